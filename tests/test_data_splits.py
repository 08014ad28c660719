"""k-fold and hold-out splits, the split manifest, and `resnetlab data split` (materialised class-folder split)."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from PIL import Image

from resnetlab.cli.main import main
from resnetlab.data.records import SampleTable
from resnetlab.data.split_folders import split_class_folders
from resnetlab.data.splits import holdout_indices, kfold_indices, plan_splits, write_split_manifest
from resnetlab.errors import DataError


def grouped_table(classes=4, groups_per_class=6, per_group=5, seed=0) -> SampleTable:
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c in range(classes):
        for g in range(groups_per_class):
            n = per_group + int(rng.integers(0, 3))
            labels += [c] * n
            groups += [f"{c}_{g}"] * n
    return SampleTable([f"/x/{i}.png" for i in range(len(labels))], np.asarray(labels), groups=np.asarray(groups))


@pytest.mark.parametrize("grouped", [True, False])
def test_kfold_partitions_the_samples_and_keeps_groups_whole(grouped):
    table = grouped_table()
    folds = kfold_indices(table, 3, seed=0, grouped=grouped)
    assert len(folds) == 3
    all_val = np.concatenate([val for _, val in folds])
    assert sorted(all_val.tolist()) == list(range(len(table)))  # every sample validates exactly once
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == len(table)
        assert set(table.labels[val]) == set(range(4))  # stratified: every class on both sides
        if grouped:
            assert not set(table.groups[train]) & set(table.groups[val])
    if not grouped:  # plain stratified folds do split groups, which is why grouped data uses the other splitter
        assert any(set(table.groups[t]) & set(table.groups[v]) for t, v in folds)


def test_kfold_refuses_impossible_requests():
    table = grouped_table()
    with pytest.raises(DataError, match="at least 2 folds"):
        kfold_indices(table, 1, seed=0, grouped=False)
    small = SampleTable(["a", "b", "c"], np.asarray([0, 0, 1]))
    with pytest.raises(DataError, match="only 1 sample"):
        kfold_indices(small, 2, seed=0, grouped=False)


def test_grouped_holdout_and_plan_share_no_group():
    table = grouped_table(groups_per_class=10)
    keep, held = holdout_indices(table, 0.2, seed=3, grouped=True)
    assert not set(table.groups[keep]) & set(table.groups[held])
    plan = plan_splits({"train": table}, strategy="auto", val_fraction=0.2, test_fraction=0.2, seed=0, group_kind="track")
    sides = [set(getattr(plan, name).groups.tolist()) for name in ("train", "val", "test")]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert plan.strategy == "grouped by track"
    with pytest.raises(DataError, match="no groups"):
        plan_splits({"train": SampleTable(["a", "b"], np.asarray([0, 1]))}, strategy="grouped", val_fraction=0.5,
                    test_fraction=0.0, seed=0)


def test_tiny_sets_fall_back_to_a_random_split():
    table = SampleTable([f"{i}" for i in range(5)], np.asarray([0, 0, 1, 1, 2]))
    plan = plan_splits({"train": table}, strategy="stratified", val_fraction=0.2, test_fraction=0.0, seed=0)
    assert len(plan.val) == 1 and len(plan.train) == 4
    assert plan.strategy.startswith("random")


def test_split_manifest_lists_every_sample(tmp_path):
    table = grouped_table()
    plan = plan_splits({"train": table}, strategy="auto", val_fraction=0.2, test_fraction=0.2, seed=0)
    write_split_manifest(plan, ["a", "b", "c", "d"], tmp_path / "splits.csv")
    with open(tmp_path / "splits.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(table) and {r["split"] for r in rows} == {"train", "val", "test"}
    assert sorted(r["path"] for r in rows) == sorted(table.paths)


# ---------------------------------------------------------------------------------------------------------------
# resnetlab data split
# ---------------------------------------------------------------------------------------------------------------


def make_class_folders(root, counts=None, order=None):
    counts = counts or {"cat": 10, "dog": 5, "eel": 2}
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / name / f"{i:02d}.png")
    if order:
        (root / "classes.txt").write_text("".join(f"{name}\n" for name in order))
    return root


def test_data_split_materialises_a_per_class_split_with_hard_links(tmp_path):
    src = make_class_folders(tmp_path / "src", order=["dog", "cat", "eel"])
    result = split_class_folders(src, tmp_path / "out", test_fraction=0.2, seed=0)
    assert result.counts == {"dog": {"train": 4, "test": 1}, "cat": {"train": 8, "test": 2},
                             "eel": {"train": 1, "test": 1}}
    out = tmp_path / "out"
    assert (out / "classes.txt").read_text() == "dog\ncat\neel\n"
    test_files = sorted(p.relative_to(out / "test") for p in (out / "test").rglob("*.png"))
    train_files = sorted(p.relative_to(out / "train") for p in (out / "train").rglob("*.png"))
    assert not set(test_files) & set(train_files) and len(test_files) + len(train_files) == 17
    linked = out / "train" / train_files[0]
    assert os.stat(linked).st_ino == os.stat(src / train_files[0]).st_ino and result.linked == 17
    again = split_class_folders(src, tmp_path / "again", test_fraction=0.2, seed=0)
    assert sorted(p.relative_to(tmp_path / "again" / "test") for p in (tmp_path / "again" / "test").rglob("*.png")) == test_files
    other = split_class_folders(src, tmp_path / "other", test_fraction=0.2, seed=1)
    assert other.counts == result.counts


def test_data_split_copies_where_links_fail(tmp_path, monkeypatch):
    src = make_class_folders(tmp_path / "src", {"a": 3, "b": 3})

    def no_links(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    result = split_class_folders(src, tmp_path / "out", test_fraction=0.34, seed=0)
    assert result.copied == 6 and result.linked == 0
    assert sum(1 for _ in (tmp_path / "out").rglob("*.png")) == 6


def test_data_split_cli_and_refusals(tmp_path, capsys):
    src = make_class_folders(tmp_path / "src")
    assert main(["data", "split", str(src), "--out", str(tmp_path / "out"), "--test-fraction", "0.2", "--seed", "0"]) == 0
    assert "train 13, test 4" in capsys.readouterr().out
    assert main(["data", "split", str(src), "--out", str(tmp_path / "out")]) == 2  # not empty
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["data", "split", str(tmp_path / "out"), "--out", str(tmp_path / "o2")]) == 2  # already split
    assert "already split" in capsys.readouterr().err
    assert main(["data", "split", str(src), "--out", str(tmp_path / "o3"), "--test-fraction", "1.5"]) == 2
    assert not (tmp_path / "o3").exists()
