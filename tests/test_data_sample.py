"""``resnetlab data sample``: K shots per class into fewshot.csv, the rest into rest.csv, no track on both sides."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from resnetlab.cli.main import main
from resnetlab.config import build_config
from resnetlab.data.datasets import open_dataset
from resnetlab.data.formats.csvfile import read_csv_dataset
from resnetlab.data.sampling import sample_few_shot
from resnetlab.errors import DataError
from tests.conftest import shared_dataset


def _source(spec: str):
    return open_dataset(build_config({}, {"data.spec": spec}, []).data)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _all_paths(source) -> set[str]:
    return {str(Path(p).resolve()) for table in source.splits.values() for p in table.paths}


def _group_of(source) -> dict[str, str]:
    """Path -> the Group value the manifests write (split/track; a sample without a track is its own group)."""
    return {str(Path(p).resolve()): f"{name}/{table.groups[i] if table.groups is not None else f'#{i}'}"
            for name, table in source.splits.items() for i, p in enumerate(table.paths)}


def test_k_shots_per_class_from_distinct_tracks_and_no_leakage(tiny_signs, tmp_path):
    source = _source(f"gtsrb:{tiny_signs}")
    result = sample_few_shot(source, tmp_path / "s", 3, seed=1)
    fewshot, rest = _rows(result.files["fewshot"]), _rows(result.files["rest"])
    excluded = _rows(result.files["excluded"]) if "excluded" in result.files else []
    assert Counter(r["ClassId"] for r in fewshot) == {str(c): 3 for c in source.class_ids}
    assert list(fewshot[0]) == ["Path", "ClassId", "ClassName", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"]
    assert list(rest[0])[-1] == "Group"
    paths = {name: {r["Path"] for r in rows} for name, rows in
             (("fewshot", fewshot), ("rest", rest), ("excluded", excluded))}
    assert not paths["fewshot"] & paths["rest"] and not paths["fewshot"] & paths["excluded"]
    assert not paths["rest"] & paths["excluded"]
    assert paths["fewshot"] | paths["rest"] | paths["excluded"] == _all_paths(source)
    assert all(Path(p).is_absolute() for p in paths["fewshot"])
    # No track of a shot in the test set, and the shots of a class come from different tracks (each class has 3+).
    group_of = _group_of(source)
    assert all(group_of[r["Path"]] == r["Group"] for r in rest + excluded)
    shot_groups = {group_of[r["Path"]] for r in fewshot}
    assert not shot_groups & {r["Group"] for r in rest}
    for class_id in source.class_ids:
        groups = [group_of[r["Path"]] for r in fewshot if r["ClassId"] == str(class_id)]
        assert len(set(groups)) == len(groups)
    assert excluded and all(r["Group"] in shot_groups for r in excluded)
    assert result.fewshot_images + result.rest_images + result.excluded_images == len(_all_paths(source))
    summary = json.loads(result.files["summary"].read_text())
    assert summary["per_class"] == 3 and summary["seed"] == 1 and summary["group_kind"] == "track"


def test_same_seed_same_draw_other_seed_other_draw(tiny_signs, tmp_path):
    source = _source(f"gtsrb:{tiny_signs}")
    first = sample_few_shot(source, tmp_path / "a", 2, seed=5).files["fewshot"].read_text()
    again = sample_few_shot(source, tmp_path / "b", 2, seed=5).files["fewshot"].read_text()
    other = sample_few_shot(source, tmp_path / "c", 2, seed=6).files["fewshot"].read_text()
    assert first == again
    assert first != other


def _write_images(folder: Path, counts: dict[int, int]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    lines = ["Path,ClassId,SourceLabel"]
    for class_id, n in counts.items():
        for i in range(n):
            name = f"c{class_id}_{i}.png"
            Image.new("RGB", (12, 12), (class_id * 20, 40, 90)).save(folder / name)
            lines.append(f"{name},{class_id},src:{class_id}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder / "labels.csv"


def test_small_classes_keep_one_image_for_the_test_set(tmp_path):
    labels = _write_images(tmp_path / "data", {0: 10, 1: 3, 2: 1})
    source = read_csv_dataset(labels, f"csv:{labels}")
    result = sample_few_shot(source, tmp_path / "s", 3, seed=0)
    shots = Counter(r["ClassId"] for r in _rows(result.files["fewshot"]))
    rest = Counter(r["ClassId"] for r in _rows(result.files["rest"]))
    assert shots == {"0": 3, "1": 2}  # class 1: 3 images -> 2 shots; class 2: its one image stays for the test set
    assert rest == {"0": 7, "1": 1, "2": 1}
    assert [c["id"] for c in result.short_classes] == [1, 2]
    assert any("class 1: 2 shot(s) of 3" in note for note in result.notes)
    assert any("no groups" in note for note in result.notes)
    assert "excluded" not in result.files
    assert list(_rows(result.files["fewshot"])[0]) == ["Path", "ClassId"]


def test_group_pattern_keeps_the_frames_of_a_track_together(tmp_path):
    from PIL import Image

    folder = tmp_path / "tracks"
    folder.mkdir()
    lines = ["Path,ClassId"]
    for track in range(6):
        for frame in range(3):
            name = f"sign_{track:05d}_{frame:05d}.png"
            Image.new("RGB", (10, 10), (200, 30, 30)).save(folder / name)
            lines.append(f"{name},7")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    source = read_csv_dataset(folder / "labels.csv", "csv:labels")
    result = sample_few_shot(source, tmp_path / "s", 4, seed=0, group_pattern=r"^(.*)_\d+\.\w+$")
    track = lambda row: Path(row["Path"]).name.rsplit("_", 1)[0]  # noqa: E731
    shots = _rows(result.files["fewshot"])
    assert len(shots) == 4 and len({track(r) for r in shots}) == 4  # four distinct tracks
    rest_tracks = {track(r) for r in _rows(result.files["rest"])}
    assert rest_tracks and not rest_tracks & {track(r) for r in shots}
    assert len(_rows(result.files["excluded"])) == 4 * 2  # the other two frames of each drawn track
    with pytest.raises(DataError, match="--group-pattern"):
        sample_few_shot(source, tmp_path / "bad", 2, group_pattern="(")


def test_cli_writes_manifests_that_a_run_trains_on(tiny_signs, tmp_path, capsys):
    out = tmp_path / "fewshot"
    assert main(["data", "sample", f"gtsrb:{tiny_signs}", "--per-class", "4", "--out", str(out), "--seed", "2",
                 "--split-test"]) == 0
    printed = capsys.readouterr().out
    assert "11 classes, 4 shot(s) per class (seed 2): fewshot 44" in printed
    split_rows = _rows(out / "split.csv")
    assert Counter(r["Split"] for r in split_rows) == {"train": 44, "test": len(_rows(out / "rest.csv"))}
    # The manifest reads back as a csv: spec with the source's classes, names and boxes.
    source = _source(f"gtsrb:{tiny_signs}")
    manifest = read_csv_dataset(out / "fewshot.csv", f"csv:{out / 'fewshot.csv'}")
    assert manifest.class_ids == source.class_ids and manifest.class_names == source.class_names
    assert manifest.splits["train"].rois is not None and (manifest.splits["train"].rois >= 0).all()
    assert manifest.group_kind is None  # the shots carry no Group column (see data.sampling)
    run = tmp_path / "run"
    assert main(["train", "--data", f"csv:{out / 'fewshot.csv'}", "--epochs", "1", "--out", str(run), "--quiet",
                 "data.batch_size=8", "train.max_steps_per_epoch=2", "train.threads=1", "eval.gradcam=false"]) == 0
    assert (run / "eval" / "metrics.json").is_file()


def test_cli_refuses_zero_shots(tiny_signs, tmp_path):
    assert main(["data", "sample", f"gtsrb:{tiny_signs}", "--per-class", "0", "--out", str(tmp_path / "x")]) != 0


def test_signs_belgium_sample(tmp_path):
    root = shared_dataset("signs-belgium")
    labels = root / "labels.csv"
    source = read_csv_dataset(labels, f"csv:{labels}")
    result = sample_few_shot(source, tmp_path / "s", 5, seed=0, group_pattern=r"^(.*)_\d+\.\w+$")
    shots = _rows(result.files["fewshot"])
    assert list(shots[0]) == ["Path", "ClassId"]
    counts = Counter(r["ClassId"] for r in shots)
    for info in result.classes:
        assert counts.get(str(info["id"]), 0) == info["fewshot"] <= 5
        assert info["fewshot"] == 5 or info in result.short_classes
    track = lambda row: Path(row["Path"]).name.rsplit("_", 1)[0]  # noqa: E731
    assert not {track(r) for r in shots} & {track(r) for r in _rows(result.files["rest"])}
    rest = read_csv_dataset(result.files["rest"], "csv:rest")
    assert len(rest.splits["train"]) == result.rest_images
    assert result.fewshot_images + result.rest_images + result.excluded_images == len(source.splits["train"])
