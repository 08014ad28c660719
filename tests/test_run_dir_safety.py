"""Nothing is deleted before it is safe: `train --overwrite` checks the config and the data before it touches the
output, replaces only a resnetlab run (and only once the new run has finished), and `evaluate` never writes over
a run's own test results.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from resnetlab.cli.main import main
from tests.test_data_bad_input import make_folder_with_bad_files

TINY = ["--epochs", "1", "--batch-size", "32", "--quiet", "train.threads=1", "eval.gradcam=false"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


@pytest.fixture(scope="module")
def old_run(tiny_signs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("old") / "run"
    assert main(["train", "--data", f"gtsrb:{tiny_signs}", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run_copy(old_run, tmp_path) -> Path:
    """A private copy of the trained run, in a folder of its own (so its siblings can be checked)."""
    copy = tmp_path / "runs" / "run"
    shutil.copytree(old_run, copy)
    return copy


def _bad_folder_data(tmp_path: Path) -> str:
    make_folder_with_bad_files(tmp_path / "bad")
    return f"folder:{tmp_path / 'bad'}"


@pytest.mark.parametrize("case", ["missing data", "unknown model", "corrupt image", "bad override"])
def test_overwrite_with_bad_input_keeps_the_old_run(run_copy, tiny_signs, tmp_path, capsys, case):
    before = snapshot(run_copy)
    args = {
        "missing data": lambda: ["--data", f"folder:{tmp_path / 'no-such-folder'}"],
        "unknown model": lambda: ["--data", f"gtsrb:{tiny_signs}", "--model", "resnet_nonexistent"],
        "corrupt image": lambda: ["--data", _bad_folder_data(tmp_path), "data.on_bad_image=error"],
        "bad override": lambda: ["--data", f"gtsrb:{tiny_signs}", "data.batch_size=many"],
    }[case]()
    assert main(["train", *args, "--out", str(run_copy), "--overwrite", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert snapshot(run_copy) == before
    assert siblings(run_copy) == []


def test_bad_input_creates_no_run_folder(tmp_path):
    out = tmp_path / "runs" / "new"
    assert main(["train", "--data", f"folder:{tmp_path / 'missing'}", "--out", str(out), *TINY]) == 2
    assert not out.exists()


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_signs, tmp_path, capsys):
    mine = tmp_path / "my_files"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.txt").write_text("four years of work\n")
    (mine / "config.yaml").write_text("someone: else\n")  # one marker name alone does not make a run
    before = snapshot(mine)
    assert main(["train", "--data", f"gtsrb:{tiny_signs}", "--out", str(mine), "--overwrite", *TINY]) == 2
    err = capsys.readouterr().err
    assert "not a resnetlab run" in err and "will not delete" in err
    assert snapshot(mine) == before


def test_overwrite_refuses_a_run_that_holds_the_users_own_files(run_copy, tiny_signs, capsys):
    """--overwrite deletes a run's own files, nothing else: a note or a dataset put into a run folder stays."""
    (run_copy / "my_notes.txt").write_text("what I learnt from this run\n")
    before = snapshot(run_copy)
    assert main(["train", "--data", f"gtsrb:{tiny_signs}", "--out", str(run_copy), "--overwrite", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "my_notes.txt" in err and "move those out" in err, err
    assert snapshot(run_copy) == before


def test_an_interrupted_overwrite_is_cleared_by_the_next_run(run_copy, tiny_signs):
    """A killed --overwrite leaves .NAME.new-PID behind (and, killed between its renames, the old run in
    .NAME.old-PID with --out missing): the next run removes the half-written one and puts the old run back."""
    dead_pid = 2 ** 22 + 12345  # above the default pid_max: never a live process
    before = snapshot(run_copy)
    half_written = run_copy.parent / f".run.new-{dead_pid}"
    (half_written / "checkpoints").mkdir(parents=True)
    (half_written / "config.yaml").write_text("half: written\n")
    moved_aside = run_copy.parent / f".run.old-{dead_pid}"
    run_copy.rename(moved_aside)
    assert main(["train", "--data", f"gtsrb:{tiny_signs}", "--out", str(run_copy), *TINY]) == 2  # not empty again
    assert snapshot(run_copy) == before
    assert siblings(run_copy) == []


def test_overwrite_replaces_the_run_and_leaves_no_siblings(run_copy, tiny_signs):
    old_info = json.loads((run_copy / "run_info.json").read_text())
    (run_copy / "checkpoints" / "epoch_099.pt").write_bytes(b"a file of the old run only")
    assert main(["train", "--data", f"gtsrb:{tiny_signs}", "--out", str(run_copy), "--overwrite", "--seed", "7",
                 *TINY]) == 0
    new_info = json.loads((run_copy / "run_info.json").read_text())
    assert new_info["start_time"] >= old_info["start_time"]
    assert "seed: 7" in (run_copy / "config.yaml").read_text()
    assert not (run_copy / "checkpoints" / "epoch_099.pt").exists()
    assert (run_copy / "eval" / "metrics.json").is_file()
    assert siblings(run_copy) == []


def test_a_failed_new_run_leaves_the_old_one(run_copy, tiny_signs):
    """A run that dies during training (here: stopped by an error after its first epoch) replaces nothing."""
    from resnetlab.config import build_config
    from resnetlab.jobs.train import train_job
    from resnetlab.recipes import load_recipe

    before = snapshot(run_copy)
    cfg = build_config(load_recipe("demo"), {"data.spec": f"gtsrb:{tiny_signs}", "train.epochs": 2,
                                             "logging.quiet": True}, ["train.threads=1", "data.batch_size=32"])

    def die(epoch, row):
        raise RuntimeError("killed mid-run")

    with pytest.raises(RuntimeError):
        train_job(cfg, run_copy, overwrite=True, on_epoch_end=die)
    assert snapshot(run_copy) == before
    assert siblings(run_copy) == []


def test_tune_overwrite_refuses_a_folder_that_is_not_a_tune(tiny_signs, tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "a.txt").write_text("mine\n")
    code = main(["tune", "--data", f"gtsrb:{tiny_signs}", "--grid", "optim.lr=0.01,0.02", "--folds", "2",
                 "--out", str(mine), "--overwrite", "--quiet"])
    assert code == 2
    assert "not a resnetlab tune folder" in capsys.readouterr().err
    assert (mine / "a.txt").read_text() == "mine\n"


def test_tune_overwrite_with_bad_data_keeps_the_earlier_tune(tmp_path):
    earlier = tmp_path / "tune"
    earlier.mkdir()
    (earlier / "tune.log").write_text("an earlier search\n")
    (earlier / "trials.csv").write_text("trial,mean\n0,0.9\n")
    before = snapshot(earlier)
    code = main(["tune", "--data", f"folder:{tmp_path / 'missing'}", "--grid", "optim.lr=0.01,0.02", "--folds", "2",
                 "--out", str(earlier), "--overwrite", "--quiet"])
    assert code == 2
    assert snapshot(earlier) == before


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_never_writes_over_the_runs_own_results(run_copy, tiny_signs, capsys):
    own = run_copy / "eval"
    before = snapshot(own)
    checkpoint = str(run_copy / "checkpoints" / "best.pt")
    # by default: a folder of its own under evaluations/
    assert main(["evaluate", checkpoint, "--data", f"gtsrb:{tiny_signs}", "--split", "all"]) == 0
    made = list((run_copy / "evaluations").iterdir())
    assert len(made) == 1 and (made[0] / "metrics.json").is_file()
    assert made[0].name.startswith(f"gtsrb-{tiny_signs.name}-all-")
    assert json.loads((made[0] / "metrics.json").read_text())["split"] == "all"
    assert snapshot(own) == before
    # into the run's eval/: refused without --overwrite, with one line
    capsys.readouterr()
    assert main(["evaluate", checkpoint, "--data", f"gtsrb:{tiny_signs}", "--split", "all", "--out", str(own)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err, err
    assert snapshot(own) == before
    # with --overwrite it is the user's explicit choice
    assert main(["evaluate", checkpoint, "--data", f"gtsrb:{tiny_signs}", "--split", "all", "--out", str(own),
                 "--overwrite"]) == 0
    assert json.loads((own / "metrics.json").read_text())["split"] == "all"


def _corrupt_test_images(tiny_signs: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the tiny set whose test split has one truncated PNG and one zero-byte file."""
    copy = tmp_path / "signs"
    shutil.copytree(tiny_signs, copy)
    tests = sorted((copy / "Test").glob("*.png"))
    truncated, empty = tests[0], tests[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    empty.write_bytes(b"")
    return copy, [truncated.name, empty.name]


def test_evaluate_skips_images_that_fail_to_decode(run_copy, tiny_signs, tmp_path, capsys):
    data, broken = _corrupt_test_images(tiny_signs, tmp_path)
    checkpoint = str(run_copy / "checkpoints" / "best.pt")
    total = len(list((data / "Test").glob("*.png")))
    out = tmp_path / "skip"
    assert main(["evaluate", checkpoint, "--data", f"gtsrb:{data}", "--out", str(out),
                 "data.on_bad_image=skip"]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == total - 2
    err = capsys.readouterr().err
    assert "skipped 2" in err and all(name in err for name in broken), err

    assert main(["evaluate", checkpoint, "--data", f"gtsrb:{data}", "--out", str(tmp_path / "error"),
                 "data.on_bad_image=error"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and broken[0] in err and "to evaluate without them" in err, err


@pytest.mark.slow
def test_overwrite_under_torchrun_replaces_the_run(run_copy, tiny_signs):
    """Two processes agree on the folder the new run is written into (rank 0 chooses it), and it replaces the run."""
    import os
    import subprocess
    import sys

    args = ["train", "--data", f"gtsrb:{tiny_signs}", "--model", "simple_cnn", "--out", str(run_copy), "--overwrite",
            "--seed", "5", "train.max_steps_per_epoch=2", *TINY]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "resnetlab", *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run_copy / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert "seed: 5" in (run_copy / "config.yaml").read_text()
    assert (run_copy / "eval" / "metrics.json").is_file()
    assert siblings(run_copy) == []
