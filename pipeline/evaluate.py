"""Stage evaluate: score the trained model on the test split; reports, confusion matrices, MLflow."""

from pathlib import Path

from cifar_alexnet.stage_runner import parse_params, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--metrics", type=Path, required=True, help="test metrics JSON")
    parser.add_argument("--reports", type=Path, required=True, help="reports directory")
    args = parser.parse_args()
    params = parse_params(args)
    # The arguments, then the MLflow store, then torch: --help, a bad param and a store that
    # cannot be used (a damaged mlflow.db, a server that does not answer) are told in about
    # 2 s, not after the 6 s that importing torch and reading the data take.
    from cifar_alexnet import tracking

    tracking.connect()
    from cifar_alexnet.stages.evaluate import evaluate_stage

    evaluate_stage(params, args.data, args.model, args.metrics, args.reports)


if __name__ == "__main__":
    run_stage(main, interrupted="interrupted; the evaluation did not finish, so reports/ was not "
                                "written (it is written whole or not at all) and the training "
                                "run is unchanged: run it again (`dvc repro`) to evaluate")
