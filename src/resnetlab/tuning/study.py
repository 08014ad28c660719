"""The Optuna study behind a tune: storage, who runs which trial, and recovery from killed workers.

Every worker (a ``resnetlab tune`` process) runs an ask-and-tell loop against one shared study. Three rules keep
the trials honest when workers run side by side or are killed:

* **Claiming.** Optuna gives every trial a unique number and hands a queued trial to exactly one worker. Each
  trial has a *slot*: its grid point for a grid search, the number of the trial it retries (or its own) for an
  Optuna search. A worker runs a trial only if it is the lowest-numbered live trial of its slot (and, for an
  Optuna search of ``N`` trials, one of the first ``N`` slots); otherwise it marks the trial ``skipped`` and
  fails it without training. Two workers can therefore never train the same setting twice, even when they ask
  at the same moment.
* **Recovery.** A trial left ``RUNNING`` by a dead worker is failed and queued again with the same parameters
  (Optuna's :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`). A worker on this machine is known dead
  when its process is gone; a worker elsewhere when its heartbeat in an RDB storage (SQLite, PostgreSQL, MySQL)
  is older than the grace period.
* **Failures are explicit.** A trial this code fails on purpose carries a ``status`` user attribute
  (``skipped: ...`` or ``error: ...``); a ``FAIL`` without one was left by a dead worker and is retried once
  per crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from resnetlab.errors import ConfigError, first_line

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable

#: Seconds between heartbeats of a running trial in an RDB storage, and how long one may be missed before another
#: worker declares the trial's worker dead (only for workers on other machines: same-machine workers are checked
#: by process id at once).
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 150
#: A trial claimed but not yet tagged with its worker this long ago was left by a worker that died while claiming.
UNTAGGED_GRACE_S = 120

@contextlib.contextmanager
def _experimental_api():
    """Optuna's heartbeats, retry and stale-trial helpers are marked experimental, and it expects heartbeats to be
    used with ``study.optimize``; they are its documented way to find dead workers, and they work with ask-and-tell
    as this module uses them (it records the heartbeats itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


@contextlib.contextmanager
def optuna_logging(verbosity: int = optuna.logging.WARNING):
    """Optuna's own logging at ``verbosity`` for the duration of a search, as it was afterwards: by default it
    logs every trial at INFO level on stderr, which the tune log already says better. Scoped, so that importing
    resnetlab or tuning once leaves the Optuna of a user's other studies as it was.

    Example:
        >>> with optuna_logging():  # doctest: +SKIP
        ...     study.tell(trial, 0.9)
    """
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(verbosity)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def ask(study: optuna.Study) -> optuna.Trial:
    with _experimental_api():
        return study.ask()


SETUP_ATTR = "resnetlab_setup"
STATUS_ATTR = "status"
WORKER_ATTR = "worker"
REFIT_ATTR = "refit"


# ---------------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------------


def resolve_storage(spec: str | None, tune_dir: Path):
    """``None``/``sqlite`` -> ``DIR/study.db``; ``journal`` -> ``DIR/study.journal``; ``journal:PATH``; or an
    SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``, ``mysql+pymysql://...``)."""
    if spec in (None, "", "sqlite"):
        return _rdb_storage(f"sqlite:///{(tune_dir / 'study.db').resolve()}")
    if spec == "journal" or spec.startswith("journal:"):
        path = Path(spec.partition(":")[2]) if ":" in spec else tune_dir / "study.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    if "://" in spec:
        return _rdb_storage(spec)
    raise ConfigError(f"--storage '{spec}': give an SQLAlchemy URL (sqlite:///FILE, postgresql://..., mysql://...), "
                      "journal (a journal file in the tune folder) or journal:FILE")


def _rdb_storage(url: str, attempts: int = 5) -> RDBStorage:
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        for attempt in range(attempts):
            try:
                with _experimental_api():
                    return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                      grace_period=HEARTBEAT_GRACE_S)
            except sqlalchemy.exc.DBAPIError:
                # Workers started together race to create the tables of a new database (a table that "already
                # exists", a second schema-version row); the loser opens the database again and finds it made.
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except ImportError as err:
        raise ConfigError(f"--storage '{describe_storage(url)}' needs a database driver that is not installed "
                          f"({err}); install it (e.g. psycopg2 or pymysql) or use the default SQLite file") from None
    except Exception as err:  # sqlalchemy's OperationalError, ArgumentError ...: a URL or server the user named
        raise ConfigError(f"--storage '{describe_storage(url)}': cannot open it ({type(err).__name__}: "
                          f"{first_line(err)})") from None


def describe_storage(spec: Any) -> str:
    """The storage for logs and reports, with any password in a URL hidden."""
    if isinstance(spec, RDBStorage):
        spec = spec.url
    elif not isinstance(spec, str):
        return type(spec).__name__
    scheme, sep, rest = spec.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else spec
    return spec


def open_study(storage, name: str, *, direction: str, sampler, pruner) -> optuna.Study:
    return optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler, pruner=pruner,
                               load_if_exists=True)


def check_setup(study: optuna.Study, setup: dict[str, Any], *, relaxed: Iterable[str] = ()) -> None:
    """Record the tune's setup in a new study, or check that a study being resumed or joined has the same one."""
    stored = study.user_attrs.get(SETUP_ATTR)
    if stored is None:
        study.set_user_attr(SETUP_ATTR, setup)
        return
    ours = json.loads(json.dumps(setup))
    differ = sorted(key for key in set(stored) | set(ours)
                    if key not in relaxed and stored.get(key) != ours.get(key))
    if differ:
        details = "; ".join(_difference(key, stored.get(key), ours.get(key)) for key in differ[:3])
        raise ConfigError(f"study '{study.study_name}' was started with another setup ({details}); run the same "
                          "command to resume or join it, or use another --out / --study-name (or --overwrite)")


def _difference(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for sub in sorted(set(old) | set(new)):
            if old.get(sub) != new.get(sub):
                return _difference(f"{key}.{sub}", old.get(sub), new.get(sub))
    return f"{key}: {_short(old)} then, {_short(new)} now"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (Linux), so a reused process id is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def worker_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def worker_label(record: dict[str, Any] | None) -> str:
    return f"{record['host']}:{record['pid']}" if record else "unknown worker"


def _worker_alive(record: dict[str, Any]) -> bool | None:
    """True/False for a worker on this machine; None when it runs elsewhere (only its heartbeat can tell)."""
    if record.get("host") != socket.gethostname():
        return None
    pid = int(record["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that id now
        return False
    start = _process_start(pid)
    return start is None or record.get("start") is None or start == record["start"]


class Heartbeat:
    """Records a running trial's heartbeat in an RDB storage from a background thread."""

    def __init__(self, study: optuna.Study, trial_id: int):
        self.storage = study._storage
        self.trial_id = trial_id
        self.enabled = isinstance(_base_storage(self.storage), RDBStorage)
        self._stop = threading.Event()
        self._thread = None
        if self.enabled:
            _base_storage(self.storage).record_heartbeat(trial_id)
            self._thread = threading.Thread(target=self._run, name="resnetlab-tune-heartbeat", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                _base_storage(self.storage).record_heartbeat(self.trial_id)
            except Exception:  # a busy database: the next beat retries; the grace period allows for misses
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _base_storage(storage):
    # optuna wraps an RDBStorage in a _CachedStorage; the heartbeat methods live on the RDBStorage itself.
    return getattr(storage, "_backend", storage)


# ---------------------------------------------------------------------------------------------------------------
# Trial bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def status_of(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get(STATUS_ATTR, ""))


def is_skipped(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and status_of(trial).startswith("skipped")


def is_error(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and status_of(trial).startswith("error")


def is_crashed(trial: FrozenTrial) -> bool:
    """Failed by recovery after its worker died (never by this code on purpose)."""
    return trial.state == TrialState.FAIL and not status_of(trial)


def root_number(trial: FrozenTrial) -> int:
    """The number of the first trial in a chain of retries (the trial itself if it is not a retry)."""
    with _experimental_api():
        root = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if root is None else int(root)


def retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the trials that this one retries, oldest first."""
    with _experimental_api():
        return list(RetryHeartbeatStaleTrialCallback.retry_history(trial))


def slot_of(trial: FrozenTrial) -> tuple[str, int] | None:
    """What a trial computes: a grid point, or a retry chain. None for a grid trial not yet given its point."""
    if "grid_id" in trial.system_attrs:
        return ("grid", int(trial.system_attrs["grid_id"]))
    if "search_space" in trial.system_attrs:  # a GridSampler trial is tagged with both at once
        return None
    return ("trial", root_number(trial))


def _holds_slot(trial: FrozenTrial) -> bool:
    """Whether a trial holds its slot: queued, running, or finished other than by a crash or as a duplicate."""
    if trial.state == TrialState.FAIL:
        return is_error(trial)
    return True


@dataclass
class StudyView:
    """A snapshot of the study's trials with the counts the worker loop decides by."""

    trials: list[FrozenTrial]

    @classmethod
    def of(cls, study: optuna.Study) -> StudyView:
        return cls(study.get_trials(deepcopy=False))

    def by_state(self, *states: TrialState) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state in states]

    def held_slots(self) -> dict[tuple[str, int], FrozenTrial]:
        """Each slot and the lowest-numbered trial that holds it."""
        held: dict[tuple[str, int], FrozenTrial] = {}
        for trial in sorted(self.trials, key=lambda t: t.number):
            slot = slot_of(trial)
            if slot is not None and _holds_slot(trial) and slot not in held:
                held[slot] = trial
        return held

    def waiting(self) -> list[FrozenTrial]:
        return self.by_state(TrialState.WAITING)

    def running(self) -> list[FrozenTrial]:
        return self.by_state(TrialState.RUNNING)


def claim_verdict(view: StudyView, number: int, *, n_trials: int | None) -> str | None:
    """None if the trial ``number`` may run; otherwise why it must be skipped."""
    trial = next(t for t in view.trials if t.number == number)
    slot = slot_of(trial)
    if slot is None:
        return "skipped: the grid sampler gave it no grid point"
    holder = view.held_slots().get(slot)
    if holder is not None and holder.number != number:
        what = f"grid point {slot[1]}" if slot[0] == "grid" else f"the setting of trial {slot[1]}"
        return f"skipped: trial {holder.number} already runs {what}"
    if n_trials is not None and slot[0] == "trial":
        order = sorted(s[1] for s in view.held_slots() if s[0] == "trial")
        if slot[1] in order and order.index(slot[1]) >= n_trials:
            return f"skipped: {n_trials} trials were already started by the workers"
    return None


def has_work(view: StudyView, *, grid_size: int | None, n_trials: int | None) -> bool:
    """Whether a trial is queued, a grid point has no trial yet, or fewer than ``n_trials`` slots are taken."""
    if view.waiting():
        return True
    slots = view.held_slots()
    if grid_size is not None:
        return len({s[1] for s in slots if s[0] == "grid"}) < grid_size
    return n_trials is None or len([s for s in slots if s[0] == "trial"]) < n_trials


def recover_dead_trials(study: optuna.Study, log=_logger.info) -> list[int]:
    """Fail the trials of dead workers and queue each of them again once; returns the numbers failed here."""
    failed = []
    now = time.time()
    for trial in StudyView.of(study).running():
        record = trial.user_attrs.get(WORKER_ATTR)
        if record is None:
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            dead = now - started > UNTAGGED_GRACE_S
        else:
            dead = _worker_alive(record) is False
        if dead:
            try:
                tell(study, trial.number, state=TrialState.FAIL)
            except ValueError:  # another worker failed or finished it first
                continue
            failed.append(trial.number)
            log(f"trial {trial.number}: its worker {worker_label(record)} is gone; it will run again")
    if _heartbeat_storage(study):
        # Workers on other machines: Optuna fails the trials whose heartbeat stopped longer than the grace period.
        with _experimental_api():
            optuna.storages.fail_stale_trials(study)
    _requeue_crashed(study, log)
    return failed


def _heartbeat_storage(study: optuna.Study) -> bool:
    return isinstance(_base_storage(study._storage), RDBStorage)


def _requeue_crashed(study: optuna.Study, log) -> None:
    trials = StudyView.of(study).trials
    retried = {n for t in trials for n in retry_history(t)}
    for trial in trials:
        if is_crashed(trial) and trial.number not in retried:
            # Two workers may queue the same retry at once; the claiming rule then lets only the first one run.
            with _experimental_api():
                RetryHeartbeatStaleTrialCallback()(study, trial)
            log(f"trial {trial.number}: queued again with the same parameters")


def tell(study: optuna.Study, trial: optuna.Trial | int, value: float | None = None,
         state: TrialState | None = None) -> None:
    """``study.tell``, outside ``study.optimize``.

    The GridSampler calls ``study.stop()`` once the grid is done, which raises outside an optimize loop *after* the
    trial's state is stored (the documented ask-and-tell caveat, optuna issue 4121); the worker loop stops on its
    own when nothing is left, so that error is dropped here.
    """
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def finish_skipped(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    _fail_with_status(study, trial, reason)


def finish_error(study: optuna.Study, trial: optuna.Trial, message: str) -> None:
    _fail_with_status(study, trial, f"error: {message}")


def _fail_with_status(study: optuna.Study, trial: optuna.Trial, status: str) -> None:
    # A trial another worker already failed (it took this worker for dead) stays as that worker left it.
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, ValueError):
        trial.set_user_attr(STATUS_ATTR, status)
        tell(study, trial, state=TrialState.FAIL)


def study_is_settled(view: StudyView) -> bool:
    """No trial queued or running anywhere."""
    return not view.waiting() and not view.running()
