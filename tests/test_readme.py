"""The README's commands do what it says: every `-S` override in the README and docs/ is a valid
param, and the synthetic-data example runs as written, with the small study it promises."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_the_synthetic_data_example_runs_as_written(archive, tmp_path):
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
    summary = json.loads((project / "tune/summary.json").read_text())
    # the small study the example sets, not params.yaml's 20 trials x 8 epochs
    assert summary["trials_complete"] + summary["trials_pruned"] == 4
    assert summary["epochs_per_trial"] == 2
    assert json.loads((project / "metrics/evaluate.json").read_text())["accuracy"] > 0.2
