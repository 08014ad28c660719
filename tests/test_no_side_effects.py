"""The library logs and never prints, and importing it changes nothing outside it.

Importing every module leaves Pillow's pixel limit, Optuna's verbosity, the root logger, torch's thread count and
the process's output as they were; a run called from Python writes nothing to stdout while its ``train.log`` has
its usual lines; ``RunLog`` is a ``logging`` sink that each run attaches for its own file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from resnetlab.errors import DataError
from resnetlab.utils.runlog import RunLog

SRC = Path(__file__).resolve().parents[1] / "src"

_IMPORT_ALL = textwrap.dedent("""
    import io, json, logging, pkgutil, sys, contextlib
    import optuna, torch
    from PIL import Image

    def state():
        library = logging.getLogger("resnetlab")
        return {"pillow_max_pixels": Image.MAX_IMAGE_PIXELS, "optuna_verbosity": optuna.logging.get_verbosity(),
                "root_handlers": [type(h).__name__ for h in logging.getLogger().handlers],
                "root_level": logging.getLogger().level, "torch_threads": torch.get_num_threads(),
                "library_handlers": [type(h).__name__ for h in library.handlers
                                     if not isinstance(h, logging.NullHandler)],
                "library_level": library.level}

    before = state()
    out, err = io.StringIO(), io.StringIO()
    failed, names = [], []
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        import resnetlab
        for info in pkgutil.walk_packages(resnetlab.__path__, "resnetlab.", onerror=failed.append):
            if info.name == "resnetlab.__main__":  # running it is its purpose
                continue
            try:
                __import__(info.name)
                names.append(info.name)
            except Exception as error:
                failed.append(f"{info.name}: {error!r}")
        # Nothing configured (a notebook): the library's warnings are not printed by Python's last resort either.
        logging.getLogger("resnetlab.reporting.runs_index").warning("not shown unless asked for")
    print(json.dumps({"before": before, "after": state(), "out": out.getvalue(), "err": err.getvalue(),
                      "failed": [str(f) for f in failed], "imported": names}))
""")


def test_importing_every_module_changes_nothing_outside_the_library():
    result = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not report["failed"]
    assert len(report["imported"]) > 50 and "resnetlab.tuning.study" in report["imported"]
    assert report["after"] == report["before"]
    assert report["out"] == "" and report["err"] == ""
    assert result.stderr == ""


@pytest.fixture
def library_logger():
    """The ``resnetlab`` logger, restored after a test that configures it as an application would."""
    logger = logging.getLogger("resnetlab")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_a_run_from_python_prints_nothing_and_keeps_its_train_log(tiny_signs, tmp_path, capfd, library_logger):
    from resnetlab.config import build_config
    from resnetlab.jobs.train import train_job
    from resnetlab.recipes import load_recipe

    library_logger.setLevel(logging.NOTSET)  # as in a fresh notebook: nothing configured
    cfg = build_config(load_recipe("demo"), {"data.spec": f"gtsrb:{tiny_signs}", "model.name": "simple_cnn",
                                              "train.epochs": 1},
                       ["data.batch_size=32", "train.threads=1", "train.max_steps_per_epoch=2", "eval.gradcam=false",
                        "eval.deployment_check=false"])
    capfd.readouterr()
    out = train_job(cfg, tmp_path / "run")
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "test top-1" not in captured.err and "model simple_cnn" not in captured.err
    log = (out / "train.log").read_text()
    lines = log.splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
    assert lines and all(stamp.match(line) for line in lines if not line.startswith(" "))
    for expected in ("resnetlab ", "classes (", "model simple_cnn:", "epoch 1/1", "training stopped:", "test top-1",
                     "report:"):
        assert any(line[20:].startswith(expected) for line in lines), expected
    # The file handler was the run's alone: it is gone once the run has ended.
    assert not [h for h in library_logger.handlers if isinstance(h, logging.FileHandler)]


def test_runlog_is_a_logging_sink_each_run_keeps_its_own_file(tmp_path, capsys, library_logger):
    from resnetlab.cli.logging_setup import console_logging

    outer = RunLog(None)
    outer("checked the data")  # before the folder exists: kept, then written first
    outer.attach(tmp_path / "outer.log")
    logging.getLogger("resnetlab.data.build").warning("a library warning")
    undo = console_logging()
    try:
        outer("shown on the console")
        inner = RunLog(tmp_path / "inner.log")  # a trial inside a tune
        inner("a trial's line")
        inner.close()
        quiet = RunLog(tmp_path / "quiet.log", quiet=True)
        quiet("quiet: file only")
        quiet.close()
    finally:
        undo()
    outer("after the command")
    outer.close()
    outer_text = (tmp_path / "outer.log").read_text()
    assert [line[20:] for line in outer_text.splitlines()] == [
        "checked the data", "a library warning", "shown on the console", "after the command"]
    assert (tmp_path / "inner.log").read_text().endswith(" a trial's line\n")
    assert (tmp_path / "quiet.log").read_text().endswith(" quiet: file only\n")
    err = capsys.readouterr().err
    assert "shown on the console" in err and "a trial's line" in err
    assert "quiet: file only" not in err and "after the command" not in err and "checked the data" not in err
    assert library_logger.handlers == [h for h in library_logger.handlers if not isinstance(h, logging.FileHandler)]


def test_distributed_ranks_other_than_0_log_nowhere(tmp_path, library_logger):
    log = RunLog(None, enabled=False)
    log.attach(tmp_path / "train.log")
    log("rank 1")
    log.close()
    assert not (tmp_path / "train.log").exists()


def test_the_pixel_limit_is_resnetlabs_own_and_pillows_is_left_alone(tmp_path):
    from resnetlab.data.preprocessing import MAX_IMAGE_PIXELS, load_image

    pillow_limit = Image.MAX_IMAGE_PIXELS
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    Image.new("1", (side, side)).save(tmp_path / "huge.png")  # a few kB on disk, 64 megapixels decoded
    with pytest.raises(DataError, match=f"too large \\(over {MAX_IMAGE_PIXELS:,} pixels\\)"):
        load_image(tmp_path / "huge.png")
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


def test_optuna_logging_is_scoped_to_the_search():
    import optuna

    from resnetlab.tuning.study import optuna_logging

    previous = optuna.logging.get_verbosity()
    with optuna_logging():
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    assert optuna.logging.get_verbosity() == previous
