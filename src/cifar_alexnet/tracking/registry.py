"""The Model Registry: every evaluated model registered, and the promotion gate that keeps
``@champion`` on the most accurate version (:func:`champion_for`, a pure function) even when
evaluations on several machines race."""

from __future__ import annotations

import logging
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import mlflow
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)


CHAMPION, CHALLENGER = "champion", "challenger"
ACCURACY_TAG = "test_accuracy"  # on a model version: what the promotion gate compares


@dataclass(frozen=True)
class Promotion:
    """What the promotion gate decided for one newly registered version."""
    name: str
    version: str
    alias: str                      # CHAMPION or CHALLENGER
    accuracy: float
    champion_version: str | None    # the champion before this decision (None: there was none)
    champion_accuracy: float | None

    def describe(self) -> str:
        if self.champion_version is None:
            before, verdict = "there was no champion", "it is @champion"
        else:
            before = (f"champion was version {self.champion_version} with "
                      f"{_fmt(self.champion_accuracy)}")
            verdict = ("higher: it is the new @champion" if self.alias == CHAMPION
                       else "not higher: the champion stays; this version is @challenger")
        return (f"registered {self.name} version {self.version} with test accuracy "
                f"{_fmt(self.accuracy)}; {before}; {verdict}")


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class Candidate:
    """A registered version as the gate sees it."""
    version: str
    accuracy: float | None  # None: unknown (registered by hand, without an evaluation)


def champion_for(candidates: Sequence[Candidate], current: str | None) -> str | None:
    """Which version should hold ``@champion``: the current champion, unless a version is
    strictly more accurate (then the earliest of the most accurate); a champion of unknown
    accuracy (promoted by hand: a person decided) is kept. A pure function of the registry's
    state, so every evaluator that applies it reaches the same answer, whatever order they
    ran in."""
    known = [c for c in candidates if c.accuracy is not None]
    accuracy = {c.version: c.accuracy for c in candidates}
    if current is not None and current in accuracy and accuracy[current] is None:
        return current
    if not known:
        return current
    best = max(c.accuracy for c in known)
    if current is not None and accuracy.get(current) is not None and accuracy[current] >= best:
        return current
    return min((c.version for c in known if c.accuracy == best), key=int)


def _version_accuracy(client: mlflow.MlflowClient, version: Any) -> float | None:
    """A version's test accuracy: its tag, else its run's ``test/accuracy`` metric."""
    if ACCURACY_TAG in version.tags:
        return float(version.tags[ACCURACY_TAG])
    if version.run_id:
        try:
            return client.get_run(version.run_id).data.metrics.get("test/accuracy")
        except MlflowException:
            return None
    return None


def _champion(client: mlflow.MlflowClient, name: str) -> Any:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _registry_write(call: Callable[..., Any], *args: Any) -> Any:
    """A registry write that may race another evaluator's: MLflow's server inserts an alias or
    tag that does not exist yet, and of two inserting at once one fails on the key (seen on
    PostgreSQL). The retry finds the row and updates it."""
    for attempt in range(5):
        try:
            return call(*args)
        except MlflowException as exc:
            conflict = re.search(r"duplicate key|UniqueViolation|UNIQUE constraint", str(exc))
            if not conflict or attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


PROMOTION_TAG = "promotion"  # on a version: the gate's decision, in words
SETTLED_BY_TAG = "gate.settled_by"  # on a version killed before its gate: who settled it
GATE_ROUNDS = 20


def register_and_gate(model_uri: str, name: str, accuracy: float) -> Promotion:
    """Register ``model_uri`` as a new version of ``name`` and settle ``@champion``
    (:func:`champion_for`); a version that is not the champion gets ``@challenger``. The
    decision is tagged on the active run and on the version.

    Safe when evaluations race (several machines on one tracking server): the registry has no
    transactions, so each evaluator applies the rule, sets the alias, and reads the registry
    again until what it reads already satisfies the rule. The last writer has checked after
    its write, so no better version is left without the alias. A version whose evaluation
    was killed between registering it and the gate is settled by the next evaluation too (tag
    ``gate.settled_by``)."""
    client = mlflow.MlflowClient()
    with warnings.catch_warnings():  # MLflow warns that registering may take a while
        warnings.simplefilter("ignore")
        version = mlflow.register_model(model_uri, name,
                                        tags={ACCURACY_TAG: repr(float(accuracy))})
    mine = str(version.version)
    before = _champion(client, name)
    before_accuracy = _version_accuracy(client, before) if before else None
    for _ in range(GATE_ROUNDS):
        versions = client.search_model_versions(f"name = '{name}'")
        current = _champion(client, name)
        current_version = str(current.version) if current else None
        target = champion_for([Candidate(str(v.version), _version_accuracy(client, v))
                               for v in versions], current_version)
        if target is None or target == current_version:
            break
        _registry_write(client.set_registered_model_alias, name, CHAMPION, target)
    else:
        log.warning("the %s registry kept changing while %d evaluations settled @champion; "
                    "it is version %s now", name, GATE_ROUNDS, target)
    alias = CHAMPION if target == mine else CHALLENGER
    if alias == CHALLENGER:
        _registry_write(client.set_registered_model_alias, name, CHALLENGER, mine)
    decision = Promotion(name, mine, alias, float(accuracy),
                         str(before.version) if before else None, before_accuracy)
    _registry_write(client.set_model_version_tag, name, mine, PROMOTION_TAG, decision.describe())
    for other in versions:
        # No decision of its own: killed before its gate (or still in it: a tag of its own key,
        # so a racing evaluator's decision is never overwritten).
        if PROMOTION_TAG not in other.tags and str(other.version) != mine:
            _registry_write(client.set_model_version_tag, name, other.version, SETTLED_BY_TAG,
                            mine)
    mlflow.set_tags({"registry.model": name, "registry.version": decision.version,
                     "registry.alias": alias,
                     "registry.champion_before": decision.champion_version or "none"})
    return decision
