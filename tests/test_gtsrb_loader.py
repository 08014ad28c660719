"""The GTSRB (Kaggle layout) CSV loader and the track-grouped split."""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from resnetlab.config import DataConfig
from resnetlab.data.datasets import open_dataset
from resnetlab.data.splits import holdout_indices, plan_splits
from resnetlab.errors import DataError
from tests.conftest import shared_dataset

HEADER = ["Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path"]


def make_gtsrb(root, rows_per_class=6, classes=(0, 14), with_track_column=False):
    """A GTSRB-layout folder: two tracks per class, files named <class>_<track>_<frame>.png."""
    rows = []
    for class_id in classes:
        folder = root / "Train" / str(class_id)
        folder.mkdir(parents=True)
        for i in range(rows_per_class):
            track, frame = i // 3, i % 3
            name = f"{class_id:05d}_{track:05d}_{frame:05d}.png"
            Image.new("RGB", (30 + i, 32), (10 * class_id % 255, 100, 50)).save(folder / name)
            row = [30 + i, 32, 2, 3, 25, 28, class_id, f"Train/{class_id}/{name}"]
            rows.append(row + ([track] if with_track_column else []))
    with open(root / "Train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER + (["Track"] if with_track_column else []))
        writer.writerows(rows)
    return root


def test_reads_paths_labels_rois_and_tracks(tmp_path):
    make_gtsrb(tmp_path)
    source = open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}"))
    train = source.splits["train"]
    assert source.class_ids == [0, 14]
    assert source.class_names == ["Speed limit (20km/h)", "Stop"]
    assert len(train) == 12
    assert set(train.labels.tolist()) == {0, 1}
    assert train.rois.shape == (12, 4) and (train.rois[:, 2] == 25).all()
    assert len(set(train.groups.tolist())) == 4  # two tracks per class, parsed from the file names
    assert all(p.startswith(str(tmp_path.resolve())) for p in train.paths)


def test_track_column_is_used_when_present(tmp_path):
    make_gtsrb(tmp_path, with_track_column=True)
    train = open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}")).splits["train"]
    assert len(set(train.groups.tolist())) == 4


def test_missing_column_is_named(tmp_path):
    make_gtsrb(tmp_path)
    text = (tmp_path / "Train.csv").read_text().replace("ClassId", "Label")
    (tmp_path / "Train.csv").write_text(text)
    with pytest.raises(DataError, match="missing column.*ClassId"):
        open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}"))


def test_missing_file_is_named(tmp_path):
    make_gtsrb(tmp_path)
    victim = next((tmp_path / "Train" / "14").iterdir())
    victim.unlink()
    with pytest.raises(DataError, match=victim.name):
        open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}"))


def test_missing_folder_and_missing_csv(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(DataConfig(spec=f"gtsrb:{tmp_path / 'nope'}"))
    with pytest.raises(DataError, match="Train.csv"):
        open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}"))


def test_class_subset_relabels_and_keeps_names(tmp_path):
    make_gtsrb(tmp_path, classes=(0, 2, 14))
    source = open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}", classes=[14, "Speed limit (50km/h)"]))
    assert source.class_ids == [14, 2]
    assert source.class_names == ["Stop", "Speed limit (50km/h)"]
    assert sorted(set(source.splits["train"].labels.tolist())) == [0, 1]
    with pytest.raises(DataError, match="no class 99"):
        open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}", classes=[99]))


def test_corrupt_image_stops_the_run_with_its_path(tmp_path):
    from resnetlab.data.pipeline import decode_split, report_bad_images
    from resnetlab.data.preprocessing import Preprocessing

    make_gtsrb(tmp_path)
    victim = next((tmp_path / "Train" / "0").iterdir())
    victim.write_bytes(b"not a png at all")
    train = open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}")).splits["train"]
    decoded = decode_split(train, Preprocessing(32), use_cache=False)
    assert [b.path for b in decoded.bad] == [str(victim.resolve())]
    assert len(decoded.images) == len(train) - 1
    with pytest.raises(DataError, match=victim.name):
        report_bad_images(decoded.bad, "error", "train")


def test_grouped_split_of_gtsrb_dev_shares_no_track():
    root = shared_dataset("gtsrb-dev")
    source = open_dataset(DataConfig(spec=f"gtsrb:{root}"))
    train = source.splits["train"]
    assert len(train) == 10410 and source.num_classes == 43
    assert len(set(train.groups.tolist())) == 347
    plan = plan_splits(source.splits, strategy="auto", val_fraction=0.1, test_fraction=0.15, seed=0, group_kind="track")
    tracks = {name: set(getattr(plan, name).groups.tolist()) for name in ("train", "val", "test")}
    assert not tracks["train"] & tracks["val"]
    assert not tracks["train"] & tracks["test"]
    assert not tracks["val"] & tracks["test"]
    assert plan.strategy == "grouped by track"
    assert 0.05 < len(plan.val) / len(train) < 0.15
    # every class is still present in training
    assert (plan.train.class_counts(43) > 0).all()


def test_stratified_holdout_keeps_class_proportions(tmp_path):
    make_gtsrb(tmp_path, rows_per_class=30)
    train = open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}")).splits["train"]
    keep, held = holdout_indices(train, 0.2, seed=0, grouped=False)
    assert len(held) == 12 and not set(keep) & set(held)
    assert np.bincount(train.labels[held]).tolist() == [6, 6]
