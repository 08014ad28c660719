"""What this machine can do: bf16 support of the CPU, a C++ compiler for compiled packages.

The training runtime (:mod:`resnetlab.engine.runtime`) and the deployment policy (:mod:`resnetlab.deployment.policy`)
both ask here, so neither needs the other.
"""

from __future__ import annotations

import shutil

import torch


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX); without them bf16 is emulated, slowly.

    Stricter than :func:`cpu_supports_bf16` (oneDNN's own check, which the training runtime uses): the deployment
    policy only chooses bf16 where it is fast.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpp_compiler_available() -> bool:
    return shutil.which("g++") is not None or shutil.which("c++") is not None
