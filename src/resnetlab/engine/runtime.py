"""Device, precision, memory format, threads and seeding: the fastest correct path, chosen automatically and logged.

On CPUs with bf16 matrix instructions, bf16 autocast with channels_last trains ResNets faster than float32 NCHW, while
fp16 on CPU has no fast kernels at all (figures: ``docs/benchmarks.md``). So ``precision=auto`` picks bf16 where the
CPU (avx512_bf16 / AMX, :mod:`resnetlab.hardware`) or GPU supports it, and never fp16 on CPU.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from resnetlab.config import TrainConfig
from resnetlab.errors import ConfigError
from resnetlab.hardware import cpu_supports_bf16


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    threads: int
    reasons: list[str]

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def for_evaluation(self, precision: str) -> Runtime:
        """The runtime that validates and tests: float32 (``eval.precision=fp32``) or this one (``train``)."""
        if precision == "train" or self.precision == "fp32":
            return self
        return replace(self, precision="fp32")

    def describe(self) -> str:
        return (f"device {self.device}, precision {self.precision}, channels_last {self.channels_last}, "
                f"{self.threads} thread(s) ({'; '.join(self.reasons)})")


def resolve_runtime(cfg: TrainConfig, *, local_rank: int | None = None) -> Runtime:
    reasons = []
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is available; use --device cpu or auto")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank or 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()

    precision = cfg.precision
    if precision == "auto":
        if use_cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            reasons.append(f"{precision} autocast on this GPU")
        elif cpu_supports_bf16():
            precision = "bf16"
            reasons.append("bf16 autocast: this CPU has bf16 matrix instructions")
        else:
            precision = "fp32"
            reasons.append("fp32: this CPU has no bf16 matrix instructions")
    elif precision == "fp16" and not use_cuda:
        raise ConfigError("train.precision=fp16 is not supported on CPU (no fast fp16 kernels); use bf16 or fp32")

    if cfg.channels_last == "auto":
        channels_last = True
        reasons.append("channels_last (faster convolutions in oneDNN/cuDNN)")
    else:
        channels_last = cfg.channels_last == "on"

    if use_cuda:
        # cuDNN's autotuner picks the fastest convolution algorithm per shape, which may differ between runs.
        torch.backends.cudnn.benchmark = not cfg.deterministic
        if not cfg.deterministic:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            reasons.append("cudnn.benchmark and TF32 on")
    return Runtime(device=device, precision=precision, channels_last=channels_last, threads=threads, reasons=reasons)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    # Set both ways: several runs may share one process (tuning trials, tests).
    # warn_only: an operation without a deterministic kernel warns instead of stopping the run.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached": float(np_state[4])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the current device only: a run may be resumed on a machine with another number of GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    cuda_state = state.get("cuda")
    if isinstance(cuda_state, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
