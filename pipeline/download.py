"""Stage download: fetch the CIFAR-10 archive named by data.url (or $CIFAR_DATA_URL) and verify it
against data.md5."""

from pathlib import Path

from cifar_alexnet.stage_runner import parse_params, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="where the archive is kept")
    args = parser.parse_args()
    params = parse_params(args)
    # Imported once the arguments are read: --help and a bad param answer at once, not after
    # the seconds torch and MLflow take to import.
    from cifar_alexnet.stages.download import fetch, source_url

    fetch(source_url(params.data.url), params.data.md5, args.out)


if __name__ == "__main__":
    run_stage(main)
