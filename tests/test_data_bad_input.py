"""Bad input, nothing lost: with data.on_bad_image=error a run stops before training and names the files; with skip
it goes on and every left-out sample is in RunData.bad (and the run's bad_images.csv)."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from resnetlab.config import DataConfig, build_config
from resnetlab.data.build import build_run_data
from resnetlab.data.datasets import open_dataset
from resnetlab.errors import DataError
from tests.test_gtsrb_loader import make_gtsrb


def make_folder_with_bad_files(root):
    """Two classes of six good 32x32 images, and four files that claim to be images but are not readable."""
    for name in ("ants", "bees"):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32 + i, 30), (40 * i, 100, 7)).save(folder / f"{i}.png")
    good = (root / "ants" / "0.png").read_bytes()
    bad = {
        "corrupt": root / "ants" / "corrupt.png",
        "truncated": root / "bees" / "truncated.png",
        "empty": root / "bees" / "empty.jpg",
        "text": root / "ants" / "readme.jpg",
    }
    bad["corrupt"].write_bytes(good[:40] + bytes(200) + good[240:])  # valid header, garbage pixel data
    big = root / "big.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(big)
    bad["truncated"].write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    big.unlink()
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is a text file with an image suffix\n")
    return {k: str(v.resolve()) for k, v in bad.items()}


def _cfg(spec, *overrides):
    return build_config({}, {"data.spec": spec}, ["data.val_fraction=0.2", "data.test_fraction=0.2",
                                                  "data.batch_size=4", "data.num_workers=0", *overrides])


@pytest.mark.parametrize("pipeline", ["in_memory", "files"])
def test_unreadable_files_stop_the_run_with_their_paths(tmp_path, pipeline):
    bad = make_folder_with_bad_files(tmp_path)
    extra = ["data.in_memory=always"] if pipeline == "in_memory" else ["data.in_memory=never"]
    with pytest.raises(DataError) as err:
        build_run_data(_cfg(f"folder:{tmp_path}", *extra), log=lambda m: None)
    message = str(err.value)
    assert "on_bad_image=skip" in message
    # the first split found with unreadable files stops the run, naming every one of them in that split
    named = [path for path in bad.values() if path in message]
    assert named and f"{len(named)} unreadable image(s)" in message


@pytest.mark.parametrize("pipeline", ["in_memory", "files"])
def test_skip_leaves_them_out_and_lists_every_one(tmp_path, pipeline):
    bad = make_folder_with_bad_files(tmp_path)
    extra = ["data.in_memory=always"] if pipeline == "in_memory" else ["data.in_memory=never"]
    data = build_run_data(_cfg(f"folder:{tmp_path}", "data.on_bad_image=skip", *extra), log=lambda m: None)
    listed = {b.path: b.reason for rows in data.bad.values() for b in rows}
    assert set(listed) == set(bad.values())
    assert all("cannot read image" in reason for reason in listed.values())
    used = set(data.plan.train.paths) | set(data.plan.val.paths) | set(data.plan.test.paths)
    assert not used & set(bad.values())
    assert len(used) == 12  # every good image is still there
    images, labels = next(iter(data.train))
    assert images.shape[1:] == (3, 32, 32) and len(labels) == len(images)


def test_csv_listing_missing_files_and_bad_class_ids(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Path", "ClassId"])
        writer.writerows([["a.png", 0], ["b.png", 1], ["c.png", 0], ["d.png", 1], ["gone.png", 1], ["a.png", "x"]])
    spec = f"csv:{tmp_path / 'list.csv'}"
    with pytest.raises(DataError, match=r"2 sample\(s\) cannot be used.*gone.png.*does not exist.*'x' is not an integer"):
        open_dataset(DataConfig(spec=spec))
    source = open_dataset(DataConfig(spec=spec, on_bad_image="skip"))
    assert len(source.splits["train"]) == 4
    assert [b.path.endswith(n) for b, n in zip(source.rejected["train"], ("gone.png", "a.png"))] == [True, True]
    data = build_run_data(_cfg(spec, "data.on_bad_image=skip", "data.split=stratified", "data.val_fraction=0.25",
                               "data.test_fraction=0.0"), log=lambda m: None)
    assert len(data.bad["train"]) == 2


def test_gtsrb_unknown_class_ids_and_missing_files(tmp_path):
    make_gtsrb(tmp_path, rows_per_class=6, classes=(0, 14))
    with open(tmp_path / "Train.csv", "a", newline="") as handle:
        csv.writer(handle).writerow([30, 32, 2, 3, 25, 28, 99, "Train/0/00000_00000_00000.png"])  # not a GTSRB class
    (tmp_path / "Test").mkdir()
    Image.new("RGB", (30, 30)).save(tmp_path / "Test" / "00000.png")
    Image.new("RGB", (30, 30)).save(tmp_path / "Test" / "00001.png")
    with open(tmp_path / "Test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path"])
        writer.writerows([[30, 30, 1, 1, 28, 28, 14, "Test/00000.png"], [30, 30, 1, 1, 28, 28, 5, "Test/00001.png"],
                          [30, 30, 1, 1, 28, 28, 0, "Test/00002.png"]])
    with pytest.raises(DataError, match=r"3 sample\(s\)") as err:
        open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}"))
    assert "ClassId 99 is not a GTSRB class" in str(err.value)
    assert "ClassId 5 has no training images" in str(err.value)
    assert "00002.png" in str(err.value) and "does not exist" in str(err.value)
    source = open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}", on_bad_image="skip"))
    assert len(source.splits["test"]) == 1 and len(source.splits["train"]) == 12
    assert sorted(len(v) for v in source.rejected.values()) == [1, 2]


def test_empty_class_folder(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / name / "1.png")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty.*class folder holds no images"):
        open_dataset(DataConfig(spec=f"folder:{tmp_path}"))
    source = open_dataset(DataConfig(spec=f"folder:{tmp_path}", on_bad_image="skip"))
    assert source.class_ids == ["a", "b"]
    assert source.rejected["train"][0].path.endswith("empty")


def test_val_folder_with_a_class_the_train_split_lacks(tmp_path):
    for split, names in (("train", ("a", "b")), ("val", ("a", "b", "zebra"))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "1.png")
    with pytest.raises(DataError, match="zebra.*not in the train split"):
        open_dataset(DataConfig(spec=f"folder:{tmp_path}"))
    assert len(open_dataset(DataConfig(spec=f"folder:{tmp_path}", on_bad_image="skip")).splits["val"]) == 2


def test_train_job_writes_bad_images_csv(tmp_path):
    """The lead's train job turns RunData.bad into bad_images.csv: the end of the 'nothing lost' chain."""
    from resnetlab.jobs.train import train_job

    bad = make_folder_with_bad_files(tmp_path / "data")
    cfg = build_config({}, {"data.spec": f"folder:{tmp_path / 'data'}"},
                       ["data.on_bad_image=skip", "data.val_fraction=0.2", "data.test_fraction=0.2", "data.batch_size=4",
                        "model.name=resnet20", "train.epochs=1", "train.max_steps_per_epoch=1", "train.threads=1",
                        "logging.quiet=true", "eval.gradcam=false"])
    out = train_job(cfg, tmp_path / "run", evaluate=False, report=False)
    with open(out / "bad_images.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["path"] for r in rows} == set(bad.values())
    assert all(r["reason"] and r["split"] in ("train", "val", "test") for r in rows)
