"""``synthetic-signs``: the built-in procedural traffic-sign set, read through the same loader as real GTSRB."""

from __future__ import annotations

from resnetlab.config import DataConfig
from resnetlab.data.formats._registry import register_format
from resnetlab.data.formats.gtsrb import read_gtsrb_kaggle
from resnetlab.data.records import DatasetSource


@register_format("synthetic-signs", "the built-in synthetic traffic signs (generated once, then cached)")
def open_synthetic(argument: str, cfg: DataConfig) -> DatasetSource:
    from resnetlab.data.synthetic import ensure_synthetic_signs

    root = ensure_synthetic_signs(per_class=cfg.synthetic_per_class, seed=cfg.synthetic_seed)
    source = read_gtsrb_kaggle(root, "synthetic-signs")
    source.notes.append(f"synthetic signs in {root}")
    return source
