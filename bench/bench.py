"""Benchmark: tutorial baseline vs. the project's trainer, time to accuracy, achieved TFLOP/s.

Runs with torch and torchvision alone (plus PyYAML to read params.yaml), on GPU or CPU. Prints a
table last and writes every figure, the device, the versions and the params to a JSON file.
"""

import logging
from pathlib import Path

from cifar_alexnet.tools import throughput
from cifar_alexnet.stage_runner import parse_params, run_stage, stage_parser
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.files import write_json
from cifar_alexnet.core.data import SPLITS
from cifar_alexnet.core.trainer import resolve_device

log = logging.getLogger("bench")


def parse_limits(items: list[str]) -> dict[str, int]:
    limits = {}
    for item in items:
        split, _, count = item.partition("=")
        if split not in SPLITS or not count.isdigit() or int(count) < 1:
            raise PipelineError(f"--limit-images {item!r}: expected SPLIT=N with N >= 1, "
                                "e.g. train=5000 (splits: " + ", ".join(SPLITS) + ")")
        limits[split] = int(count)
    return limits


def main() -> None:
    parser = stage_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="prepared dataset directory (data/prepared)")
    source.add_argument("--archive", type=Path,
                        help="official-format CIFAR-10 .tar.gz, split as the prepare stage does")
    parser.add_argument("--device", help="shorthand for --set train.device=DEVICE")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny run for CI: {', '.join(throughput.SMOKE_OVERRIDES)}, "
                             f"{throughput.SMOKE_IMAGES} images, {throughput.SMOKE_STEPS} timed steps")
    parser.add_argument("--warmup-steps", type=int,
                        help=f"untimed steps first (default {throughput.DEFAULT_WARMUP_STEPS})")
    parser.add_argument("--steps", type=int,
                        help=f"timed training steps (default {throughput.DEFAULT_STEPS})")
    parser.add_argument("--workers", type=int,
                        help="baseline DataLoader workers (default min(4, CPU count))")
    parser.add_argument("--target-acc", type=float,
                        help=f"test accuracy to reach (default {throughput.FULL_TARGET_ACC} on full "
                             f"CIFAR-10, {throughput.SUBSET_TARGET_ACC} on a subset)")
    parser.add_argument("--budget-seconds", type=float,
                        help=f"time budget (default {throughput.DEFAULT_BUDGET_SECONDS:.0f})")
    parser.add_argument("--peak-tflops", type=float,
                        help="bf16 peak of a device not in the built-in table")
    parser.add_argument("--limit-images", action="append", default=[], metavar="SPLIT=N",
                        help="use only the first N images of a split (train, val, test) for "
                             "quick CPU runs; repeatable")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-tta-run", action="store_true",
                        help="skip the time-to-accuracy training run")
    parser.add_argument("--json", type=Path, default=Path("bench/results.json"),
                        help="where to write all figures (default: %(default)s)")
    args = parser.parse_args()

    smoke = args.smoke
    limits = {**(throughput.SMOKE_IMAGES if smoke else {}), **parse_limits(args.limit_images)}
    args.overrides = [*(throughput.SMOKE_OVERRIDES if smoke else ()), *args.overrides,
                      *([f"train.device={args.device}"] if args.device else [])]
    try:
        params = parse_params(args)
    except ModuleNotFoundError as exc:
        raise PipelineError(f"reading {args.params} needs PyYAML ({exc}); install it "
                            "(pip install pyyaml) or carry its wheel to this machine") from None

    def pick(given, smoke_value, default):
        return given if given is not None else smoke_value if smoke else default

    options = throughput.BenchOptions(
        warmup_steps=pick(args.warmup_steps, throughput.SMOKE_WARMUP_STEPS,
                          throughput.DEFAULT_WARMUP_STEPS),
        steps=pick(args.steps, throughput.SMOKE_STEPS, throughput.DEFAULT_STEPS),
        target_acc=args.target_acc,
        budget_seconds=pick(args.budget_seconds, throughput.SMOKE_BUDGET_SECONDS,
                            throughput.DEFAULT_BUDGET_SECONDS),
        baseline=not args.skip_baseline, time_to_accuracy=not args.skip_tta_run,
        workers=args.workers, peak_tflops=args.peak_tflops)

    device = resolve_device(params.train.device)
    try:
        data = (throughput.load_prepared(args.data) if args.data else
                throughput.load_archive(args.archive, params.data.val_size, params.base.seed))
    except ModuleNotFoundError as exc:  # the archive split uses scikit-learn, as prepare does
        raise PipelineError(f"splitting {args.archive} needs {exc.name}; install it or pass "
                            "--data with the prepare stage's output") from None
    if limits:
        data = data.head(limits)

    results = throughput.run_benchmark(params, data, device, options)
    results["smoke"] = smoke
    write_json(args.json, results)
    log.info("wrote %s", args.json)
    print(throughput.format_table(results), end="")


if __name__ == "__main__":
    run_stage(main)
