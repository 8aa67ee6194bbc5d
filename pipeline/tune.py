"""Stage tune: Optuna over train.lr and model.dropout on the validation split; best params out."""

from pathlib import Path

from cifar_alexnet.stage_runner import TUNING_INTERRUPTED, parse_params, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for best_params.yaml, summary.json, trials.csv, plots/")
    args = parser.parse_args()
    params = parse_params(args)
    # Imported once the arguments are read: --help and a bad param answer at once, not after
    # the seconds Optuna, torch and MLflow take to import; and tuning off imports neither.
    if params.tune.n_trials == 0:
        from cifar_alexnet.tune.report import write_disabled

        write_disabled(args.out)
    else:
        from cifar_alexnet.tune.runner import run_study

        run_study(params, args.data, out_dir=args.out)


if __name__ == "__main__":
    run_stage(main, interrupted=TUNING_INTERRUPTED)
