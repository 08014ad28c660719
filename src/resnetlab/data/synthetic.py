"""``synthetic-signs``: procedural traffic signs written to disk in the GTSRB (Kaggle) layout.

The set mirrors eleven GTSRB classes and keeps their ClassIds and names, so that the offline demo goes through
the same loader, ROI crop and track-grouped split as real GTSRB:

* speed limits 30/50/60/70/80 (ClassIds 1-5): one shared template (white disc, red ring, black digits) whose
  style is drawn from the same distribution for every class, so that only the digits tell them apart;
* priority road (12), yield (13), stop (14), no entry (17), general caution (18) and keep right (38), with
  GTSRB's shapes and colours.

Like GTSRB, images are 30-80 px, not always square, the sign fills the ROI box (inclusive coordinates) with a
margin of about 10% to the image border, and images come in *tracks*: one physical sign (its background, wear,
lighting and occluder fixed) seen in 5-10 frames at a growing scale and a slowly changing pose. A random split
therefore leaks near-duplicates between training and validation, while a track-grouped split does not.

Each sign is drawn as a vector template with Pillow, warped by a random perspective into a cluttered
procedural scene, optionally partly hidden by a branch, foliage or another plate, then blurred, relit and
noised. Everything a track needs is drawn from a random generator seeded by ``(seed, split, class, track)``, so
the output is byte-identical for a seed whatever the number of worker processes.

Layout written (as in the Kaggle release of GTSRB, plus a ``Track`` column in ``Test.csv`` and ``meta.json``)::

    Train.csv   Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path,Track
    Train/<ClassId>/<ClassId:05d>_<track:05d>_<frame:05d>.png
    Test.csv    same columns, Path = Test/<n:05d>.png (files shuffled across classes as in GTSRB)
    Test/<n:05d>.png
    meta.json   generator version, settings and class names
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from resnetlab.data.cache import cache_root
from resnetlab.data.gtsrb_classes import GTSRB_CLASS_NAMES
from resnetlab.errors import ConfigError, DataError
from resnetlab.utils.io import write_csv_rows

__all__ = [
    "CSV_COLUMNS",
    "FRAMES_PER_TRACK",
    "GENERATOR_VERSION",
    "IMAGE_SIZE_RANGE",
    "SYNTHETIC_CLASS_IDS",
    "default_synthetic_dir",
    "ensure_synthetic_signs",
    "generate_synthetic_signs",
]

# Bump whenever the images a seed produces change: it is part of the cache folder name and of meta.json.
GENERATOR_VERSION = 1

SYNTHETIC_CLASS_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 12, 13, 14, 17, 18, 38)
CSV_COLUMNS: tuple[str, ...] = ("Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path", "Track")
IMAGE_SIZE_RANGE: tuple[int, int] = (30, 80)  # GTSRB's images are 15-250 px, most of them 30-80
FRAMES_PER_TRACK: tuple[int, int] = (5, 10)  # GTSRB has 30 per track; fewer keep small sets track-rich

_SPEED_LIMIT_DIGITS = {1: "30", 2: "50", 3: "60", 4: "70", 5: "80"}
_SHAPE_OF_CLASS = {
    1: "speed_limit", 2: "speed_limit", 3: "speed_limit", 4: "speed_limit", 5: "speed_limit",
    12: "priority_road", 13: "yield", 14: "stop", 17: "no_entry", 18: "general_caution", 38: "keep_right",
}
_TRIANGLE_HEIGHT = math.sqrt(3) / 2  # height of an equilateral triangle of side 1

# Templates are drawn at twice their size and box-filtered down: Pillow's polygons and ellipses are not
# anti-aliased otherwise.
_TEMPLATE_SIZE = 128
_GLYPH_FONT_SIZE = 64

# The scene (background, pole, occluder) lives in its own pixel grid in which the sign's bounding box is centred
# at (_SCENE_SIZE / 2, _SCENE_SIZE / 2) and _SCENE_SIGN_WIDTH wide; each frame samples it around the ROI box. It is
# coarser than the frames: it is out of focus anyway, and small scenes are cheap to draw and blur.
_SCENE_SIZE = 96
_SCENE_SIGN_WIDTH = 32

# Random streams: the first entropy word keeps the plan, track and test-order streams apart.
_STREAM_PLAN, _STREAM_TRACK, _STREAM_TEST_ORDER = 0, 1, 2
_SPLIT_CODES = {"train": 0, "test": 1}

# What meta.json must agree on for an existing folder to be reused.
_META_SETTINGS = ("generator_version", "seed", "per_class", "test_per_class", "class_ids")


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def default_synthetic_dir(per_class: int, seed: int, test_per_class: int | None = None) -> Path:
    """The cache folder of a synthetic set: ``$RESNETLAB_CACHE_DIR`` (or ``~/.cache/resnetlab``)/synthetic-signs-...

    ``test_per_class`` only changes the name when it differs from its default (``per_class // 3``).
    """
    root = cache_root()
    name = f"synthetic-signs-v{GENERATOR_VERSION}-n{per_class}-s{seed}"
    if test_per_class is not None and test_per_class != per_class // 3:
        name += f"-t{test_per_class}"
    return root / name


def ensure_synthetic_signs(
    per_class: int = 300,
    seed: int = 0,
    *,
    test_per_class: int | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The synthetic set for these settings in the cache folder, generated there first if it is not there yet."""
    out_dir = default_synthetic_dir(per_class, seed, test_per_class)
    return generate_synthetic_signs(out_dir, per_class=per_class, test_per_class=test_per_class, seed=seed,
                                    workers=workers, progress=progress)


def generate_synthetic_signs(
    out_dir: str | Path,
    *,
    per_class: int = 300,
    test_per_class: int | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the synthetic traffic-sign set to ``out_dir`` in the GTSRB Kaggle layout and return ``out_dir``.

    Args:
        out_dir: Folder to create. If it already holds a complete set generated with the same settings it is
            returned untouched; any other existing, non-empty folder is an error (nothing is deleted).
        per_class: Training images per class.
        test_per_class: Test images per class (default ``per_class // 3``); ``0`` writes no ``Test.csv``.
        seed: Seed of everything random; the same seed gives byte-identical files.
        workers: Processes to render with; the output does not depend on it.
        progress: Called as ``progress(images_done, images_total)`` after each rendered track.

    The set is written into ``<out_dir>.tmp-<pid>`` beside ``out_dir`` and renamed into place when complete, so
    an interrupted run never leaves a half-written set under ``out_dir``.
    """
    out_dir = Path(out_dir).expanduser()
    test_per_class = per_class // 3 if test_per_class is None else test_per_class
    _check_settings(per_class, test_per_class, seed, workers)
    meta = _build_meta(per_class, test_per_class, seed)
    if _holds_dataset(out_dir, meta):
        return out_dir
    _refuse_foreign_folder(out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp_dir.exists():  # left by a killed run that had our process id
        shutil.rmtree(tmp_dir)
    try:
        _write_dataset(tmp_dir, meta, workers, progress)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty folder (made by the caller, say) is as good as none
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if _holds_dataset(out_dir, meta):  # another process finished the same set first
                shutil.rmtree(tmp_dir)
                return out_dir
            raise
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Settings, meta.json and reuse
# ----------------------------------------------------------------------------------------------------------------


def _check_settings(per_class: int, test_per_class: int, seed: int, workers: int) -> None:
    for name, value, minimum in (("per_class", per_class, 1), ("test_per_class", test_per_class, 0),
                                 ("seed", seed, 0), ("workers", workers, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"synthetic-signs: {name}={value!r} must be an integer >= {minimum}")


def _build_meta(per_class: int, test_per_class: int, seed: int) -> dict[str, Any]:
    return {
        "dataset": "synthetic-signs",
        "generator": __name__,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "per_class": per_class,
        "test_per_class": test_per_class,
        "class_ids": list(SYNTHETIC_CLASS_IDS),
        "classes": [{"class_id": c, "name": GTSRB_CLASS_NAMES[c]} for c in SYNTHETIC_CLASS_IDS],
        "image_size_range": list(IMAGE_SIZE_RANGE),
        "frames_per_track": list(FRAMES_PER_TRACK),
        "train_images": per_class * len(SYNTHETIC_CLASS_IDS),
        "test_images": test_per_class * len(SYNTHETIC_CLASS_IDS),
        "pillow_version": PIL.__version__,  # for the record only: not compared when reusing a folder
        "numpy_version": np.__version__,
    }


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _holds_dataset(folder: Path, meta: dict[str, Any]) -> bool:
    """Whether ``folder`` is a complete set made with the settings in ``meta``.

    meta.json is written last and the folder appears by a rename, so a folder with a matching meta.json and the
    CSVs it promises is complete.
    """
    found = _read_meta(folder)
    if found is None or any(found.get(key) != meta[key] for key in _META_SETTINGS):
        return False
    return (folder / "Train.csv").is_file() and (meta["test_per_class"] == 0 or (folder / "Test.csv").is_file())


def _refuse_foreign_folder(out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        found = _read_meta(out_dir)
        what = (f"a synthetic-signs set with other settings ({', '.join(f'{k}={found.get(k)}' for k in _META_SETTINGS)})"
                if found is not None else "something other than a synthetic-signs set")
        raise DataError(f"{out_dir} already exists and holds {what}; delete it or choose another output folder")


# ----------------------------------------------------------------------------------------------------------------
# Planning and writing
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TrackJob:
    """One physical sign to render: everything a worker process needs, nothing random left to share."""

    root: str
    seed: int
    split: str
    class_id: int
    track: int
    rel_paths: tuple[str, ...]


def _track_lengths(seed: int, split: str, class_id: int, images: int) -> list[int]:
    rng = np.random.default_rng([_STREAM_PLAN, seed, _SPLIT_CODES[split], class_id])
    lengths: list[int] = []
    while images > 0:
        length = min(int(rng.integers(FRAMES_PER_TRACK[0], FRAMES_PER_TRACK[1] + 1)), images)
        lengths.append(length)
        images -= length
    return lengths


def _plan_jobs(root: Path, per_class: int, test_per_class: int, seed: int) -> list[_TrackJob]:
    jobs: list[_TrackJob] = []
    test_frames: list[tuple[int, int, int]] = []  # (class_id, track, frame) in plan order
    for class_id in SYNTHETIC_CLASS_IDS:
        train_lengths = _track_lengths(seed, "train", class_id, per_class)
        for track, length in enumerate(train_lengths):
            paths = tuple(f"Train/{class_id}/{class_id:05d}_{track:05d}_{frame:05d}.png" for frame in range(length))
            jobs.append(_TrackJob(str(root), seed, "train", class_id, track, paths))
        # Test tracks are numbered after the training ones, so (ClassId, Track) names one sign across both CSVs.
        for offset, length in enumerate(_track_lengths(seed, "test", class_id, test_per_class)):
            test_frames.extend((class_id, len(train_lengths) + offset, frame) for frame in range(length))
    # GTSRB's test files are numbered in an order unrelated to class and track; do the same.
    numbers = np.random.default_rng([_STREAM_TEST_ORDER, seed]).permutation(len(test_frames))
    paths_of_track: dict[tuple[int, int], list[str]] = {}
    for (class_id, track, _frame), number in zip(test_frames, numbers.tolist()):
        paths_of_track.setdefault((class_id, track), []).append(f"Test/{number:05d}.png")
    for (class_id, track), paths in paths_of_track.items():
        jobs.append(_TrackJob(str(root), seed, "test", class_id, track, tuple(paths)))
    return jobs


def _write_dataset(root: Path, meta: dict[str, Any], workers: int,
                   progress: Callable[[int, int], None] | None) -> None:
    jobs = _plan_jobs(root, meta["per_class"], meta["test_per_class"], meta["seed"])
    for class_id in SYNTHETIC_CLASS_IDS:
        (root / "Train" / str(class_id)).mkdir(parents=True)
    if meta["test_per_class"] > 0:
        (root / "Test").mkdir()
    total = sum(len(job.rel_paths) for job in jobs)
    rows = {"train": [], "test": []}
    done = 0
    for job, track_rows in zip(jobs, _run_jobs(jobs, workers)):
        rows[job.split].extend(track_rows)
        done += len(track_rows)
        if progress is not None:
            progress(done, total)
    _write_csv(root / "Train.csv", sorted(rows["train"], key=lambda r: (r[6], r[8], r[7])))
    if rows["test"]:
        _write_csv(root / "Test.csv", sorted(rows["test"], key=lambda r: r[7]))
    # Last: a folder with meta.json is a complete one (see _holds_dataset).
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _run_jobs(jobs: Sequence[_TrackJob], workers: int) -> Iterable[list[tuple]]:
    if workers == 1:
        yield from map(_render_track, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        # Results come back in submission order, which keeps the CSVs identical for any worker count.
        yield from pool.map(_render_track, jobs, chunksize=8)
    finally:  # on an interruption, drop the queued tracks instead of rendering them into a folder being deleted
        pool.shutdown(wait=True, cancel_futures=True)


def _write_csv(path: Path, rows: Sequence[tuple]) -> None:
    write_csv_rows(path, CSV_COLUMNS, rows)


# ----------------------------------------------------------------------------------------------------------------
# Sign templates
# ----------------------------------------------------------------------------------------------------------------

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _SignStyle:
    """How one physical sign looks: paint (faded or not), border widths and the lettering."""

    red: RGB
    blue: RGB
    yellow: RGB
    white: RGB
    black: RGB
    rim: float  # white outer rim, as a fraction of the sign's width
    border: float  # red ring / border, as a fraction of the sign's width
    glyph_height: float  # digits and text, as a fraction of the sign's width
    glyph_aspect: float  # width / height of the digit pair
    glyph_weight: int  # extra stroke width at _GLYPH_FONT_SIZE
    glyph_offset: tuple[float, float]


def _sample_style(rng: np.random.Generator) -> _SignStyle:
    fade = float(rng.uniform(0.0, 0.4)) if rng.random() < 0.4 else 0.0  # sun-bleached paint

    def paint(base: Sequence[int], jitter: float) -> RGB:
        colour = np.asarray(base, dtype=np.float64) + rng.uniform(-jitter, jitter, 3)
        colour = colour * (1 - fade) + colour.mean() * fade
        return tuple(int(v) for v in np.clip(colour, 0, 255).round())  # type: ignore[return-value]

    return _SignStyle(
        red=paint((200, 28, 38), 22),
        blue=paint((18, 72, 160), 20),
        yellow=paint((242, 184, 12), 15),
        white=paint((238, 238, 235), 14),
        black=paint((22, 22, 26), 14),
        rim=float(rng.uniform(0.015, 0.035)),
        border=float(rng.uniform(0.095, 0.125)),
        glyph_height=float(rng.uniform(0.38, 0.46)),
        glyph_aspect=float(rng.uniform(1.0, 1.25)),
        glyph_weight=int(rng.integers(1, 4)),
        glyph_offset=(float(rng.normal(0, 0.012)), float(rng.normal(0, 0.012))),
    )


@functools.lru_cache(maxsize=None)
def _glyph_mask(text: str, weight: int) -> Image.Image:
    """``text`` in Pillow's bundled font as a tight 8-bit mask (no system font needed)."""
    font = ImageFont.load_default(size=_GLYPH_FONT_SIZE)
    left, top, right, bottom = font.getbbox(text, stroke_width=weight)
    mask = Image.new("L", (right - left + 2, bottom - top + 2))
    ImageDraw.Draw(mask).text((1 - left, 1 - top), text, font=font, fill=255, stroke_width=weight, stroke_fill=255)
    return mask.crop(mask.getbbox())


def _paste_glyphs(canvas: Image.Image, text: str, colour: RGB, centre: tuple[float, float], width: float,
                  height: float, weight: int) -> None:
    box_w, box_h = max(1, round(width)), max(1, round(height))
    glyphs = _glyph_mask(text, weight).resize((box_w, box_h), Image.Resampling.LANCZOS)
    left, top = round(centre[0] - box_w / 2), round(centre[1] - box_h / 2)
    canvas.paste(colour, (left, top, left + box_w, top + box_h), glyphs)


def _scaled(points: Sequence[tuple[float, float]], centre: tuple[float, float], factor: float) -> list[tuple[float, float]]:
    return [(centre[0] + (x - centre[0]) * factor, centre[1] + (y - centre[1]) * factor) for x, y in points]


def _disc(draw: ImageDraw.ImageDraw, centre: float, radius: float, fill: RGB) -> None:
    draw.ellipse((centre - radius, centre - radius, centre + radius, centre + radius), fill=fill)


def _draw_template(class_id: int, style: _SignStyle) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Draw the sign of ``class_id``; return an RGBA template and the sign's bounding box in it."""
    size = 2 * _TEMPLATE_SIZE  # drawn at twice the size, reduced at the end (anti-aliasing)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    c = size / 2
    full = size / 2 - 1  # outer radius / apothem / half-width
    rim, border = style.rim * size, style.border * size
    shape = _SHAPE_OF_CLASS[class_id]
    bbox = (0.0, 0.0, float(size), float(size))

    if shape in ("speed_limit", "no_entry", "keep_right"):
        _disc(draw, c, full, style.white)
        inner = style.blue if shape == "keep_right" else style.red
        _disc(draw, c, full - rim, inner)
        if shape == "speed_limit":
            _disc(draw, c, full - rim - border, style.white)
            height = style.glyph_height * size
            centre = (c + style.glyph_offset[0] * size, c + style.glyph_offset[1] * size)
            _paste_glyphs(canvas, _SPEED_LIMIT_DIGITS[class_id], style.black, centre,
                          height * style.glyph_aspect, height, style.glyph_weight)
        elif shape == "no_entry":
            half_w, half_h = 0.31 * size, 0.085 * size
            draw.rectangle((c - half_w, c - half_h, c + half_w, c + half_h), fill=style.white)
        else:  # keep right: a white arrow pointing down and to the right
            u = (math.sqrt(0.5), math.sqrt(0.5))
            v = (-u[1], u[0])
            arrow = [(-0.30, -0.07), (0.04, -0.07), (0.04, -0.19), (0.31, 0.0), (0.04, 0.19), (0.04, 0.07), (-0.30, 0.07)]
            draw.polygon([(c + size * (s * u[0] + t * v[0]), c + size * (s * u[1] + t * v[1])) for s, t in arrow],
                         fill=style.white)
    elif shape == "stop":
        radius = full / math.cos(math.pi / 8)
        octagon = [(c + radius * math.cos(math.pi / 8 + k * math.pi / 4), c + radius * math.sin(math.pi / 8 + k * math.pi / 4))
                   for k in range(8)]
        draw.polygon(octagon, fill=style.white)
        draw.polygon(_scaled(octagon, (c, c), (full - rim) / full), fill=style.red)
        height = 0.62 * style.glyph_height * size
        _paste_glyphs(canvas, "STOP", style.white, (c, c), 0.72 * size, height, style.glyph_weight)
    elif shape == "priority_road":
        diamond = [(c, c - full), (c + full, c), (c, c + full), (c - full, c)]
        draw.polygon(diamond, fill=style.black)
        draw.polygon(_scaled(diamond, (c, c), 0.96), fill=style.white)
        draw.polygon(_scaled(diamond, (c, c), 0.60), fill=style.black)
        draw.polygon(_scaled(diamond, (c, c), 0.56), fill=style.yellow)
    else:  # yield (pointing down) and general caution (pointing up): equilateral triangles
        height = 2 * full * _TRIANGLE_HEIGHT
        top, bottom = c - height / 2, c + height / 2
        if shape == "yield":
            triangle = [(c - full, top), (c + full, top), (c, bottom)]
            centroid = (c, top + height / 3)
        else:
            triangle = [(c, top), (c + full, bottom), (c - full, bottom)]
            centroid = (c, top + 2 * height / 3)
        inradius = height / 3
        draw.polygon(triangle, fill=style.white)
        draw.polygon(_scaled(triangle, centroid, (inradius - rim) / inradius), fill=style.red)
        draw.polygon(_scaled(triangle, centroid, (inradius - rim - 1.25 * border) / inradius), fill=style.white)
        if shape == "general_caution":  # "!": a tapered bar and a dot
            bar_top, bar_bottom = top + 0.36 * height, top + 0.72 * height
            draw.polygon([(c - 0.045 * size, bar_top), (c + 0.045 * size, bar_top),
                          (c + 0.028 * size, bar_bottom), (c - 0.028 * size, bar_bottom)], fill=style.black)
            dot_y, dot_r = top + 0.81 * height, 0.042 * size
            draw.ellipse((c - dot_r, dot_y - dot_r, c + dot_r, dot_y + dot_r), fill=style.black)
        bbox = (0.0, top, float(size), bottom)

    template = canvas.reduce(2)
    return template, tuple(v / 2 for v in bbox)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# Scenes: background clutter, pole, occluder
# ----------------------------------------------------------------------------------------------------------------

_SCENE_PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "sky": ((150, 175, 205), (200, 210, 225), (120, 140, 170), (230, 232, 235), (95, 110, 90)),
    "foliage": ((40, 70, 35), (75, 100, 50), (30, 45, 25), (95, 85, 55), (120, 140, 80)),
    "building": ((150, 140, 125), (110, 100, 95), (175, 165, 150), (80, 70, 65), (130, 60, 50)),
    "street": ((95, 95, 100), (130, 130, 135), (60, 60, 65), (160, 155, 150), (45, 55, 40)),
    "dark": ((15, 15, 20), (30, 28, 35), (45, 45, 50), (10, 12, 10), (60, 55, 45)),
}
# Saturated colours that also appear in the clutter (cars, shop fronts, other signs), so that colour alone is
# not a class cue.
_LOUD_COLOURS = ((200, 30, 40), (20, 70, 160), (240, 190, 20), (235, 235, 235), (20, 20, 20), (200, 90, 20))


def _colour(rng: np.random.Generator, palette: Sequence[RGB], jitter: float = 18) -> RGB:
    base = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float64)
    return tuple(int(v) for v in np.clip(base + rng.uniform(-jitter, jitter, 3), 0, 255))  # type: ignore[return-value]


def _draw_scene(rng: np.random.Generator, sign_height: float) -> Image.Image:
    """Background clutter, the sign's pole and maybe a neighbouring plate, in scene pixels (sign width = 1 unit)."""
    size, centre, unit = _SCENE_SIZE, _SCENE_SIZE / 2, _SCENE_SIGN_WIDTH
    palette = _SCENE_PALETTES[("sky", "foliage", "building", "street", "dark")[int(rng.integers(5))]]
    top, bottom = np.asarray(_colour(rng, palette), np.float32), np.asarray(_colour(rng, palette), np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    gradient = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (size, size, 3))
    scene = Image.fromarray(gradient.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(scene)
    for _ in range(int(rng.integers(6, 22))):
        colour = _colour(rng, _LOUD_COLOURS, 25) if rng.random() < 0.12 else _colour(rng, palette, 30)
        x, y = rng.uniform(-0.3 * unit, size + 0.3 * unit, 2)
        w, h = rng.uniform(0.12, 1.4, 2) * unit
        kind = rng.random()
        if kind < 0.4:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        elif kind < 0.8:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        else:  # branches, wires, lamp posts
            angle = rng.uniform(0, math.pi)
            length = 2 * unit
            draw.line((x, y, x + length * math.cos(angle), y + length * math.sin(angle)), fill=colour,
                      width=max(1, round(rng.uniform(0.02, 0.08) * unit)))
    # Real signs stand on a pole and often share it with another plate above or below.
    if rng.random() < 0.85:
        pole_half = rng.uniform(0.03, 0.07) * unit
        pole_colour = _colour(rng, ((120, 120, 125), (160, 160, 160), (70, 70, 75)), 15)
        draw.rectangle((centre - pole_half, centre, centre + pole_half, size), fill=pole_colour)
    if rng.random() < 0.3:
        gap = rng.uniform(0.03, 0.15) * unit
        plate_h = rng.uniform(0.3, 0.8) * unit
        plate_half_w = rng.uniform(0.3, 0.55) * unit
        if rng.random() < 0.5:  # above
            y0 = centre - sign_height / 2 - gap - plate_h
        else:
            y0 = centre + sign_height / 2 + gap
        shape = (centre - plate_half_w, y0, centre + plate_half_w, y0 + plate_h)
        (draw.ellipse if rng.random() < 0.4 else draw.rectangle)(shape, fill=_colour(rng, _LOUD_COLOURS, 20))
    # The background is out of focus.
    return scene.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.01, 0.035) * unit)))


def _draw_occluder(rng: np.random.Generator) -> Image.Image:
    """Something between the camera and the sign (foliage, a branch, another plate), as an RGBA scene layer.

    It comes in from one side and reaches at most a quarter of the way across the sign, so digits stay readable.
    """
    size, centre, unit = _SCENE_SIZE, _SCENE_SIZE / 2, _SCENE_SIGN_WIDTH
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    angle = rng.uniform(0, 2 * math.pi)
    normal = (math.cos(angle), math.sin(angle))  # from the sign's centre towards the side it comes from
    tangent = (-normal[1], normal[0])
    reach = (0.5 - rng.uniform(0.06, 0.25)) * unit  # distance from the sign's centre to the occluder's inner edge
    edge = (centre + reach * normal[0], centre + reach * normal[1])
    kind = rng.random()
    if kind < 0.45:  # foliage: a cluster of leaves
        greens = ((40, 75, 30), (65, 95, 40), (30, 50, 25), (90, 110, 50), (70, 60, 40))
        for _ in range(int(rng.integers(8, 18))):
            radius = rng.uniform(0.06, 0.15) * unit
            along = radius + rng.uniform(0, 0.6) * unit
            across = rng.normal(0, 0.22) * unit
            x = edge[0] + along * normal[0] + across * tangent[0]
            y = edge[1] + along * normal[1] + across * tangent[1]
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(*_colour(rng, greens, 15), 255))
    elif kind < 0.7:  # a branch or wire across the sign, off its centre
        colour = _colour(rng, ((70, 50, 35), (40, 35, 30), (90, 90, 90)), 15)
        length = 2 * unit
        draw.line((edge[0] - length * tangent[0], edge[1] - length * tangent[1],
                   edge[0] + length * tangent[0], edge[1] + length * tangent[1]),
                  fill=(*colour, 255), width=max(1, round(rng.uniform(0.03, 0.08) * unit)))
    else:  # another plate, a car roof or a lamp post covering one side
        colour = _colour(rng, _LOUD_COLOURS + _SCENE_PALETTES["street"], 20)
        far = 2 * size  # a half-plane: a square whose near edge runs through ``edge``
        corners = [(edge[0] + a * tangent[0] + b * normal[0], edge[1] + a * tangent[1] + b * normal[1])
                   for a, b in ((-far, 0), (far, 0), (far, far), (-far, far))]
        draw.polygon(corners, fill=(*colour, 255))
    return layer.filter(ImageFilter.GaussianBlur(0.012 * unit))


# ----------------------------------------------------------------------------------------------------------------
# Rendering one track
# ----------------------------------------------------------------------------------------------------------------


def _perspective_coefficients(dst: Sequence[tuple[float, float]], src: Sequence[tuple[float, float]]) -> tuple[float, ...]:
    """Coefficients for ``Image.transform(..., PERSPECTIVE)``, which maps output points ``dst`` to input ``src``."""
    matrix, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        matrix.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        matrix.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend((u, v))
    return tuple(np.linalg.solve(np.asarray(matrix), np.asarray(rhs)).tolist())


def _motion_kernel(rng: np.random.Generator) -> ImageFilter.Kernel:
    weights = np.zeros((5, 5))
    angle = rng.uniform(0, math.pi)
    for t in np.linspace(-2, 2, 9):
        weights[int(round(2 + t * math.sin(angle))), int(round(2 + t * math.cos(angle)))] += 1
    return ImageFilter.Kernel((5, 5), (weights / weights.sum()).ravel().tolist(), scale=1)


def _frame_layout(base: float, margins: np.ndarray, roi_aspect: float) -> tuple[int, int, int, int, int, int]:
    """Image size and ROI box ``(width, height, x1, y1, roi_w, roi_h)`` for a frame whose larger side is ~``base``."""
    low, high = IMAGE_SIZE_RANGE
    left, right, top, bottom = margins
    if roi_aspect <= 1:
        roi_w = base * (1 - left - right)
        roi_h = roi_w * roi_aspect
    else:
        roi_h = base * (1 - top - bottom)
        roi_w = roi_h / roi_aspect
    roi_w, roi_h = max(8, round(roi_w)), max(8, round(roi_h))
    pad = [max(2, round(m * base)) for m in margins]
    width, height = pad[0] + roi_w + pad[1], pad[2] + roi_h + pad[3]
    # Grow the margins of a side that came out smaller than GTSRB's smallest images; never crop the sign.
    if width < low:
        extra = low - width
        pad[0] += extra // 2
        width = low
    if height < low:
        extra = low - height
        pad[2] += extra // 2
        height = low
    if width > high or height > high:
        shrink = max(width, height) - high
        roi_w, roi_h = roi_w - shrink, roi_h - shrink
        width, height = min(width - shrink, high), min(height - shrink, high)
    return width, height, pad[0], pad[2], roi_w, roi_h


def _render_track(job: _TrackJob) -> list[tuple]:
    """Render and save the frames of one track; return their CSV rows."""
    rng = np.random.default_rng([_STREAM_TRACK, job.seed, _SPLIT_CODES[job.split], job.class_id, job.track])
    template, (bx0, by0, bx1, by1) = _draw_template(job.class_id, _sample_style(rng))
    # Mip levels: bilinear sampling from the smallest level at least as large as the sign does not alias.
    mips = [template]
    while mips[-1].width > 32:
        mips.append(mips[-1].reduce(2))
    class_aspect = (by1 - by0) / (bx1 - bx0)

    scene = _draw_scene(rng, _SCENE_SIGN_WIDTH * class_aspect)
    occluder = _draw_occluder(rng) if rng.random() < 0.3 else None

    frames = len(job.rel_paths)
    # The camera approaches the sign: it grows, and turns a little more away as the car passes it.
    start = rng.uniform(IMAGE_SIZE_RANGE[0], 58)
    end = rng.uniform(max(start + 6, 42), IMAGE_SIZE_RANGE[1] - 2)
    bases = start * (end / start) ** (np.arange(frames) / max(1, frames - 1))
    yaw = rng.uniform(0.0, 0.14) + np.linspace(0, rng.uniform(0, 0.06), frames)  # horizontal foreshortening
    yaw_side = 1 if rng.random() < 0.5 else -1
    pitch = rng.uniform(0.0, 0.05)
    roll = rng.normal(0, 3.0) + rng.normal(0, 0.7, frames)  # degrees
    margins = rng.uniform(0.06, 0.14, 4)  # left, right, top, bottom, as fractions of the image size
    drift_bg = rng.normal(0, 0.01, 2) * _SCENE_SIGN_WIDTH  # parallax, scene pixels per frame
    drift_occluder = rng.normal(0, 0.02, 2) * _SCENE_SIGN_WIDTH

    exposure = rng.choice([rng.uniform(0.25, 0.55), rng.uniform(0.55, 1.1), rng.uniform(1.1, 1.5)], p=[0.35, 0.5, 0.15])
    contrast = rng.uniform(0.65, 1.1)
    gamma = rng.uniform(0.8, 1.25)
    cast = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    shadow = (rng.uniform(0, 2 * math.pi), rng.uniform(0.45, 0.8)) if rng.random() < 0.25 else None
    blur = rng.uniform(0.0, 0.9)
    motion = _motion_kernel(rng) if rng.random() < 0.15 else None
    noise_sigma = rng.uniform(1.5, 8.0)

    rows = []
    for frame, rel_path in enumerate(job.rel_paths):
        frame_margins = np.clip(margins + rng.normal(0, 0.012, 4), 0.04, 0.16)
        width, height, x1, y1, roi_w, roi_h = _frame_layout(bases[frame], frame_margins, class_aspect / (1 - yaw[frame]))
        roi_cx, roi_cy = x1 + roi_w / 2, y1 + roi_h / 2

        # Background and occluder: the scene scaled so that the sign's box lands on the ROI box.
        scale = _SCENE_SIGN_WIDTH / roi_w  # scene pixels per image pixel
        origin = (_SCENE_SIZE / 2 - roi_cx * scale, _SCENE_SIZE / 2 - roi_cy * scale)

        def scene_transform(layer: Image.Image, drift: np.ndarray) -> Image.Image:
            return layer.transform((width, height), Image.Transform.AFFINE,
                                   (scale, 0, origin[0] + drift[0] * frame, 0, scale, origin[1] + drift[1] * frame),
                                   Image.Resampling.BILINEAR)

        image = scene_transform(scene, drift_bg)

        # The sign: a rectangle around its box, foreshortened and rolled, then stretched back onto the ROI box.
        quad = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)
        quad[quad[:, 0] != yaw_side, 1] *= 1 - 1.5 * yaw[frame]  # the far edge looks shorter
        quad[quad[:, 1] > 0, 0] *= 1 - pitch
        theta = math.radians(roll[frame])
        quad = quad @ np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
        quad -= (quad.max(0) + quad.min(0)) / 2
        quad /= (quad.max(0) - quad.min(0)) / 2
        dst = [(roi_cx + qx * roi_w / 2, roi_cy + qy * roi_h / 2) for qx, qy in quad]
        level = min(len(mips) - 1, max(0, math.floor(math.log2(_TEMPLATE_SIZE / max(roi_w, roi_h)))))
        factor = 2.0 ** -level
        src = [(x * factor, y * factor) for x, y in ((bx0, by0), (bx1, by0), (bx1, by1), (bx0, by1))]
        sign = mips[level].transform((width, height), Image.Transform.PERSPECTIVE,
                                     _perspective_coefficients(dst, src), Image.Resampling.BILINEAR)
        image.paste(sign, (0, 0), sign)
        if occluder is not None:
            layer = scene_transform(occluder, drift_occluder)
            image.paste(layer, (0, 0), layer)

        # Camera: optics, exposure, sensor noise.
        frame_blur = blur + rng.normal(0, 0.15)
        if frame_blur > 0.2:
            image = image.filter(ImageFilter.GaussianBlur(frame_blur))
        if motion is not None:
            image = image.filter(motion)
        pixels = (np.asarray(image, dtype=np.float32) / 255.0) ** gamma
        mean = pixels.mean()
        pixels = (pixels - mean) * contrast + mean
        pixels *= (exposure * rng.uniform(0.92, 1.08)) * cast
        if shadow is not None:
            angle, depth = shadow
            yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
            t = ((xx - width / 2) * math.cos(angle) + (yy - height / 2) * math.sin(angle)) / max(width, height)
            pixels *= (1 - (1 - depth) * np.clip(t + 0.5, 0, 1))[..., None]
        pixels = pixels * 255.0 + rng.normal(0, noise_sigma, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
        image.save(Path(job.root) / rel_path, format="PNG")

        # GTSRB's ROI corners are inclusive pixel indices.
        rows.append((width, height, x1, y1, x1 + roi_w - 1, y1 + roi_h - 1, job.class_id, rel_path, job.track))
    return rows
