"""``resnetlab export``: a checkpoint -> an export folder (model file + ``preprocessing.json``), parity-checked.

The folder holds ``model.onnx`` (ONNX, through torch's dynamo exporter, which needs onnxscript), ``model.ts``
(TorchScript, traced and frozen) or ``model.pt2`` (an AOTInductor package: the model compiled ahead of time to a
shared library for this machine's CPU, in float32 or bf16), and ``preprocessing.json``, the deployment record of
:mod:`resnetlab.deployment.records` with an ``artifact`` entry (format, opset, batch, precision, parity).

Before anything is written the export is run beside the eager model on the same normalized images, at batch 1 and,
for a batch-dynamic model, at batch N. The largest absolute differences are reported, and a float32 export fails
when the confidences (softmax probabilities, what users see) differ by more than 1e-4, or when the logits differ by
more than 1e-4 of the largest logit. The logit bound is relative because float32 rounding scales with the values:
a barely trained ResNet-50 has logits near 1000 and differs from its ONNX export by 2e-4 (2e-7 relative), while
a real mistake (a wrong normalization or layer) changes logits by a large fraction of their size. An int8 model (``quantize="int8"``, ONNX Runtime static quantization) cannot meet that
bar by design, so its float32 parent is checked instead and its accuracy change is measured on real images and
recorded. A bf16 package is held to a bf16 tolerance (0.1) against the same float32 model, which catches a wrong
layer or normalization but not the rounding bf16 is chosen for; what that rounding costs is measured on real images
when there are any (top-1 change and agreement with float32) and recorded beside the parity.
Files are staged in a hidden folder inside ``out_dir`` and moved into place only when all checks pass.

A calibrated checkpoint (one with ``meta["calibration"]``) is exported as :class:`TemperatureScaled`: the graph
outputs ``logits / T``, so a runtime's plain softmax gives the calibrated confidences, and the record says so in
``output.temperature_applied``; the parity reference is the same scaled eager model. ``raw=True`` exports the raw
logits instead (``temperature_applied`` null), with the calibration still recorded for the runtime to apply.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, model_validator
from torch import nn

from resnetlab.data.preprocessing import Preprocessing, normalize
from resnetlab.deployment.backends import (
    AotInductorBackend,
    InferenceBackend,
    OnnxRuntimeBackend,
    TorchBackend,
    TorchScriptBackend,
    quiet_cpp_builder,
    quiet_torchscript_warnings,
)
from resnetlab.deployment.records import (
    INPUT_NAME,
    MODEL_FILES,
    OUTPUT_NAME,
    RECORD_FILE,
    checkpoint_file_of,
    file_sha256,
    record_from_meta,
)
from resnetlab.errors import ExportError, first_line
from resnetlab.hardware import native_bf16_cpu
from resnetlab.utils.io import write_json

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable

DEFAULT_OPSET = 18  # the dynamo exporter's native opset (torch 2.14); lower ones go through onnx's version converter
PARITY_ATOL = 1e-4  # float32: largest probability difference (absolute) and logit difference (relative to the
# largest logit) an export may have from the eager model
# bf16 keeps 8 bits of mantissa: on real test images a trained ResNet-20's confidences moved by up to 0.03
# (docs/benchmarks.md). This bound catches a broken export (a wrong layer moves them by a large fraction), not the
# rounding, which is measured on real images instead.
PARITY_ATOL_BF16 = 0.1
DEFAULT_PARITY_BATCH = 8
MAX_DYNAMIC_BATCH = 4096
FORMATS = ("onnx", "torchscript", "aoti")
EXPORT_PRECISIONS = ("float32", "bf16")


class ExportOptions(BaseModel):
    """The choices of one export that must fit together; a combination that cannot work fails when this is built
    (ExportError is not a ValueError, so pydantic lets it through with its own message)."""

    fmt: str = "onnx"
    precision: str = "float32"
    quantize: str | None = None
    parity_batch: int = DEFAULT_PARITY_BATCH

    @model_validator(mode="after")
    def _consistent(self) -> ExportOptions:
        if self.fmt not in FORMATS:
            raise ExportError(f"--format '{self.fmt}': choose one of {', '.join(FORMATS)}")
        if self.precision not in EXPORT_PRECISIONS:
            raise ExportError(f"--precision '{self.precision}': choose float32 or bf16")
        if self.precision == "bf16" and self.fmt != "aoti":
            raise ExportError("--precision bf16 needs --format aoti (an AOTInductor package): ONNX Runtime and "
                              "TorchScript have no fast bf16 convolutions on CPUs")
        if self.quantize not in (None, "int8"):
            raise ExportError(f"--quantize '{self.quantize}': the only quantization is int8")
        if self.quantize and self.fmt != "onnx":
            raise ExportError("--quantize int8 works on ONNX exports (through ONNX Runtime); use --format onnx")
        if self.parity_batch < 2:
            raise ExportError(f"--parity-batch {self.parity_batch}: use 2 or more (batch 1 is always checked)")
        return self


@dataclass
class ParityResult:
    batch_size: int
    max_abs_logits: float  # largest |export - eager| over the logits
    max_abs_probabilities: float  # the same over the softmax probabilities (the confidences users see)
    largest_logit: float  # largest |logit| of the eager model: the scale the logit difference is judged against
    top1_agreement: float

    def passes(self, atol: float) -> bool:
        # written so that NaN fails
        return (self.max_abs_probabilities <= atol
                and self.max_abs_logits <= atol * max(1.0, self.largest_logit))

    def line(self) -> str:
        return (f"parity at batch {self.batch_size}: max |probability difference| {self.max_abs_probabilities:.2e}, "
                f"max |logit difference| {self.max_abs_logits:.2e} (largest |logit| {self.largest_logit:.3g}), "
                f"top-1 agreement {self.top1_agreement:.0%}")


@dataclass
class ExportResult:
    out_dir: Path
    model_path: Path
    record: dict[str, Any]
    parity: list[ParityResult]
    quantization: dict[str, Any] | None = None
    accuracy_change: dict[str, Any] | None = None
    temperature_applied: float | None = None  # what the graph divides its logits by (None: raw logits)


class TemperatureScaled(nn.Module):
    """``model(x) / temperature``: the calibrated logits, whose softmax is the confidence a user should see.

    Exported in place of the model itself, so that any runtime's softmax over the graph's output is already
    calibrated. The temperature is a Python float, which the exporters fold into the graph as a constant.
    """

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def parity_images(prep: Preprocessing, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 images of the model's input size: pixel values a real image can have, reproducible by seed."""
    generator = torch.Generator().manual_seed(seed)
    size = prep.input_size
    return torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)


def compare_backends(reference: InferenceBackend, candidate: InferenceBackend, x: torch.Tensor) -> ParityResult:
    """Both backends on the same normalized batch ``x``."""
    expected, actual = reference.run(x), candidate.run(x)
    if actual.shape != expected.shape:
        raise ExportError(f"the export returns shape {tuple(actual.shape)} for a batch of {len(x)}, the eager model "
                          f"{tuple(expected.shape)}")
    return ParityResult(
        batch_size=len(x),
        max_abs_logits=float((actual - expected).abs().max()),
        max_abs_probabilities=float((actual.softmax(1) - expected.softmax(1)).abs().max()),
        largest_logit=float(expected.abs().max()),
        top1_agreement=float((actual.argmax(1) == expected.argmax(1)).float().mean()),
    )


def export_onnx(model: nn.Module, path: Path, input_size: int, *, dynamic_batch: bool, opset: int) -> int:
    """Write ``model`` as ONNX (input ``input`` [batch, 3, S, S] -> output ``logits``); return the opset written."""
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it; fail with a clear message, not deep inside)
    except ImportError:
        raise ExportError("ONNX export needs the onnxscript package: pip install onnxscript") from None
    import onnx

    # A batch of 2 for a dynamic export: an example of size 1 would be specialized to a constant by torch.export.
    example = torch.zeros(2 if dynamic_batch else 1, 3, input_size, input_size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},) if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=dynamic_shapes, verbose=False)
            program.save(str(path))
    except ExportError:
        raise
    except Exception as err:  # the exporter raises many types; the user needs the first line, not a traceback
        raise ExportError(f"ONNX export (opset {opset}) failed: {first_line(err, 300)}") from None
    written = onnx.load(str(path), load_external_data=False)
    return max((entry.version for entry in written.opset_import if entry.domain in ("", "ai.onnx")), default=opset)


def export_torchscript(model: nn.Module, path: Path, input_size: int) -> None:
    """Trace and freeze ``model`` (frozen: weights become constants, batch norm is folded into the convolutions)."""
    example = torch.zeros(1, 3, input_size, input_size)
    try:
        with quiet_torchscript_warnings(), torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
            frozen = torch.jit.freeze(traced)
            torch.jit.save(frozen, str(path))
    except Exception as err:
        raise ExportError(f"TorchScript export failed: {first_line(err, 300)}") from None


class Bf16Inference(nn.Module):
    """A classifier in bf16 up to its pooled features, channels_last, with the final linear layer in float32.

    This is the model a bf16 package compiles. Rather than autocast (which ``torch.export`` does not carry into an
    AOTInductor package), the weights themselves are bf16, so the convolutions run on the CPU's bf16 dot-product
    units at about twice the float32 rate. The classifier stays float32: it is a negligible share of the work, and
    rounding the logits to bf16 would move every confidence by up to 0.4%.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        body = copy.deepcopy(model).eval()
        self.head = body.fc.float()
        body.fc = nn.Identity()
        self.body = body.to(dtype=torch.bfloat16, memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
        return self.head(features.float())


def export_aotinductor(model: nn.Module, path: Path, input_size: int, *, precision: str = "float32") -> None:
    """Compile ``model`` ahead of time into an AOTInductor package (any batch size; weights frozen into the code).

    The package holds a shared library compiled for this machine's CPU (its vector instruction set is recorded), so
    build it where it will run, or on a machine with the same instruction set.
    """
    import torch._inductor

    if precision == "bf16":
        # Bf16Inference splits the classifier off the body: it takes the bare model, the temperature goes around it
        if isinstance(model, TemperatureScaled):
            module: nn.Module = TemperatureScaled(Bf16Inference(model.model), model.temperature)
        else:
            module = Bf16Inference(model)
    else:
        module = copy.deepcopy(model).eval()
    # A batch of 2: an example of size 1 would be specialized to a constant by torch.export.
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    try:
        with torch.no_grad(), warnings.catch_warnings(), quiet_cpp_builder():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            # freezing: weights become constants, so batch norm folds into the convolutions and oneDNN gets its
            # weights pre-packed once, at compile time
            torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                     inductor_configs={"freezing": True})
    except Exception as err:  # inductor raises many types (a missing compiler among them): first line, no traceback
        raise ExportError(f"AOTInductor export failed: {first_line(err, 300)} (it compiles C++ code: a C++ compiler "
                          "such as g++ must be installed)") from None


def cpu_vector_isa() -> str | None:
    """The CPU vector instruction set inductor compiles for here (``avx512``, ``avx2``...), None if unknown."""
    try:
        with quiet_cpp_builder():
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            return str(pick_vec_isa()) or None
    except Exception:  # a private helper: its absence must not stop an export
        return None


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, fmt: str = "onnx", dynamic_batch: bool = False,
                      opset: int = DEFAULT_OPSET, parity_batch: int = DEFAULT_PARITY_BATCH, atol: float | None = None,
                      quantize: str | None = None, calibration_data: str | None = None, precision: str = "float32",
                      measure_accuracy: bool = True, raw: bool = False,
                      log: Callable[[str], None] = _logger.info) -> ExportResult:
    """Export a checkpoint (file or run directory) into ``out_dir``; see the module docstring.

    ``precision="bf16"`` needs ``fmt="aoti"``. ``measure_accuracy=False`` skips a bf16 package's accuracy check on
    real images (the parity check always runs). A calibrated checkpoint's graph outputs ``logits / T`` unless
    ``raw``; a checkpoint without calibration exports its raw logits either way.
    """
    from resnetlab.checkpoint import load_checkpoint, model_from_checkpoint, preprocessing_from_meta

    ExportOptions(fmt=fmt, precision=precision, quantize=quantize, parity_batch=parity_batch)
    if atol is None:
        atol = PARITY_ATOL_BF16 if precision == "bf16" else PARITY_ATOL
    checkpoint_file = checkpoint_file_of(checkpoint)
    model, meta = model_from_checkpoint(load_checkpoint(checkpoint_file))
    prep = preprocessing_from_meta(meta)
    record = record_from_meta(meta, checkpoint_sha256=file_sha256(checkpoint_file))
    calibration = meta.get("calibration")
    temperature = None if raw or not calibration else float(calibration["temperature"])
    if temperature is not None:
        model = TemperatureScaled(model, temperature).eval()
        log(f"the exported graph divides its logits by the calibrated temperature {temperature:.4g} (raw logits: "
            "export with --raw)")
    record["output"]["temperature_applied"] = temperature
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
    try:
        result = _export_into(staging, model, meta, prep, record, fmt=fmt, dynamic_batch=dynamic_batch, opset=opset,
                              parity_batch=parity_batch, atol=atol, quantize=quantize,
                              calibration_data=calibration_data, precision=precision,
                              measure_accuracy=measure_accuracy, log=log)
        # The record goes last: a folder with preprocessing.json is a complete export.
        for stale in MODEL_FILES.values():
            if stale != result.model_path.name:
                (out_dir / stale).unlink(missing_ok=True)
        final_model = out_dir / result.model_path.name
        result.model_path.replace(final_model)
        (staging / RECORD_FILE).replace(out_dir / RECORD_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.out_dir, result.model_path, result.temperature_applied = out_dir, final_model, temperature
    log(f"wrote {final_model} and {out_dir / RECORD_FILE}")
    return result


def _export_into(staging: Path, model: nn.Module, meta: dict, prep: Preprocessing, record: dict, *, fmt: str,
                 dynamic_batch: bool, opset: int, parity_batch: int, atol: float, quantize: str | None,
                 calibration_data: str | None, precision: str, measure_accuracy: bool,
                 log: Callable[[str], None]) -> ExportResult:
    size = prep.input_size
    model_path = staging / MODEL_FILES[fmt]
    written_opset = None
    if fmt == "onnx":
        written_opset = export_onnx(model, model_path, size, dynamic_batch=dynamic_batch, opset=opset)
        if written_opset != opset:
            log(f"note: asked for opset {opset}, the exporter wrote opset {written_opset}")
        exported: InferenceBackend = OnnxRuntimeBackend(model_path)
    elif fmt == "aoti":
        if precision == "bf16" and not native_bf16_cpu():
            log("note: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX); the bf16 package will run "
                "slower than float32 here")
        export_aotinductor(model, model_path, size, precision=precision)
        exported = AotInductorBackend(model_path, precision=precision)
        dynamic_batch = True
    else:
        export_torchscript(model, model_path, size)
        exported = TorchScriptBackend(model_path)
        dynamic_batch = True  # a traced convolutional net takes any batch; checked at batch N below

    reference = TorchBackend(model)
    mean, std = torch.as_tensor(prep.mean), torch.as_tensor(prep.std)
    batch_sizes = [1, parity_batch] if dynamic_batch else [1]
    parity = []
    for batch_size in batch_sizes:
        x = normalize(parity_images(prep, batch_size, seed=batch_size), mean, std)
        result = compare_backends(reference, exported, x)
        log(result.line())
        parity.append(result)
    failed = [p for p in parity if not p.passes(atol)]
    if failed:
        worst = failed[0]
        raise ExportError(f"{fmt} export failed its parity check at batch {worst.batch_size}: max |probability "
                          f"difference| {worst.max_abs_probabilities:.2e}, max |logit difference| "
                          f"{worst.max_abs_logits:.2e} (largest |logit| {worst.largest_logit:.3g}); {precision} allows "
                          f"{atol:.0e} (logits: relative to the largest); nothing was written")

    accuracy_change = None
    if precision == "bf16" and measure_accuracy:
        from resnetlab.deployment.quantize import measure_precision_change

        accuracy_change = measure_precision_change(reference, exported, meta, prep, data=calibration_data, log=log)
    quantization = None
    if quantize == "int8":
        from resnetlab.deployment.quantize import quantize_checkpoint_export

        quantization = quantize_checkpoint_export(model_path, model_path, reference, meta, prep,
                                                  calibration_data=calibration_data, log=log)
        precision = "int8"

    record["artifact"] = {
        "format": fmt,
        "file": model_path.name,
        "precision": precision,
        "opset": written_opset,
        "dynamic_batch": dynamic_batch,
        "batch_size": None if dynamic_batch else 1,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        "cpu_isa": cpu_vector_isa() if fmt == "aoti" else None,
        "parity": {"reference": "eager float32 model from the checkpoint"
                   + (", its logits divided by the same temperature" if record["output"]["temperature_applied"]
                      else ""),
                   "inputs": "random uint8 images, normalized",
                   "tolerance": {"probabilities": atol, "logits": f"{atol:g} x max(1, largest |logit|)"},
                   "checks": [asdict(p) for p in parity],
                   "checked_model": "the float32 model before int8 quantization" if quantize else "this model"},
        "quantization": quantization,
        "accuracy_change": accuracy_change,  # bf16: against the float32 model on real images (None: not measured)
    }
    write_json(staging / RECORD_FILE, record)
    (staging / RECORD_FILE).chmod(0o644)  # an artifact to ship: readable by the account that serves it
    return ExportResult(out_dir=staging, model_path=model_path, record=record, parity=parity,
                        quantization=quantization, accuracy_change=accuracy_change)
