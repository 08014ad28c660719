"""Where a training run's progress goes besides its checkpoints: ``metrics.csv`` (one row per epoch, rewritten whole
so that a resumed run can drop the rows of epochs it replays), TensorBoard, the console progress bar and the epoch
line of the log."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from resnetlab.utils.io import read_csv, write_csv

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5",
                  "grad_norm", "epoch_seconds", "images_per_second", "ema_val_top1", "ema_val_loss", "best",
                  "train_input_size"]
# metrics.csv column -> TensorBoard tag
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "ema_val_loss": "loss/val_ema",
                    "train_top1": "accuracy/train_top1", "train_top5": "accuracy/train_top5",
                    "val_top1": "accuracy/val_top1", "val_top5": "accuracy/val_top5",
                    "ema_val_top1": "accuracy/val_ema_top1",
                    "lr": "optim/lr", "grad_norm": "optim/grad_norm", "images_per_second": "speed/images_per_second",
                    "epoch_seconds": "speed/epoch_seconds"}
PREVIEW_IMAGES = 64
PROGRESS_EVERY = 10  # batches between progress-bar statistics (each reads values back from the device)



class MetricsFile:
    """``metrics.csv`` of a run: :data:`METRIC_COLUMNS`, one row per finished epoch."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, row: dict) -> None:
        rows = self._read()
        rows.append({k: _fmt(row.get(k, "")) for k in METRIC_COLUMNS})
        self._write(rows)

    def truncate(self, epochs: int) -> None:
        """Drop the rows of epochs after ``epochs`` (a killed run may have logged one more than its checkpoint)."""
        self._write([r for r in self._read() if int(r["epoch"]) <= epochs])

    def _read(self) -> list[dict]:
        return read_csv(self.path) if self.path.is_file() else []

    def _write(self, rows: list[dict]) -> None:
        write_csv(self.path, rows, METRIC_COLUMNS, lineterminator="\r\n")


class TensorBoardSink:
    """The epoch's scalars under :data:`TENSORBOARD_TAGS`, and once, a grid of the first augmented batch."""

    def __init__(self, log_dir: Path, mean: tuple[float, ...], std: tuple[float, ...]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.mean, self.std = mean, std
        self._preview: torch.Tensor | None = None  # the first augmented batch this process trains on
        self._preview_written = False

    def capture_preview(self, images: torch.Tensor) -> None:
        if self._preview is None and not self._preview_written:
            self._preview = images[:PREVIEW_IMAGES].detach().float().cpu()

    def write(self, row: dict) -> None:
        for key, tag in TENSORBOARD_TAGS.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, row["epoch"])
        if self._preview is not None and not self._preview_written:
            import torchvision

            mean = torch.as_tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.as_tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            images = (self._preview.contiguous() * std + mean).clamp(0, 1)
            self.writer.add_image("augmented_batch", torchvision.utils.make_grid(images, nrow=8), row["epoch"])
            self._preview, self._preview_written = None, True
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def epoch_line(row: dict, epochs: int, out_of_time: bool = False) -> str:
    ema = f" ema_val_top1 {row['ema_val_top1']:.4f}" if isinstance(row["ema_val_top1"], float) else ""
    partial = " (partial: time budget)" if out_of_time else ""
    val = (f" val_loss {row['val_loss']:.4f} val_top1 {row['val_top1']:.4f} val_top5 {row['val_top5']:.4f}"
           if isinstance(row["val_top1"], float) else " (no validation split)")
    return (f"epoch {row['epoch']}/{epochs}{partial} lr {row['lr']:.3g} train_loss {row['train_loss']:.4f} "
            f"train_top1 {row['train_top1']:.4f} train_top5 {row['train_top5']:.4f}{val}{ema} "
            f"grad_norm {row['grad_norm']:.3g} {row['epoch_seconds']:.1f}s "
            f"{row['images_per_second']:.0f} img/s{' *best*' if row['best'] else ''}")


class Progress:
    """A progress bar for the batches of one epoch: loss, accuracy, images/s and time left.

    In a terminal, rich's bar on stderr; in a notebook, tqdm's (a widget where ipywidgets is installed, text
    otherwise: rich needs ipywidgets to draw anything there); nowhere else (a pipe, a file, a test's captured
    output), so that a script's output holds only what it prints itself.
    """

    def __init__(self, enabled: bool):
        self.bar = None  # rich, in a terminal
        self.task = None
        self.notebook_bar = None  # tqdm, in a notebook, one per epoch
        self.notebook = False
        if enabled:
            from rich.console import Console

            console = Console(stderr=True)
            self.notebook = console.is_jupyter
            enabled = console.is_terminal or self.notebook
            if enabled and not self.notebook:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=True,
                                    console=console)
                self.bar.start()
        self.enabled = enabled

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        if self.notebook and self.enabled:
            import warnings

            self._close_notebook_bar()
            with warnings.catch_warnings():  # without ipywidgets tqdm says so, then draws a text bar
                warnings.simplefilter("ignore")
                from tqdm.auto import tqdm

                self.notebook_bar = tqdm(total=batches, desc=f"epoch {epoch}/{epochs}", leave=False)
            return
        if self.bar is None:
            return
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(f"epoch {epoch}/{epochs}", total=batches, stats="")

    def advance(self, completed: int, *, loss: float, top1: float, rate: float) -> None:
        stats = f"loss {loss:.3f} top1 {top1:.3f} {rate:.0f} img/s"
        if self.notebook_bar is not None:
            self.notebook_bar.set_postfix_str(stats, refresh=False)
            self.notebook_bar.update(completed - self.notebook_bar.n)
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, stats=stats)

    def _close_notebook_bar(self) -> None:
        if self.notebook_bar is not None:
            self.notebook_bar.close()
            self.notebook_bar = None

    def close(self) -> None:
        self._close_notebook_bar()
        if self.bar is not None:
            self.bar.stop()
