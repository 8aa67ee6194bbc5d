"""What every stage script shares: argument parsing for params, logging, and clean failures."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable

from cifar_alexnet.config import Params, load_params, split_override_string
from cifar_alexnet.errors import PipelineError


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a param, e.g. --set train.lr=0.01; repeatable, and a "
                             "comma-separated list is accepted (as MLproject passes it)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    return [item for text in args.overrides for item in split_override_string(text)]


def parse_params(args: argparse.Namespace) -> Params:
    return load_params(args.params, _overrides(args))


def overridden_keys(args: argparse.Namespace) -> set[str]:
    """``{"train.lr", ...}``: keys set on the command line, which win over tuned values."""
    return {item.split("=", 1)[0].strip() for item in _overrides(args)}


RESUME_HINT = ("interrupted; outputs already written are complete, the rest were not written; "
               "run it again to resume (training continues from its last checkpoint)")
TUNING_INTERRUPTED = ("interrupted; the study keeps every finished trial and runs the interrupted "
                      "one again: rerun the same command (or `dvc repro`) to continue")


def run_stage(main: Callable[[], None], interrupted: str = RESUME_HINT) -> None:
    """Run a stage; a PipelineError becomes one clear line on stderr and exit status 1, Ctrl-C
    or SIGTERM the line ``interrupted`` (what was kept, how to continue) and exit status 130."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Pre-emption sends SIGTERM: unwind like Ctrl-C, so MLflow runs are marked KILLED and
    # temporary files are removed. (SIGKILL cannot be caught; a rerun recovers from it.)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _run(main, interrupted)
    finally:
        # From here the process only exits: a SIGTERM now (torchrun's agent stopping a rank
        # that is already leaving) ends it at once, not with a traceback from the shutdown.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(main: Callable[[], None], interrupted: str) -> None:
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        sys.exit(130)
