"""A run SIGKILLed again and again, at random moments and in the middle of checkpoint writes, and resumed each time
with ``resnetlab train --resume`` ends with the very metrics of a run that was never interrupted (CPU,
``train.deterministic=true``, one thread; timing columns aside).

The kill moments come from a seeded generator, so a failure repeats. Random delays land anywhere (start-up, data,
an epoch, a checkpoint write, evaluation, the report); two kills are placed exactly: the process kills itself the
moment the temporary file of a ``checkpoints/last.pt`` write exists, once while it is still empty and once when it
holds the whole checkpoint but has not been renamed over ``last.pt`` yet.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from resnetlab.cli.main import main

pytestmark = pytest.mark.slow

EPOCHS = 5
SEED = 20261202
TIME_COLUMNS = {"epoch_seconds", "images_per_second"}

# `resnetlab` with one change: the process SIGKILLs itself during the N-th write of checkpoints/last.pt (0: never),
# right after the temporary file appears (empty) or, with KILL_WHEN=full, once the checkpoint is in it.
CHILD = """
import contextlib, os, signal, sys
from pathlib import Path
from resnetlab.utils import io

kill_at, when = int(os.environ.get("KILL_AT_WRITE", "0")), os.environ.get("KILL_WHEN", "empty")
writes = 0
original = io.atomic_write

@contextlib.contextmanager
def atomic_write(path, mode="w", **kwargs):
    global writes
    with original(path, mode, **kwargs) as handle:
        dying = Path(path).name == "last.pt" and (writes := writes + 1) == kill_at
        if dying and when == "empty":
            os.kill(os.getpid(), signal.SIGKILL)
        yield handle
        if dying:
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

io.atomic_write = atomic_write
from resnetlab.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_args(tiny_signs: Path, out: Path) -> list[str]:
    return ["train", "--recipe", "demo", "--data", f"gtsrb:{tiny_signs}", "--epochs", str(EPOCHS), "--batch-size",
            "32", "--out", str(out), "--quiet", "train.deterministic=true", "train.threads=1", "train.ema=true",
            "eval.gradcam=false"]


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(handle)]


def eval_metrics(run: Path) -> dict:
    return json.loads((run / "eval" / "metrics.json").read_text())


def start(args: list[str], *, kill_at_write: int = 0, when: str = "empty") -> subprocess.Popen:
    env = {**os.environ, "KILL_AT_WRITE": str(kill_at_write), "KILL_WHEN": when}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, *, kill_after: float | None = None, timeout: float = 300) -> int:
    """Wait for ``process`` (SIGKILLing it after ``kill_after`` seconds); its return code."""
    try:
        process.wait(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            raise
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    assert process.returncode in (0, -signal.SIGKILL), f"exit {process.returncode}: {stderr}"
    return process.returncode


def next_args(tiny_signs: Path, out: Path) -> list[str]:
    """How to go on after a kill: resume from the last checkpoint, or start again when there is none yet."""
    if (out / "checkpoints" / "last.pt").is_file():
        return ["train", "--resume", str(out), "--quiet"]
    if out.is_dir() and not (out / "config.yaml").is_file():
        shutil.rmtree(out)  # killed before the run wrote anything that makes it a run
    return run_args(tiny_signs, out) + (["--overwrite"] if out.is_dir() else [])


def test_sigkills_at_random_points_then_resume_reproduce_the_uninterrupted_run(tiny_signs, tmp_path):
    reference = tmp_path / "uninterrupted"
    assert main(run_args(tiny_signs, reference)) == 0

    out = tmp_path / "killed"
    rng = random.Random(SEED)
    # (kind, argument): a random delay in seconds, or the write of last.pt (counted in that process) to die in
    plan = [("delay", rng.uniform(3, 9)), ("write-empty", rng.randint(1, 2)), ("delay", rng.uniform(3, 9)),
            ("write-full", rng.randint(1, 2)), ("delay", rng.uniform(3, 12)), ("delay", rng.uniform(3, 12))]
    kills = []
    for kind, argument in plan:
        args = next_args(tiny_signs, out)
        if kind == "delay":
            code = finish(start(args), kill_after=argument)
        else:
            when = kind.split("-")[1]
            code = finish(start(args, kill_at_write=argument, when=when))
            if code == -signal.SIGKILL:
                # in the run, or in the new run an --overwrite start writes beside it
                leftovers = list(tmp_path.glob("*killed*/checkpoints/.last.pt.*.tmp"))
                assert leftovers, f"killed at a write of last.pt ({when}) but no temporary file is left"
                if when == "full":
                    assert leftovers[0].stat().st_size > 0
        if code == -signal.SIGKILL:
            kills.append(kind)
        else:
            break  # finished before the kill came
    assert "write-empty" in kills and "write-full" in kills and len(kills) >= 4, kills

    for _ in range(3):  # the last runs finish unless a kill above came in the last instant of one
        if (out / "eval" / "metrics.json").is_file() and (out / "report.html").is_file():
            break
        assert finish(start(next_args(tiny_signs, out))) == 0
    assert metric_rows(out) == metric_rows(reference)
    assert eval_metrics(out) == eval_metrics(reference)
    assert not list(out.rglob(".*.tmp"))
