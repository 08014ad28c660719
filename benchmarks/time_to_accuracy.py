"""Validation top-1 against cumulative training minutes for resnetlab runs and plain-loop runs, in one figure (#20).

Each run folder holds a ``metrics.csv``:

* a resnetlab run (``resnetlab train``): ``epoch_seconds`` and ``val_top1`` (and ``ema_val_top1`` when an EMA was
  kept); the curves come from ``resnetlab.reporting.plots.time_to_accuracy_curves``;
* a ``benchmarks/plain_gtsrb_loop.py`` run: cumulative ``train_seconds``, ``val_top1`` (its leaky random split) and
  ``holdout_top1`` (whole tracks it never saw).

Both time columns count training only, validation excluded. From the repository root::

    python benchmarks/time_to_accuracy.py --label gtsrb-fast=runs/gtsrb-fast --label plain=runs/plain-gtsrb \\
        --out docs/img/time_to_accuracy.png

A bare ``DIR`` argument is labelled with its folder name.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from resnetlab.reporting.plots import time_to_accuracy, time_to_accuracy_curves
from resnetlab.utils.io import read_csv_columns


def run_curves(label: str, run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """The curves of one run folder, keyed ``"LABEL: what"``."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        sys.exit(f"error: {path} not found")
    history = read_csv_columns(path)
    if "train_seconds" in history and "val_top1" in history:  # the plain loop
        seconds = np.asarray(history["train_seconds"], dtype=np.float64)
        curves = {"validation top-1 (random split, leaky)": {"seconds": seconds, "top1": history["val_top1"]}}
        if "holdout_top1" in history and np.isfinite(np.asarray(history["holdout_top1"], dtype=np.float64)).any():
            curves["held-out tracks top-1"] = {"seconds": seconds, "top1": history["holdout_top1"],
                                               "style": {"linestyle": "--"}}
    else:
        curves = time_to_accuracy_curves(history)
    if not curves:
        sys.exit(f"error: {path} has neither epoch_seconds nor train_seconds beside val_top1")
    return {f"{label}: {name}": curve for name, curve in curves.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders, labelled with their folder name")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=DIR", help="a labelled run folder")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--target", type=float, action="append", help="horizontal target line(s); default 0.995")
    parser.add_argument("--log-time", action="store_true", help="logarithmic time axis (runs of minutes and hours)")
    args = parser.parse_args()

    runs = [(run.name or str(run), run) for run in args.runs]
    for pair in args.label:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--label expects NAME=DIR, got {pair!r}")
        runs.append((name, Path(folder)))
    if not runs:
        parser.error("give at least one run folder (DIR or --label NAME=DIR)")
    curves = {}
    for label, run_dir in runs:
        curves.update(run_curves(label, run_dir))
    out = time_to_accuracy(curves, args.out, targets=args.target or [0.995], log_time=args.log_time)
    for name, curve in curves.items():
        top1 = np.asarray(curve["top1"], dtype=np.float64)
        print(f"{name}: {top1[-1]:.4f} after {curve['seconds'][-1] / 60:.1f} min (best {np.nanmax(top1):.4f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
