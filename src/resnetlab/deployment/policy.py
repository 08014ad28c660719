"""The precision the default deployment path runs a checkpoint in, on this machine.

Why the choice depends on the model's size (the measurements are in ``docs/benchmarks.md``): for a small model such
as ResNet-20 at 32 px (0.04 GMAC per image) per-call overheads dominate, and ONNX Runtime in float32 answers faster
than the bf16 AOTInductor package; for large ones such as resnet50 at 224 px (4.1 GMAC) the convolutions dominate,
and the bf16 package is faster in latency and throughput than any float32 path, which already runs close to the
CPU's float32 peak.

So ``precision="auto"`` (the default of ``predict`` and ``serve``) picks bf16 for a model of at least
:data:`BF16_MIN_GMACS` per image, where the convolutions dominate, on a CPU with bf16 matrix instructions and a C++
compiler to build the package; float32 ONNX Runtime otherwise. What bf16 costs a model is measured, not assumed:
the training run evaluates the package on its test split when this picks bf16 (``metrics.json["deployment"]``),
and ``resnetlab evaluate RUN --export DIR`` does it for any export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import resnetlab.hardware as hardware
from resnetlab.hardware import cpp_compiler_available

# Below this, per-call overheads dominate and ONNX Runtime float32 is faster at batch 1 (ResNet-20: 0.04 GMAC);
# above it bf16 has been faster in latency and throughput wherever measured (resnet18 and resnet50 at 224 px).
BF16_MIN_GMACS = 1.0


@dataclass
class PrecisionChoice:
    precision: str  # float32 | bf16
    reason: str
    gmacs: float  # multiply-accumulates per image, in billions


def checkpoint_gmacs(meta: dict[str, Any]) -> float:
    """Multiply-accumulates of one image through the checkpoint's model, in billions (counted on the meta device:
    nothing is computed or allocated)."""
    from resnetlab.models import count_macs, create_model

    model_meta = meta["model"]
    size = int(meta["preprocessing"]["input_size"])
    with torch.device("meta"):
        model = create_model(model_meta["name"], int(model_meta["num_classes"]), **(model_meta.get("kwargs") or {}))
    return count_macs(model.eval(), (3, size, size)) / 1e9


def choose_precision(meta: dict[str, Any]) -> PrecisionChoice:
    """float32 or bf16 for this checkpoint on this machine, with the reason in words."""
    gmacs = checkpoint_gmacs(meta)
    size = f"{gmacs:.2f} GMAC per image"
    if gmacs < BF16_MIN_GMACS:
        return PrecisionChoice("float32", f"{size}: float32 ONNX Runtime is the fastest at this size", gmacs)
    if not hardware.native_bf16_cpu():
        return PrecisionChoice("float32", f"{size}, but this CPU has no bf16 matrix instructions", gmacs)
    if not cpp_compiler_available():
        return PrecisionChoice("float32", f"{size}, but there is no C++ compiler (g++) to build the bf16 package",
                               gmacs)
    return PrecisionChoice("bf16", f"{size} on a CPU with bf16 instructions, where the bf16 package is faster than "
                                   "any float32 path", gmacs)
