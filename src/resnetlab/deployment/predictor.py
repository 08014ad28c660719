"""Prediction: class names with confidences, from a checkpoint or an export, with the recorded preprocessing only.

:func:`load_predictor` is the one way in. Whatever the backend, an image goes through the same steps, which are the
evaluation's own: :func:`~resnetlab.data.preprocessing.prepare_image` (decode any mode to RGB, resize and crop by the
record), :func:`~resnetlab.data.preprocessing.normalize` (mean and std from the record), the backend's logits, and a
softmax here (an export's output is logits, as ``preprocessing.json`` says). So the checkpoint, its exports and the
service agree to the export's parity tolerance.

The default (backend and precision ``auto``) is the fastest path for the model on this machine
(:mod:`resnetlab.deployment.policy`): float32 ONNX Runtime for small models, which keeps parity with evaluation to
1e-4, and a bf16 AOTInductor package for large ones on CPUs with bf16 instructions, where it is faster than any
float32 path (figures: ``docs/benchmarks.md``). A checkpoint is exported on first use (parity-checked like
``resnetlab export``) into a cache folder keyed by the checkpoint's hash; if that fails, prediction falls back (bf16
to float32, ONNX Runtime to eager torch) and says so. ``precision="float32"`` or ``"bf16"`` overrides the choice.

Calibrated answers. When the record carries a calibration (``meta["calibration"]``, copied into every export), the
confidences are ``softmax(logits / T)``: the predictor divides by the temperature itself unless the exported graph
already did (``output.temperature_applied``), never twice. Each answer is then held against an operating point
(:class:`AnswerOptions`: the stored one by default, or one chosen now by ``coverage``, ``max_error`` or a
``threshold``); one below it is marked ``unknown`` with the reason, and its best guess is still reported. ``raw``
gives the uncalibrated confidences, and no operating point unless a ``threshold`` is given (the stored one was
chosen on calibrated confidences and means nothing on raw ones).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resnetlab.data.preprocessing import Preprocessing, normalize, pil_to_uint8, prepare_image, resize_to_input
from resnetlab.deployment.backends import (
    AotInductorBackend,
    InferenceBackend,
    OnnxRuntimeBackend,
    TorchBackend,
    TorchScriptBackend,
    onnxruntime_available,
    preferred_batch,
)
from resnetlab.deployment.export_cache import cached_export
from resnetlab.deployment.records import (
    checkpoint_file_of,
    file_sha256,
    is_export_dir,
    read_export_record,
    record_from_meta,
)
from resnetlab.errors import CheckpointError, ConfigError, DataError, ExportError
from resnetlab.evaluation.selective import (
    ACCEPT_ALL,
    OperatingPoint,
    check_operating_rule,
    operating_point_from_record,
)

BACKEND_CHOICES = ("auto", "torch", "onnxruntime", "torchscript", "aoti")
PRECISIONS = ("auto", "float32", "bf16")
EXPORT_RUNTIMES = {"onnx": "onnxruntime", "torchscript": "torchscript", "aoti": "aoti"}  # export format -> backend
RUNTIME_FORMATS = {runtime: fmt for fmt, runtime in EXPORT_RUNTIMES.items()}
FORMAT_ARTICLES = {"onnx": "an ONNX", "torchscript": "a TorchScript", "aoti": "an AOTInductor"}


@dataclass(frozen=True)
class AnswerOptions:
    """How confidences are computed and which answers are withheld: the flags ``--raw``, ``--coverage``,
    ``--max-error``, ``--threshold`` and ``--accept-all`` of ``predict`` and ``serve``.

    By default the confidences are calibrated (when the model has a temperature) and the operating point is the one
    stored with the calibration. ``coverage`` or ``max_error`` choose another on the stored validation
    risk-coverage curve; ``threshold`` sets one directly; ``accept_all`` withholds nothing. At most one of these
    four may be given. ``raw`` reports the uncalibrated softmax and accepts every answer unless a ``threshold`` is
    given: the stored operating point is a threshold on calibrated confidences.
    """

    raw: bool = False
    coverage: float | None = None
    max_error: float | None = None
    threshold: float | None = None
    accept_all: bool = False

    def __post_init__(self) -> None:
        chosen = [flag for flag, value in (("--coverage", self.coverage), ("--max-error", self.max_error),
                                           ("--threshold", self.threshold)) if value is not None]
        if self.accept_all:
            chosen.append("--accept-all")
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)}: give at most one way to choose the operating point")
        check_operating_rule(self.coverage, self.max_error)
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ConfigError(f"--threshold {self.threshold}: give a confidence in [0, 1]")
        if self.raw and (self.coverage is not None or self.max_error is not None):
            raise ConfigError("--raw with --coverage or --max-error: the validation curve is one of calibrated "
                              "confidences; drop --raw, or give a --threshold on raw confidences")

    def temperature(self, record: dict[str, Any]) -> float | None:
        """The temperature the confidences are computed at (None: raw logits)."""
        calibration = record.get("calibration")
        return None if self.raw or not calibration else float(calibration["temperature"])

    def operating_point(self, record: dict[str, Any], source: str = "the model") -> OperatingPoint:
        if self.accept_all:
            return ACCEPT_ALL
        if self.raw and self.threshold is None:
            return ACCEPT_ALL
        try:
            return operating_point_from_record(record.get("calibration"), coverage=self.coverage,
                                               max_error=self.max_error, threshold=self.threshold)
        except ValueError as err:
            flag = "--coverage" if self.coverage is not None else "--max-error"
            raise ConfigError(f"{flag} with '{source}': {err}") from None

    def to_environment(self) -> dict[str, str]:
        """The options as strings, for a service's worker processes (:meth:`from_environment` reads them)."""
        values = {"RAW": "1" if self.raw else "0", "ACCEPT_ALL": "1" if self.accept_all else "0"}
        for key, value in (("COVERAGE", self.coverage), ("MAX_ERROR", self.max_error), ("THRESHOLD", self.threshold)):
            if value is not None:
                values[key] = repr(float(value))
        return values

    @classmethod
    def from_environment(cls, get: Callable[[str], str | None]) -> AnswerOptions:
        number = lambda key: None if get(key) is None else float(get(key))  # noqa: E731
        return cls(raw=get("RAW") == "1", accept_all=get("ACCEPT_ALL") == "1", coverage=number("COVERAGE"),
                   max_error=number("MAX_ERROR"), threshold=number("THRESHOLD"))


@dataclass
class Prediction:
    path: str
    classes: list[str] = field(default_factory=list)  # top-k class names, most likely first (the best guess)
    class_ids: list = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)  # calibrated when the model has a temperature
    error: str | None = None
    confidence: float | None = None  # the best guess's (maximum calibrated) probability
    energy: float | None = None  # -T logsumexp(logits / T) at the applied temperature: lower is more familiar
    unknown: bool = False  # the confidence is below the operating point: the best guess is withheld
    reason: str | None = None  # why, in words, when unknown

    def to_dict(self) -> dict:
        if self.error:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "unknown": self.unknown, "reason": self.reason, "confidence": self.confidence,
                "energy": self.energy,
                "top": [{"class": c, "class_id": cid, "index": i, "confidence": p}
                        for c, cid, i, p in zip(self.classes, self.class_ids, self.indices, self.confidences)]}


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to ``count`` for the block, then restored (a cheap call: well under 1 us)."""
    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Predictor:
    """A backend plus the deployment record (classes, preprocessing, output kind) it was made from."""

    def __init__(self, backend: InferenceBackend, record: dict[str, Any], *, source: str = "",
                 micro_batch: int | None = None, artifact_dir: Path | None = None,
                 answers: AnswerOptions | None = None):
        self.backend = backend
        self.record = record
        self.source = source
        self.artifact_dir = artifact_dir  # the export folder the backend runs, if it runs one
        self.chosen_because: str | None = None  # why precision=auto chose this precision, when it chose
        self.prep: Preprocessing = Preprocessing.from_dict(record["preprocessing"])
        self.class_names: list[str] = list(record["classes"]["names"])
        self.class_ids: list = list(record["classes"]["ids"])
        self.output_kind: str = record["output"]["kind"]
        self.mean = torch.as_tensor(self.prep.mean, dtype=torch.float32)
        self.std = torch.as_tensor(self.prep.std, dtype=torch.float32)
        self.micro_batch = micro_batch or preferred_batch(self.prep.input_size)
        # what the graph already divides its logits by (an export's record says; a checkpoint's model: nothing)
        self.graph_temperature: float | None = record["output"].get("temperature_applied")
        self.set_answers(answers or AnswerOptions())

    def set_answers(self, answers: AnswerOptions) -> None:
        """Apply other :class:`AnswerOptions` from now on (the operating point is chosen here, once)."""
        self.answers = answers
        self.temperature = answers.temperature(self.record)
        self.operating_point = answers.operating_point(self.record, self.source or "the model")

    # -- images -> uint8 model inputs (the evaluation's own code) ---------------------------------------------------

    def prepare(self, path: str | Path) -> torch.Tensor:
        # Files given to predict have no ROI box: the whole image is the sign (as cropped by a detector).
        return prepare_image(path, self.prep, None)

    def prepare_pil(self, image) -> torch.Tensor:
        return pil_to_uint8(resize_to_input(image.convert("RGB"), self.prep))

    # -- uint8 batch -> probabilities ------------------------------------------------------------------------------

    def backend_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float32 batch -> what the backend's graph returns, in micro-batches."""
        chunks = [self.backend.run(x[start : start + self.micro_batch]) for start in range(0, len(x), self.micro_batch)]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def outputs(self, x: torch.Tensor, temperature: float | None | str = "default") -> torch.Tensor:
        """Normalized float32 batch -> logits divided by ``temperature`` (default: the applied one; None: raw), so
        that their softmax is the confidence reported, whichever graph computed them.

        The graph's own division is taken into account: a calibrated export at the applied temperature is returned
        as it is (exactly what it computed), a raw one is divided here, and a calibrated one asked for raw logits
        is multiplied back. An export whose output is probabilities gives log-probabilities, which differ from its
        logits by a constant per image and so have the same softmax at any temperature.
        """
        if temperature == "default":
            temperature = self.temperature
        outputs = self.backend_outputs(x)
        if self.output_kind != "logits":
            return outputs.clamp_min(torch.finfo(outputs.dtype).tiny).log() / (temperature or 1.0)
        if self.graph_temperature == temperature:
            return outputs
        if self.graph_temperature is not None:
            outputs = outputs * self.graph_temperature
        return outputs / temperature if temperature is not None else outputs

    def _scores(self, x: torch.Tensor, temperature: float | None,
                energy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities and (unless ``energy`` is False) energies of a normalized batch at ``temperature``."""
        logits = self.outputs(x, temperature)
        if energy and self.output_kind == "logits":
            # the energy -T logsumexp(logits / T) of Liu et al. (2020), from the logits already divided by T
            return logits.softmax(dim=1), -(temperature or 1.0) * torch.logsumexp(logits.double(), dim=1)
        return logits.softmax(dim=1), None

    def scores(self, batch_uint8: torch.Tensor, *, tta: bool = False, temperature: float | None | str = "default",
               energy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [B, 3, S, S] -> (probabilities [B, C] float32, energies [B] float64, or None for a model whose
        output is probabilities or with ``energy=False``), at ``temperature`` (default: the applied one). ``tta``
        averages both over the test-time augmentation views as ``evaluate --tta`` does (see :meth:`probabilities`)."""
        if temperature == "default":
            temperature = self.temperature
        with self._torch_thread_scope():
            x = normalize(batch_uint8, self.mean, self.std)
            if not tta:
                return self._scores(x, temperature, energy)
            from resnetlab.evaluation.tta import tta_views

            views = tta_views(x, flip=self.record.get("test_time_flip") is True, crops=True)
            # As `evaluate --tta` does (resnetlab.evaluation.tta): the log of the views' mean uncalibrated softmax
            # stands for the logits of the averaged prediction, and the temperature applies to those, so that the
            # two report the same calibrated confidences and energies.
            averaged = torch.stack([self.outputs(view, None).softmax(dim=1) for view in views]).mean(dim=0)
            logits = averaged.clamp_min(1e-12).log()
            if temperature is not None:
                logits = logits / temperature
            if not (energy and self.output_kind == "logits"):
                return logits.softmax(dim=1), None
            return logits.softmax(dim=1), -(temperature or 1.0) * torch.logsumexp(logits.double(), dim=1)

    def probabilities(self, batch_uint8: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
        """uint8 [B, 3, S, S] (as :meth:`prepare` makes) -> class probabilities [B, C], float32, calibrated when
        the model has a temperature (unless ``raw``).

        ``tta`` averages the uncalibrated softmax over the views ``evaluate --tta`` uses
        (:mod:`resnetlab.evaluation.tta`): the image, four corner crops, and their mirror images only where the model
        was trained with flips; the temperature then applies to the log of that average, as in ``evaluate --tta``.
        """
        return self.scores(batch_uint8, tta=tta, energy=False)[0]

    def _torch_thread_scope(self):
        """One torch thread around a call whose model runs on another runtime's thread pool.

        The normalization and softmax are light, but with torch's default of one OpenMP thread per core their worker
        threads and ONNX Runtime's spin on the same cores and slow each other down: with torch on one thread this
        class runs as fast as the bare ONNX Runtime session, and at less than half its rate without
        (``docs/benchmarks.md``).
        """
        if self.backend.uses_torch_threads:
            return contextlib.nullcontext()
        return torch_threads(1)

    # -- whole predictions ---------------------------------------------------------------------------------------

    def predict_tensors(self, batch_uint8: torch.Tensor, names: Sequence[str], *, topk: int = 5,
                        tta: bool = False, answers: AnswerOptions | None = None) -> list[Prediction]:
        """Predictions of a uint8 batch; ``answers`` overrides this predictor's :class:`AnswerOptions` for the call."""
        temperature, point = self.temperature, self.operating_point
        if answers is not None:
            temperature, point = answers.temperature(self.record), answers.operating_point(self.record, self.source)
        probs, energy = self.scores(batch_uint8, tta=tta, temperature=temperature)
        return [self._fill(Prediction(name), row, topk, point, None if energy is None else float(energy[i]))
                for i, (name, row) in enumerate(zip(names, probs))]

    def predict_paths(self, paths: list[str], *, topk: int = 5, batch_size: int = 64,
                      tta: bool = False) -> list[Prediction]:
        """Predictions in the order of ``paths``; an unreadable file gets a Prediction with ``error`` set."""
        results: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            tensors, names = [], []
            for path in paths[start : start + batch_size]:
                try:
                    tensors.append(self.prepare(path))
                    names.append(path)
                except DataError as err:
                    results.append(Prediction(path, error=str(err)))
            if tensors:
                results += self.predict_tensors(torch.stack(tensors), names, topk=topk, tta=tta)
        order = {p: i for i, p in enumerate(paths)}
        return sorted(results, key=lambda r: order[r.path])

    def _fill(self, prediction: Prediction, probs: torch.Tensor, topk: int, point: OperatingPoint,
              energy: float | None) -> Prediction:
        values, indices = probs.topk(min(topk, len(self.class_names)))
        prediction.indices = indices.tolist()
        prediction.classes = [self.class_names[i] for i in prediction.indices]
        prediction.class_ids = [self.class_ids[i] for i in prediction.indices]
        prediction.confidences = [round(float(v), 6) for v in values]
        confidence = float(values[0])  # decided unrounded: a rounded value could cross the threshold
        prediction.confidence = prediction.confidences[0]
        prediction.energy = None if energy is None else round(energy, 6)
        prediction.unknown = not point.accepts(confidence)
        prediction.reason = point.reason(confidence) if prediction.unknown else None
        return prediction

    def describe_answers(self) -> dict[str, Any]:
        """How confidences are computed and answers withheld, for ``GET /model``, responses and logs."""
        return {"temperature": self.temperature, "temperature_in_graph": self.graph_temperature,
                "raw": self.answers.raw, "calibrated": self.temperature is not None,
                "operating_point": {**self.operating_point.to_dict(),
                                    "description": self.operating_point.describe()}}

    def describe(self) -> dict[str, Any]:
        """The deployment record plus how this process runs it (for ``GET /model`` and logs)."""
        return {**self.record, "answers": self.describe_answers(),
                "runtime": {**self.backend.describe(), "micro_batch": self.micro_batch, "source": self.source,
                            "precision_chosen_because": self.chosen_because}}


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_predictor(source: str | Path, *, backend: str = "auto", threads: int | None = None, device: str = "cpu",
                   precision: str = "auto", cache_root: Path | None = None,
                   log: Callable[[str], None] | None = None, answers: AnswerOptions | None = None) -> Predictor:
    """A predictor for a checkpoint (file or run directory) or an export folder.

    backend: ``auto`` (an export's own runtime; for a checkpoint, ONNX Runtime in float32 and an AOTInductor
        package in bf16, each through a cached export), ``torch`` (eager, checkpoints only), ``onnxruntime``,
        ``torchscript`` or ``aoti`` (exports of that format, or a checkpoint's cached export for onnxruntime/aoti).
    threads: intra-op threads for ONNX Runtime or torch (None: their defaults, one per core).
    precision: ``auto`` (with backend ``auto``, the choice of :func:`~resnetlab.deployment.policy.choose_precision`
        for this checkpoint on this machine: float32 for small models, bf16 for large ones on CPUs with bf16
        instructions; an explicit backend runs float32), ``float32`` (parity with evaluation to 1e-4 on every
        backend) or ``bf16``: a bf16 AOTInductor package (the fastest path for large models on CPUs with bf16
        instructions; ``--backend torch``: eager bf16 autocast), with confidences that differ from float32 by up to a few
        hundredths on uncertain images (measured on gtsrb-dev and imagenette-dev). An export runs in the precision
        it was made in.
    answers: calibrated or raw confidences and the operating point (:class:`AnswerOptions`; default: calibrated,
        the stored operating point). A checkpoint's cached export is one of raw logits when ``answers.raw``.
    """
    answers = answers or AnswerOptions()
    if backend not in BACKEND_CHOICES:
        raise CheckpointError(f"--backend '{backend}': choose one of {', '.join(BACKEND_CHOICES)}")
    if precision not in PRECISIONS:
        raise CheckpointError(f"--precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    path = Path(source)
    if is_export_dir(path):
        made_in = read_export_record(path)["artifact"].get("precision", "float32")
        if precision not in ("auto", made_in):
            raise CheckpointError(f"'{path}' is a {made_in} export, and an export runs in the precision it was "
                                  f"made in; for {precision} pass the checkpoint, or export it again with "
                                  f"{'--format aoti --precision bf16' if precision == 'bf16' else '--format onnx'}")
        return _load_export(path, backend, threads, answers)
    checkpoint_file = checkpoint_file_of(path)
    if backend == "torchscript":
        raise CheckpointError(f"--backend torchscript runs a TorchScript export; make one with `resnetlab export "
                              f"{source} --format torchscript --out DIR` and pass DIR")
    if precision == "bf16" and backend == "onnxruntime":
        raise CheckpointError("--precision bf16 runs on the aoti or torch backend: ONNX Runtime has no fast bf16 "
                              "convolutions on CPUs")
    chosen_because = None
    if precision == "auto":
        precision = "float32"
        if backend == "auto":
            from resnetlab.deployment.policy import choose_precision
            from resnetlab.checkpoint import load_checkpoint

            choice = choose_precision(load_checkpoint(checkpoint_file)["meta"])
            precision, chosen_because = choice.precision, choice.reason
            if log is not None and precision != "float32":
                log(f"precision {precision} (auto): {choice.reason}; --precision float32 gives the evaluation's "
                    "exact confidences")
    asked_for = backend
    if backend == "auto":
        backend = "aoti" if precision == "bf16" else ("onnxruntime" if onnxruntime_available() else "torch")
    if backend in ("onnxruntime", "aoti"):
        fmt = "onnx" if backend == "onnxruntime" else "aoti"
        try:
            folder = cached_export(checkpoint_file, fmt=fmt, precision=precision, raw=answers.raw,
                                   cache_root=cache_root, log=log)
            predictor = _load_export(folder, backend, threads, answers, source=checkpoint_file)
            predictor.chosen_because = chosen_because
            return predictor
        except ExportError as err:
            if asked_for != "auto":
                raise
            if chosen_because is not None and precision == "bf16":
                # the automatic choice could not be built here: the float32 default path instead
                if log is not None:
                    log(f"note: {err}; predicting in float32 instead")
                return load_predictor(checkpoint_file, threads=threads, device=device, precision="float32",
                                      cache_root=cache_root, log=log, answers=answers)
            if log is not None:
                log(f"note: {err}; predicting with eager torch instead")
    from resnetlab.checkpoint import load_checkpoint, model_from_checkpoint

    model, meta = model_from_checkpoint(load_checkpoint(checkpoint_file))
    if threads:
        torch.set_num_threads(threads)
    record = record_from_meta(meta, checkpoint_sha256=file_sha256(checkpoint_file))
    engine = TorchBackend(model, device=_device(device), precision=precision, channels_last=precision == "bf16")
    return Predictor(engine, record, source=str(checkpoint_file), answers=answers)


def _load_export(folder: Path, backend: str, threads: int | None, answers: AnswerOptions,
                 source: Path | None = None) -> Predictor:
    record = read_export_record(folder)
    artifact = record["artifact"]
    runtime = EXPORT_RUNTIMES.get(artifact["format"])
    if runtime is None:
        raise CheckpointError(f"export '{folder}' has unknown format '{artifact['format']}'")
    if backend not in ("auto", runtime):
        needs = ("a checkpoint" if backend == "torch"
                 else f"an export made with --format {RUNTIME_FORMATS[backend]}")
        raise CheckpointError(f"'{folder}' is {FORMAT_ARTICLES[artifact['format']]} export, which runs on --backend "
                              f"{runtime} (or auto); --backend {backend} needs {needs}")
    model_file = folder / artifact["file"]
    precision = artifact.get("precision", "float32")
    if runtime == "onnxruntime":
        engine: InferenceBackend = OnnxRuntimeBackend(model_file, threads=threads, precision=precision)
    else:
        if threads:
            torch.set_num_threads(threads)
        engine = (AotInductorBackend(model_file, precision=precision) if runtime == "aoti"
                  else TorchScriptBackend(model_file))
    return Predictor(engine, record, source=str(source or folder), artifact_dir=folder, answers=answers)


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
