"""``cifar-study``: run, resume, inspect and export the Optuna study that params.yaml describes.

The same study the tune stage uses (``tune.storage`` or ``$CIFAR_TUNE_STORAGE``, name from
``tune.study_name``), so workers on other machines only need the prepared data, the params and
the storage URL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cifar_alexnet.stage_runner import TUNING_INTERRUPTED, parse_params, run_stage, stage_parser
from cifar_alexnet.errors import ConfigError
from cifar_alexnet.redact import redact_url


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar-study", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = stage_parser("")
    for name, text in (("run", "create the study if needed and run trials"),
                       ("resume", "run trials in an existing study (error if it does not exist)")):
        sub = commands.add_parser(name, help=text, parents=[common], add_help=False)
        sub.add_argument("--data", type=Path, default=Path("data/prepared"),
                         help="prepared dataset directory (default: %(default)s)")
        sub.add_argument("--n-trials", type=int,
                         help="run exactly this many trials in this process (a worker); default: "
                              "top the study up to tune.n_trials")
        sub.add_argument("--worker-id", type=int, default=0,
                         help="distinct number per concurrent worker: seeds its sampler apart")
        sub.add_argument("--out", type=Path, default=Path("tune"),
                         help="rewrite the tune stage's outputs (best_params.yaml, summary.json, "
                              "study.json, trials.csv, plots/) here from the study, so the next "
                              "`dvc repro` trains with its best (default: %(default)s)")
        sub.add_argument("--no-out", dest="out", action="store_const", const=None,
                         help="write no files (a worker on a machine that does not train)")
    commands.add_parser("best", help="print the best trial and the study's progress as JSON",
                        parents=[common], add_help=False)
    export = commands.add_parser("export", help="write every trial to CSV (pandas)",
                                 parents=[common], add_help=False)
    export.add_argument("csv", type=Path, help="output CSV path")
    commands.add_parser("storage", help="print the study name and storage URL for the optuna "
                                        "CLI and optuna-dashboard", parents=[common],
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    params = parse_params(args)
    # Imported once the arguments are read: --help answers at once, not after the seconds
    # Optuna, torch and MLflow take to import; and only `run`/`resume` train, so only they
    # import torch and MLflow (`best`, `export`, `storage` read the study: Optuna alone).
    from .report import summarize, write_trials_csv
    from .study import open_study, progress, storage_url

    if args.command in ("run", "resume"):
        if args.n_trials is not None and args.n_trials < 1:
            raise SystemExit("cifar-study: --n-trials must be at least 1")
        if params.tune.n_trials == 0 and args.out is not None:
            raise ConfigError(
                f"tune.n_trials is 0 in {args.params}: tuning is off, so the next `dvc repro` "
                f"would replace the {args.out}/ this run writes with empty best params. Set "
                "tune.n_trials to at least 1 (the finished trials the study should hold), or "
                "pass --no-out to only grow the study")
        from cifar_alexnet import tracking

        from .runner import run_study

        with tracking.project_invocation(params):
            study = run_study(params, args.data, out_dir=args.out, n_trials=args.n_trials,
                              worker_id=args.worker_id, create=args.command == "run")
        print(json.dumps(summarize(study, params), indent=2))
        return
    study = open_study(params, create=False)
    if args.command == "best":
        print(json.dumps(summarize(study, params), indent=2))
    elif args.command == "export":
        write_trials_csv(study, args.csv)
        state = progress(study)
        print(f"wrote {len(study.trials)} trials ({state.complete} complete, {state.pruned} "
              f"pruned, {state.failed} failed) to {args.csv}")
    elif args.command == "storage":
        # The real URL is what the optuna CLI needs; it is printed to this terminal only.
        url = storage_url(params)
        print(f"study:   {study.study_name}\nstorage: {url}")
        if redact_url(url) != url:
            print("(the storage URL holds a password: do not paste it into logs)",
                  file=sys.stderr)


def cli() -> None:
    run_stage(main, interrupted=TUNING_INTERRUPTED)


if __name__ == "__main__":
    cli()
