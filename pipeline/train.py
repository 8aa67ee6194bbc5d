"""Stage train: fit the AlexNet on the train split, keep the best-validation model, log to MLflow."""

import os
import sys
from pathlib import Path

from cifar_alexnet.stage_runner import (RESUME_HINT, overridden_keys, parse_params, run_stage,
                                        stage_parser)

LAUNCHED_HERE = "CIFAR_TRAIN_LAUNCHED"  # set for the ranks this script launches


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    parser.add_argument("--best-params", type=Path,
                        help="tune stage's best_params.yaml: its values replace params.yaml's "
                             "(but not values given with --set)")
    parser.add_argument("--out", type=Path, required=True, help="model directory")
    parser.add_argument("--metrics", type=Path, required=True, help="train metrics JSON")
    parser.add_argument("--history", type=Path, required=True, help="per-epoch CSV for dvc plots")
    parser.add_argument("--curves", type=Path, help="training curves PNG (viewable offline)")
    parser.add_argument("--checkpoint", type=Path,
                        help="per-epoch checkpoint: an interrupted training resumes from it")
    args = parser.parse_args()
    params = parse_params(args)
    # The arguments, then the MLflow store, then torch: --help, a bad param and a store that
    # cannot be used (a damaged mlflow.db, a server that does not answer) are told in about
    # 2 s, not after the 6 s that importing torch and reading the data take. Only the process
    # that logs checks it: a launcher (train.nproc > 1) leaves it to rank 0 (connecting takes
    # the run id `mlflow run` hands its command out of the environment the ranks inherit), and
    # under a torchrun of your own (RANK set) the other ranks never touch the store.
    if params.train.nproc == 1 and os.environ.get("RANK", "0") == "0":
        from cifar_alexnet import tracking

        tracking.connect()
    from cifar_alexnet.core.distributed import launch, launched_world

    if params.train.nproc > 1 and launched_world().size == 1:
        # train.nproc copies of this script, started by torchrun's launcher, train together.
        launch(params.train.nproc, __file__, sys.argv[1:], env={LAUNCHED_HERE: "1"})
        return
    from cifar_alexnet.stages.train import TrainOutputs, train_stage

    outputs = TrainOutputs(args.out, args.metrics, args.history, args.curves, args.checkpoint)
    train_stage(params, args.data, outputs, best_params_path=args.best_params,
                keep=overridden_keys(args))


if __name__ == "__main__":
    # The ranks a launch() started leave the interruption message to the launcher (one line).
    run_stage(main, interrupted="" if os.environ.get(LAUNCHED_HERE) else RESUME_HINT)
