r"""``resnetlab data sample``: a K-shot training manifest and the test manifest of everything else.

From any labelled dataset (``folder:``, ``csv:``, ``gtsrb:``, ``synthetic-signs`` ...) :func:`sample_few_shot` draws
K images per class, stratified and seeded, from every split the dataset brings, and writes CSV manifests that a run
reads back as ``csv:`` specs:

* ``fewshot.csv`` -- the K shots of every class (the training set of a few-shot run);
* ``rest.csv`` -- every other image (the test set);
* ``excluded.csv`` -- only for a dataset with groups, and only when some are left over: the other images of the
  groups a shot came from (see below);
* ``split.csv`` -- with ``split_test=True``: the rows of fewshot.csv and rest.csv with a ``Split`` column (``train``,
  ``test``), so that one run ``--data csv:DIR/split.csv data.val_fraction=0`` trains on the shots and reports on the
  rest (a validation part held out of a few shots per class would take whole classes out of training);
* ``sample.json`` -- what was drawn: the spec, K, the seed, the counts per class, the notes.

Columns: ``Path`` (absolute), ``ClassId`` (the dataset's integer class ids; ``ClassName`` instead where the ids are
not integers, e.g. class folder names, and beside it where the classes have names of their own),
``Roi.X1,Roi.Y1,Roi.X2,Roi.Y2`` where the dataset has boxes (empty cells for a sample without one), ``Group`` in
rest.csv and excluded.csv where it has groups (not in fewshot.csv and split.csv: the shots come from distinct groups
already, and a run's grouped hold-out of a validation part cannot be stratified with a few images per class).

Small classes: a class with K images or fewer gives all but one of them (at least one stays for the test set), and
the manifest's summary says which classes came up short.

Groups (GTSRB tracks: about 30 frames of one physical sign; a ``Group`` column of a CSV): frames of one track are
near-duplicates, so a track must not be on both sides. The K shots of a class come from K distinct groups where the
class has enough, one random frame each (more frames of the drawn groups only when it has too few groups), and
always from at most all but one of its groups so that the class keeps test images. The other frames of a drawn
group go to neither manifest but to ``excluded.csv``: ``rest.csv`` holds no image of a track a shot came from (no
leakage), and fewshot, rest and excluded together are exactly the dataset. A class with a single group gives its
shots from it and has no test images (said in the notes). A dataset whose groups are only in its file names (the
BelgiumTSC files ``btsc_test_31_00588_00001.webp`` are frame 1 of track 00588) gets them from ``group_pattern``, a
regular expression searched in each file name: its first capture group (or the whole match) is the group, e.g.
``^(.*)_\d+\.\w+$``; a file it does not match is a group of its own. The ``Group`` column written holds the split's
name before the group (``train/00588``): readers number groups per split.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resnetlab.data.records import DatasetSource, SampleTable
from resnetlab.errors import DataError
from resnetlab.utils.io import write_csv, write_json

ROI_COLUMNS = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")


@dataclass
class FewShotSample:
    """What :func:`sample_few_shot` drew and wrote."""

    spec: str
    out: Path
    per_class: int
    seed: int
    files: dict[str, Path]  # "fewshot", "rest", and where written "excluded", "split", "summary"
    classes: list[dict[str, Any]]  # per class: index, id, name, available, groups, fewshot, rest, excluded
    group_kind: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def fewshot_images(self) -> int:
        return sum(c["fewshot"] for c in self.classes)

    @property
    def rest_images(self) -> int:
        return sum(c["rest"] for c in self.classes)

    @property
    def excluded_images(self) -> int:
        return sum(c["excluded"] for c in self.classes)

    @property
    def short_classes(self) -> list[dict[str, Any]]:
        """Classes that gave fewer than K shots."""
        return [c for c in self.classes if c["fewshot"] < self.per_class]

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "out": str(self.out), "per_class": self.per_class, "seed": self.seed,
                "files": {k: str(v) for k, v in self.files.items()}, "group_kind": self.group_kind,
                "fewshot_images": self.fewshot_images, "rest_images": self.rest_images,
                "excluded_images": self.excluded_images, "classes": self.classes, "notes": self.notes}


def _pooled(source: DatasetSource, pattern: re.Pattern | None) -> tuple[SampleTable, np.ndarray]:
    """Every split of ``source`` in one table, and a group key per sample (its own key where it has no group).

    Keys carry the split's name: a reader numbers the tracks of each split on its own, and track 3 of the test split
    is not track 3 of the training split.
    """
    names = sorted(source.splits)
    tables = [source.splits[name] for name in names]
    keys = []
    for name, table in zip(names, tables):
        for i, path in enumerate(table.paths):
            if pattern is not None:
                found = pattern.search(Path(path).name)
                group = (found.group(1) if pattern.groups else found.group(0)) if found else f"#{i}"
            else:
                group = str(table.groups[i]) if table.groups is not None else f"#{i}"
            keys.append(f"{name}/{group}")
    return SampleTable.concat(tables), np.asarray(keys, dtype=object)


def _draw_class(rng: np.random.Generator, members: np.ndarray, keys: np.ndarray, per_class: int,
                grouped: bool) -> tuple[list[int], list[int], list[int]]:
    """Shots, rest and excluded (indices into the pooled table) for the samples ``members`` of one class."""
    if not grouped:
        order = rng.permutation(members)
        take = min(per_class, max(len(members) - 1, 0))
        return order[:take].tolist(), order[take:].tolist(), []
    group_names = sorted(set(keys[members].tolist()))
    frames = {g: [] for g in group_names}
    for i in members.tolist():
        frames[keys[i]].append(i)
    order = [group_names[j] for j in rng.permutation(len(group_names))]
    usable = order if len(order) == 1 else order[: min(per_class, len(order) - 1)]
    shuffled = {g: rng.permutation(frames[g]).tolist() for g in usable}
    shots: list[int] = []
    depth = 0
    while len(shots) < per_class and any(depth < len(shuffled[g]) for g in usable):
        # One frame from each drawn group, then a second from each, ...: distinct groups first.
        shots += [shuffled[g][depth] for g in usable if depth < len(shuffled[g])][: per_class - len(shots)]
        depth += 1
    chosen = set(shots)
    excluded = [i for g in usable for i in shuffled[g] if i not in chosen]
    rest = [i for g in order if g not in shuffled for i in frames[g]]
    return shots, rest, excluded


def sample_few_shot(source: DatasetSource, out_dir: str | Path, per_class: int, *, seed: int = 0,
                    split_test: bool = False, group_pattern: str | None = None,
                    log: Callable[[str], None] | None = None) -> FewShotSample:
    """Draw ``per_class`` images of each class of ``source`` into ``out_dir/fewshot.csv``, the rest into
    ``out_dir/rest.csv`` (see the module docstring for the files, columns and the rules for small classes and
    groups). The draw is a function of the dataset and ``seed`` alone."""
    if per_class < 1:
        raise DataError(f"--per-class {per_class}: give the number of training images per class, 1 or more")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' is a file; give a folder to write fewshot.csv and rest.csv into")
    pattern = None
    if group_pattern:
        try:
            pattern = re.compile(group_pattern)
        except re.error as exc:
            raise DataError(f"--group-pattern {group_pattern!r} is not a regular expression ({exc}); e.g. "
                            r"'^(.*)_\d+\.\w+$' groups track_frame.ext file names by track") from None
    table, keys = _pooled(source, pattern)
    if not len(table):
        raise DataError(f"{source.spec}: no labelled images to sample from")
    grouped = pattern is not None or any(t.groups is not None for t in source.splits.values())
    group_kind = "group" if pattern is not None else source.group_kind
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"fewshot": [], "rest": [], "excluded": []}
    classes, notes = [], []
    for index, (class_id, name) in enumerate(zip(source.class_ids, source.class_names)):
        members = np.flatnonzero(table.labels == index)
        shots, rest, excluded = _draw_class(rng, members, keys, per_class, grouped)
        parts["fewshot"] += shots
        parts["rest"] += rest
        parts["excluded"] += excluded
        groups = len(set(keys[members].tolist())) if grouped else None
        classes.append({"index": index, "id": class_id, "name": name, "available": len(members), "groups": groups,
                        "fewshot": len(shots), "rest": len(rest), "excluded": len(excluded)})
        label = f"class {class_id}" + (f" ({name})" if str(name) != str(class_id) else "")
        if len(shots) < per_class:
            if grouped and groups and groups <= per_class:
                notes.append(f"{label}: {len(shots)} shot(s) of {per_class}, from {len(members)} image(s) in "
                             f"{groups} {group_kind or 'group'}(s), one kept whole for the test set")
            else:
                notes.append(f"{label}: {len(shots)} shot(s) of {per_class}, from {len(members)} image(s); at least "
                             "one is kept for the test set")
        elif grouped and groups is not None and groups - 1 < per_class and groups > 1:
            notes.append(f"{label}: only {groups} {group_kind or 'group'}(s), so several shots share one")
        if not rest:
            notes.append(f"{label}: no test image left (all its images or {group_kind or 'group'}s were "
                         "drawn)")

    if pattern is not None:
        unmatched = sum(1 for path in table.paths if not pattern.search(Path(path).name))
        if unmatched:
            notes.append(f"--group-pattern matched no group in {unmatched} of {len(table)} file names; each of those "
                         "is a group of its own")
    elif not grouped:
        notes.append("the dataset has no groups, so images are drawn one by one: if one object appears in several "
                     "images (frames of a track), give --group-pattern so that they stay on one side")
    out.mkdir(parents=True, exist_ok=True)
    columns, rows_of = _manifest_rows(source, table, keys if grouped else None)
    # The shots carry no Group column: they already come from distinct groups wherever a class has enough, and a
    # run's hold-out of a validation part by group cannot be stratified with a few images per class.
    shot_columns = [c for c in columns if c != "Group"]
    files = {"fewshot": out / "fewshot.csv", "rest": out / "rest.csv"}
    write_csv(files["fewshot"], (rows_of(i) for i in sorted(parts["fewshot"])), shot_columns)
    write_csv(files["rest"], (rows_of(i) for i in sorted(parts["rest"])), columns)
    if parts["excluded"]:
        files["excluded"] = out / "excluded.csv"
        write_csv(files["excluded"], (rows_of(i) for i in sorted(parts["excluded"])), columns)
    else:
        (out / "excluded.csv").unlink(missing_ok=True)  # a stale one from an earlier draw would mislead
    if split_test:
        files["split"] = out / "split.csv"
        rows = [{**rows_of(i), "Split": "train"} for i in sorted(parts["fewshot"])]
        rows += [{**rows_of(i), "Split": "test"} for i in sorted(parts["rest"])]
        write_csv(files["split"], rows, [*shot_columns, "Split"])
    files["summary"] = out / "sample.json"
    result = FewShotSample(spec=source.spec, out=out, per_class=per_class, seed=seed, files=files, classes=classes,
                           group_kind=group_kind if grouped else None, notes=notes)
    write_json(files["summary"], result.to_dict())
    if log is not None:
        for note in notes:
            log(f"note: {note}")
    return result


def _manifest_rows(source: DatasetSource, table: SampleTable,
                   keys: np.ndarray | None) -> tuple[list[str], Callable[[int], dict[str, Any]]]:
    """The manifest's columns, and a function from a pooled index to its row."""
    integer_ids = all(isinstance(c, (int, np.integer)) or re.fullmatch(r"[+-]?[0-9]{1,18}", str(c))
                      for c in source.class_ids)
    named = any(str(n) != str(c) for c, n in zip(source.class_ids, source.class_names))
    columns = ["Path"] + (["ClassId"] if integer_ids else []) + (["ClassName"] if named or not integer_ids else [])
    if table.rois is not None:
        columns += list(ROI_COLUMNS)
    if keys is not None:
        columns.append("Group")

    def row(i: int) -> dict[str, Any]:
        label = int(table.labels[i])
        values: dict[str, Any] = {"Path": str(Path(table.paths[i]).resolve())}
        if integer_ids:
            values["ClassId"] = int(source.class_ids[label])
        if "ClassName" in columns:
            values["ClassName"] = source.class_names[label] if named else str(source.class_ids[label])
        if table.rois is not None and (table.rois[i] >= 0).all():
            values.update({c: int(v) for c, v in zip(ROI_COLUMNS, table.rois[i].tolist())})
        if keys is not None:
            values["Group"] = keys[i]
        return values

    return columns, row
