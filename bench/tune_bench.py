"""Benchmark the tune stage: the same study with and without pruning, side by side.

Runs ``tune.n_trials`` trials once per pruner in fresh SQLite studies (MLflow into a temporary
store) and prints trials/hour, epochs spent vs. a no-pruning study, and the best validation
value of each. Example (the CI configuration, on data prepared by `dvc repro prepare`):

    python bench/tune_bench.py --params .ci/params.yaml --data data/prepared \\
        --set tune.n_trials=12 --pruners median none
"""

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from cifar_alexnet.stage_runner import parse_params, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    parser.add_argument("--pruners", nargs="+", default=["median", "none"],
                        choices=["median", "hyperband", "none"])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    params = parse_params(args)
    workdir = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ.pop("CIFAR_TUNE_STORAGE", None)  # it would override the fresh studies below
    # imported after the tracking URI is set
    from cifar_alexnet.tune.runner import run_study
    from cifar_alexnet.tune.report import summarize

    rows = []
    for pruner in args.pruners:
        tune = dataclasses.replace(params.tune, pruner=pruner, study_name=f"bench-{pruner}",
                                   storage=f"sqlite:///{workdir / pruner}.db")
        run_params = dataclasses.replace(params, tune=tune)
        started = time.perf_counter()
        study = run_study(run_params, args.data)
        seconds = time.perf_counter() - started
        summary = summarize(study, run_params)
        rows.append({"pruner": pruner, "trials": len(study.trials),
                     "complete": summary["trials_complete"], "pruned": summary["trials_pruned"],
                     "failed": summary["trials_failed"], "epochs_spent": summary["epochs_spent"],
                     "epochs_without_pruning": summary["epochs_without_pruning"],
                     "best_value": summary["best_value"], "seconds": seconds,
                     "trials_per_hour": len(study.trials) / seconds * 3600})
    header = (f"{'pruner':<10}{'trials':>7}{'pruned':>8}{'epochs':>8}{'no-prune':>10}"
              f"{'best ' + params.tune.metric:>14}{'seconds':>9}{'trials/h':>10}")
    print(header)
    for r in rows:
        print(f"{r['pruner']:<10}{r['trials']:>7}{r['pruned']:>8}{r['epochs_spent']:>8}"
              f"{r['epochs_without_pruning']:>10}{r['best_value'] or float('nan'):>14.4f}{r['seconds']:>9.1f}"
              f"{r['trials_per_hour']:>10.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    run_stage(main)
