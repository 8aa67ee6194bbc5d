"""The Optuna study: storage, name, identity (fingerprint), sampler seeding and trial bookkeeping.

A study lives in an SQLAlchemy storage (SQLite file by default, PostgreSQL for many machines) so
it survives crashes and can be shared by any number of worker processes; heartbeats let a later
process fail and retry trials whose worker was killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from cifar_alexnet.config import DATA, TRIAL, Params, identity
from cifar_alexnet.errors import ConfigError, PipelineError
from cifar_alexnet.redact import redact_url
from cifar_alexnet.workspace import resolve_sqlite_url

log = logging.getLogger(__name__)


class _TrialFailuresWithoutTraceback(logging.Filter):
    """Optuna logs a failed trial's traceback and then "failed with value None". For a trial
    stopped by Ctrl-C, SIGTERM or a tracking outage that is some 60 lines before the stage's own
    one-line message, which says everything (what stopped, that nothing finished is lost, what
    to run); the trial is not at fault and runs again. Other failures keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().endswith("failed with value None."):
            return False
        from cifar_alexnet import tracking  # imported by now: a study is running

        stopped = record.exc_info and record.exc_info[1]
        if isinstance(stopped, (KeyboardInterrupt, SystemExit, tracking.TrackingUnavailable)):
            number = re.match(r"Trial (\d+)", record.getMessage())
            record.msg = (f"trial {number[1] if number else '?'} stopped "
                          f"({type(stopped).__name__}); it runs again when the study continues")
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """While a study runs: no "experimental" warnings (heartbeats, stale-trial retries and the
    matplotlib plots are documented features that still carry the label; the warnings say
    nothing actionable), and no traceback for a trial that was stopped rather than failed.
    Scoped, so importing this module changes nothing for the importer."""
    optimize_log = logging.getLogger("optuna.study._optimize")
    failure_filter = _TrialFailuresWithoutTraceback()
    optimize_log.addFilter(failure_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optimize_log.removeFilter(failure_filter)

STORAGE_ENV = "CIFAR_TUNE_STORAGE"
GRACE_HEARTBEATS = 3  # a RUNNING trial whose heartbeat is this many intervals old is dead
MAX_RETRIES = 3
STORAGE_ATTEMPTS = 4

def storage_url(params: Params) -> str:
    """$CIFAR_TUNE_STORAGE or tune.storage; a relative SQLite path is relative to the project
    root, also when DVC runs the stage in a temporary experiment copy."""
    return resolve_sqlite_url(configured_storage(params))


def configured_storage(params: Params) -> str:
    """The storage as the user gave it ($CIFAR_TUNE_STORAGE or tune.storage), unresolved."""
    return os.environ.get(STORAGE_ENV) or params.tune.storage


def study_fingerprint(params: Params) -> dict[str, Any]:
    """What a trial's result depends on (the params marked DATA or TRIAL in config.py); a study
    must not mix trials of different ones. Devices and other speed settings are not in it:
    workers on other hardware share a study."""
    return identity(params, DATA, TRIAL)


def _digest(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]


def study_name(params: Params) -> str:
    """``auto`` names the study after its fingerprint, so a changed search starts a new study."""
    if params.tune.study_name != "auto":
        return params.tune.study_name
    return f"{params.mlflow.experiment}-{params.model.arch}-{_digest(study_fingerprint(params))}"


def make_storage(url: str, heartbeat_seconds: int) -> RDBStorage:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(1, STORAGE_ATTEMPTS + 1):
        try:
            with quiet_optuna():
                return RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                    grace_period=GRACE_HEARTBEATS * heartbeat_seconds,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(MAX_RETRIES))
        except Exception as exc:  # SQLAlchemy/driver errors have no common base worth naming
            # Workers started together on an empty database race to create Optuna's tables
            # (PostgreSQL: duplicate key on CREATE TYPE); the loser finds them made on a retry.
            if attempt < STORAGE_ATTEMPTS:
                log.info("opening %s failed (%s); retrying", redact_url(url),
                         type(exc).__name__)
                time.sleep(attempt + random.random())
                continue
            raise PipelineError(f"cannot open the study storage {redact_url(url)}: {exc}. "
                                f"Check tune.storage (or ${STORAGE_ENV}) and that the database "
                                "server is reachable") from None
    raise AssertionError("unreachable")


def make_sampler(params: Params, seed: int) -> optuna.samplers.BaseSampler:
    if params.tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    if params.tune.pruner == "median":
        # Judge a trial only after its one-cycle warm-up (a quarter of its epochs): while the
        # lr is still rising, a trial that will end well can look poor. Needs 3 finished trials.
        return optuna.pruners.MedianPruner(
            n_startup_trials=3, n_warmup_steps=math.ceil(params.tune.epochs_per_trial / 4))
    if params.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1,
                                              max_resource=params.tune.epochs_per_trial)
    return optuna.pruners.NopPruner()


def open_study(params: Params, worker_id: int = 0, create: bool = True) -> optuna.Study:
    """Create or load the study; refuse a study that was made for different settings. Its
    sampler is seeded for each trial (:class:`SeededPerTrial`)."""
    url, name = storage_url(params), study_name(params)
    storage = make_storage(url, params.tune.heartbeat_seconds)
    fingerprint = study_fingerprint(params)
    if create:
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                    direction=params.tune.direction, pruner=make_pruner(params))
    else:
        try:
            study = optuna.load_study(study_name=name, storage=storage,
                                      pruner=make_pruner(params))
        except KeyError:
            raise PipelineError(f"no study named {name!r} in {redact_url(url)}; start it with "
                                "`cifar-study run`") from None
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif stored != fingerprint:
        changed = sorted(f"{section}.{key}" for section in fingerprint
                         for key in set(fingerprint[section]) | set(stored.get(section, {}))
                         if fingerprint[section].get(key) != stored.get(section, {}).get(key))
        raise ConfigError(
            f"study {name!r} in {redact_url(url)} was created with different settings "
            f"({', '.join(changed)}); its trials would not be comparable. Set tune.study_name "
            "to a new name (or `auto`), or delete the study with "
            f"`optuna delete-study --study-name {name} --storage <url>`")
    study.sampler = SeededPerTrial(params, worker_id)
    return study


class SeededPerTrial(optuna.samplers.BaseSampler):
    """The configured sampler, seeded afresh for each trial from (``tune.seed``, the trials
    finished before it, the trials still running that started before it, the worker id) alone.

    A trial's suggestion then depends only on those and the finished trials TPE learns from:
    a study that crashed and was resumed suggests what an uninterrupted one would have (a
    retried trial reruns its own params), and concurrent workers draw different values even
    with the same worker id (`dvc queue start -j 2` runs two tune stages, both worker 0): the
    later one sees the earlier one's trial running. The seed is taken when the trial exists in
    the storage (``before_trial``), so two workers never compute it from the same state."""

    def __init__(self, params: Params, worker_id: int = 0) -> None:
        self._params, self._worker_id = params, worker_id
        self._sampler = make_sampler(params, params.tune.seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        retried = retried_trial_numbers(others)
        finished = sum(t.state.is_finished() and not (t.state == TrialState.FAIL
                                                       and t.number in retried) for t in others)
        running_before = sum(t.state == TrialState.RUNNING and t.number < trial.number
                             for t in others)
        seed = (self._params.tune.seed + finished + 1_000_003 * self._worker_id
                + 7_919 * running_before) % 2**32  # numpy seeds are 32-bit
        self._sampler = make_sampler(self._params, seed)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> Any:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: Any) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        self._sampler.after_trial(study, trial, state, values)


def retried_trial_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Failed trials that a later trial re-runs (heartbeat retry or interrupted-trial retry)."""
    numbers = set()
    for t in trials:
        # A retry of a retry records the whole chain in retry_history, not only the original.
        numbers.update(int(n) for n in t.system_attrs.get("retry_history", []))
        with warnings.catch_warnings():  # documented, but labelled experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            original = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
        if original is None:
            original = t.user_attrs.get("retry_of")
        if original is not None:
            numbers.add(int(original))
    return numbers


@dataclass(frozen=True)
class Progress:
    complete: int
    pruned: int
    failed: int       # failed for good (diverged, or out of retries), not the retried ones
    running: int
    waiting: int      # queued retries

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def progress(study: optuna.Study) -> Progress:
    trials = study.get_trials(deepcopy=False)
    retried = retried_trial_numbers(trials)
    count = {state: 0 for state in TrialState}
    for t in trials:
        if not (t.state == TrialState.FAIL and t.number in retried):
            count[t.state] += 1
    return Progress(count[TrialState.COMPLETE], count[TrialState.PRUNED], count[TrialState.FAIL],
                    count[TrialState.RUNNING], count[TrialState.WAITING])


def recover(study: optuna.Study, handled: set[int]) -> None:
    """Fail trials of dead workers (stale heartbeat) and retry them; close their MLflow runs.

    Trials interrupted by Ctrl-C/SIGTERM are marked failed by Optuna itself; they are retried
    here too, since nothing was wrong with their parameters. ``handled`` holds the numbers of
    failed trials this process has already dealt with, so each costs MLflow calls only once.
    """
    optuna.storages.fail_stale_trials(study)  # its heartbeat callback enqueues the retry
    trials = study.get_trials(deepcopy=False)
    retried = retried_trial_numbers(trials)
    lost_runs: dict[int, list[str]] = {}  # trial number -> its MLflow runs, closed if open
    for t in trials:
        if t.state != TrialState.FAIL or "fail_reason" in t.user_attrs or t.number in handled:
            continue  # not failed, failed for its own reason (diverged), or already seen
        handled.add(t.number)
        if t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log.info("trial %d was interrupted; queued again", t.number)
        runs = [r for r in (t.user_attrs.get("mlflow_run_id"),
                            t.user_attrs.get("mlflow_parent_run_id")) if r]
        if runs:
            lost_runs[t.number] = runs
    if not lost_runs:
        return
    # Only now: a study with nothing to recover (the tune stage finding it done) needs no MLflow.
    from cifar_alexnet import tracking

    for number, runs in lost_runs.items():
        killed = tracking.mark_killed(runs)
        if killed:
            log.info("trial %d's worker died; marked MLflow run(s) %s KILLED", number,
                     ", ".join(killed))


