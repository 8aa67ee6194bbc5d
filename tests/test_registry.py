"""The Model Registry's promotion gate: the rule as a pure function, then on a real store (the
default sqlite file, an `mlflow server` on 127.0.0.1): every evaluated model becomes a version,
`@champion` moves only to a strictly higher test accuracy, anything else is `@challenger`, and a
version left without a decision by a killed evaluation is settled by the next one."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cifar_alexnet import tracking
from cifar_alexnet.config import ModelConfig
from cifar_alexnet.core.model import build_model
from helpers import MlflowServer

NAME = "cifar10-alexnet-test"
C = tracking.Candidate


@pytest.mark.parametrize("candidates, current, expected", [
    ([], None, None),
    ([C("1", 0.5)], None, "1"),                                   # the first one
    ([C("1", 0.5), C("2", 0.4)], "1", "1"),                       # worse: stays
    ([C("1", 0.5), C("2", 0.4), C("3", 0.5)], "1", "1"),          # a tie keeps the champion
    ([C("1", 0.5), C("2", 0.61)], "1", "2"),                      # strictly better moves it
    ([C("1", 0.5), C("2", 0.61), C("3", 0.61)], None, "2"),       # no champion: earliest best
    ([C("1", 0.5), C("2", 0.61), C("3", 0.61)], "3", "3"),        # an equal champion stays
    ([C("1", None), C("2", 0.99)], "1", "1"),                     # promoted by hand: kept
    ([C("1", 0.5), C("2", 0.7)], "9", "2"),                       # alias on a deleted version
])
def test_the_champion_is_the_earliest_strictly_best_version(candidates, current, expected):
    assert tracking.champion_for(candidates, current) == expected
    # whichever evaluator applies it next finds nothing to change: the races settle
    assert tracking.champion_for(candidates, expected) == expected


@pytest.fixture
def store(request, tmp_path, monkeypatch):
    """The tracking URI of a fresh store (sqlite, or a server over a sqlite file), set as the
    current one with an experiment of this test's."""
    def use(uri: str) -> str:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("registry")
        return uri

    if request.param == "sqlite":
        yield use(f"sqlite:///{tmp_path / 'mlflow.db'}")
    else:
        with MlflowServer(tmp_path / "server.db", tmp_path) as server:
            yield use(server.uri)


def logged_model() -> str:
    torch.manual_seed(0)
    model = build_model(ModelConfig("alexnet", 0.0625, 0.0, "batch"))
    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    return tracking.log_model(model, images, [f"c{i}" for i in range(10)])


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_champion_moves_only_to_a_strictly_better_model(store, tmp_path):
    decisions = []
    with mlflow.start_run():
        uri = logged_model()
        for accuracy in (0.50, 0.40, 0.50, 0.61):  # first, worse, a tie, better
            decisions.append(tracking.register_and_gate(uri, NAME, accuracy))
        tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags
    assert [(d.version, d.alias) for d in decisions] == [
        ("1", "champion"), ("2", "challenger"), ("3", "challenger"), ("4", "champion")]
    assert [d.champion_version for d in decisions] == [None, "1", "1", "1"]
    assert decisions[2].champion_accuracy == pytest.approx(0.50)
    assert "not higher: the champion stays" in decisions[2].describe()
    assert "it is the new @champion" in decisions[3].describe()
    assert decisions[0].describe().endswith("there was no champion; it is @champion")

    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "4"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "3"
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert sorted(float(v.tags["test_accuracy"]) for v in versions) == [0.40, 0.50, 0.50, 0.61]
    assert tags["registry.version"] == "4" and tags["registry.alias"] == "champion"

    # what a user serves or predicts with: the champion loads by its alias, with class names
    predict, names = tracking.load_logged_model(f"models:/{NAME}@champion")
    assert names == [f"c{i}" for i in range(10)]
    assert predict(np.zeros((3, 3, 32, 32), dtype=np.uint8)).shape == (3, 10)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_champion_promoted_by_hand_without_an_accuracy_is_kept(store):
    with mlflow.start_run():
        uri = logged_model()
        version = mlflow.register_model(uri, NAME).version
        MlflowClient().set_registered_model_alias(NAME, "champion", version)
        decision = tracking.register_and_gate(uri, NAME, 0.99)
    assert decision.alias == "challenger" and decision.champion_accuracy is None
    assert "champion was version 1 with unknown" in decision.describe()


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_version_left_without_alias_by_a_killed_evaluation_is_settled_by_the_rerun(store):
    with mlflow.start_run():
        uri = logged_model()
        tracking.register_and_gate(uri, NAME, 0.50)
        # What kill -9 between registering and the gate leaves: a version with its accuracy
        # and no alias or decision (registered as the gate registers it).
        orphan = mlflow.register_model(uri, NAME, tags={tracking.ACCURACY_TAG: repr(0.70)})
        rerun = tracking.register_and_gate(uri, NAME, 0.70)  # the same model evaluated again
    client = MlflowClient(store)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == str(orphan.version)  # the best, earliest of equals
    assert rerun.alias == "challenger"
    settled = client.get_model_version(NAME, orphan.version)
    assert settled.tags[tracking.SETTLED_BY_TAG] == rerun.version
