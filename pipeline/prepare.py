"""Stage prepare: decode the archive safely, split train/val (seeded, stratified), write arrays."""

from pathlib import Path

from cifar_alexnet.stage_runner import parse_params, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="prepared dataset directory")
    args = parser.parse_args()
    params = parse_params(args)
    # Imported once the arguments are read: --help and a bad param answer at once, not after
    # the seconds torch and MLflow take to import.
    from cifar_alexnet.core.archive import read_archive
    from cifar_alexnet.stages.prepare import prepare

    prepare(read_archive(args.archive), params.data.val_size, params.base.seed, args.out,
            source_md5=params.data.md5)


if __name__ == "__main__":
    run_stage(main)
