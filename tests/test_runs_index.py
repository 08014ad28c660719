"""Runs as a collection: ``rl.runs`` / ``resnetlab runs`` over real tiny runs, their statuses, JSON and the
sortable index page (checked in headless Chromium)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from resnetlab.cli.main import main
from resnetlab.config import build_config
from resnetlab.errors import ConfigError
from resnetlab.jobs.train import train_job
from resnetlab.recipes import load_recipe
from resnetlab.reporting.runs_index import find_run_dirs, runs, summarize_run, write_runs_html
from resnetlab.utils.io import read_json, write_json


def _tiny_run(data: Path, out: Path, *, epochs: int, model: str) -> Path:
    cfg = build_config(load_recipe("demo"), {"data.spec": f"gtsrb:{data}", "model.name": model,
                                              "train.epochs": epochs},
                       ["data.batch_size=32", "train.threads=1", "train.max_steps_per_epoch=2", "eval.gradcam=false",
                        "eval.deployment_check=false", "logging.quiet=true"])
    return train_job(cfg, out)


def _shift_start(run: Path, hours: float) -> None:
    """Make a copied run look as if it started ``hours`` after the original (a copy shares its stamps)."""
    info_file = run / "run_info.json"
    if info_file.is_file():
        info = read_json(info_file)
        info["start_time"] = (datetime.fromisoformat(info["start_time"]) + timedelta(hours=hours)).isoformat()
        write_json(info_file, info)
    log = run / "train.log"
    first, rest = log.read_text().split("\n", 1)
    stamp = datetime.strptime(first[:19], "%Y-%m-%d %H:%M:%S") + timedelta(hours=hours)
    log.write_text(stamp.strftime("%Y-%m-%d %H:%M:%S") + first[19:] + "\n" + rest)


@pytest.fixture(scope="module")
def runs_root(tiny_signs, tmp_path_factory) -> Path:
    """Two finished runs (the second started later), and copies of the first cut down to what a run killed at
    each stage leaves, a damaged one, a nested one (a tune's refit) and an --overwrite leftover."""
    root = tmp_path_factory.mktemp("runs")
    first = _tiny_run(tiny_signs, root / "first", epochs=1, model="simple_cnn")
    _tiny_run(tiny_signs, root / "second", epochs=2, model="simple_cnn")

    resumable = root / "killed-while-testing"
    shutil.copytree(first, resumable)
    for name in ("eval", "plots"):
        shutil.rmtree(resumable / name, ignore_errors=True)
    for name in ("run_info.json", "report.md", "report.html"):
        (resumable / name).unlink()
    _shift_start(resumable, 1)

    interrupted = root / "killed-in-epoch-1"
    shutil.copytree(resumable, interrupted)
    shutil.rmtree(interrupted / "checkpoints")
    (interrupted / "metrics.csv").unlink()
    _shift_start(interrupted, 1)

    damaged = root / "damaged"
    shutil.copytree(first, damaged)
    (damaged / "run_info.json").write_text('{"start_time": "2026-')  # cut short by a full disk
    nested = root / "photos-tune" / "refit"
    shutil.copytree(first, nested)
    _shift_start(nested, -1)
    shutil.copytree(first, root / ".second.new-4242")  # an --overwrite in progress: not a run of its own
    (root / "notes").mkdir()
    (root / "notes" / "config.yaml").write_text("a config.yaml alone is not a run\n")
    return root


def test_runs_lists_every_run_with_its_status_newest_first(runs_root, caplog):
    with caplog.at_level("WARNING", logger="resnetlab"):
        found = runs(runs_root)
    by_name = {summary.dir.name: summary for summary in found}
    assert set(by_name) == {"first", "second", "killed-while-testing", "killed-in-epoch-1", "damaged", "refit"}
    assert {name: s.status for name, s in by_name.items()} == {
        "first": "finished", "second": "finished", "killed-while-testing": "resumable",
        "killed-in-epoch-1": "interrupted", "damaged": "damaged", "refit": "finished"}
    assert "run_info.json is not valid JSON" in by_name["damaged"].problem
    assert any("damaged" in record.getMessage() for record in caplog.records)

    first, second = by_name["first"], by_name["second"]
    info = read_json(runs_root / "second" / "run_info.json")
    metrics = read_json(runs_root / "second" / "eval" / "metrics.json")
    assert (second.recipe, second.model, second.epochs, second.epochs_planned) == ("demo", "simple_cnn", 2, 2)
    assert second.data.startswith("gtsrb:") and second.train_seconds == pytest.approx(info["train_seconds"])
    assert second.test_top1 == pytest.approx(metrics["top1"]) and 0 <= second.val_top1 <= 1
    assert first.epochs == 1 and first.report_path == runs_root / "first" / "report.html"
    killed = by_name["killed-while-testing"]
    assert killed.epochs == 1 and killed.test_top1 is None and killed.val_top1 == first.val_top1
    assert by_name["killed-in-epoch-1"].epochs is None

    started = [s.started for s in found if s.status != "damaged"]
    assert started == sorted(started, reverse=True)
    order = [s.dir.name for s in found]
    assert order.index("killed-in-epoch-1") < order.index("killed-while-testing") < order.index("first")
    assert order.index("second") < order.index("first") and order.index("first") < order.index("refit")
    assert "simple_cnn" in repr(second) and "test top-1" in repr(second) and "finished" in repr(second)


def test_find_run_dirs_skips_hidden_and_refuses_a_missing_root(runs_root, tmp_path):
    assert not any(part.startswith(".") for path in find_run_dirs(runs_root) for part in path.relative_to(runs_root).parts)
    assert runs(tmp_path) == []
    with pytest.raises(ConfigError, match="is not a folder"):
        runs(tmp_path / "absent")
    # A folder that is not even readable as a run summarizes as damaged, never raises.
    assert summarize_run(tmp_path / "absent").status == "damaged"


def test_cli_runs_json_and_a_bad_folder(runs_root, capsys):
    assert main(["runs", str(runs_root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [Path(row["dir"]).name for row in listed] == [s.dir.name for s in runs(runs_root)]
    second = next(row for row in listed if Path(row["dir"]).name == "second")
    assert second["status"] == "finished" and second["model"] == "simple_cnn" and second["epochs"] == 2
    assert second["report"].endswith("report.html") and datetime.fromisoformat(second["started"]).tzinfo
    assert main(["runs", str(runs_root / "absent")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_cli_runs_table_and_html_page(runs_root, tmp_path, capsys):
    page = tmp_path / "site" / "index.html"
    assert main(["runs", str(runs_root), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "killed-while-testing" in out and "resumable" in out and str(page) in out
    html = page.read_text()
    assert "<script>" in html and "http" not in html.replace("http-equiv", "")  # self-contained
    # Relative links that resolve to each finished run's report.
    for name in ("first", "second"):
        link = next(part.split('"')[0] for part in html.split('href="')[1:] if f"{name}/report.html" in part)
        assert not link.startswith("/") and (page.parent / link).resolve() == (runs_root / name / "report.html").resolve()
    assert not list(page.parent.glob(".*.tmp"))


def _chromium():
    from tests.test_deploy_service import _chromium as find

    return find()


def test_html_page_sorts_by_a_clicked_column_in_headless_chromium(runs_root, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found (install Debian's chromium or set RESNETLAB_CHROMIUM): the page test needs one")
    from tests.test_deploy_service import DevTools

    page = write_runs_html(runs(runs_root), tmp_path / "index.html")
    column = "Array.from(document.querySelectorAll('#runs tbody tr')).map(r => r.cells[{}].dataset.value)"
    browser = DevTools(binary, tmp_path / "profile")
    try:
        browser.open(page.as_uri())
        browser.wait_for("document.readyState === 'complete' && document.querySelectorAll('#runs tbody tr').length")
        before = browser.evaluate(f"JSON.stringify({column.format(1)})")
        headers = browser.evaluate("JSON.stringify(Array.from(document.querySelectorAll('#runs th')).map(h => h.textContent))")
        epochs_index = json.loads(headers).index("epochs")
        browser.evaluate(f"document.querySelectorAll('#runs th')[{epochs_index}].click()")
        ascending = json.loads(browser.evaluate(f"JSON.stringify({column.format(epochs_index)})"))
        browser.evaluate(f"document.querySelectorAll('#runs th')[{epochs_index}].click()")
        descending = json.loads(browser.evaluate(f"JSON.stringify({column.format(epochs_index)})"))
        after = browser.evaluate(f"JSON.stringify({column.format(1)})")
    finally:
        browser.close()
    numbers = [float(v) for v in ascending if v != ""]
    assert numbers == sorted(numbers) and numbers[-1] == 2 and ascending[-1] == ""  # empty cells last
    assert [float(v) for v in descending if v != ""] == sorted(numbers, reverse=True)
    assert before != after  # the rows moved
