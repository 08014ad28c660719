"""Inference backends: one call, normalized float32 NCHW batch in, float32 logits out.

Preprocessing is not a backend's business (the :class:`~resnetlab.deployment.predictor.Predictor` does it with the
shared code), so two backends given the same tensor can be compared number for number.

=============  ===================================================================================================
torch          the eager model rebuilt from a checkpoint; optionally bf16 autocast, channels_last, torch.compile
onnxruntime    an ONNX export on ONNX Runtime's CPU provider (the default path for small models, where it is the
               fastest at batch 1; see docs/benchmarks.md)
torchscript    a traced and frozen TorchScript export
aoti           an AOTInductor package (``torch._inductor.aoti_compile_and_package``): the model compiled ahead of time
               to a shared library, weights frozen in; in bf16 the fastest backend for large models on CPUs with bf16
               instructions, in float32 about as fast as ONNX Runtime
=============  ===================================================================================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resnetlab.errors import CheckpointError, first_line

BACKENDS = ("torch", "onnxruntime", "torchscript", "aoti")


class InferenceBackend:
    name: str = ""
    precision: str = "float32"
    # Whether the model itself runs on torch's intra-op thread pool. A backend with a pool of its own (ONNX Runtime)
    # sets this False, and the Predictor then runs its torch pre- and post-processing on the calling thread alone.
    uses_torch_threads: bool = True

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalized float32 [B, 3, S, S] -> float32 logits [B, C] on the CPU."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision}


class TorchBackend(InferenceBackend):
    """An eager (or compiled) torch model.

    ``precision="bf16"`` runs under CPU/GPU autocast; ``channels_last`` converts model and input; ``compile`` wraps
    the model in ``torch.compile`` with inductor's weight freezing (constant-folded weights: the fastest inductor
    inference mode we measured). Each new batch size compiles once (``dynamic=False``).
    """

    name = "torch"

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu", precision: str = "float32",
                 channels_last: bool = False, compile: bool = False):
        if precision not in ("float32", "bf16"):
            raise ValueError(f"precision must be float32 or bf16, not {precision!r}")
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        self.compiled = compile
        model = model.eval().to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model, dynamic=False, options={"freezing": True}) if compile else model

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        # no_grad rather than inference_mode: inference_mode made NCHW float32 ResNet-20 slower at batch 1
        with torch.no_grad(), self._autocast():
            x = batch.to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "channels_last": self.channels_last,
                "compiled": self.compiled, "device": str(self.device)}


class OnnxRuntimeBackend(InferenceBackend):
    """An ONNX model on ONNX Runtime's CPU provider, with all graph optimizations.

    ``threads`` sets ``intra_op_num_threads`` (None: ONNX Runtime's default, one per physical core). A model
    exported with a fixed batch of 1 is run image by image.
    """

    name = "onnxruntime"
    uses_torch_threads = False

    def __init__(self, path: str | Path, *, threads: int | None = None, precision: str = "float32"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # a ResNet is a chain of ops: nothing to run side by side
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise CheckpointError(f"ONNX Runtime cannot load '{path}': {first_line(err, 300)}") from None
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        batch_dim = model_input.shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None
        self.path = Path(path)
        self.threads = threads
        self.precision = precision

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        if self.fixed_batch is None or self.fixed_batch == len(array):
            return torch.from_numpy(self.session.run([self.output_name], {self.input_name: array})[0])
        if self.fixed_batch != 1:
            raise CheckpointError(f"'{self.path}' takes batches of exactly {self.fixed_batch}; re-export with "
                                  "--dynamic-batch")
        outputs = [self.session.run([self.output_name], {self.input_name: array[i : i + 1]})[0]
                   for i in range(len(array))]
        return torch.from_numpy(np.concatenate(outputs))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "file": self.path.name,
                "fixed_batch": self.fixed_batch, "threads": self.threads or "default",
                "onnxruntime_version": _onnxruntime_version()}


class TorchScriptBackend(InferenceBackend):
    name = "torchscript"

    def __init__(self, path: str | Path):
        try:
            with quiet_torchscript_warnings():
                self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot load TorchScript model '{path}': {first_line(err, 300)}") from None
        self.path = Path(path)

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(batch.cpu()).float()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "file": self.path.name}


class AotInductorBackend(InferenceBackend):
    """An AOTInductor package (``model.pt2``) of a resnetlab export, run through ``torch._inductor.aoti_load_package``.

    The package takes normalized float32 NCHW input whatever its precision: a bf16 package converts inside (see
    :class:`~resnetlab.deployment.export.Bf16Inference`). Its kernels run on torch's intra-op thread pool. Each
    image's outputs do not depend on the batch it comes in (measured: identical at batch 8 and 32, within 1e-8 at
    batch 1), so a service answering one image at a time gives what a batch prediction gives.
    """

    name = "aoti"

    def __init__(self, path: str | Path, *, precision: str = "float32"):
        import torch._inductor  # imported here: inductor takes a second to import and only this backend needs it

        try:
            with warnings.catch_warnings(), quiet_cpp_builder():
                warnings.simplefilter("ignore")
                self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as err:  # a damaged package, or one built for another CPU or torch version
            raise CheckpointError(f"cannot load AOTInductor package '{path}': {first_line(err, 300)}; it runs only with the torch "
                                  "version and on the CPU type it was built for: re-export it here") from None
        self.path = Path(path)
        self.precision = precision

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.runner(batch.detach().cpu().float().contiguous()).float()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "file": self.path.name,
                "torch_version": str(torch.__version__)}


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def preferred_batch(input_size: int) -> int:
    """Images per backend call: about 8 at 224 px, more for smaller inputs.

    Float32 ResNets at 224 px run faster on CPUs in batches of about 8 than of 32 (the activations of larger batches
    overflow the caches); at 32 px a batch of 8 * 49 images has the same activation size.
    """
    return max(1, min(256, (8 * 224 * 224) // (input_size * input_size)))


def default_threads(workers: int = 1) -> int:
    """Threads per process when ``workers`` processes share this machine's cores (no oversubscription)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


@contextlib.contextmanager
def quiet_torchscript_warnings():
    """torch.jit.trace/freeze/load warn that TorchScript is deprecated in favour of torch.compile; it still works."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


@contextlib.contextmanager
def quiet_cpp_builder():
    """torch's C++ builder logs 'No CUDA runtime is found' whenever AOTInductor compiles or loads on a CPU machine."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)
