"""Evaluate a model: on a run's own test split after training, or a checkpoint on any dataset later.

``resnetlab evaluate CHECKPOINT --data SPEC --split val`` rebuilds the very validation split the run held out:
the checkpoint records the data config and the split fingerprints, the split is recomputed with the same seed and
checked against them. A dataset from another source whose classes are a subset of the model's is evaluated on the
classes it has, its class ids mapped through the checkpoint's class list.

``--export DIR`` evaluates an export of the checkpoint instead of the checkpoint itself (an int8 ONNX model, a bf16
AOTInductor package, ...), on the same images with the same metrics and report, through the runtime that serves it:
the accuracy of what is deployed, measured on the whole split rather than on the sample the export checked.

The model's stored calibration (``meta["calibration"]``, fitted at the end of training or by ``resnetlab calibrate``)
is applied as ``predict`` and ``serve`` apply it: confidences are ``max softmax(logits / T)`` and answers below the
stored operating point are counted as "unknown" (``accepted`` = 0). ``--raw`` evaluates the uncalibrated logits;
``--coverage``/``--max-error`` choose another operating point from the stored validation curve.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from resnetlab.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    preprocessing_from_meta,
    resolve_checkpoint_file,
)
from resnetlab.config import DataConfig, RunConfig, parse_override, set_dotted, validate_config
from resnetlab.data.augment import get_policy
from resnetlab.data.build import eval_batches_for_table
from resnetlab.data.datasets import open_dataset_for_model
from resnetlab.data.formats.common import describe_paths
from resnetlab.data.preprocessing import Preprocessing, normalize, prepare_image
from resnetlab.data.records import SampleTable
from resnetlab.data.splits import plan_data_splits
from resnetlab.engine.evaluation_loop import evaluate_loader
from resnetlab.engine.runtime import Runtime, resolve_runtime
from resnetlab.errors import CheckpointError, ConfigError, DataError
from resnetlab.evaluation.selective import ACCEPT_ALL, OperatingPoint, operating_point_from_record
from resnetlab.utils.io import write_csv_rows

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable

GRADCAM_IMAGES = 16


class ExportedModel(torch.nn.Module):
    """An export's inference backend where the evaluation expects a model: normalized batch in, logits out.

    ``graph_temperature`` is the temperature the exported graph already divides its logits by (1: none); the
    outputs are multiplied back by it, so that the evaluation sees the raw logits of every model alike and applies
    the temperature (or, with ``--raw``, none) itself.
    """

    def __init__(self, backend, graph_temperature: float = 1.0):
        super().__init__()
        self.backend = backend
        self.graph_temperature = float(graph_temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.backend.run(x.float().contiguous())
        return outputs if self.graph_temperature == 1.0 else outputs * self.graph_temperature


def graph_temperature(record: dict, calibration: dict | None = None) -> float:
    """The temperature an export's graph applies to its logits, from its record's ``output.temperature_applied``
    (a number, or true for the record's own or the checkpoint's calibrated temperature); 1.0 for an export that
    outputs raw logits, or whose record predates the field."""
    value = (record.get("output") or {}).get("temperature_applied")
    if value is None or value is False:
        return 1.0
    if value is True:
        value = ((record.get("calibration") or calibration) or {}).get("temperature")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise CheckpointError(f"the export record's output.temperature_applied is {value!r}, not a positive number; "
                          "export the checkpoint again")


def export_runtime() -> Runtime:
    """What the evaluation loop does around an export: normalized float32 NCHW batches on the CPU, no autocast (the
    export runs in its own precision)."""
    return Runtime(device=torch.device("cpu"), precision="fp32", channels_last=False,
                   threads=torch.get_num_threads(), reasons=["an export runs in its own runtime"])


def load_export_of(checkpoint_file: Path, export_dir: Path, checkpoint_sha256: str):
    """The predictor of ``export_dir``, which must have been exported from ``checkpoint_file`` (a checkpoint file,
    whose sha256 the caller has computed)."""
    from resnetlab.deployment.predictor import load_predictor
    from resnetlab.deployment.records import is_export_dir, read_export_record
    from resnetlab.errors import CheckpointError

    if not is_export_dir(export_dir):
        raise CheckpointError(f"--export '{export_dir}' is not an export folder (no preprocessing.json); make one "
                              "with `resnetlab export`")
    made_from = (read_export_record(export_dir).get("source") or {}).get("checkpoint_sha256")
    if made_from != checkpoint_sha256:
        raise CheckpointError(f"--export '{export_dir}' was not exported from '{checkpoint_file}' (its record names "
                              f"checkpoint sha256 {str(made_from)[:12]}...); pass the checkpoint it was made from")
    return load_predictor(export_dir)


@dataclass
class CollectedLogits:
    """The logits of one evaluation: the evaluated split's and, where there is one, the validation split's (which
    training fits the stored calibration on before the test metrics are computed)."""

    logits: torch.Tensor
    targets: torch.Tensor
    val_logits: torch.Tensor | None = None
    val_targets: torch.Tensor | None = None


def collect_logits(model, runtime: Runtime, batches, val_batches=None, *, tta: bool = False,
                   flip_allowed: bool = False) -> CollectedLogits:
    """Run ``model`` over ``batches`` (and ``val_batches``) and keep every logit, on the CPU."""
    flip = tta and flip_allowed
    _, logits, targets = evaluate_loader(model, batches, runtime, collect=True, tta_flip=flip, tta_crops=tta)
    if val_batches is None:
        return CollectedLogits(logits, targets)
    _, val_logits, val_targets = evaluate_loader(model, val_batches, runtime, collect=True, tta_flip=flip,
                                                 tta_crops=tta)
    return CollectedLogits(logits, targets, val_logits, val_targets)


def evaluate_model_on_batches(model, runtime: Runtime, batches, table: SampleTable, *, class_names: list[str],
                              prep: Preprocessing, out_dir: Path, val_batches=None, topk: int = 5,
                              gradcam: bool = True, split_name: str = "test", labels_present: list[int] | None = None,
                              tta: bool = False, flip_allowed: bool = False, evaluated_model: dict | None = None,
                              collected: CollectedLogits | None = None, temperature: float | None = None,
                              operating_point: OperatingPoint | None = None, checkpoint_sha256: str | None = None,
                              log: Callable[[str], None] = _logger.info):
    """Evaluate ``model`` on ``batches`` and write the evaluation files into ``out_dir``.

    ``collected`` are logits already computed by :func:`collect_logits` (then ``batches``/``val_batches`` are not
    run again); ``temperature`` and ``operating_point`` are the model's calibration, applied to every confidence
    (see :func:`~resnetlab.evaluation.metrics.evaluate_predictions`); ``checkpoint_sha256`` names the evaluated
    checkpoint in metrics.json, for `compare` to pair evaluations of one model.
    """
    from resnetlab.evaluation.metrics import evaluate_predictions

    flip = tta and flip_allowed
    if collected is None:
        collected = collect_logits(model, runtime, batches, val_batches, tta=tta, flip_allowed=flip_allowed)
    logits, targets = collected.logits, collected.targets
    result = evaluate_predictions(logits, targets, class_names, paths=table.paths, val_logits=collected.val_logits,
                                  val_targets=collected.val_targets, topk=topk, labels_present=labels_present,
                                  temperature=temperature, operating_point=operating_point)
    result.metrics["split"] = split_name
    result.metrics["tta"] = ("5 crops" + (" x horizontal flip" if flip else "")) if tta else "none"
    if evaluated_model is not None:
        result.metrics["evaluated_model"] = evaluated_model  # an export, not the checkpoint
    if checkpoint_sha256 is not None:
        result.metrics["checkpoint_sha256"] = checkpoint_sha256
    result.save(out_dir)
    if gradcam:
        _save_gradcam(model, runtime, table, targets, logits, class_names, prep, out_dir / "gradcam.npz",
                      temperature=temperature or 1.0)
    log(f"evaluation written to {out_dir}")
    return result


def _save_gradcam(model, runtime: Runtime, table: SampleTable, targets: torch.Tensor, logits: torch.Tensor,
                  class_names: list[str], prep: Preprocessing, path: Path, *, temperature: float = 1.0) -> None:
    """Grad-CAM maps for the misclassified images with the highest loss (the gallery the report shows)."""
    from resnetlab.evaluation.gradcam import grad_cam, save_gradcam_npz

    losses = F.cross_entropy(logits, targets, reduction="none")
    wrong = torch.nonzero(logits.argmax(dim=1) != targets).flatten()
    if len(wrong) == 0:
        path.unlink(missing_ok=True)
        return
    chosen = wrong[losses[wrong].argsort(descending=True)[:GRADCAM_IMAGES]].tolist()
    raw = torch.stack([prepare_image(table.paths[i], prep, None if table.rois is None else table.rois[i]) for i in chosen])
    mean, std = torch.as_tensor(prep.mean), torch.as_tensor(prep.std)
    images = normalize(raw, mean, std).to(runtime.device)
    predicted = logits[chosen].argmax(dim=1)
    was_training = model.training
    model.eval()
    heatmaps = grad_cam(model.float(), images, predicted.to(runtime.device))
    model.train(was_training)
    probs = (logits[chosen] / temperature).softmax(dim=1)  # the confidences predictions.csv shows
    save_gradcam_npz(path, raw.permute(0, 2, 3, 1).numpy(), heatmaps.cpu(),
                     [class_names[int(targets[i])] for i in chosen], [class_names[int(p)] for p in predicted],
                     probs.max(dim=1).values.tolist(), [table.paths[i] for i in chosen])


# ---------------------------------------------------------------------------------------------------------------
# `resnetlab evaluate`
# ---------------------------------------------------------------------------------------------------------------


def deployment_check(checkpoint_file: Path, meta: dict, batches, reference, *,
                     log: Callable[[str], None] = _logger.info) -> dict | None:
    """When the default deployment path runs this model in bf16 on this machine (:mod:`resnetlab.deployment.policy`),
    what that costs on ``batches``: the bf16 package (built into the export cache, where ``predict`` and ``serve``
    will find it) evaluated beside ``reference``, the float32 evaluation of the same images. None when the default
    path is float32, which is the evaluated model itself."""
    from resnetlab.deployment.policy import choose_precision
    from resnetlab.deployment.predictor import load_predictor

    choice = choose_precision(meta)
    if choice.precision == "float32" or not reference.predictions:
        return None
    predictor = load_predictor(checkpoint_file, log=log)
    if predictor.backend.precision == "float32":  # the package could not be built here (said in the log)
        return None
    exported = ExportedModel(predictor.backend, graph_temperature(predictor.record, meta.get("calibration")))
    _, logits, targets = evaluate_loader(exported, batches, export_runtime(), collect=True)
    # The float32 confidences are at the temperature the reference evaluation applied: compare like with like.
    probabilities = (logits / (reference.metrics.get("temperature_applied") or 1.0)).softmax(dim=1)
    float32_pred = torch.tensor([row["pred_index"] for row in reference.predictions])
    float32_confidence = torch.tensor([row["confidence"] for row in reference.predictions])
    top1 = float((logits.argmax(dim=1) == targets).float().mean())
    report = {
        "precision": choice.precision, "format": "aoti", "backend": predictor.backend.name,
        "chosen_because": choice.reason, "package": str(predictor.artifact_dir), "images": len(targets),
        "top1": round(top1, 6), "float32_top1": round(float(reference.metrics["top1"]), 6),
        "top1_change": round(top1 - float(reference.metrics["top1"]), 6),
        "top1_agreement": round(float((logits.argmax(dim=1) == float32_pred).float().mean()), 6),
        # the confidence of the float32 answer, in the package's probabilities
        "max_abs_confidence_change": round(float(
            (probabilities.gather(1, float32_pred[:, None])[:, 0] - float32_confidence).abs().max()), 6),
    }
    log(f"deployment: predict and serve run this model in {choice.precision} here ({choice.reason}); on the "
        f"{report['images']} test images it scores top-1 {report['top1']:.4f} against {report['float32_top1']:.4f} "
        f"in float32, {report['top1_agreement']:.1%} of answers the same")
    return report


# data.* keys that describe the model's input: they come from the checkpoint and cannot change at evaluation.
PREPROCESSING_KEYS = ("input_size", "resize", "crop_pct", "interpolation", "roi_crop", "contrast", "normalize")


def evaluation_data_config(saved: RunConfig, data_spec: str | None, overrides: list[str] | None = None) -> DataConfig:
    """The run's data settings for reading the data to evaluate: ``--data`` and ``data.*`` overrides applied.

    Only ``data.*`` keys about which images to read and how (``data.classes``, ``data.on_bad_image``,
    ``data.split_seed``, ...) may be overridden; the preprocessing is the checkpoint's.
    """
    tree = {"data": {**saved.data.model_dump(), "spec": data_spec or saved.data.spec}}
    for text in overrides or []:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section != "data" or not name:
            raise ConfigError(f"override '{text}': evaluate takes data.* settings only (e.g. data.on_bad_image=skip)")
        if name in PREPROCESSING_KEYS:
            raise ConfigError(f"override '{text}': {key} is part of the model's preprocessing, recorded in the "
                              "checkpoint; evaluation always uses the checkpoint's")
        set_dotted(tree, key, value)
    return validate_config(tree, source="evaluate").data


def dataset_file_name(spec: str) -> str:
    """A file-name part for a dataset spec: its kind and folder or file (``folder-my_photos``, ``csv-shifted-Test``,
    ``synthetic-signs``), as evaluation folders and adapted checkpoints are named."""
    from resnetlab.data.datasets import parse_spec

    kind, location = parse_spec(spec)
    where = Path(location)
    # a file (csv:shifted/Test.csv) is named with its folder: csv-shifted-Test
    names = (where.parent.name, where.stem) if where.suffix else (where.name,)
    name = "-".join(part for part in (kind, *names) if part)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"


def default_evaluation_dir(checkpoint: Path, data_spec: str | None, split: str) -> Path:
    """Where an evaluation goes unless told: ``<run>/evaluations/<data>-<split>-<YYYYmmdd-HHMMSS>``, beside (never
    in) the run's own ``eval/``. ``<data>`` names the dataset by its kind and folder or file (``folder-my_photos``,
    ``csv-shifted-Test``, ``synthetic-signs``), or is ``trained-data`` when ``--data`` is not given; a name already
    taken gets ``-2``, ``-3``...
    """
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.resolve().parent.parent
    data_name = dataset_file_name(data_spec) if data_spec else "trained-data"
    base = run_dir / "evaluations" / f"{data_name}-{split}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    candidate, number = base, 2
    while candidate.exists():
        candidate, number = base.with_name(f"{base.name}-{number}"), number + 1
    return candidate


def check_evaluation_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse to write an evaluation over files already there (a run's own ``eval/``, an earlier evaluation)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out '{out_dir}' is a file; choose a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--out '{out_dir}' is not empty (an earlier evaluation, or a run's own test results); "
                          "choose another folder, leave --out out (a new folder under the run's evaluations/), or "
                          "add --overwrite to write over its files")


@dataclass
class EvaluationData:
    """The images an evaluation (or a calibration) runs on, labelled with the model's class indices."""

    table: SampleTable
    #: The model classes the images hold when they are not all of them, else None.
    labels_present: list[int] | None
    #: The dataset's spec, for messages.
    spec: str
    #: Whether it is the dataset the model was trained on (same fingerprint).
    same_dataset: bool


def evaluation_table(meta: dict, data_cfg: DataConfig, split: str, *, unknown_classes: str = "skip",
                     log: Callable[[str], None] = _logger.info) -> EvaluationData:
    """The images of ``split`` of the dataset ``data_cfg`` names, labelled with the model's class indices.

    The run's own splits are rebuilt as training made them (same seed, checked against the recorded fingerprints);
    a dataset from another source is evaluated on its test split, or else on all of its images. Images of classes
    the model does not have are left out and logged (``unknown_classes="skip"``), or refused (``"error"``).

    """
    source, mapping = open_dataset_for_model(data_cfg, meta)
    for note in source.notes:
        log(note)
    same_dataset = source.fingerprint() == meta["data"]["fingerprint"]

    if split == "all":
        table = SampleTable.concat([source.splits[name] for name in ("train", "val", "test") if name in source.splits])
    elif same_dataset or split == "val" or "test" in source.splits:
        if split == "test" and len(source.splits.get("test", ())) > 0:
            # The dataset's own test split is used as it is: no need to (be able to) hold out a validation split,
            # which a class subset (data.classes) may leave too few tracks for.
            table = source.splits["test"]
        else:
            plan = plan_data_splits(source, data_cfg)
            table = getattr(plan, split)
        recorded = meta["data"].get("split_fingerprints", {}).get(split)
        if same_dataset and recorded and recorded != table.fingerprint():
            log(f"warning: the rebuilt {split} split differs from the one the run used (the data changed?)")
    else:
        table = SampleTable.concat(list(source.splits.values()))
        log(f"{source.spec} is not the dataset the model was trained on and has no test split: evaluating all "
            f"{len(table)} of its images")

    known = mapping[table.labels] >= 0
    if not known.all():
        unknown = sorted({source.class_names[i] for i in table.labels[~known].tolist()})
        listed = f"{', '.join(map(str, unknown[:8]))}{' ...' if len(unknown) > 8 else ''}"
        if unknown_classes == "error":
            raise DataError(f"{source.spec} ({split} split) holds {int((~known).sum())} image(s) of {len(unknown)} "
                            f"class(es) the model does not have ({listed}); a calibration needs labels the model "
                            "can answer: keep the model's classes with data.classes=[...] or use another dataset")
        log(f"skipping {int((~known).sum())} image(s) of {len(unknown)} class(es) the model does not have: {listed}")
        table = table.subset(np.flatnonzero(known))
    if len(table) == 0:
        raise DataError(f"no image of {source.spec} ({split} split) belongs to a class of this model "
                        f"({', '.join(map(str, meta['classes']['ids'][:10]))} ...)")
    table = SampleTable(table.paths, mapping[table.labels], table.rois, table.groups)
    present = sorted(set(table.labels.tolist()))
    labels_present = None if len(present) == len(meta["classes"]["names"]) else present
    return EvaluationData(table, labels_present, source.spec, same_dataset)


def readable_batches(table: SampleTable, prep: Preprocessing, batch_size: int, data_cfg: DataConfig, split: str,
                     spec: str, out_dir: Path | None, *, job: str = "evaluate",
                     log: Callable[[str], None] = _logger.info):
    """Decoded batches of ``table``: unreadable images stop the job, or with ``data.on_bad_image=skip`` are left out,
    logged and (with ``out_dir``) listed in ``out_dir/bad_images.csv``. Returns the batches and the readable table."""
    batches, table, unreadable = eval_batches_for_table(table, prep, batch_size, on_bad_image="skip", split=split)
    if unreadable and data_cfg.on_bad_image == "error":
        raise DataError(f"{len(unreadable)} unreadable image(s) in the {split} split: "
                        f"{describe_paths([b.path for b in unreadable])}. Fix or remove them, or pass "
                        f"data.on_bad_image=skip to {job} without them")
    if unreadable:
        listed = f", listed in {out_dir / 'bad_images.csv'}" if out_dir is not None else ""
        log(f"data.on_bad_image=skip: skipped {len(unreadable)} unreadable image(s) of the {split} split{listed}: "
            f"{describe_paths([b.path for b in unreadable])}")
        if out_dir is not None:
            write_csv_rows(out_dir / "bad_images.csv", ["split", "path", "reason"],
                           [(split, b.path, b.reason) for b in unreadable])
    if len(table) == 0:
        raise DataError(f"no readable image left in the {split} split of {spec}")
    return batches, table


def applied_calibration(calibration: dict | None, *, raw: bool = False, coverage: float | None = None,
                        max_error: float | None = None) -> tuple[float | None, OperatingPoint]:
    """The temperature and operating point an evaluation applies: the stored ones by default, none with ``raw``,
    or an operating point chosen now on the stored validation curve by ``coverage`` or ``max_error``."""
    if coverage is not None and max_error is not None:
        raise ConfigError("--coverage and --max-error each choose the operating point: pass one of them")
    if raw:
        if coverage is not None or max_error is not None:
            raise ConfigError("--raw evaluates the uncalibrated confidences, which the stored validation curve (of "
                              "calibrated ones) cannot place a threshold on: leave out --coverage/--max-error")
        return None, ACCEPT_ALL
    if (coverage is not None or max_error is not None) and not calibration:
        flag = "--coverage" if coverage is not None else "--max-error"
        raise ConfigError(f"{flag}: the checkpoint stores no calibration to choose an operating point from; run "
                          "`resnetlab calibrate CHECKPOINT` first")
    try:
        point = operating_point_from_record(calibration, coverage=coverage, max_error=max_error)
    except ValueError as err:
        flag = "--coverage" if coverage is not None else "--max-error"
        raise ConfigError(f"{flag}: {err}") from None
    return (float(calibration["temperature"]) if calibration else None), point


def evaluate_job(checkpoint: Path, data_spec: str | None, split: str, out_dir: Path, *, tta: bool = False,
                 device: str = "auto", batch_size: int | None = None, overrides: list[str] | None = None,
                 export_dir: Path | None = None, overwrite: bool = False, raw: bool = False,
                 coverage: float | None = None, max_error: float | None = None,
                 log: Callable[[str], None] = _logger.info) -> Path:
    """Evaluate ``checkpoint`` (a file or run directory), or with ``export_dir`` its export, on ``split``.

    ``out_dir`` must be empty or new unless ``overwrite``. Images that cannot be decoded stop the evaluation with
    their names, or with ``data.on_bad_image=skip`` are left out, logged and listed in ``out_dir/bad_images.csv``.
    The checkpoint's calibration is applied unless ``raw``; ``coverage``/``max_error`` choose the operating point
    from its stored validation curve instead of the stored one.
    """
    from resnetlab.deployment.records import file_sha256

    check_evaluation_dir(out_dir, overwrite=overwrite)
    checkpoint_file = resolve_checkpoint_file(checkpoint)
    checkpoint_sha256 = file_sha256(checkpoint_file)
    state = load_checkpoint(checkpoint_file)
    model, meta = model_from_checkpoint(state)
    temperature, operating_point = applied_calibration(meta.get("calibration"), raw=raw, coverage=coverage,
                                                       max_error=max_error)
    prep = preprocessing_from_meta(meta)
    saved = RunConfig.model_validate(meta["config"])
    data_cfg = evaluation_data_config(saved, data_spec, overrides)

    selected = evaluation_table(meta, data_cfg, split, log=log)
    table, labels_present, spec = selected.table, selected.labels_present, selected.spec
    if labels_present is not None:
        log(f"evaluating on the {len(labels_present)} of {len(meta['classes']['names'])} model classes this data "
            "holds")

    runtime = resolve_runtime(saved.train.model_copy(update={"device": device})).for_evaluation(saved.eval.precision)
    gradcam = saved.eval.gradcam
    evaluated = None
    if export_dir is not None:
        predictor = load_export_of(checkpoint_file, Path(export_dir), checkpoint_sha256)
        artifact = predictor.record["artifact"]
        in_graph = graph_temperature(predictor.record, meta.get("calibration"))
        evaluated = {"export": str(export_dir), "format": artifact["format"], "precision": artifact["precision"],
                     "backend": predictor.backend.name, "graph_temperature": in_graph}
        log(f"evaluating the {artifact['precision']} {artifact['format']} export {export_dir} on "
            f"{predictor.backend.name}, not the checkpoint (no Grad-CAM: it needs the torch model)"
            + (f"; its graph divides the logits by T = {in_graph:.4g}, undone before the evaluation applies its own"
               if in_graph != 1.0 else ""))
        model, gradcam, runtime = ExportedModel(predictor.backend, in_graph), False, export_runtime()
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches, table = readable_batches(table, prep, batch_size or saved.data.eval_batch_size, data_cfg, split, spec,
                                      out_dir, log=log)
    # said once the data is known to be readable: an input error stays the one line it is
    if temperature is not None:
        log(f"confidences calibrated with the stored temperature T = {temperature:.4g}; operating point: threshold "
            f"{operating_point.threshold:.4f} ({operating_point.describe()})")
    elif raw:
        log("--raw: uncalibrated confidences (T = 1), every answer accepted")
    else:
        log("the checkpoint stores no calibration: uncalibrated confidences, every answer accepted (fit one with "
            "`resnetlab calibrate`)")
    flip_allowed = bool(get_policy(saved.augment.preset).hflip)
    if tta and not flip_allowed:
        log(f"note: the '{saved.augment.preset}' augmentation preset does not flip images (mirror-image classes), "
            "so test-time augmentation uses crops only, no flips")
    evaluate_model_on_batches(model, runtime, batches, table, class_names=list(meta["classes"]["names"]), prep=prep,
                              out_dir=out_dir, topk=saved.eval.topk, gradcam=gradcam, split_name=split,
                              labels_present=labels_present, tta=tta, flip_allowed=flip_allowed,
                              evaluated_model=evaluated, temperature=temperature, operating_point=operating_point,
                              checkpoint_sha256=checkpoint_sha256, log=log)
    return out_dir
