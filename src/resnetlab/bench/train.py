"""Training-step throughput: resnetlab's step, as configured by default, against a plain reference loop.

Both run in one process on the same model architecture, batch and data. The reference is what a user writes from the
torchvision tutorials: float32, NCHW, eager, ``torch.optim.SGD`` and ``nn.CrossEntropyLoss``. resnetlab's side is
the real :meth:`Trainer.train_step` with the settings :func:`resolve_runtime` picks when the user gives no flag
(precision, memory format, threads). Warm-up steps are excluded; the two loops are timed in alternating rounds so
that machine noise hits both alike, and the medians are reported with the achieved GFLOP/s as a fraction of the
matrix peak measured in the same process.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from torch import nn

from resnetlab.config import build_config
from resnetlab.data.build import RunData
from resnetlab.data.pipeline import TensorBatches
from resnetlab.data.preprocessing import Preprocessing
from resnetlab.data.records import DatasetSource, SampleTable
from resnetlab.data.splits import SplitPlan
from resnetlab.engine.runtime import resolve_runtime
from resnetlab.engine.trainer import Trainer
from resnetlab.models import count_macs, create_model
from resnetlab.utils.runlog import RunLog

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable


def measure_conv_peak(dtype: torch.dtype, channels_last: bool = True, seconds: float = 1.0) -> float:
    """GFLOP/s of a large 3x3 convolution (64 channels, 56x56, batch 32), the best case of a ResNet layer."""
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(32, 64, 56, 56)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    flops = 2 * 32 * 64 * 64 * 9 * 56 * 56
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        for _ in range(2):
            conv(x)
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            conv(x)
            best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


def _synthetic_run_data(cfg, num_classes: int, images: torch.Tensor, labels: torch.Tensor) -> RunData:
    empty = SampleTable([], np.zeros(0, dtype=np.int64))
    prep = Preprocessing(input_size=images.shape[-1], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batches = TensorBatches(images, labels, cfg.data.batch_size, mean=prep.mean, std=prep.std, shuffle=True,
                            drop_last=True)
    source = DatasetSource(spec="benchmark", root=Path("."), class_ids=list(range(num_classes)),
                           class_names=[str(i) for i in range(num_classes)], splits={"train": empty})
    plan = SplitPlan(train=empty, val=empty, test=empty, strategy="none", sources={})
    return RunData(source=source, plan=plan, prep=prep, train=batches, val=batches, test=batches,
                   train_counts=np.ones(num_classes, dtype=np.int64), in_memory=True)


def _timed(step: Callable[[], None], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        step()
    return time.perf_counter() - start


class TrainerStep:
    """The Trainer's own :meth:`Trainer.train_step` on one fixed random batch, for timing.

    ``cfg`` is a full run config (model, optimizer, loss, runtime choices); the batch size is ``cfg.data.batch_size``
    and the image size ``cfg.data.input_size``. Use as a context manager (the Trainer needs a scratch directory).
    """

    def __init__(self, cfg, num_classes: int):
        self.cfg = cfg
        self.runtime = resolve_runtime(cfg.train)
        size, batch = cfg.data.input_size, cfg.data.batch_size
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch * 2, 3, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, num_classes, (batch * 2,), generator=generator)
        self.data = _synthetic_run_data(cfg, num_classes, images, labels)
        self.batch_x, self.batch_y = next(iter(self.data.train))
        self.model = create_model(cfg.model.name, num_classes, **dict(cfg.model.kwargs))
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.to(self.runtime.device).train()
        self._tmp = TemporaryDirectory()
        self.trainer = Trainer(cfg, self.data, self.model, self.runtime, Path(self._tmp.name),
                               RunLog(None, quiet=True), model_kwargs={})
        self._x = self.runtime.to_input(self.batch_x)
        self._y = self.batch_y.to(self.runtime.device)

    def __call__(self) -> None:
        self.trainer.train_step(self._x, self._y)
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)

    def __enter__(self) -> TrainerStep:
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()


def trainer_step_rate(cfg, num_classes: int, *, steps: int = 10, warmup_steps: int = 3) -> float:
    """Images per second of the Trainer's step as ``cfg`` configures it (what `data profile` compares against)."""
    with TrainerStep(cfg, num_classes) as step:
        _timed(step, warmup_steps)
        return steps * cfg.data.batch_size / _timed(step, steps)


def bench_train(model_name: str, input_size: int, batch_size: int, *, num_classes: int = 43, repeats: int = 5,
                min_seconds: float = 2.0, warmup_steps: int = 3, overrides: list[str] | None = None,
                log: Callable[[str], None] = _logger.info) -> dict:
    cfg = build_config({}, {"model.name": model_name, "data.input_size": input_size, "data.batch_size": batch_size},
                       overrides or [])
    with TrainerStep(cfg, num_classes) as ours_step:
        runtime, batch_x, batch_y = ours_step.runtime, ours_step.batch_x, ours_step.batch_y

        # reference: float32, NCHW, eager, as in the torchvision tutorials
        reference = create_model(model_name, num_classes)
        reference.load_state_dict(ours_step.model.state_dict())
        reference.train()
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        criterion = nn.CrossEntropyLoss()
        ref_x = batch_x.contiguous()

        def reference_step() -> None:
            optimizer.zero_grad()
            loss = criterion(reference(ref_x), batch_y)
            loss.backward()
            optimizer.step()

        for step in (reference_step, ours_step):
            _timed(step, warmup_steps)
        # steps per timed block: enough for min_seconds of the slower (reference) loop
        per_step = _timed(reference_step, 1)
        count = max(2, int(min_seconds / max(per_step, 1e-6)))
        ref_rates, our_rates = [], []
        for _ in range(repeats):
            ref_rates.append(count * batch_size / _timed(reference_step, count))
            our_rates.append(count * batch_size / _timed(ours_step, count))

    ref_ips, our_ips = statistics.median(ref_rates), statistics.median(our_rates)
    macs = count_macs(create_model(model_name, num_classes), (3, input_size, input_size))
    train_flops_per_image = 6 * macs  # forward + backward = 3x the forward's 2*MACs
    peak_fp32 = measure_conv_peak(torch.float32)
    peak_ours = peak_fp32 if runtime.amp_dtype is None else measure_conv_peak(runtime.amp_dtype)
    result = {
        "model": model_name, "input_size": input_size, "batch_size": batch_size, "num_classes": num_classes,
        "threads": torch.get_num_threads(), "repeats": repeats, "steps_per_repeat": count,
        "resnetlab": {"images_per_second": round(our_ips, 1), "precision": runtime.precision,
                      "channels_last": runtime.channels_last, "choices": runtime.reasons,
                      "gflops": round(our_ips * train_flops_per_image / 1e9, 1),
                      "peak_gflops": round(peak_ours, 1),
                      "fraction_of_peak": round(our_ips * train_flops_per_image / 1e9 / peak_ours, 3),
                      "all_repeats": [round(r, 1) for r in our_rates]},
        "reference": {"images_per_second": round(ref_ips, 1), "precision": "fp32", "channels_last": False,
                      "gflops": round(ref_ips * train_flops_per_image / 1e9, 1),
                      "peak_gflops": round(peak_fp32, 1),
                      "fraction_of_peak": round(ref_ips * train_flops_per_image / 1e9 / peak_fp32, 3),
                      "all_repeats": [round(r, 1) for r in ref_rates]},
        "ratio": round(our_ips / ref_ips, 3),
        "forward_gmacs_per_image": round(macs / 1e9, 4),
        "torch_version": str(torch.__version__),
    }
    log(f"{model_name}@{input_size} batch {batch_size}: resnetlab {our_ips:.0f} img/s ({runtime.precision}, "
        f"channels_last {runtime.channels_last}) vs reference {ref_ips:.0f} img/s (fp32, NCHW): {our_ips / ref_ips:.2f}x")
    return result

