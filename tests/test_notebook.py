"""``examples/quickstart.ipynb`` runs from top to bottom in a fresh Jupyter kernel (nbclient), and is committed with
its outputs cleared.

The notebook trains the demo for 8 epochs on a smaller synthetic set (50 images per class, where the model gets about
half the test images right), then evaluates it. Its execution took 29 s on the 2-core development machine at load
0.8 (2026-12-02 23:59 UTC; 135 s at load 3.7 beside other test runs), so it stays in the default suite.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tools are absent: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="the notebook tools are absent: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, \
            f"code cell {i + 1} of {NOTEBOOK.name} has outputs: clear them before committing (jupyter nbconvert " \
            "--clear-output --inplace examples/quickstart.ipynb)"


def _text(outputs) -> str:
    parts = []
    for output in outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output:
            parts.append(output.data.get("text/plain", ""))
    return "\n".join(parts)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel", reason="no Jupyter kernel: pip install -e '.[dev]'")
    # the kernel imports this checkout's resnetlab and uses the test session's cache (RESNETLAB_CACHE_DIR)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's run folder (tempfile.mkdtemp) goes here
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    sources = [cell.source for cell in code]
    train = code[next(i for i, s in enumerate(sources) if "rl.train(" in s)]
    assert "Run(" in _text(train.outputs) and "top1=" in _text(train.outputs)
    assert not [o for o in train.outputs if o.output_type == "stream" and o.name == "stdout"], \
        "rl.train printed to stdout: the library must log, not print"
    metrics = code[next(i for i, s in enumerate(sources) if "run.metrics[key]" in s)]
    shown = ast.literal_eval(_text(metrics.outputs))
    assert shown["top1"] > 0.2, f"the quickstart's model is near chance (1/11): {shown}"
    plot = code[next(i for i, s in enumerate(sources) if "plt.subplots" in s)]
    assert any("image/png" in o.get("data", {}) for o in plot.outputs), "the history plot was not drawn"
    predict = code[next(i for i, s in enumerate(sources) if "prediction.topk" in s)]
    assert "true:" in _text(predict.outputs)
    evaluate = code[next(i for i, s in enumerate(sources) if "rl.evaluate(" in s)]
    assert "Evaluation(" in _text(evaluate.outputs)
    assert (ROOT / "examples" / "quickstart.ipynb").read_text() == NOTEBOOK.read_text()  # nothing written back
