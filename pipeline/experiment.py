"""MLproject's `main` and `train` entry points: the pipeline, run by DVC so its outputs stay in
step with dvc.lock.

    python pipeline/experiment.py                              # dvc repro
    python pipeline/experiment.py "train.lr=0.01,model.dropout=0.3"
                                  # dvc exp run -S train.lr=0.01 -S model.dropout=0.3
"""

import argparse
import subprocess
import sys

from cifar_alexnet.stage_runner import run_stage
from cifar_alexnet.config import load_params, split_override_string
from cifar_alexnet.best_params import DROPOUT, LR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value, comma-separated or as separate arguments")
    overrides = split_override_string(",".join(parser.parse_args().overrides))
    # A bad value is refused here, before DVC writes it into params.yaml.
    params = load_params("params.yaml", overrides)
    tuned = sorted({o.split("=", 1)[0].strip() for o in overrides} & {LR, DROPOUT})
    if tuned and params.tune.n_trials > 0:
        print(f"note: training takes {', '.join(tuned)} from the study (tune/best_params.yaml) "
              "while tune.n_trials > 0; add tune.n_trials=0 to train with your value",
              file=sys.stderr)
    command = [sys.executable, "-m", "dvc"]
    command += ["exp", "run", *(a for o in overrides for a in ("-S", o))] if overrides \
        else ["repro"]
    print("running:", " ".join(["dvc", *command[3:]]), flush=True)
    from cifar_alexnet import tracking

    with tracking.project_invocation(params) as environment:
        sys.exit(subprocess.call(command, env=environment))


if __name__ == "__main__":
    run_stage(main)
