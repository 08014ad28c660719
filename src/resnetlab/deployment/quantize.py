"""int8 post-training quantization through ONNX Runtime, with its accuracy change measured on real images.

Static quantization (``onnxruntime.quantization.quantize_static``): QDQ format, per-channel signed int8 weights,
unsigned int8 activations whose ranges are calibrated (min/max) on images from the training split. The change in
top-1 accuracy is then measured on the held-out split (test, else validation) of the same data, mapped onto the
model's classes, so an int8 export records what it costs next to what it gains. A bf16 package gets the same
measurement (:func:`measure_precision_change`), without the calibration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnetlab.data.preprocessing import Preprocessing, normalize, prepare_image
from resnetlab.deployment.backends import InferenceBackend, OnnxRuntimeBackend, preferred_batch
from resnetlab.errors import DataError, ExportError, ResnetlabError, first_line

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable

CALIBRATION_IMAGES = 256
EVALUATION_IMAGES = 1000


class LabelledSample:
    """Decoded uint8 images (evaluation preprocessing, ROI crops included) with labels as model class indices."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, description: str):
        self.images, self.labels, self.description = images, labels, description

    def __len__(self) -> int:
        return len(self.labels)


def load_labelled_samples(spec: str | None, meta: dict[str, Any], prep: Preprocessing, *, seed: int = 0,
                          calibration_limit: int = CALIBRATION_IMAGES,
                          evaluation_limit: int = EVALUATION_IMAGES) -> tuple[LabelledSample, LabelledSample]:
    """Calibration images from the train split and evaluation images from the held-out split of ``spec``.

    ``spec`` is a ``--data`` dataset spec; None means the data the checkpoint was trained on. The splits are made as
    the run made them (same split settings and seed), so on the training data the evaluation images are the run's
    own test split.
    """
    from resnetlab.config import DataConfig, RunConfig
    from resnetlab.data.datasets import open_dataset_for_model
    from resnetlab.data.splits import plan_data_splits

    try:
        saved_data = RunConfig.model_validate(meta["config"]).data.model_dump()
    except Exception:  # a checkpoint without a usable config: only the spec is known
        saved_data = {"input_size": prep.input_size}
    spec = spec or saved_data.get("spec")
    if not spec:
        raise ResnetlabError("the checkpoint does not record its training data; pass --calibration-data SPEC")
    data_cfg = DataConfig.model_validate({**saved_data, "spec": spec})
    source, mapping = open_dataset_for_model(data_cfg, meta)
    plan = plan_data_splits(source, data_cfg)
    held_out_name = "test" if len(plan.test) else "val"
    rng = np.random.default_rng(seed)

    def sample(table, limit: int, split: str) -> LabelledSample:
        known = np.flatnonzero(mapping[table.labels] >= 0)
        if len(known) == 0:
            raise DataError(f"no image of the {split} split of {spec} belongs to a class of this model")
        chosen = np.sort(rng.choice(known, size=min(limit, len(known)), replace=False))
        images, labels = [], []
        for i in chosen:
            try:
                images.append(prepare_image(table.paths[i], prep, None if table.rois is None else table.rois[i]))
                labels.append(int(mapping[table.labels[i]]))
            except DataError:
                continue  # an unreadable file is no reason to stop a calibration
        if not images:
            raise DataError(f"none of the sampled {split} images of {spec} could be read")
        return LabelledSample(torch.stack(images), torch.as_tensor(labels), f"{len(images)} {split} images of {spec}")

    return sample(plan.train, calibration_limit, "train"), sample(getattr(plan, held_out_name), evaluation_limit,
                                                                 held_out_name)


def quantize_onnx_int8(fp32_model: Path, out_model: Path, calibration: torch.Tensor, *, batch_size: int = 8) -> None:
    """Static int8 quantization of ``fp32_model`` with activation ranges from ``calibration`` (normalized floats)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnxruntime as ort

    input_name = ort.InferenceSession(str(fp32_model), providers=["CPUExecutionProvider"]).get_inputs()[0]
    fixed = input_name.shape[0] if isinstance(input_name.shape[0], int) else None
    step = fixed or batch_size
    batches = [calibration[i : i + step].numpy() for i in range(0, len(calibration), step)]
    if fixed:
        batches = [b for b in batches if len(b) == fixed]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {input_name.name: batch}

    prepared = out_model.with_name(out_model.stem + ".prepared.onnx")
    try:
        # Shape inference and graph cleanup first, as onnxruntime recommends before quantize_static.
        quant_pre_process(str(fp32_model), str(prepared))
        quantize_static(str(prepared), str(out_model), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    except ResnetlabError:
        raise
    except Exception as err:
        raise ExportError(f"int8 quantization failed: {first_line(err, 300)}") from None
    finally:
        prepared.unlink(missing_ok=True)


def run_on_sample(backends: dict[str, InferenceBackend], sample: LabelledSample, prep: Preprocessing, *,
                  batch_size: int = 32) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every backend on the same batches, interleaved so that load from elsewhere hits all alike: outputs, seconds."""
    mean, std = torch.as_tensor(prep.mean), torch.as_tensor(prep.std)
    outputs: dict[str, list[torch.Tensor]] = {key: [] for key in backends}
    seconds = dict.fromkeys(backends, 0.0)
    for start in range(0, len(sample), batch_size):
        x = normalize(sample.images[start : start + batch_size], mean, std)
        for key, backend in backends.items():
            began = time.perf_counter()
            outputs[key].append(backend.run(x))
            seconds[key] += time.perf_counter() - began
    return {key: torch.cat(value) for key, value in outputs.items()}, seconds


def accuracy_change(reference: torch.Tensor, quantized: torch.Tensor, labels: torch.Tensor, *,
                    precision: str = "int8") -> dict[str, float]:
    top1_reference = float((reference.argmax(1) == labels).float().mean())
    top1_quantized = float((quantized.argmax(1) == labels).float().mean())
    return {
        "float32_top1": round(top1_reference, 6),
        f"{precision}_top1": round(top1_quantized, 6),
        "top1_change": round(top1_quantized - top1_reference, 6),
        "top1_agreement": round(float((reference.argmax(1) == quantized.argmax(1)).float().mean()), 6),
        "max_abs_probability_difference": round(float((reference.softmax(1) - quantized.softmax(1)).abs().max()), 6),
    }


def quantize_checkpoint_export(fp32_model: Path, out_model: Path, reference: InferenceBackend, meta: dict[str, Any],
                               prep: Preprocessing, *, calibration_data: str | None,
                               log: Callable[[str], None] = _logger.info) -> dict[str, Any]:
    """Quantize an export's float32 ONNX model (``out_model`` may be the same file) and measure what it costs.

    ``reference`` is the eager float32 model: the accuracy change is int8 against the model that was evaluated.
    """
    calibration, evaluation = load_labelled_samples(calibration_data, meta, prep)
    log(f"int8: calibrating on {calibration.description}")
    mean, std = torch.as_tensor(prep.mean), torch.as_tensor(prep.std)
    fp32_backend = OnnxRuntimeBackend(fp32_model)  # loaded now: out_model may overwrite the file
    quantize_onnx_int8(fp32_model, out_model, normalize(calibration.images, mean, std))
    int8_backend = OnnxRuntimeBackend(out_model, precision="int8")
    outputs, seconds = run_on_sample({"eager": reference, "onnxruntime_float32": fp32_backend, "int8": int8_backend},
                                     evaluation, prep, batch_size=min(preferred_batch(prep.input_size), 64))
    report = {"evaluated_on": evaluation.description,
              **accuracy_change(outputs["eager"], outputs["int8"], evaluation.labels),
              "speedup_vs_onnxruntime_float32": round(seconds["onnxruntime_float32"] / max(seconds["int8"], 1e-9), 3),
              "speedup_vs_eager_float32": round(seconds["eager"] / max(seconds["int8"], 1e-9), 3),
              "speedup_measured": "total time over the evaluation batches, backends interleaved",
              "calibration": {"images": len(calibration), "source": calibration.description, "method": "minmax",
                              "format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor"}}
    log(f"int8: top-1 {report['int8_top1']:.4f} vs float32 {report['float32_top1']:.4f} "
        f"(change {report['top1_change']:+.4f}, agreement {report['top1_agreement']:.1%}) on "
        f"{evaluation.description}; {report['speedup_vs_onnxruntime_float32']:.2f}x float32 ONNX Runtime, "
        f"{report['speedup_vs_eager_float32']:.2f}x eager float32 during that evaluation")
    return report


def measure_precision_change(reference: InferenceBackend, candidate: InferenceBackend, meta: dict[str, Any],
                             prep: Preprocessing, *, data: str | None,
                             log: Callable[[str], None] = _logger.info) -> dict[str, Any] | None:
    """A lower-precision model's top-1 change and agreement against the float32 one, on the held-out split of
    ``data`` (None: the checkpoint's training data). None, with a note, when no such images can be read here."""
    precision = candidate.precision
    try:
        _, evaluation = load_labelled_samples(data, meta, prep, calibration_limit=1)
    except ResnetlabError as err:
        log(f"note: {precision} accuracy change not measured ({err}); pass --calibration-data SPEC to measure it")
        return None
    outputs, seconds = run_on_sample({"float32": reference, precision: candidate}, evaluation, prep,
                                     batch_size=min(preferred_batch(prep.input_size), 64))
    report = {"evaluated_on": evaluation.description,
              **accuracy_change(outputs["float32"], outputs[precision], evaluation.labels, precision=precision),
              "speedup_vs_eager_float32": round(seconds["float32"] / max(seconds[precision], 1e-9), 3),
              "speedup_measured": "total time over the evaluation batches, interleaved with eager float32"}
    log(f"{precision}: top-1 {report[precision + '_top1']:.4f} vs float32 {report['float32_top1']:.4f} "
        f"(change {report['top1_change']:+.4f}, agreement {report['top1_agreement']:.1%}, largest confidence change "
        f"{report['max_abs_probability_difference']:.1e}) on {evaluation.description}")
    return report
