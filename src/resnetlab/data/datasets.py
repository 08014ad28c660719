"""``--data SPEC`` -> a :class:`DatasetSource`, with the class subset applied."""

from __future__ import annotations

import numpy as np

from resnetlab.config import DataConfig
from resnetlab.data.formats import dataset_formats, get_reader
from resnetlab.data.records import DatasetSource
from resnetlab.errors import DataError


def parse_spec(spec: str) -> tuple[str, str]:
    prefix, sep, argument = spec.partition(":")
    if not sep:
        return spec, ""
    if not argument:
        raise DataError(f"--data '{spec}' has no path after '{prefix}:'; write it like {prefix}:/path/to/data")
    return prefix, argument


def open_dataset(cfg: DataConfig) -> DatasetSource:
    prefix, argument = parse_spec(cfg.spec)
    reader = get_reader(prefix)
    if reader is None:
        known = "; ".join(f"{name}{'' if name == 'synthetic-signs' else ':PATH'}" for name in dataset_formats())
        raise DataError(f"unknown dataset '{cfg.spec}'; --data takes one of: {known}")
    source = reader(argument, cfg)
    if cfg.classes:
        source = select_classes(source, cfg.classes)
    check_rejected(source, cfg.on_bad_image)
    return source


def map_classes_to_model(source: DatasetSource, model_ids: list, model_names: list[str]) -> np.ndarray:
    """For each class of ``source``, its index in the model's class list (matched by id, then by name), or -1."""
    by_id = {str(cid): i for i, cid in enumerate(model_ids)}
    by_name = {name.lower(): i for i, name in enumerate(model_names)}
    mapping = []
    for cid, name in zip(source.class_ids, source.class_names):
        mapping.append(by_id.get(str(cid), by_name.get(str(name).lower(), -1)))
    return np.asarray(mapping, dtype=np.int64)


def open_dataset_for_model(data_cfg: DataConfig, meta: dict) -> tuple[DatasetSource, np.ndarray]:
    """Read a dataset for a trained model: the source, and each of its classes' index in the model (or -1)."""
    try:
        source = open_dataset(data_cfg)
    except DataError:
        if not data_cfg.classes:
            raise
        # A foreign set may lack some of the classes the run kept: read all of its classes and map them instead.
        source = open_dataset(DataConfig.model_validate({**data_cfg.model_dump(), "classes": None}))
    return source, map_classes_to_model(source, meta["classes"]["ids"], meta["classes"]["names"])


def check_rejected(source: DatasetSource, policy: str) -> None:
    """Stop on rows or files the reader could not use, unless ``data.on_bad_image=skip`` (then they are logged)."""
    rejected = source.all_rejected()
    if not rejected:
        return
    if policy == "error":
        shown = "; ".join(f"{b.path} ({b.reason})" for b in rejected[:5])
        more = f"; and {len(rejected) - 5} more" if len(rejected) > 5 else ""
        raise DataError(f"{source.spec}: {len(rejected)} sample(s) cannot be used: {shown}{more}. Fix or remove them, "
                        "or pass data.on_bad_image=skip to go on without them (they are then listed in bad_images.csv)")
    source.notes.append(f"on_bad_image=skip: leaving out {len(rejected)} sample(s) the reader could not use "
                        f"(listed in bad_images.csv), e.g. {rejected[0].path} ({rejected[0].reason})")


def select_classes(source: DatasetSource, wanted: list[int | str]) -> DatasetSource:
    """Keep only the wanted classes (by id or name), relabelled 0..k-1 in the order given, names kept."""
    positions = []
    for item in wanted:
        position = _find_class(source, item)
        if position in positions:
            raise DataError(f"data.classes lists class {item!r} twice")
        positions.append(position)
    new_index = np.full(source.num_classes, -1, dtype=np.int64)
    new_index[positions] = np.arange(len(positions))
    splits = {}
    for name, table in source.splits.items():
        keep = np.flatnonzero(new_index[table.labels] >= 0)
        subset = table.subset(keep)
        subset.labels = new_index[subset.labels]
        splits[name] = subset
    kept_ids = [source.class_ids[p] for p in positions]
    return DatasetSource(spec=source.spec, root=source.root, class_ids=kept_ids,
                         class_names=[source.class_names[p] for p in positions], splits=splits,
                         group_kind=source.group_kind, notes=source.notes + [f"kept {len(positions)} classes"],
                         rejected=source.rejected,
                         mirror_pairs=tuple(pair for pair in source.mirror_pairs if set(pair) <= set(kept_ids)))


def _find_class(source: DatasetSource, item: int | str) -> int:
    for position, (cid, name) in enumerate(zip(source.class_ids, source.class_names)):
        if item == cid or str(item) == str(cid) or (isinstance(item, str) and item.lower() == name.lower()):
            return position
    shown = ", ".join(f"{cid} ({name})" if str(cid) != name else str(cid)
                      for cid, name in list(zip(source.class_ids, source.class_names))[:12])
    raise DataError(f"data.classes: no class {item!r} in {source.spec}; classes are: {shown}"
                    f"{' ...' if source.num_classes > 12 else ''}")
