"""``resnetlab data inspect``: what a dataset holds before anything is trained on it.

Images per class and split (the splits a run with this config would use), the distribution of image sizes, the
imbalance ratio, the number of groups, every sample that cannot be used (the reader's rejects and files whose
header cannot be read; the full decode check happens when a run starts), and a PNG grid of samples per class as the
model will see them (ROI-cropped where the data has boxes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from resnetlab.config import RunConfig
from resnetlab.data.datasets import open_dataset
from resnetlab.data.preprocessing import Preprocessing, prepare_image
from resnetlab.data.records import BadImage, DatasetSource, SampleTable
from resnetlab.data.splits import SplitPlan, plan_data_splits
from resnetlab.errors import ConfigError, DataError, first_line
from resnetlab.utils.io import atomic_write, write_csv, write_json

SPLITS = ("train", "val", "test")
SIZE_BINS = (0, 32, 64, 128, 256, 512, 1024)  # shorter side, pixels


def _header(path: str) -> tuple[int, int, str, str] | str:
    """(width, height, mode, format) from the file header (no pixel decoding), or the reason it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.width, image.height, image.mode, image.format or "?"
    except UnidentifiedImageError:
        return "cannot read image header: not an image file Pillow can read (empty, corrupt or another format)"
    except Exception as err:  # noqa: BLE001 - any failure here is a property of the file, reported as such
        return f"cannot read image header: {first_line(err)}"


def _summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {"min": int(values.min()), "median": float(np.median(values)), "mean": round(float(values.mean()), 1),
            "max": int(values.max())}


def _shorter_side_histogram(shorter: np.ndarray) -> dict[str, int]:
    edges = list(SIZE_BINS) + [np.inf]
    labels = [f"{lo}-{hi - 1}" if hi != np.inf else f">={lo}" for lo, hi in zip(edges[:-1], edges[1:])]
    counts = np.histogram(shorter, bins=edges)[0] if len(shorter) else np.zeros(len(labels), dtype=int)
    return {label: int(count) for label, count in zip(labels, counts)}


def size_report(table: SampleTable, *, threads: int = 4) -> tuple[dict, list[BadImage]]:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        headers = list(pool.map(_header, table.paths, chunksize=64))
    bad = [BadImage(p, h) for p, h in zip(table.paths, headers) if isinstance(h, str)]
    good = [h for h in headers if not isinstance(h, str)]
    widths = np.asarray([h[0] for h in good], dtype=np.int64)
    heights = np.asarray([h[1] for h in good], dtype=np.int64)
    report = {
        "images": len(good),
        "width": _summary(widths),
        "height": _summary(heights),
        "shorter_side_histogram": _shorter_side_histogram(np.minimum(widths, heights)),
        "aspect_ratio": {"min": round(float((widths / heights).min()), 3), "max": round(float((widths / heights).max()), 3)}
        if len(good) else {},
        "modes": dict(Counter(h[2] for h in good).most_common()),
        "formats": dict(Counter(h[3] for h in good).most_common()),
    }
    if table.rois is not None:
        boxes = table.rois[table.rois[:, 0] >= 0]
        if len(boxes):
            report["roi_width"] = _summary(boxes[:, 2] - boxes[:, 0] + 1)
            report["roi_height"] = _summary(boxes[:, 3] - boxes[:, 1] + 1)
    return report, bad


def inspect_dataset(cfg: RunConfig, *, out_dir: Path | None = None, samples_per_class: int = 8, tile: int = 48,
                    log: Callable[[str], None] = lambda message: None) -> dict:
    """Inspect ``cfg.data``; with ``out_dir``, also write ``inspect.json``, ``samples_per_class.png`` and, when some
    samples cannot be used, ``bad_images.csv``."""
    d = cfg.data
    if out_dir is not None:
        out_dir = _check_out_dir(Path(out_dir))
    # Problems are what inspection is for: collect them instead of stopping at the first.
    source = open_dataset(d.model_copy(update={"on_bad_image": "skip"}))
    problems = [{"split": split, "path": b.path, "reason": b.reason}
                for split in sorted(source.rejected) for b in source.rejected[split]]
    try:
        plan = plan_data_splits(source, d)
    except DataError as err:
        # A run could not split this data as configured; inspecting it still shows what it holds, in the splits
        # it brings, and names the problem.
        plan = _unsplit_plan(source)
        problems.append({"split": "plan", "path": str(source.root), "reason": f"a run cannot plan its splits: {err}"})
    log(f"{source.spec}: {source.num_classes} classes; split {plan.strategy}")
    everything = SampleTable.concat([getattr(plan, name) for name in SPLITS])
    sizes, unreadable = size_report(everything)
    split_of = {path: name for name in SPLITS for path in getattr(plan, name).paths} if unreadable else {}
    problems += [{"split": split_of.get(b.path, "?"), "path": b.path, "reason": b.reason} for b in unreadable]

    counts = {name: getattr(plan, name).class_counts(source.num_classes) for name in SPLITS}
    total = sum(counts.values())
    train = counts["train"]
    result = {
        "spec": source.spec,
        "root": str(source.root),
        "fingerprint": source.fingerprint(),
        "num_classes": source.num_classes,
        "images": int(total.sum()),
        "split_strategy": plan.strategy,
        "split_sources": plan.sources,
        "split_sizes": plan.sizes(),
        "classes": [{"index": i, "id": cid, "name": name, **{split: int(counts[split][i]) for split in SPLITS},
                     "total": int(total[i])}
                    for i, (cid, name) in enumerate(zip(source.class_ids, source.class_names))],
        "imbalance_ratio": _ratio(train),
        "imbalance_ratio_all": _ratio(total),
        "group_kind": source.group_kind,
        "groups": {name: (len(set(getattr(plan, name).groups.tolist())) if getattr(plan, name).groups is not None
                          else None) for name in SPLITS},
        "image_sizes": sizes,
        "mirror_pairs": [list(pair) for pair in source.mirror_pairs],
        "notes": list(source.notes),
        "problems": problems,
    }
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--out '{out_dir}': cannot create the folder ({err.strerror}); give a folder to "
                              "write inspect.json and samples_per_class.png into") from None
        write_json(out_dir / "inspect.json", result)
        grid = out_dir / "samples_per_class.png"
        prep = Preprocessing(input_size=tile, resize=d.resize, crop_pct=d.crop_pct, roi_crop=d.roi_crop,
                             contrast=d.contrast)
        save_class_grid(source, plan.train, grid, prep, samples_per_class=samples_per_class, seed=d.split_seed)
        result["files"] = {"json": str(out_dir / "inspect.json"), "grid": str(grid)}
        if problems:
            write_csv(out_dir / "bad_images.csv", problems, ["split", "path", "reason"], lineterminator="\r\n")
            result["files"]["bad_images"] = str(out_dir / "bad_images.csv")
    return result


def _check_out_dir(out_dir: Path) -> Path:
    """``out_dir`` when it is, or can become, a folder; checked before the data is read."""
    blocking = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--out '{out_dir}': '{blocking}' is a file, not a folder; give a folder (new or "
                          "existing) to write inspect.json and samples_per_class.png into")
    return out_dir


def _unsplit_plan(source: DatasetSource) -> SplitPlan:
    """The splits the data brings, none held out: what inspection shows when a run's split cannot be planned."""
    empty = SampleTable([], np.zeros(0, dtype=np.int64))
    tables = {name: source.splits.get(name, empty) for name in SPLITS}
    return SplitPlan(**tables, strategy="not planned (see problems)",
                     sources={name: "dataset" if name in source.splits else "none (not planned)" for name in SPLITS})


def _ratio(counts: np.ndarray) -> float | None:
    present = counts[counts > 0]
    return round(float(present.max() / present.min()), 2) if len(present) else None


def save_class_grid(source: DatasetSource, table: SampleTable, path: Path, prep: Preprocessing, *,
                    samples_per_class: int = 8, seed: int = 0) -> Path:
    """One row per class: its index, id, name and count, then up to ``samples_per_class`` random samples."""
    rng = np.random.default_rng(seed)
    tile, gap = prep.input_size, 2
    font = ImageFont.load_default(size=max(10, tile // 4))
    label_width = 8 * max(10, tile // 4) * 3  # room for about 24 characters
    rows = source.num_classes
    canvas = Image.new("RGB", (label_width + samples_per_class * (tile + gap), rows * (tile + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    counts = table.class_counts(source.num_classes)
    for index, (cid, name) in enumerate(zip(source.class_ids, source.class_names)):
        top = index * (tile + gap)
        members = np.flatnonzero(table.labels == index)
        chosen = rng.choice(members, size=min(samples_per_class, len(members)), replace=False) if len(members) else []
        label = f"{index}: {name}" if str(cid) == name else f"{index}: {cid} {name}"
        draw.text((4, top + 2), label[:28], fill=(0, 0, 0), font=font)
        draw.text((4, top + 2 + tile // 2), f"{counts[index]} train", fill=(90, 90, 90), font=font)
        for column, sample in enumerate(chosen):
            roi = None if table.rois is None else table.rois[sample]
            try:
                pixels = prepare_image(table.paths[sample], prep, roi)
            except DataError:
                pixels = torch.zeros(3, tile, tile, dtype=torch.uint8)
                pixels[0] = 255  # a red tile marks an unreadable file
            canvas.paste(Image.fromarray(pixels.permute(1, 2, 0).numpy()),
                         (label_width + column * (tile + gap), top))
    with atomic_write(path, "wb") as handle:
        canvas.save(handle, format="PNG")
    return path
