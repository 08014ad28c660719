"""Matplotlib figures for reports, one function per plot: data in, PNG path out.

Figures are built with :class:`matplotlib.figure.Figure` directly rather than ``pyplot``: no global figure state,
no GUI backend, and PNGs are rendered by Agg whatever backend the caller has selected. Each function takes plain
arrays (as read from the run directory's CSV/JSON files) and writes its PNG atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from PIL import Image

from resnetlab.utils.io import atomic_write_bytes

DPI = 110
CORRECT_COLOR = "#2e7d32"
WRONG_COLOR = "#c62828"


def short_label(name: str, max_chars: int = 32) -> str:
    """Shorten a long class name for tick labels and captions, marking the cut with an ellipsis."""
    name = str(name)
    return name if len(name) <= max_chars else name[: max_chars - 1].rstrip() + "\u2026"


def _save(figure: Figure, out_path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return atomic_write_bytes(Path(out_path), buffer.getvalue())


def _as_float_array(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def training_curves(history: Mapping[str, Sequence[float]], out_path: Path, *, best_epoch: int | None = None) -> Path:
    """Loss, accuracy, learning rate and the train-minus-val accuracy gap per epoch (columns of ``metrics.csv``)."""
    epochs = _as_float_array(history["epoch"])
    figure = Figure(figsize=(11, 7.5))
    (ax_loss, ax_acc), (ax_lr, ax_gap) = figure.subplots(2, 2, sharex=True)

    def plot(axis, column, label, **style):
        if column in history and np.isfinite(_as_float_array(history[column])).any():
            axis.plot(epochs, _as_float_array(history[column]), label=label, marker="o", markersize=3, **style)

    plot(ax_loss, "train_loss", "train")
    plot(ax_loss, "val_loss", "val")
    ax_loss.set_title("Loss")
    plot(ax_acc, "train_top1", "train top-1", color="#1f78b4")
    plot(ax_acc, "val_top1", "val top-1", color="#ff7f00")
    plot(ax_acc, "train_top5", "train top-5", color="#1f78b4", linestyle="--")
    plot(ax_acc, "val_top5", "val top-5", color="#ff7f00", linestyle="--")
    plot(ax_acc, "ema_val_top1", "EMA val top-1", color="#33a02c", linestyle=":")
    ax_acc.set_title("Accuracy")
    plot(ax_lr, "lr", "learning rate", color="#6a3d9a")
    if "lr" in history:
        lr = _as_float_array(history["lr"])
        if (lr > 0).all() and lr.max() / lr.min() > 20:
            ax_lr.set_yscale("log")
    ax_lr.set_title("Learning rate")
    if "train_top1" in history and "val_top1" in history:
        gap = _as_float_array(history["train_top1"]) - _as_float_array(history["val_top1"])
        ax_gap.plot(epochs, gap, marker="o", markersize=3, color="#b15928", label="train - val top-1")
        ax_gap.axhline(0.0, color="0.5", linewidth=0.8)
    ax_gap.set_title("Generalization gap (train top-1 minus val top-1)")
    for axis in (ax_loss, ax_acc, ax_lr, ax_gap):
        if best_epoch is not None:
            axis.axvline(best_epoch, color="0.4", linestyle="--", linewidth=0.9, label=f"best epoch {best_epoch}")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    ax_lr.set_xlabel("epoch")
    ax_gap.set_xlabel("epoch")
    figure.tight_layout()
    return _save(figure, out_path)


def time_to_accuracy(curves: Mapping[str, Mapping[str, Sequence[float]]], out_path: Path, *,
                     targets: Sequence[float] = (), log_time: bool = False) -> Path:
    """Validation top-1 against cumulative training time, one line per curve (``{"label": {"seconds": [...],
    "top1": [...]}}``, optionally with a ``"style"`` dict of matplotlib line options), with horizontal lines at the
    ``targets``: what a recipe reaches in how many minutes. ``log_time`` draws the time axis logarithmic, for runs
    of minutes beside runs of hours."""
    figure = Figure(figsize=(8, 5))
    axis = figure.subplots()
    best = [float(np.nanmax(_as_float_array(c["top1"]))) for c in curves.values() if len(c["top1"])]
    for label, curve in curves.items():
        minutes = _as_float_array(curve["seconds"]) / 60.0
        axis.plot(minutes, _as_float_array(curve["top1"]), marker="o", markersize=3, label=short_label(label, 48),
                  **curve.get("style", {}))
    for target in targets:
        axis.axhline(target, color="0.5", linestyle="--", linewidth=0.8)
        axis.annotate(f"{target:.2%}", (0, target), textcoords="offset points", xytext=(2, 2), fontsize=8,
                      color="0.3")
    if best:
        # The interesting part of such a curve is its last points: zoom to them rather than to the first epochs.
        top = max(best)
        axis.set_ylim(max(0.0, min(min(best) - 0.05, top - 0.1)), min(1.0, top + 0.01))
    if log_time:
        axis.set_xscale("log")
    axis.set_xlabel("training time (minutes)" + (", log scale" if log_time else ""))
    axis.set_ylabel("validation top-1")
    axis.set_title("Time to accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, out_path)


def time_to_accuracy_curves(history: Mapping[str, Sequence[float]]) -> dict[str, dict[str, np.ndarray]]:
    """The time-to-accuracy curves of one run's ``metrics.csv`` columns: validation top-1 of the raw weights and, when
    kept, of their EMA, against the cumulative ``epoch_seconds`` (training only, validation time excluded)."""
    if "epoch_seconds" not in history or "val_top1" not in history:
        return {}
    seconds = np.cumsum(np.nan_to_num(_as_float_array(history["epoch_seconds"])))
    curves = {"validation top-1": {"seconds": seconds, "top1": _as_float_array(history["val_top1"])}}
    if "ema_val_top1" in history and np.isfinite(_as_float_array(history["ema_val_top1"])).any():
        curves["EMA validation top-1"] = {"seconds": seconds, "top1": _as_float_array(history["ema_val_top1"])}
    return curves


def confusion_matrix(matrix, row_names: Sequence[str], col_names: Sequence[str], out_path: Path, *,
                     normalize: bool = True, title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix whose size grows with the class count, so 43 classes stay legible.

    A square-root colour scale keeps 1-5 % confusions visible next to a diagonal near 1; off-diagonal cells of at
    least 1 % are written in percent.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    n_rows, n_cols = counts.shape
    if normalize:
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    else:
        values = counts
    cell = 0.3 if max(n_rows, n_cols) > 12 else 0.6
    figure = Figure(figsize=(max(5.5, cell * n_cols + 3.8), max(4.5, cell * n_rows + 3.2)))
    axis = figure.subplots()
    image = axis.imshow(values, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0, vmax=max(values.max(), 1e-9)),
                        aspect="equal", interpolation="nearest")
    tick_size = 7 if max(n_rows, n_cols) > 20 else 9
    axis.set_xticks(range(n_cols), [short_label(name, 30) for name in col_names], rotation=90, fontsize=tick_size)
    axis.set_yticks(range(n_rows), [short_label(name, 30) for name in row_names], fontsize=tick_size)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title + (" (row-normalised)" if normalize else ""))
    annotate_size = 5 if max(n_rows, n_cols) > 20 else 8
    for i in range(n_rows):
        for j in range(n_cols):
            value = values[i, j]
            if normalize and (value >= 0.01 if i != j else value > 0):
                text = f"{100 * value:.0f}"
            elif not normalize and value > 0:
                text = f"{value:.0f}"
            else:
                continue
            axis.text(j, i, text, ha="center", va="center", fontsize=annotate_size,
                      color="white" if value > 0.5 * values.max() else "black")
    axis.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    axis.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    axis.grid(which="minor", color="0.92", linewidth=0.4)
    axis.tick_params(which="minor", length=0)
    colorbar = figure.colorbar(image, ax=axis, fraction=0.03, pad=0.02)
    colorbar.set_label("fraction of true class" if normalize else "count")
    figure.tight_layout()
    return _save(figure, out_path)


def per_class_f1(names: Sequence[str], f1, support, out_path: Path, *, threshold: float = 0.9) -> Path:
    """Horizontal F1 bars sorted from worst to best, classes below ``threshold`` in red, support on the right."""
    f1 = _as_float_array(f1)
    support = np.asarray(support)
    order = np.argsort(f1, kind="stable")
    figure = Figure(figsize=(9, max(3.0, 0.24 * len(names) + 1.2)))
    axis = figure.subplots()
    colors = [WRONG_COLOR if f1[i] < threshold else "#3465a4" for i in order]
    positions = np.arange(len(order))
    axis.barh(positions, f1[order], color=colors)
    axis.set_yticks(positions, [short_label(names[i], 40) for i in order], fontsize=7 if len(names) > 20 else 9)
    axis.invert_yaxis()
    axis.axvline(threshold, color="0.3", linestyle="--", linewidth=0.9, label=f"F1 = {threshold:g}")
    for position, i in zip(positions, order):
        axis.text(1.01, position, f"{f1[i]:.3f}  n={int(support[i])}", va="center", fontsize=6.5,
                  transform=axis.get_yaxis_transform())
    axis.set_xlim(0, 1)
    axis.set_xlabel("F1")
    axis.set_title("Per-class F1 (worst first)")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return _save(figure, out_path)


def reliability_diagram(curves: Mapping[str, Mapping[str, Sequence[float]]], out_path: Path) -> Path:
    """Accuracy against confidence per bin for each variant (e.g. uncalibrated, temperature-scaled).

    Each value of ``curves`` holds ``bin_lower``, ``bin_upper``, ``count``, ``mean_confidence`` and ``accuracy``
    (rows of ``reliability.csv``); the legend gives each variant's ECE. The lower panel shows how many predictions
    fall in each bin.
    """
    figure = Figure(figsize=(6.5, 7.0))
    axis, hist_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    axis.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="perfect calibration")
    palette = ["#3465a4", "#e66101", "#4daf4a", "#984ea3"]
    width_scale = 1.0 / max(1, len(curves))
    for index, (label, bins) in enumerate(curves.items()):
        lower, upper = _as_float_array(bins["bin_lower"]), _as_float_array(bins["bin_upper"])
        count, accuracy = _as_float_array(bins["count"]), _as_float_array(bins["accuracy"])
        confidence = _as_float_array(bins["mean_confidence"])
        filled = count > 0
        total = count.sum()
        ece = float(np.sum(count[filled] / total * np.abs(accuracy[filled] - confidence[filled]))) if total else np.nan
        width = (upper - lower) * width_scale
        left = lower + index * width
        color = palette[index % len(palette)]
        axis.bar(left[filled], accuracy[filled], width=width[filled], align="edge", alpha=0.75, color=color,
                 edgecolor="white", label=f"{label} (ECE {ece:.4f})")
        hist_axis.bar(left, count, width=width, align="edge", color=color, alpha=0.75)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.set_title("Reliability diagram")
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(alpha=0.3)
    hist_axis.set_yscale("log")
    hist_axis.set_xlabel("confidence (top-1 probability)")
    hist_axis.set_ylabel("predictions")
    figure.tight_layout()
    return _save(figure, out_path)


def risk_coverage(coverage, risk, out_path: Path, *, reject_fractions: Sequence[float] = (0.01, 0.02, 0.05)) -> Path:
    """Error rate among accepted predictions as less confident ones are accepted (risk-coverage curve)."""
    coverage, risk = _as_float_array(coverage), _as_float_array(risk)
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    axis.plot(coverage, risk, color="#3465a4", label=f"selective risk (AURC {risk.mean():.4f})")
    axis.axhline(risk[-1], color="0.5", linestyle=":", linewidth=1, label=f"no rejection ({risk[-1]:.4f})")
    for fraction in reject_fractions:
        # Same rounding as the error_at_reject_* metrics: floor(fraction * N) predictions rejected.
        index = len(coverage) - 1 - math.floor(fraction * len(coverage) + 1e-9)
        if index < 0:
            continue
        axis.plot(coverage[index], risk[index], "o", color=WRONG_COLOR, markersize=4)
        axis.annotate(f"reject {fraction:.0%}: {risk[index]:.4f}", (coverage[index], risk[index]),
                      textcoords="offset points", xytext=(-8, 8), ha="right", fontsize=7)
    axis.set_xlim(0, 1.01)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("coverage (fraction of predictions accepted, most confident first)")
    axis.set_ylabel("error rate among accepted")
    axis.set_title("Risk-coverage curve")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, out_path)


@dataclass(frozen=True)
class GalleryItem:
    """One image of a gallery with its labels; ``loss`` is shown when given."""

    path: str
    true: str
    pred: str
    confidence: float
    loss: float | None = None


def open_image(path: str) -> Image.Image:
    """Default gallery loader: the file as RGB, without the dataset's ROI crop or resizing."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _grid_shape(count: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, count))
    return math.ceil(count / ncols), ncols


def image_gallery(items: Sequence[GalleryItem], out_path: Path, *,
                  load_image: Callable[[str], Image.Image] = open_image, title: str = "", ncols: int = 4,
                  thumbnail_size: int = 160) -> Path | None:
    """A grid of images captioned with true class, predicted class and confidence (red when wrong).

    Images that cannot be loaded (moved dataset, unreadable file) are left out; returns ``None`` when none could
    be loaded, so reports can skip the figure.
    """
    loaded: list[tuple[GalleryItem, Image.Image]] = []
    for item in items:
        try:
            image = load_image(item.path)
        except (OSError, ValueError):
            continue
        image = image.convert("RGB")
        image.thumbnail((thumbnail_size, thumbnail_size))
        loaded.append((item, image))
    if not loaded:
        return None
    n_rows, n_cols = _grid_shape(len(loaded), ncols)
    # constrained layout reserves room for each caption and for the figure title; tight_layout let the captions of
    # images of other aspect ratios run into the row above, and the first row's into the title
    figure = Figure(figsize=(2.6 * n_cols, 3.05 * n_rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, (item, image) in zip(axes, loaded):
        axis.imshow(np.asarray(image))
        wrong = item.true != item.pred
        caption = f"true: {short_label(item.true, 26)}\npred: {short_label(item.pred, 26)}\nconf {item.confidence:.3f}"
        if item.loss is not None:
            caption += f"  loss {item.loss:.2f}"
        axis.set_title(caption, fontsize=7.5, color=WRONG_COLOR if wrong else CORRECT_COLOR, loc="left")
    if title:
        figure.suptitle(title)
    return _save(figure, out_path)


def gradcam_overlays(images, heatmaps, true_names: Sequence[str], pred_names: Sequence[str], confidences,
                     out_path: Path, *, target_names: Sequence[str] | None = None, ncols: int = 4,
                     alpha: float = 0.45) -> Path:
    """Each image next to its Grad-CAM heatmap blended over it (data from ``eval/gradcam.npz``).

    ``target_names`` is the class each heatmap explains (default: the predicted class).
    """
    target_names = list(target_names) if target_names is not None else list(pred_names)
    images = np.asarray(images)
    heatmaps = np.asarray(heatmaps, dtype=np.float64)
    n_rows, n_cols = _grid_shape(len(images), ncols)
    figure = Figure(figsize=(2.5 * 2 * n_cols, 2.9 * n_rows))
    axes = figure.subplots(n_rows, 2 * n_cols, squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for index in range(len(images)):
        row, col = divmod(index, n_cols)
        image_axis, overlay_axis = axes[row, 2 * col], axes[row, 2 * col + 1]
        image_axis.imshow(images[index])
        image_axis.set_title(f"true: {short_label(true_names[index], 24)}\npred: "
                             f"{short_label(pred_names[index], 24)} ({float(confidences[index]):.2f})",
                             fontsize=7, loc="left",
                             color=WRONG_COLOR if true_names[index] != pred_names[index] else CORRECT_COLOR)
        overlay_axis.imshow(images[index])
        overlay_axis.imshow(heatmaps[index], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        overlay_axis.set_title(f"Grad-CAM: {short_label(target_names[index], 24)}", fontsize=7)
    figure.tight_layout()
    return _save(figure, out_path)


def compare_curves(histories: Mapping[str, Mapping[str, Sequence[float]]], out_path: Path) -> Path:
    """Overlaid validation accuracy/loss and training loss per epoch, and validation accuracy over wall-clock
    time (the fair view for runs trained under an equal time budget)."""
    figure = Figure(figsize=(11, 7.5))
    (ax_acc, ax_val_loss), (ax_train_loss, ax_time) = figure.subplots(2, 2)
    for label, history in histories.items():
        epochs = _as_float_array(history["epoch"])
        if "val_top1" in history:
            line, = ax_acc.plot(epochs, _as_float_array(history["val_top1"]), marker="o", markersize=2.5, label=label)
            if "epoch_seconds" in history:
                elapsed = np.cumsum(np.nan_to_num(_as_float_array(history["epoch_seconds"]))) / 60.0
                ax_time.plot(elapsed, _as_float_array(history["val_top1"]), marker="o", markersize=2.5, label=label,
                             color=line.get_color())
        if "val_loss" in history:
            ax_val_loss.plot(epochs, _as_float_array(history["val_loss"]), marker="o", markersize=2.5, label=label)
        if "train_loss" in history:
            ax_train_loss.plot(epochs, _as_float_array(history["train_loss"]), marker="o", markersize=2.5, label=label)
    titles = (("Validation top-1", "epoch"), ("Validation loss", "epoch"), ("Training loss", "epoch"),
              ("Validation top-1 over training time", "minutes (sum of epoch times)"))
    for axis, (title, xlabel) in zip((ax_acc, ax_val_loss, ax_train_loss, ax_time), titles):
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, out_path)


def per_class_delta(names: Sequence[str], deltas: Mapping[str, Sequence[float]], out_path: Path, *,
                    metric: str = "F1", baseline: str = "baseline") -> Path:
    """Per-class change of ``metric`` against the baseline run, one bar group per compared run."""
    names = list(names)
    figure = Figure(figsize=(9, max(3.0, 0.24 * len(names) * max(1, len(deltas)) ** 0.5 + 1.5)))
    axis = figure.subplots()
    positions = np.arange(len(names))
    height = 0.8 / max(1, len(deltas))
    for index, (label, values) in enumerate(deltas.items()):
        values = _as_float_array(values)
        axis.barh(positions + index * height - 0.4 + height / 2, np.nan_to_num(values), height=height, label=label)
    axis.set_yticks(positions, [short_label(name, 40) for name in names], fontsize=7 if len(names) > 20 else 9)
    axis.invert_yaxis()
    axis.axvline(0.0, color="0.3", linewidth=0.8)
    axis.set_xlabel(f"{metric} minus {metric} of {baseline}")
    axis.set_title(f"Per-class {metric} change against {baseline}")
    axis.grid(axis="x", alpha=0.3)
    if deltas:
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, out_path)
