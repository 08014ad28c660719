"""Each dataset format, read from small files the tests write: GTSRB official layout, CIFAR pickle batches and class
folders, CSV lists, class folders with every image mode."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
from PIL import Image

from resnetlab.config import DataConfig
from resnetlab.data.datasets import open_dataset
from resnetlab.data.formats import dataset_formats
from resnetlab.data.preprocessing import load_image
from resnetlab.errors import DataError

OFFICIAL_HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]


def make_official_gtsrb(root, classes=(0, 33, 34), tracks=2, frames=3, test_per_class=2, test_labels=True,
                        training_folder=("GTSRB", "Final_Training", "Images")):
    """GTSRB as the official archives unpack: per-class folders of .ppm files with a ';'-separated GT-000NN.csv."""
    train_dir = root.joinpath(*training_folder)
    for class_id in classes:
        folder = train_dir / f"{class_id:05d}"
        folder.mkdir(parents=True)
        rows = []
        for track in range(tracks):
            for frame in range(frames):
                name = f"{track:05d}_{frame:05d}.ppm"
                Image.new("RGB", (40 + frame, 38), (class_id * 5 % 255, 60 + track, 90)).save(folder / name)
                rows.append([name, 40 + frame, 38, 5, 5, 34, 32, class_id])
        with open(folder / f"GT-{class_id:05d}.csv", "w", newline="") as handle:
            writer = csv.writer(handle, delimiter=";")
            writer.writerow(OFFICIAL_HEADER)
            writer.writerows(rows)
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows, n = [], 0
    for class_id in classes:
        for _ in range(test_per_class):
            name = f"{n:05d}.ppm"
            Image.new("RGB", (36, 36), (class_id * 5 % 255, 10, 10)).save(test_dir / name)
            rows.append([name, 36, 36, 3, 3, 32, 32, class_id])
            n += 1
    if test_labels:
        with open(root / "GT-final_test.csv", "w", newline="") as handle:
            writer = csv.writer(handle, delimiter=";")
            writer.writerow(OFFICIAL_HEADER)
            writer.writerows(rows)
    return root


def test_every_format_is_registered():
    assert {"gtsrb", "folder", "csv", "cifar10", "cifar100", "synthetic-signs"} <= set(dataset_formats())


# ---------------------------------------------------------------------------------------------------------------
# GTSRB, official layout
# ---------------------------------------------------------------------------------------------------------------


def test_gtsrb_official_layout_is_detected_and_read(tmp_path):
    make_official_gtsrb(tmp_path)
    source = open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}"))
    train, test = source.splits["train"], source.splits["test"]
    assert source.class_ids == [0, 33, 34]
    assert source.class_names == ["Speed limit (20km/h)", "Turn right ahead", "Turn left ahead"]
    assert len(train) == 18 and len(test) == 6
    assert all(p.endswith(".ppm") for p in train.paths)
    assert (train.rois == [5, 5, 34, 32]).all()
    # tracks come from the <track>_<frame>.ppm names within each class folder: 2 per class
    assert len(set(train.groups.tolist())) == 6
    assert source.group_kind == "track"
    assert source.mirror_pairs == ((33, 34),)
    assert np.bincount(test.labels).tolist() == [2, 2, 2]
    assert load_image(train.paths[0], train.rois[0]).size == (30, 28)  # the ROI box, inclusive corners


def test_gtsrb_official_without_test_labels_notes_it(tmp_path):
    make_official_gtsrb(tmp_path, test_labels=False, training_folder=("GTSRB", "Training"))
    source = open_dataset(DataConfig(spec=f"gtsrb:{tmp_path}"))
    assert "test" not in source.splits
    assert any("GT-final_test.csv" in note for note in source.notes)


def test_gtsrb_download_goes_through_torchvision(tmp_path, monkeypatch):
    """data.download=true asks torchvision for the official archives; here a stand-in unpacks a small copy."""
    import torchvision.datasets

    calls = []

    class FakeGTSRB:
        def __init__(self, root, split, download):
            calls.append((split, download))
            if split == "train":
                make_official_gtsrb(tmp_path / "staging", test_labels=True)
                (tmp_path / "data" / "gtsrb").mkdir(parents=True, exist_ok=True)
                (tmp_path / "staging" / "GTSRB").rename(tmp_path / "data" / "gtsrb" / "GTSRB")
                (tmp_path / "staging" / "GT-final_test.csv").rename(tmp_path / "data" / "gtsrb" / "GT-final_test.csv")

    monkeypatch.setattr(torchvision.datasets, "GTSRB", FakeGTSRB)
    source = open_dataset(DataConfig(spec=f"gtsrb:{tmp_path / 'data'}", download=True))
    assert calls == [("train", True), ("test", True)]
    assert len(source.splits["train"]) == 18 and len(source.splits["test"]) == 6


def test_gtsrb_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    class OfflineGTSRB:
        def __init__(self, root, split, download):
            raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "GTSRB", OfflineGTSRB)
    with pytest.raises(DataError, match="could not download GTSRB.*name resolution"):
        open_dataset(DataConfig(spec=f"gtsrb:{tmp_path / 'new'}", download=True))


# ---------------------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------------------


def _pickle(path, obj):
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def make_cifar10_batches(root, per_batch=4, seed=0):
    """cifar-10-batches-py with five training batches and a test batch of random pixels (bytes keys, as published)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        arrays[name] = (data, labels)
        _pickle(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]})
    _pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in
                                                         ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                          "horse", "ship", "truck")], b"num_vis": 3072})
    return folder, arrays


def test_cifar10_pickles_become_png_files_with_the_same_pixels(tmp_path):
    folder, arrays = make_cifar10_batches(tmp_path)
    source = open_dataset(DataConfig(spec=f"cifar10:{tmp_path}"))
    train, test = source.splits["train"], source.splits["test"]
    assert source.class_names[:3] == ["airplane", "automobile", "bird"] and source.num_classes == 10
    assert len(train) == 20 and len(test) == 4
    data, labels = arrays["data_batch_3"]
    position = 2 * 4 + 1  # second image of the third batch
    assert train.paths[position].endswith("data_batch_3/00001.png")
    assert train.labels[position] == labels[1]
    pixels = np.asarray(load_image(train.paths[position]))
    assert np.array_equal(pixels, data[1].reshape(3, 32, 32).transpose(1, 2, 0))  # PNG is lossless
    # a second read finds the written files by content hash and gives the same table
    again = open_dataset(DataConfig(spec=f"cifar10:{folder}"))
    assert again.splits["train"].paths == train.paths


def test_cifar100_fine_and_coarse_labels(tmp_path):
    from resnetlab.data.formats.cifar import CIFAR100_CLASSES, CIFAR100_COARSE_CLASSES

    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = {"train": [0, 1, 99, 4], "test": [30, 55]}  # apple, aquarium_fish, worm, beaver; dolphin, otter
    coarse_of = {0: 4, 1: 1, 99: 13, 4: 0, 30: 0, 55: 0}
    for split, labels in fine.items():
        _pickle(folder / split, {"data": rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8),
                                 "fine_labels": labels, "coarse_labels": [coarse_of[x] for x in labels]})
    _pickle(folder / "meta", {"fine_label_names": list(CIFAR100_CLASSES),
                              "coarse_label_names": list(CIFAR100_COARSE_CLASSES)})
    source = open_dataset(DataConfig(spec=f"cifar100:{tmp_path}"))
    assert source.num_classes == 100
    assert [source.class_names[i] for i in source.splits["train"].labels] == ["apple", "aquarium_fish", "worm", "beaver"]
    coarse = open_dataset(DataConfig(spec=f"cifar100:{tmp_path}", cifar100_labels="coarse"))
    assert coarse.num_classes == 20
    assert [coarse.class_names[i] for i in coarse.splits["train"].labels] == [
        "fruit_and_vegetables", "fish", "non-insect_invertebrates", "aquatic_mammals"]
    assert coarse.splits["train"].paths == source.splits["train"].paths  # the same image files, other labels


def test_cifar100_superclass_table_is_complete():
    from resnetlab.data.formats.cifar import CIFAR100_CLASSES, CIFAR100_SUPERCLASSES

    assert len(CIFAR100_SUPERCLASSES) == 20 and all(len(v) == 5 for v in CIFAR100_SUPERCLASSES.values())
    assert len(set(CIFAR100_CLASSES)) == 100


def test_cifar_class_folders_and_coarse_mapping(tmp_path):
    for split in ("train", "test"):
        for name in ("apple", "pear", "whale"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / split / name / "a.png")
    fine = open_dataset(DataConfig(spec=f"cifar100:{tmp_path}"))
    assert fine.class_ids == ["apple", "pear", "whale"]
    coarse = open_dataset(DataConfig(spec=f"cifar100:{tmp_path}", cifar100_labels="coarse"))
    assert coarse.class_ids == ["aquatic_mammals", "fruit_and_vegetables"]
    labels = [coarse.class_ids[i] for i in coarse.splits["train"].labels]
    assert labels == ["fruit_and_vegetables", "fruit_and_vegetables", "aquatic_mammals"]


def test_cifar_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        filename = "cifar-10-python.tar.gz"

        def __init__(self, root, train, download):
            calls.append((train, download))
            make_cifar10_batches(tmp_path / "c")  # what the archive unpacks to

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    source = open_dataset(DataConfig(spec=f"cifar10:{tmp_path / 'c'}", download=True))
    assert calls == [(True, True)] and len(source.splits["train"]) == 20
    open_dataset(DataConfig(spec=f"cifar10:{tmp_path / 'c'}", download=True))
    assert len(calls) == 1  # already there: no second download


def test_cifar_without_data_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py.*data.download=true"):
        open_dataset(DataConfig(spec=f"cifar10:{tmp_path}"))


def test_cifar_truncated_pickle_is_named(tmp_path):
    folder, _ = make_cifar10_batches(tmp_path)
    (folder / "data_batch_2").write_bytes((folder / "data_batch_2").read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_2"):
        open_dataset(DataConfig(spec=f"cifar10:{tmp_path}"))


# ---------------------------------------------------------------------------------------------------------------
# CSV lists
# ---------------------------------------------------------------------------------------------------------------


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _images(folder, names, size=(20, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, (200, 10, 10)).save(folder / name)


def test_csv_with_class_ids_rois_groups_relative_paths(tmp_path):
    _images(tmp_path / "img", ["a.png", "b.png", "c.png", "d.png"])
    _write_csv(tmp_path / "list.csv", ["Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path", "Group"],
               [[20, 24, 1, 2, 10, 12, 14, "img/a.png", "s1"], [20, 24, 1, 2, 10, 12, 14, "img/b.png", "s1"],
                [20, 24, 0, 0, 19, 23, 3, "img/c.png", "s2"], [20, 24, "", "", "", "", 3, "img/d.png", ""]])
    source = open_dataset(DataConfig(spec=f"csv:{tmp_path / 'list.csv'}"))
    train = source.splits["train"]
    assert source.class_ids == [3, 14] and source.class_names == ["3", "14"]
    assert train.labels.tolist() == [1, 1, 0, 0]
    assert train.rois[0].tolist() == [1, 2, 10, 12] and train.rois[3].tolist() == [-1, -1, -1, -1]
    assert train.groups[0] == train.groups[1] != train.groups[2]
    assert train.groups[3] not in {"s1", "s2"}  # an empty group cell is a group of its own
    assert train.paths[2] == str((tmp_path / "img" / "c.png").resolve())


def test_csv_with_names_only_and_semicolons(tmp_path):
    _images(tmp_path, ["x.jpg", "y.jpg", "z.jpg"])
    (tmp_path / "set.csv").write_text("path;label\nx.jpg;stop\ny.jpg;yield\nz.jpg;stop\n")
    source = open_dataset(DataConfig(spec=f"csv:{tmp_path / 'set.csv'}"))
    assert source.class_ids == ["stop", "yield"] and source.class_names == ["stop", "yield"]
    assert source.splits["train"].labels.tolist() == [0, 1, 0]


def test_csv_integer_label_column_is_ids_and_names_column_names_them(tmp_path):
    _images(tmp_path, ["x.png", "y.png"])
    _write_csv(tmp_path / "a.csv", ["file", "label"], [["x.png", 2], ["y.png", 7]])
    assert open_dataset(DataConfig(spec=f"csv:{tmp_path / 'a.csv'}")).class_ids == [2, 7]
    _write_csv(tmp_path / "b.csv", ["Path", "ClassId", "ClassName"], [["x.png", 2, "two"], ["y.png", 7, "seven"]])
    assert open_dataset(DataConfig(spec=f"csv:{tmp_path / 'b.csv'}")).class_names == ["two", "seven"]
    _write_csv(tmp_path / "c.csv", ["Path", "ClassId", "ClassName"], [["x.png", 2, "two"], ["y.png", 2, "deux"]])
    with pytest.raises(DataError, match="class id 2 is named 'deux'"):
        open_dataset(DataConfig(spec=f"csv:{tmp_path / 'c.csv'}"))


def test_csv_split_column(tmp_path):
    _images(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    _write_csv(tmp_path / "s.csv", ["Path", "ClassId", "Split"],
               [["a.png", 0, "train"], ["b.png", 1, "train"], ["c.png", 1, "validation"], ["d.png", 0, "test"]])
    source = open_dataset(DataConfig(spec=f"csv:{tmp_path / 's.csv'}"))
    assert {k: len(v) for k, v in source.splits.items()} == {"train": 2, "val": 1, "test": 1}


def test_csv_wrong_columns_are_named(tmp_path):
    _write_csv(tmp_path / "bad.csv", ["image_file", "ClassId"], [["x.png", 1]])
    with pytest.raises(DataError, match="missing column.*Path"):
        open_dataset(DataConfig(spec=f"csv:{tmp_path / 'bad.csv'}"))
    _write_csv(tmp_path / "bad2.csv", ["Path", "Roi.X1", "ClassId"], [["x.png", 1, 1]])
    with pytest.raises(DataError, match="only some of Roi"):
        open_dataset(DataConfig(spec=f"csv:{tmp_path / 'bad2.csv'}"))
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(DataConfig(spec=f"csv:{tmp_path / 'absent.csv'}"))


# ---------------------------------------------------------------------------------------------------------------
# Class folders
# ---------------------------------------------------------------------------------------------------------------


def _save_mode_images(folder):
    """One file per image mode a user may bring, each a different size and aspect ratio."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")  # L
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("LA").save(folder / "grey_alpha.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette_transparent.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(folder / "sixteen_bit.png")  # I;16
    Image.fromarray(rgb[..., 2].astype(np.float32) / 255).save(folder / "float.tif")  # F, values 0..1
    Image.fromarray(rgb).convert("1").save(folder / "bilevel.png")
    Image.fromarray(rgb[:7, :]).save(folder / "wide.bmp")
    Image.fromarray(np.ascontiguousarray(rgb[:, :5])).save(folder / "tall.webp")
    Image.fromarray(rgb).save(folder / "animated.gif", save_all=True, append_images=[Image.fromarray(rgb[::-1])])


def test_every_image_mode_and_size_becomes_rgb(tmp_path):
    from resnetlab.data.preprocessing import Preprocessing, prepare_image

    folder = tmp_path / "modes"
    folder.mkdir()
    _save_mode_images(folder)
    for path in sorted(folder.iterdir()):
        image = load_image(path)
        assert image.mode == "RGB", path.name
        array = np.asarray(image)
        assert array.max() > 0, path.name  # not clipped to black
        if path.name in ("sixteen_bit.png", "float.tif"):
            # scaled by the type's range, not clipped: a 16-bit value 257*v reads back as v
            assert 0 < array.mean() < 255 and array.max() < 256, path.name
        tensor = prepare_image(path, Preprocessing(24))
        assert tensor.shape == (3, 24, 24) and tensor.dtype.is_floating_point is False
    # 16-bit value 257 * v is the 8-bit value v; a 0-1 float f is round(255 f)
    rgb = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(folder / "sixteen_bit.png"))[..., 0], rgb[..., 1])
    assert np.abs(np.asarray(load_image(folder / "float.tif"))[..., 0].astype(int) - rgb[..., 2]).max() <= 1
    # alpha is dropped, not composited: the colour channels stay as stored
    assert np.array_equal(np.asarray(load_image(folder / "rgba.png")), rgb)


def test_folder_ignores_hidden_and_non_image_files_with_a_count(tmp_path):
    for name in ("cat", "dog"):
        _images(tmp_path / "train" / name, ["1.png", "2.png"])
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "train" / "cat" / "._1.png").write_bytes(b"apple double")
    (tmp_path / "train" / "dog" / ".ipynb_checkpoints").mkdir()
    _images(tmp_path / "train" / "dog" / ".ipynb_checkpoints", ["3.png"])
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden_class").mkdir()
    source = open_dataset(DataConfig(spec=f"folder:{tmp_path}"))
    assert source.class_ids == ["cat", "dog"]
    assert len(source.splits["train"]) == 4
    note = " ".join(source.notes)
    assert "1 non-image file" in note and "3 hidden" in note


def test_folder_readable_names_from_two_and_three_column_tsv(tmp_path):
    for wnid in ("n01", "n02"):
        _images(tmp_path / "train" / wnid, ["a.png"])
    (tmp_path / "class_names.tsv").write_text("0\tn01\ttench\n1\tn02\tEnglish springer\n")
    assert open_dataset(DataConfig(spec=f"folder:{tmp_path}")).class_names == ["tench", "English springer"]
    (tmp_path / "class_names.tsv").write_text("n02\tspringer\n")
    assert open_dataset(DataConfig(spec=f"folder:{tmp_path}")).class_names == ["n01", "springer"]


def test_folder_class_order_from_classes_txt(tmp_path):
    for name in ("b", "a", "c"):
        _images(tmp_path / name, ["x.png"])
    (tmp_path / "classes.txt").write_text("c\nb\na\n")
    source = open_dataset(DataConfig(spec=f"folder:{tmp_path}"))
    assert source.class_ids == ["c", "b", "a"]
    assert [source.class_ids[i] for i in source.splits["train"].labels] == ["a", "b", "c"]  # files sorted by path
