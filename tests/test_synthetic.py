"""The synthetic traffic-sign generator: GTSRB layout, determinism, tracks, reuse."""

from __future__ import annotations

import csv
import filecmp
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnetlab.data.gtsrb_classes import GTSRB_CLASS_NAMES
from resnetlab.data.synthetic import (
    FRAMES_PER_TRACK,
    IMAGE_SIZE_RANGE,
    SYNTHETIC_CLASS_IDS,
    _draw_template,
    _sample_style,
    default_synthetic_dir,
    ensure_synthetic_signs,
    generate_synthetic_signs,
)
from resnetlab.errors import ConfigError, DataError

GTSRB_HEADER = ["Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path", "Track"]
PER_CLASS, TEST_PER_CLASS, SEED = 12, 5, 3


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_signs(tmp_path_factory.mktemp("synth") / "signs", per_class=PER_CLASS,
                                    test_per_class=TEST_PER_CLASS, seed=SEED)


def test_csv_columns_and_paths_follow_gtsrb(dataset: Path) -> None:
    for name, pattern in (("Train", r"Train/(\d+)/(\d{5})_(\d{5})_(\d{5})\.png"), ("Test", r"Test/(\d{5})\.png")):
        header, rows = read_rows(dataset / f"{name}.csv")
        assert header == GTSRB_HEADER
        for row in rows:
            match = re.fullmatch(pattern, row["Path"])
            assert match, row["Path"]
            if name == "Train":  # the folder, the file name and the columns agree on class and track
                assert int(match.group(1)) == int(match.group(2)) == int(row["ClassId"])
                assert int(match.group(3)) == int(row["Track"])
            with Image.open(dataset / row["Path"]) as image:
                assert image.mode == "RGB"
                assert image.size == (int(row["Width"]), int(row["Height"]))
    test_paths = [row["Path"] for row in read_rows(dataset / "Test.csv")[1]]
    assert test_paths == [f"Test/{n:05d}.png" for n in range(len(test_paths))]


def test_every_class_has_the_requested_count(dataset: Path) -> None:
    for name, expected in (("Train", PER_CLASS), ("Test", TEST_PER_CLASS)):
        counts = Counter(int(row["ClassId"]) for row in read_rows(dataset / f"{name}.csv")[1])
        assert counts == {class_id: expected for class_id in SYNTHETIC_CLASS_IDS}
    assert len(all_files(dataset / "Train")) == PER_CLASS * len(SYNTHETIC_CLASS_IDS)
    assert len(all_files(dataset / "Test")) == TEST_PER_CLASS * len(SYNTHETIC_CLASS_IDS)


def test_images_and_roi_boxes_are_gtsrb_like(dataset: Path) -> None:
    rows = read_rows(dataset / "Train.csv")[1] + read_rows(dataset / "Test.csv")[1]
    low, high = IMAGE_SIZE_RANGE
    sizes = set()
    for row in rows:
        width, height = int(row["Width"]), int(row["Height"])
        x1, y1, x2, y2 = (int(row[c]) for c in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        assert low <= width <= high and low <= height <= high
        # Inclusive corners strictly inside the image, with a margin on every side as in GTSRB.
        assert 0 < x1 < x2 < width - 1 and 0 < y1 < y2 < height - 1
        assert 0.6 <= (x2 - x1 + 1) / width <= 0.95 and 0.6 <= (y2 - y1 + 1) / height <= 0.95
        sizes.add((width, height))
    assert any(w != h for w, h in sizes), "images should not all be square"
    assert len(sizes) > 20, "image sizes should vary"


def test_the_sign_fills_its_roi_box(dataset: Path) -> None:
    """The ROI crop of a red-ringed sign is redder than the image's outer border (which is background)."""
    redness_inside, redness_border = [], []
    for row in read_rows(dataset / "Train.csv")[1]:
        if int(row["ClassId"]) not in (14, 17):  # stop and no entry are red almost to their edges
            continue
        pixels = np.asarray(Image.open(dataset / row["Path"]), dtype=np.float32)
        red = pixels[..., 0] - pixels[..., 1:].mean(-1)
        x1, y1, x2, y2 = (int(row[c]) for c in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        w, h = x2 - x1 + 1, y2 - y1 + 1
        redness_inside.append(red[y1 + h // 4:y2 - h // 4 + 1, x1 + w // 4:x2 - w // 4 + 1].mean())
        redness_border.append(np.concatenate([red[0], red[-1], red[:, 0], red[:, -1]]).mean())
    assert np.mean(redness_inside) > np.mean(redness_border) + 10


def test_tracks_group_frames_of_one_sign(dataset: Path) -> None:
    frames_of = defaultdict(list)
    for split in ("Train", "Test"):
        for row in read_rows(dataset / f"{split}.csv")[1]:
            frames_of[(split, row["Track"], int(row["ClassId"]))].append(row)
    tracks_per_split_and_number = Counter((split, track) for split, track, _ in frames_of)
    # A track number is reused across classes but never within one class, nor between the two splits.
    train_tracks = {(c, t) for s, t, c in frames_of if s == "Train"}
    test_tracks = {(c, t) for s, t, c in frames_of if s == "Test"}
    assert not train_tracks & test_tracks
    assert max(tracks_per_split_and_number.values()) <= len(SYNTHETIC_CLASS_IDS)
    lengths = [len(rows) for rows in frames_of.values()]
    assert max(lengths) <= FRAMES_PER_TRACK[1]
    assert sum(n >= FRAMES_PER_TRACK[0] for n in lengths) >= len(lengths) // 2  # most tracks are full length
    # Frames of one track share one background: their corners look alike, unlike those of other tracks.
    def corner(row: dict[str, str]) -> np.ndarray:
        with Image.open(dataset / row["Path"]) as image:
            return np.asarray(image.resize((32, 32)), dtype=np.float32)[:4, :4].mean((0, 1))
    within, between = [], []
    train_groups = [rows for (split, _, _), rows in frames_of.items() if split == "Train" and len(rows) > 1]
    for rows, other in zip(train_groups, train_groups[1:] + train_groups[:1]):
        within.append(np.abs(corner(rows[0]) - corner(rows[1])).mean())
        between.append(np.abs(corner(rows[0]) - corner(other[0])).mean())
    assert np.median(within) < np.median(between)


def test_meta_json_describes_the_set(dataset: Path) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["seed"] == SEED and meta["per_class"] == PER_CLASS and meta["test_per_class"] == TEST_PER_CLASS
    assert [c["class_id"] for c in meta["classes"]] == list(SYNTHETIC_CLASS_IDS)
    assert all(c["name"] == GTSRB_CLASS_NAMES[c["class_id"]] for c in meta["classes"])
    assert meta["image_size_range"] == list(IMAGE_SIZE_RANGE)


def test_same_seed_gives_identical_files_whatever_the_workers(dataset: Path, tmp_path: Path) -> None:
    again = generate_synthetic_signs(tmp_path / "again", per_class=PER_CLASS, test_per_class=TEST_PER_CLASS,
                                     seed=SEED, workers=2)
    assert all_files(again) == all_files(dataset)
    _, mismatch, errors = filecmp.cmpfiles(dataset, again, all_files(dataset), shallow=False)
    assert mismatch == [] and errors == []


def test_different_seeds_give_different_sets(dataset: Path, tmp_path: Path) -> None:
    other = generate_synthetic_signs(tmp_path / "other", per_class=PER_CLASS, test_per_class=TEST_PER_CLASS,
                                     seed=SEED + 1)
    assert (other / "Train.csv").read_bytes() != (dataset / "Train.csv").read_bytes()
    same_names = sorted(set(all_files(other / "Train")) & set(all_files(dataset / "Train")))
    assert same_names
    _, mismatch, _ = filecmp.cmpfiles(dataset / "Train", other / "Train", same_names, shallow=False)
    assert len(mismatch) == len(same_names)


def test_speed_limits_differ_only_in_their_digits() -> None:
    style = _sample_style(np.random.default_rng(0))
    templates = {c: np.asarray(_draw_template(c, style)[0], dtype=np.int16) for c in (1, 2, 3, 4, 5)}
    size = templates[1].shape[0]
    centre = np.zeros(templates[1].shape[:2], dtype=bool)
    half = int(size * (style.glyph_height * style.glyph_aspect / 2 + 0.05))
    centre[size // 2 - half:size // 2 + half, size // 2 - half:size // 2 + half] = True
    for class_id in (2, 3, 4, 5):
        changed = np.abs(templates[class_id] - templates[1]).max(-1) > 0
        assert changed.any(), f"class {class_id} looks exactly like class 1"
        assert not (changed & ~centre).any(), f"class {class_id} differs from class 1 outside the digits"


def test_existing_set_is_reused_untouched(dataset: Path) -> None:
    stamps = {name: (dataset / name).stat().st_mtime_ns for name in ("meta.json", "Train.csv", "Test.csv")}
    assert generate_synthetic_signs(dataset, per_class=PER_CLASS, test_per_class=TEST_PER_CLASS, seed=SEED) == dataset
    assert {name: (dataset / name).stat().st_mtime_ns for name in stamps} == stamps
    assert not list(dataset.parent.glob("*.tmp-*"))


def test_folder_holding_something_else_is_refused(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="other settings"):
        generate_synthetic_signs(dataset, per_class=PER_CLASS, test_per_class=TEST_PER_CLASS, seed=SEED + 1)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine"):
        generate_synthetic_signs(foreign, per_class=2)
    assert all_files(foreign) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_synthetic_signs(empty, per_class=2) / "Train.csv").is_file()


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_generation_leaves_nothing_behind(tmp_path: Path, workers: int) -> None:
    def interrupt(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_signs(tmp_path / "signs", per_class=30, workers=workers, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_progress_counts_every_image(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    generate_synthetic_signs(tmp_path / "signs", per_class=4, test_per_class=0,
                             progress=lambda done, total: calls.append((done, total)))
    total = 4 * len(SYNTHETIC_CLASS_IDS)
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert not (tmp_path / "signs" / "Test.csv").exists()  # no test split asked for: no header-only CSV


def test_cache_dir_and_ensure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNETLAB_CACHE_DIR", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / default_synthetic_dir(4, 7).name
    assert default_synthetic_dir(4, 7) == expected
    assert "-n4-s7" in expected.name and default_synthetic_dir(4, 7, test_per_class=2) != expected
    assert ensure_synthetic_signs(per_class=4, seed=7) == expected
    assert json.loads((expected / "meta.json").read_text())["test_per_class"] == 4 // 3
    stamp = (expected / "meta.json").stat().st_mtime_ns
    assert ensure_synthetic_signs(per_class=4, seed=7) == expected
    assert (expected / "meta.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("kwargs", [{"per_class": 0}, {"seed": -1}, {"workers": 0}, {"test_per_class": -2},
                                    {"per_class": 2.5}])
def test_bad_settings_are_config_errors(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        generate_synthetic_signs(tmp_path / "signs", **kwargs)
    assert not (tmp_path / "signs").exists()


def test_the_gtsrb_reader_loads_the_set(dataset: Path) -> None:
    from resnetlab.data.formats.gtsrb import read_gtsrb_kaggle

    source = read_gtsrb_kaggle(dataset, "synthetic-signs")
    assert source.class_ids == list(SYNTHETIC_CLASS_IDS)
    assert source.class_names == [GTSRB_CLASS_NAMES[c] for c in SYNTHETIC_CLASS_IDS]
    assert len(set(source.splits["train"].groups.tolist())) < PER_CLASS * len(SYNTHETIC_CLASS_IDS)
