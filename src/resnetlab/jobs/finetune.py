"""Fine-tuning a trained resnetlab model to a new domain: ``resnetlab train --init-from RUN_OR_CHECKPOINT``.

The fine-tuned model is a drop-in replacement for the one it started from:

- its **class list** is the checkpoint's, head kept: the new data's classes (all of them, or a few) are mapped onto
  the model's by id, then by name, as ``evaluate`` maps a foreign test set (:func:`~resnetlab.data.datasets.
  map_classes_to_model`); a class the model does not know is an error;
- its **preprocessing** (input size, resize, crop, ROI crop, contrast, mean and std) and its **architecture** (model
  name and options) are the checkpoint's, whatever the recipe says (a different ``model.name`` is an error);
- the weights are read with :func:`~resnetlab.checkpoint.load_checkpoint` (``weights_only``), and every checkpoint
  of the new run records ``init_from: {checkpoint, sha256}``.

The data is split in its own class list, exactly as ``evaluate`` rebuilds a run's splits later, then relabelled into
the model's; the checkpoints record the fingerprints of the data and of its splits in that own class list, so
``evaluate RUN --split val`` finds the same held-out images.

After training, :func:`write_finetune_comparison` measures what fine-tuning did: the original and the fine-tuned
model on the new data's test split (the gain) and on the original dataset's test split (what was forgotten), in
``eval/finetune.json``, which the report's "Fine-tuning" section shows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnetlab.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    preprocessing_from_meta,
    resolve_checkpoint_file,
)
from resnetlab.config import RunConfig
from resnetlab.data.build import eval_batches_for_table
from resnetlab.data.datasets import map_classes_to_model, open_dataset_for_model
from resnetlab.data.records import DatasetSource, SampleTable
from resnetlab.data.splits import SplitPlan, plan_data_splits
from resnetlab.deployment.records import file_sha256
from resnetlab.engine.evaluation_loop import evaluate_loader
from resnetlab.engine.runtime import Runtime
from resnetlab.errors import CheckpointError, ConfigError, DataError, first_line
from resnetlab.jobs.evaluate import evaluation_data_config
from resnetlab.utils.io import write_json

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable

#: data.* keys describing the model's input; a fine-tuning run takes them from the checkpoint.
PREPROCESSING_FIELDS = ("input_size", "resize", "crop_pct", "interpolation", "roi_crop", "contrast")
#: The figures of each before/after entry of eval/finetune.json (metrics.json keys -> finetune.json keys).
SCORES = {"top1": "top1", "balanced_accuracy": "balanced_accuracy", "ece": "ece", "num_samples": "num_images"}
FINETUNE_FILE = "finetune.json"


@dataclass
class OriginalTest:
    """The original dataset's test split, in the model's class list, for measuring what fine-tuning forgot."""

    spec: str
    table: SampleTable
    where: str  # which split this is, in words
    labels_present: list[int] | None


@dataclass
class InitFrom:
    """The checkpoint a run fine-tunes, read once before the run starts."""

    checkpoint: Path
    sha256: str
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    # Set when the data has been mapped onto the model's classes: the model class indices the data holds (None:
    # all of them), and the data's fingerprints in its own class list (recorded in the checkpoints).
    labels_present: list[int] | None = None
    data_record: dict[str, Any] = field(default_factory=dict)
    original: OriginalTest | None = None
    original_skipped: str | None = None  # why there is no original test split to evaluate on

    @property
    def record(self) -> dict[str, str]:
        """``meta["init_from"]`` of the new run's checkpoints."""
        return {"checkpoint": str(self.checkpoint), "sha256": self.sha256}

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        prep = self.meta["preprocessing"]
        return tuple(float(v) for v in prep["mean"]), tuple(float(v) for v in prep["std"])

    def meta_extra(self) -> dict[str, Any]:
        """What the new run's checkpoints add to their meta."""
        return {"init_from": self.record, "data": self.data_record}


# ---------------------------------------------------------------------------------------------------------------
# Before the run: the checkpoint, and the config it implies
# ---------------------------------------------------------------------------------------------------------------


def resolve_init_from(cfg: RunConfig, log: Callable[[str], None] = _logger.info) -> tuple[RunConfig, InitFrom | None]:
    """Read ``model.init_from`` and return the config the run trains with (the checkpoint's model and
    preprocessing), with the checkpoint; ``(cfg, None)`` when there is nothing to start from."""
    if not cfg.model.init_from:
        if cfg.train.freeze != "none" and not (cfg.model.pretrained or cfg.model.pretrained_path):
            raise ConfigError(f"train.freeze={cfg.train.freeze} (recipe {cfg.recipe}) trains only part of the model, "
                              "so it must start from trained weights: pass --init-from RUN_OR_CHECKPOINT (the run "
                              "directory or checkpoint to fine-tune), or set train.freeze=none")
        if cfg.eval.original_data:
            log(f"warning: eval.original_data={cfg.eval.original_data} is used only when fine-tuning (--init-from)")
        return cfg, None
    try:
        path = resolve_checkpoint_file(cfg.model.init_from)
        sha256 = file_sha256(path)  # of the file read next: the record names the very weights the run started from
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"--init-from: {first_line(err)}") from None
    except OSError as err:
        raise CheckpointError(f"--init-from: cannot read '{cfg.model.init_from}' ({err.strerror})") from None
    meta = state["meta"]
    log(f"--init-from {path} (sha256 {sha256[:12]}...): {meta['model']['name']} with "
        f"{len(meta['classes']['names'])} classes, trained on {meta['data'].get('spec')}")
    cfg = _adopt_model(cfg, meta, path, log)
    cfg = _adopt_preprocessing(cfg, meta, log)
    init = InitFrom(checkpoint=path.resolve(), sha256=sha256, meta=meta, weights=state["model"])
    _open_original_test(init, cfg.eval.original_data, log)
    return cfg, init


def _adopt_model(cfg: RunConfig, meta: dict[str, Any], path: Path, log: Callable[[str], None]) -> RunConfig:
    from resnetlab.models import resolve_model_name

    m = cfg.model
    name = resolve_model_name(meta["model"]["name"])
    given = m.model_fields_set
    if "name" in given and resolve_model_name(m.name) != name:
        raise ConfigError(f"model.name={m.name} but --init-from {path} holds a {name}; fine-tuning keeps the "
                          f"checkpoint's model: drop model.name (--model) or set it to {name}")
    if m.pretrained_path:
        raise ConfigError(f"model.pretrained_path={m.pretrained_path} and --init-from {path} both give starting "
                          "weights; use one of them")
    kwargs = dict(meta["model"]["kwargs"])
    saved_drop_rate = kwargs.pop("drop_rate", None)
    if "kwargs" in given and m.kwargs and m.kwargs != kwargs:
        raise ConfigError(f"model.kwargs={m.kwargs} but the model in --init-from {path} was built with {kwargs}; "
                          "fine-tuning keeps the checkpoint's architecture: drop model.kwargs")
    if m.pretrained:
        log(f"model.pretrained={m.pretrained} is not used: the starting weights come from --init-from {path}")
    # Dropout has no weights: a fine-tuning recipe may choose its own rate; otherwise the checkpoint's.
    drop_rate = m.drop_rate if "drop_rate" in given and m.drop_rate is not None else saved_drop_rate
    model = m.model_copy(update={"name": name, "kwargs": kwargs, "drop_rate": drop_rate, "pretrained": False,
                                 "zero_init_residual": False})
    return cfg.model_copy(update={"model": model})


def _adopt_preprocessing(cfg: RunConfig, meta: dict[str, Any], log: Callable[[str], None]) -> RunConfig:
    prep = meta["preprocessing"]
    wanted: dict[str, Any] = {key: prep[key] for key in PREPROCESSING_FIELDS}
    # data.normalize as the original run had it, for the record; the numbers themselves are the checkpoint's
    # mean and std (InitFrom.normalization), not recomputed on the new data.
    wanted["normalize"] = meta["config"]["data"]["normalize"]
    differing = [f"data.{key}={getattr(cfg.data, key)!r} (checkpoint: {value!r})" for key, value in wanted.items()
                 if key in cfg.data.model_fields_set and getattr(cfg.data, key) != value]
    if differing:
        log(f"warning: fine-tuning keeps the checkpoint's preprocessing, so these settings are not used: "
            f"{', '.join(differing)}")
    crop = f" (crop {prep['crop_pct']})" if prep["resize"] == "shorter_crop" else ""
    log(f"preprocessing from the checkpoint: {prep['input_size']} px, resize {prep['resize']}{crop}, "
        f"{prep['interpolation']}, ROI crop {'on' if prep['roi_crop'] else 'off'}, contrast {prep['contrast']}, "
        f"mean {list(prep['mean'])}, std {list(prep['std'])}")
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=wanted)})


# ---------------------------------------------------------------------------------------------------------------
# The data, in the model's class list
# ---------------------------------------------------------------------------------------------------------------


def to_model_classes(source: DatasetSource, plan: SplitPlan, init: InitFrom,
                     log: Callable[[str], None] = _logger.info) -> tuple[DatasetSource, SplitPlan]:
    """``source`` and its split ``plan`` relabelled into the checkpoint's class list (all of its classes, those
    without images included), so that the head and the class list stay the model's."""
    ids, names = list(init.meta["classes"]["ids"]), list(init.meta["classes"]["names"])
    mapping = map_classes_to_model(source, ids, names)
    unknown = np.flatnonzero(mapping < 0)
    if len(unknown):
        known = ", ".join(_class_label(cid, name) for cid, name in list(zip(ids, names))[:8])
        first = _class_label(source.class_ids[unknown[0]], source.class_names[unknown[0]])
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise DataError(f"{source.spec}: class {first}{more} is not a class of the model in --init-from "
                        f"{init.checkpoint}, which knows {known}{' ...' if len(ids) > 8 else ''} ({len(ids)} "
                        "classes); fine-tuning keeps the model's classes: relabel those images by a known class id "
                        "or name, or leave them out (data.classes keeps the classes listed)")
    targets, counts = np.unique(mapping, return_counts=True)
    if (counts > 1).any():
        twice = int(targets[counts > 1][0])
        shared = [_class_label(source.class_ids[i], source.class_names[i]) for i in np.flatnonzero(mapping == twice)]
        raise DataError(f"{source.spec}: classes {' and '.join(shared)} both map onto the model's class "
                        f"{_class_label(ids[twice], names[twice])}; give each model class one class of the data")
    init.data_record = {"fingerprint": source.fingerprint(),
                        "split_fingerprints": {n: getattr(plan, n).fingerprint() for n in ("train", "val", "test")},
                        "class_mapping": {str(cid): int(mapping[i]) for i, cid in enumerate(source.class_ids)}}
    present = sorted(int(i) for i in mapping)
    init.labels_present = None if len(present) == len(ids) else present
    pairs = ", ".join(f"{_class_label(cid, name)} -> {mapping[i]}" for i, (cid, name)
                      in enumerate(zip(source.class_ids, source.class_names)))
    log(f"classes: the data's {source.num_classes} classes are {'all' if init.labels_present is None else 'some'} of "
        f"the model's {len(ids)} (head and class list kept): {pairs}")
    id_of = {str(cid): ids[mapping[i]] for i, cid in enumerate(source.class_ids)}
    relabelled = DatasetSource(
        spec=source.spec, root=source.root, class_ids=ids, class_names=names,
        splits={name: _relabel(table, mapping) for name, table in source.splits.items()},
        group_kind=source.group_kind, notes=list(source.notes), rejected=source.rejected,
        mirror_pairs=tuple((id_of[str(a)], id_of[str(b)]) for a, b in source.mirror_pairs
                           if str(a) in id_of and str(b) in id_of))
    relabelled_plan = SplitPlan(train=_relabel(plan.train, mapping), val=_relabel(plan.val, mapping),
                                test=_relabel(plan.test, mapping), strategy=plan.strategy, sources=dict(plan.sources))
    return relabelled, relabelled_plan


def _relabel(table: SampleTable, mapping: np.ndarray) -> SampleTable:
    return SampleTable(list(table.paths), mapping[table.labels], table.rois, table.groups)


def _class_label(cid: Any, name: str) -> str:
    return f"{cid!r} ({name})" if str(cid) != name else repr(cid)


def build_init_model(init: InitFrom, model_kwargs: dict[str, Any], log: Callable[[str], None] = _logger.info
                     ) -> tuple[torch.nn.Module, str]:
    """The checkpoint's model with its weights (``model_kwargs``: the run's, i.e. the checkpoint's options and
    the run's dropout), and where they came from, for the log, run_info.json and the report."""
    from resnetlab.models import count_params, create_model

    spec = init.meta["model"]
    model = create_model(spec["name"], spec["num_classes"], **model_kwargs)
    try:
        model.load_state_dict(init.weights)
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"the weights of --init-from {init.checkpoint} do not fit model '{spec['name']}': "
                              f"{first_line(err)}") from None
    origin = f"fine-tuned from {init.checkpoint} (sha256 {init.sha256[:12]}...)"
    log(f"model {spec['name']}: {count_params(model):,} parameters, {spec['num_classes']} classes (the "
        f"checkpoint's), {origin}")
    return model, origin


# ---------------------------------------------------------------------------------------------------------------
# After the run: before and after, on the new domain and on the original one
# ---------------------------------------------------------------------------------------------------------------


def _open_original_test(init: InitFrom, given: str | None, log: Callable[[str], None]) -> None:
    """Find the original dataset's test split (``eval.original_data``, else the original run's dataset), before
    training, so that a spec the user gave fails now rather than after the run; the run's own dataset is skipped
    with a log line when it cannot be read here."""
    if given is not None and given.strip().lower() == "none":
        init.original_skipped = "eval.original_data=none"
        log("not evaluating on the original dataset (eval.original_data=none)")
        return
    meta = init.meta
    saved = RunConfig.model_validate(meta["config"])
    spec = given or meta["data"].get("spec") or saved.data.spec
    data_cfg = evaluation_data_config(saved, spec)
    try:
        source, mapping = open_dataset_for_model(data_cfg, meta)
    except DataError as err:
        if given is not None:
            raise DataError(f"--original-data {given}: {first_line(err)}") from None
        init.original_skipped = f"the original dataset {spec} cannot be read here ({first_line(err)})"
        log(f"not evaluating what fine-tuning forgets: {init.original_skipped}; pass --original-data SPEC to name it")
        return
    if len(source.splits.get("test", ())):
        table, where = source.splits["test"], "its test split"
    else:
        # The split the original run held out, rebuilt from its recorded split settings (as `evaluate` does).
        table = plan_data_splits(source, data_cfg).test
        where = "the test split the original run held out"
        recorded = meta["data"].get("split_fingerprints", {}).get("test")
        if source.fingerprint() == meta["data"]["fingerprint"] and recorded and recorded != table.fingerprint():
            log("warning: the rebuilt test split of the original dataset differs from the one the original run used "
                "(the data changed?)")
    known = mapping[table.labels] >= 0
    table = table.subset(np.flatnonzero(known))
    if len(table) == 0:
        init.original_skipped = f"no image of {spec} ({where}) belongs to a class of the model"
        log(f"not evaluating what fine-tuning forgets: {init.original_skipped}")
        return
    table = _relabel(table, mapping)
    present = sorted(set(table.labels.tolist()))
    init.original = OriginalTest(spec=spec, table=table, where=where,
                                 labels_present=None if len(present) == len(meta["classes"]["names"]) else present)
    log(f"original dataset {spec}: {len(table)} images ({where}) to measure what fine-tuning forgets")


def scores(model: torch.nn.Module, runtime: Runtime, batches, class_names: list[str],
           labels_present: list[int] | None) -> dict[str, Any]:
    """Top-1, balanced accuracy, ECE (of the uncalibrated softmax) and the number of images of ``model`` on
    ``batches``: the figures of one before/after entry."""
    from resnetlab.evaluation.metrics import evaluate_predictions

    _, logits, targets = evaluate_loader(model, batches, runtime, collect=True)
    metrics = evaluate_predictions(logits, targets, class_names, topk=1, labels_present=labels_present).metrics
    return {name: metrics[key] for key, name in SCORES.items()}


def write_finetune_comparison(init: InitFrom, model: torch.nn.Module, runtime: Runtime, test_batches, *,
                              spec: str, out_dir: Path, batch_size: int,
                              log: Callable[[str], None] = _logger.info) -> dict[str, Any]:
    """Evaluate the original model (the checkpoint) and the fine-tuned ``model`` on the new data's test split and
    on the original dataset's, and write ``out_dir/finetune.json``; returns the record.

    ``new_domain.after`` is the run's own test evaluation (same model, images and preprocessing); all four
    figures come from one function, on the uncalibrated softmax, so that before and after compare like for like.
    """
    names = list(init.meta["classes"]["names"])
    original, _ = model_from_checkpoint({"model": init.weights, "meta": init.meta})
    original = original.to(runtime.device)
    was_training = model.training
    record: dict[str, Any] = {
        "init_from": init.record,
        "confidence": "softmax, uncalibrated",
        "new_domain": {"data": spec, "split": "test",
                       "before": scores(original, runtime, test_batches, names, init.labels_present),
                       "after": scores(model, runtime, test_batches, names, init.labels_present)},
        "original": None,
    }
    if init.original is not None:
        prep = preprocessing_from_meta(init.meta)
        batches, table, unreadable = eval_batches_for_table(init.original.table, prep, batch_size,
                                                            on_bad_image="skip", split="original test")
        if unreadable:
            log(f"original dataset: skipped {len(unreadable)} unreadable image(s)")
        if len(table):
            present = init.original.labels_present
            record["original"] = {"data": init.original.spec, "split": init.original.where,
                                  "before": scores(original, runtime, batches, names, present),
                                  "after": scores(model, runtime, batches, names, present)}
        else:
            record["original_skipped"] = "no readable image in the original dataset's test split"
    else:
        record["original_skipped"] = init.original_skipped
    model.train(was_training)
    write_json(out_dir / FINETUNE_FILE, record)
    for domain in ("new_domain", "original"):
        entry = record[domain]
        if entry:
            before, after = entry["before"], entry["after"]
            log(f"fine-tuning, {domain.replace('_', ' ')} ({entry['data']}, {entry['split']}, {after['num_images']} "
                f"images): top-1 {before['top1']:.4f} -> {after['top1']:.4f}, balanced accuracy "
                f"{before['balanced_accuracy']:.4f} -> {after['balanced_accuracy']:.4f}, ECE {before['ece']:.4f} -> "
                f"{after['ece']:.4f}")
    return record
