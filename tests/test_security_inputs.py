"""Hostile and careless inputs (issue 16): a dataset file never runs code, a malformed checkpoint or export record
is one line naming the file and the field, a rejected pickle never advises ``weights_only=False``, and ``data
inspect`` describes what it can and lists the rest under problems."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from resnetlab.cli.main import main
from resnetlab.config import DataConfig
from resnetlab.data.datasets import open_dataset
from resnetlab.errors import DataError
from tests.test_data_formats import make_cifar10_batches


def _error_line(capsys) -> str:
    """stderr of a command that must have failed with one line and no traceback; that line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# CIFAR batches are read without running code
# ---------------------------------------------------------------------------------------------------------------


class _RunsShell:
    """Unpickling this calls os.system, as the crafted batch of the issue did."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _RunsPython:
    """Unpickling this calls builtins.exec on a line that writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _plant(folder, name, payload, where):
    """Put ``payload`` in the batch file ``name``: as its labels, or as the whole pickled object."""
    path = folder / name
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")  # the test's own, trusted file
    obj = payload if where == "whole" else {**batch, "labels": payload}
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


@pytest.mark.parametrize("payload", [_RunsShell, _RunsPython])
@pytest.mark.parametrize(("batch", "where"), [("data_batch_2", "labels"), ("test_batch", "whole"),
                                              ("batches.meta", "whole")])
def test_a_crafted_cifar_batch_never_runs_code_when_opened(tmp_path, payload, batch, where):
    folder, _ = make_cifar10_batches(tmp_path / "data")
    marker = tmp_path / "code-ran"
    _plant(folder, batch, payload(marker), where)
    with pytest.raises(DataError) as err:
        open_dataset(DataConfig(spec=f"cifar10:{tmp_path / 'data'}"))
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and str(folder / batch) in message and "not a CIFAR batch" in message
    refused = "system" if payload is _RunsShell else "exec"
    assert refused in message


def test_data_inspect_of_a_crafted_cifar_batch_is_one_line_and_runs_nothing(tmp_path, capsys):
    folder, _ = make_cifar10_batches(tmp_path / "data")
    marker = tmp_path / "code-ran"
    _plant(folder, "data_batch_1", _RunsShell(marker), "labels")
    assert main(["data", "inspect", f"cifar10:{tmp_path / 'data'}"]) == 2
    assert not marker.exists()
    line = _error_line(capsys)
    assert "data_batch_1" in line and "not a CIFAR batch" in line


def test_published_style_batches_still_load(tmp_path):
    """Python 2 pickles (str keys), Python 3 protocol-2 pickles (bytes keys, through _codecs.encode), numpy scalars
    and protocol-5 arrays are what real and re-saved batches hold; all of them load."""
    folder, arrays = make_cifar10_batches(tmp_path / "bytes-keys")
    source = open_dataset(DataConfig(spec=f"cifar10:{folder}"))
    assert len(source.splits["train"]) == 20 and source.class_names[0] == "airplane"

    resaved = tmp_path / "resaved" / "cifar-10-batches-py"
    resaved.mkdir(parents=True)
    for name, (data, labels) in arrays.items():
        batch = {"batch_label": name, "data": data, "filenames": [f"{i}.png" for i in range(len(labels))],
                 "labels": [np.int64(label) for label in labels]}  # numpy scalars, as a re-saved batch may hold
        with open(resaved / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=5)
    again = open_dataset(DataConfig(spec=f"cifar10:{resaved}"))
    assert again.splits["train"].labels.tolist() == source.splits["train"].labels.tolist()
