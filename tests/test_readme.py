"""Every `-S` override the README and docs/ show is a valid param. (The README's synthetic-data
quick start runs as written, with its short `dvc exp show` view, in test_experiments.py, where
it is the first workflow of the matrix's ``experiments`` project.)"""

from __future__ import annotations

import shlex

from cifar_alexnet.config import load_params, split_override_string
from helpers import ROOT, shell_commands

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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
