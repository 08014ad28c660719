"""Images without labels: what test-time adaptation reads from a new domain.

``folder:PATH`` is every image file below ``PATH``, at any depth, whatever the folders are called: a flat folder of
photos, a camera's dated sub-folders, or class folders whose names are then not read. Any other spec (``gtsrb:PATH``,
``csv:FILE``, ``synthetic-signs`` ...) is read by its format's reader and all of its splits are taken, with their ROI
boxes, and without their labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnetlab.config import DataConfig
from resnetlab.data.datasets import open_dataset, parse_spec
from resnetlab.data.formats.common import IMAGE_EXTENSIONS, require_dir, scan_images
from resnetlab.data.records import SampleTable
from resnetlab.errors import DataError


@dataclass
class UnlabelledImages:
    """The images of a spec as a table (labels all 0, meaningless) and what the log should say about reading it."""

    spec: str
    table: SampleTable
    labelled: bool  # whether the source had labels (which were dropped)
    notes: list[str] = field(default_factory=list)


def open_unlabelled(cfg: DataConfig) -> UnlabelledImages:
    """Every image of ``cfg.spec``, labels dropped; ``cfg`` supplies the reader's other settings
    (``data.on_bad_image`` for rows a reader cannot use, ``data.synthetic_per_class`` ...)."""
    prefix, argument = parse_spec(cfg.spec)
    if prefix == "folder":
        root = require_dir(Path(argument).expanduser(), "image folder")
        images, ignored = scan_images(root)
        if not images:
            raise DataError(f"'{root}' holds no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, at any "
                            "depth); check the path in --data")
        notes = [note for note in [ignored.note(root)] if note]
        paths = [str(p.resolve()) for p in images]
        nested = any(p.parent != root for p in images)
        if nested:
            notes.append(f"read all {len(paths)} image(s) below {root}; sub-folder names are not read as classes "
                         "(adaptation uses no labels)")
        return UnlabelledImages(cfg.spec, SampleTable(paths, np.zeros(len(paths), dtype=np.int64)), labelled=False,
                                notes=notes)
    source = open_dataset(cfg)
    splits = [name for name in ("train", "val", "test") if len(source.splits.get(name, ()))]
    table = SampleTable.concat([source.splits[name] for name in splits])
    notes = list(source.notes)
    notes.append(f"{source.spec} is labelled: its labels are ignored (adaptation uses none); taking the "
                 f"{len(table)} image(s) of its {'/'.join(splits)} split(s)")
    table = SampleTable(table.paths, np.zeros(len(table), dtype=np.int64), table.rois)
    return UnlabelledImages(source.spec, table, labelled=True, notes=notes)
