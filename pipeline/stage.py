"""Run one stage's command from dvc.yaml without DVC, passing extra arguments (e.g. --set).

MLproject entry points use this, so stage paths are written once (in dvc.yaml):
    python pipeline/stage.py train --set train.lr=0.01
"""

import shlex
import subprocess
import sys

import yaml


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    stage, extra = sys.argv[1], sys.argv[2:]
    with open("dvc.yaml") as fh:
        stages = yaml.safe_load(fh)["stages"]
    if stage not in stages:
        print(f"error: unknown stage {stage!r}; stages are {', '.join(stages)}", file=sys.stderr)
        return 2
    command = shlex.split(stages[stage]["cmd"]) + extra
    if command[0] == "python":
        command[0] = sys.executable
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
