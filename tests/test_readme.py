"""The README's commands do what it says: every `-S` override in the README and docs/ is a valid
param, and the synthetic-data example runs as written, with the small study it promises."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifar_alexnet.config import load_params, split_override_string
from helpers import ROOT, dvc, make_project, run, tiny_params

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(path: Path) -> list[str]:
    """The commands in the file's fenced code blocks, continuation lines joined, comments cut."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", path.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def overrides(command: str) -> list[str]:
    """The params a command sets: `dvc exp run -S k=v`, `mlflow run -P overrides=k=v,k=v`."""
    words = shlex.split(command.replace("<printed md5>", "f" * 32).replace("…", "1"))
    found = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-S"]
    for i, word in enumerate(words[:-1]):
        if word == "-P" and words[i + 1].startswith("overrides="):
            found += split_override_string(words[i + 1].removeprefix("overrides="))
    return found


def test_every_documented_override_is_a_valid_param():
    documented = {path.name: [o for c in shell_commands(path)
                              if c.startswith(("dvc exp run", "mlflow run")) for o in overrides(c)]
                  for path in DOCS}
    assert sum(map(len, documented.values())) >= 15, documented  # the parser found them
    for name, items in documented.items():
        for item in items:
            load_params(ROOT / "params.yaml", [item])  # raises ConfigError naming the key


def dvc_warnings(result) -> list[str]:
    """DVC's WARNING lines, but for the one the README explains: the first `dvc exp run` in a
    fresh clone has nothing to check out yet ("No file hash info found")."""
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("WARNING") and "No file hash info found" not in line]


@pytest.mark.slow
def test_the_synthetic_data_example_runs_as_written_then_the_short_view_compares(archive,
                                                                                 tmp_path):
    (make, exp_run) = [c for c in shell_commands(ROOT / "README.md")
                       if c.startswith("make-synthetic-cifar")
                       or (c.startswith("dvc exp run") and "synthetic" in c)]
    project = make_project(tmp_path / "project", tiny_params(archive))
    made = run([str(Path(sys.executable).parent / make.split()[0]),
                str(tmp_path / "synthetic.tar.gz")], cwd=project)
    assert made.returncode == 0, made.stderr
    printed = dict(line.split(": ", 1) for line in made.stdout.splitlines())
    command = exp_run.replace("<printed md5>", printed["md5"]).replace(
        "file:///tmp/synthetic.tar.gz", printed["url"])
    result = dvc(*shlex.split(command)[1:], cwd=project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = json.loads((project / "tune/study.json").read_text())
    # the small study the example sets, not params.yaml's 20 trials x 8 epochs
    assert study["trials_complete"] + study["trials_pruned"] == 4
    assert study["epochs_per_trial"] == 2
    assert json.loads((project / "metrics/evaluate.json").read_text())["test"]["accuracy"] > 0.2
    assert dvc_warnings(result) == []  # no "is empty", no other noise on the quick start

    # The default view lists the test metrics before every other metric.
    plain = dvc("exp", "show", "--csv", cwd=project).stdout.splitlines()[0].split(",")
    assert plain[plain.index("Created") + 2] == "test.accuracy", plain[:10]

    # A second experiment, then the README's short view of both.
    second = dvc("exp", "run", "-S", "train.epochs=2", cwd=project)
    assert second.returncode == 0 and dvc_warnings(second) == [], second.stdout + second.stderr
    (view,) = [c for c in shell_commands(ROOT / "README.md") if c.startswith("dvc exp show")]
    shown = dvc(*shlex.split(view)[1:], "--csv", cwd=project)
    assert shown.returncode == 0, shown.stderr
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    columns = list(rows[0])
    assert len(columns) <= 15 and "test.accuracy" in columns[:5], columns
    experiments = [r for r in rows if r["Experiment"]]
    assert len(experiments) == 2 and all(float(r["test.accuracy"]) > 0.2 for r in experiments)
    assert {r["train.epochs"] for r in experiments} == {"4", "2"}

    # DVC's own edits (params.yaml by -S, dvc.lock) do not make the runs look uncommitted.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.data.tags.get("git.dirty") for r in runs
                     if "git.dirty" in r.data.tags} == {"false"}
