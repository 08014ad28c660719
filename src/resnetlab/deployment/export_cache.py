"""The export cache: a checkpoint's parity-checked export, made on first use by ``predict`` and ``serve``.

An entry is keyed by the checkpoint file's hash, the exporting versions, the format, the precision, whether the graph
emits raw or calibrated logits (and, for a compiled package, the CPU's vector instruction set), so a stale entry is
never used. Storing a calibration in a checkpoint changes its hash, so its calibrated export is a new entry too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from resnetlab._version import __version__
from resnetlab.data.cache import cache_root as default_cache_root
from resnetlab.deployment.export import DEFAULT_OPSET, cpu_vector_isa, export_checkpoint
from resnetlab.deployment.records import checkpoint_file_of, file_sha256, is_export_dir, read_export_record
from resnetlab.errors import CheckpointError

FORMAT_NAMES = {"onnx": "ONNX", "torchscript": "TorchScript", "aoti": "an AOTInductor package"}


def export_cache_dir(checkpoint_file: Path, cache_root: Path | None = None, *, fmt: str = "onnx",
                     precision: str = "float32", raw: bool = False) -> Path:
    """Where an on-the-fly export of a checkpoint lives: keyed by the file's hash, the exporting versions, the
    format, the precision and ``raw`` (a graph of raw logits rather than logits divided by the temperature)."""
    key = f"{file_sha256(checkpoint_file)}-{__version__}-{torch.__version__}-opset{DEFAULT_OPSET}"
    if (fmt, precision) != ("onnx", "float32"):
        key += f"-{fmt}-{precision}"
    if raw:
        key += "-raw"
    if fmt == "aoti":  # compiled code for one instruction set: a cache shared by other CPUs keeps one entry each
        key += f"-{cpu_vector_isa()}"
    return (cache_root or default_cache_root()) / "exports" / hashlib.sha256(key.encode()).hexdigest()[:24]


def cached_export(checkpoint: str | Path, *, fmt: str = "onnx", precision: str = "float32", raw: bool = False,
                  cache_root: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The checkpoint's parity-checked export (any batch size), made on first use; its folder. Its graph divides
    the logits by the calibrated temperature unless ``raw`` (or the checkpoint has no calibration)."""
    checkpoint_file = checkpoint_file_of(checkpoint)
    folder = export_cache_dir(checkpoint_file, cache_root, fmt=fmt, precision=precision, raw=raw)
    if is_export_dir(folder):
        try:
            read_export_record(folder)
            return folder
        except CheckpointError:
            pass  # a damaged cache entry: export again over it
    if log is not None and fmt == "aoti":
        log(f"compiling {checkpoint_file} ahead of time ({precision}); once, then cached")
    # The accuracy check on real images belongs to `resnetlab export`; a prediction should not wait for it.
    result = export_checkpoint(checkpoint_file, folder, fmt=fmt, dynamic_batch=True, precision=precision,
                               measure_accuracy=False, raw=raw, log=lambda message: None)
    if log is not None:
        worst = max(p.max_abs_probabilities for p in result.parity)
        log(f"exported {checkpoint_file} to {FORMAT_NAMES[fmt]} ({precision}, cached in {folder}; parity with the "
            f"eager float32 model: max |probability difference| {worst:.2e})")
    return folder
