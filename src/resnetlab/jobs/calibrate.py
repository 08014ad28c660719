"""`resnetlab calibrate`: fit a model's temperature and operating point again, on a labelled split, and store them.

Training stores a calibration fitted on its own validation split (:mod:`resnetlab.evaluation.selective`). This job
refits it when that is missing or no longer fits the model: for checkpoints written before calibration was stored,
for runs without a validation split, after ``adapt`` or fine-tuning, or to move the operating point to another rule
(``--coverage``/``--max-error``). The default data is the run's own validation split, rebuilt exactly as
``evaluate --split val`` rebuilds it; any labelled dataset whose classes are among the model's can be used instead.

The record replaces ``meta["calibration"]`` in the checkpoint file, atomically. The file's sha256 changes with it, so
the export cache builds ``predict``'s and ``serve``'s packages afresh, and exports made earlier no longer match it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from resnetlab.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    preprocessing_from_meta,
    resolve_checkpoint_file,
    store_calibration,
)
from resnetlab.config import RunConfig
from resnetlab.engine.runtime import resolve_runtime
from resnetlab.errors import ConfigError
from resnetlab.evaluation.selective import check_operating_rule, fit_calibration
from resnetlab.jobs.evaluate import collect_logits, evaluation_data_config, evaluation_table, readable_batches

_logger = logging.getLogger(__name__)

SPLITS = ("val", "test", "all")
# Below this many images the fitted temperature and, above all, a threshold at 99% coverage rest on a handful of
# answers: the calibration is stored, with a warning.
FEW_IMAGES = 200


def operating_rule(calibration: dict | None, saved: RunConfig, *, coverage: float | None,
                   max_error: float | None) -> tuple[float | None, float | None, str]:
    """``(coverage, max_error, why)`` for :func:`~resnetlab.evaluation.selective.fit_calibration`: the rule given,
    else the rule of the stored operating point, else the run's ``eval.max_error``/``eval.coverage``."""
    if coverage is not None and max_error is not None:
        raise ConfigError("--coverage and --max-error each choose the operating point: pass one of them")
    check_operating_rule(coverage, max_error)
    if coverage is not None:
        return coverage, None, "--coverage"
    if max_error is not None:
        return None, max_error, "--max-error"
    stored = (calibration or {}).get("operating_point") or {}
    if stored.get("rule") == "coverage":
        return float(stored["target"]), None, "the stored operating point's rule"
    if stored.get("rule") == "max_error":
        return None, float(stored["target"]), "the stored operating point's rule"
    if saved.eval.max_error is not None:
        return None, saved.eval.max_error, "the run's eval.max_error"
    return saved.eval.coverage, None, "the run's eval.coverage"


def calibrate_job(checkpoint: Path, data_spec: str | None = None, split: str = "val", *,
                  coverage: float | None = None, max_error: float | None = None, device: str = "auto",
                  batch_size: int | None = None, overrides: list[str] | None = None,
                  log: Callable[[str], None] = _logger.info) -> dict[str, Any]:
    """Fit the temperature and operating point of ``checkpoint`` (a file or run directory) on ``split`` of
    ``data_spec`` (default: the data it was trained on) and store them in the checkpoint; returns the record.

    Images of classes the model does not have are refused (a temperature fitted on answers the model cannot give
    would mean nothing); images that cannot be decoded stop the job unless ``data.on_bad_image=skip``.
    """
    if split not in SPLITS:
        raise ConfigError(f"--split '{split}': choose val, test or all")
    checkpoint_file = resolve_checkpoint_file(checkpoint)
    state = load_checkpoint(checkpoint_file)
    model, meta = model_from_checkpoint(state)
    del state  # the weights live on in `model`; the file is read again when the record is stored
    saved = RunConfig.model_validate(meta["config"])
    previous = meta.get("calibration")
    rule_coverage, rule_max_error, rule_source = operating_rule(previous, saved, coverage=coverage,
                                                                max_error=max_error)
    data_cfg = evaluation_data_config(saved, data_spec, overrides)
    selected = evaluation_table(meta, data_cfg, split, unknown_classes="error", log=log)
    if selected.same_dataset and split != "val":
        log(f"note: calibrating on the run's own {split} split: its test figures are no longer measured on images "
            "the model's calibration has not seen")
    prep = preprocessing_from_meta(meta)
    runtime = resolve_runtime(saved.train.model_copy(update={"device": device})).for_evaluation(saved.eval.precision)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches, table = readable_batches(selected.table, prep, batch_size or saved.data.eval_batch_size, data_cfg,
                                      split, selected.spec, None, job="calibrate", log=log)
    collected = collect_logits(model, runtime, batches)

    fitted_on = split if selected.same_dataset else f"{split} split of {selected.spec}"
    record = fit_calibration(collected.logits, collected.targets, coverage=rule_coverage, max_error=rule_max_error,
                             fitted_on=fitted_on)
    if record["num_images"] < FEW_IMAGES:
        log(f"warning: {record['num_images']} images are few to calibrate on (the operating point rests on a "
            f"handful of answers); use a split of at least {FEW_IMAGES} if there is one")
    store_calibration(checkpoint_file, record)
    point = record["operating_point"]
    if previous:
        log(f"replacing the calibration fitted on {previous.get('fitted_on')}: temperature "
            f"{previous['temperature']:.4g}, threshold {previous['operating_point']['threshold']:.4f}")
    log(f"calibration on {record['num_images']} images ({fitted_on}): temperature {record['temperature']:.4g} "
        f"(ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}); operating point ({point['rule']} "
        f"{point['target']:g}, from {rule_source}): threshold {point['threshold']:.4f}, coverage "
        f"{point['coverage']:.2%}, error among accepted {point['error']:.2%}; stored in {checkpoint_file}")
    log("the checkpoint changed: exports made from it before no longer match it (export it again), and its "
        "evaluations were made with the previous calibration (evaluate it again)")
    return record
