"""Benchmark: a tutorial-style baseline vs. the project's trainer, time-to-accuracy and TFLOP/s.

Torch (and torchvision for the baseline) only, so it runs on the GPU machine as well as on CPU.
Every function returns numbers; ``bench/bench.py`` prints the table and writes the JSON.

* Throughput is measured over whole training steps (data, augmentation, forward, backward,
  optimizer step) after a warm-up, between CUDA events (``perf_counter`` on CPU).
* The trainer is measured inside :func:`train.fit` itself: a global optimizer-step hook marks the
  start and end of the timed window, so the benchmark cannot drift from the code it measures.
* The baseline is the PyTorch CIFAR-10 tutorial recipe: a dataset of PIL images with per-image
  CPU transforms, a ``DataLoader``, fp32, batch 128, on the same network (``Classifier.net``:
  the tutorial's ``Normalize`` does what the project's model does in its first layer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from cifar_alexnet.core.archive import read_archive
from cifar_alexnet.core.cifar10 import IMAGE_SHAPE
from cifar_alexnet.config import ModelConfig, Params, TrainConfig
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.core.model import build_model, count_parameters, forward_flops
from cifar_alexnet.core.data import SPLITS, load_meta, load_split
from cifar_alexnet.stages.prepare import prepare
from cifar_alexnet.core.trainer import (Accel, batched_logits, fit, initial_model,
                                        make_optimizer, to_device)

log = logging.getLogger(__name__)

BASELINE_BATCH_SIZE = 128          # the tutorial's batch size, whatever params.yaml says
DEFAULT_WARMUP_STEPS = 30
DEFAULT_STEPS = 200
DEFAULT_BUDGET_SECONDS = 300.0
FULL_TARGET_ACC = 0.85             # target on full CIFAR-10 (50 000 training images)
SUBSET_TARGET_ACC = 0.45           # target on anything smaller (dev subset, generated data)
FULL_TRAIN_IMAGES, FULL_TEST_IMAGES = 50_000, 10_000

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendor data sheets. Matched as
# substrings of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),        # also GH200
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),        # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

# --smoke: a model and a run small enough to finish in seconds on 2 CPU cores.
SMOKE_OVERRIDES = ("model.width=0.0625", "train.epochs=2", "train.batch_size=64")
SMOKE_WARMUP_STEPS, SMOKE_STEPS, SMOKE_BUDGET_SECONDS = 2, 3, 30.0
SMOKE_IMAGES = {"train": 256, "val": 64, "test": 128}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class BenchData:
    """The prepared splits as numpy arrays (uint8 images (N,3,32,32), int64 labels (N,))."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: tuple[float, ...]   # train-split statistics, [0, 1] units
    std: tuple[float, ...]
    source: str

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_labels), "val": len(self.val_labels),
                "test": len(self.test_labels)}

    @property
    def full_size(self) -> bool:
        """Whether this is all of CIFAR-10 (train + val = 50 000, test = 10 000)."""
        return (len(self.train_labels) + len(self.val_labels) == FULL_TRAIN_IMAGES
                and len(self.test_labels) == FULL_TEST_IMAGES)

    def head(self, sizes: dict[str, int]) -> "BenchData":
        """The first ``sizes[split]`` images of the named splits (quick CPU runs, ``--smoke``).

        The statistics stay those of the whole train split, as the model would use them.
        """
        unknown = set(sizes) - set(SPLITS)
        if unknown:
            raise PipelineError(f"unknown split(s) {', '.join(sorted(unknown))}; "
                                f"splits are {', '.join(SPLITS)}")
        cut = {f"{split}_{part}": getattr(self, f"{split}_{part}")[:n]
               for split, n in sizes.items() for part in ("images", "labels")}
        return dataclasses.replace(self, **cut)


def load_prepared(prepared_dir: str | Path, source: str | None = None) -> BenchData:
    """Read the prepare stage's output (``data/prepared``)."""
    meta = load_meta(prepared_dir)
    train, val, test = (load_split(prepared_dir, s) for s in ("train", "val", "test"))
    return BenchData(train.images, train.labels, val.images, val.labels, test.images,
                     test.labels, tuple(meta.mean), tuple(meta.std),
                     source or str(prepared_dir))


def load_archive(path: str | Path, val_size: float, seed: int) -> BenchData:
    """Read an official-format archive and split it exactly as the prepare stage would."""
    with tempfile.TemporaryDirectory(prefix="bench-prepared-") as tmp:
        prepare(read_archive(path), val_size, seed, tmp)
        return load_prepared(tmp, source=str(path))


GENERATED_CHUNK = 4096  # images per make_images call: a thread's share, ~100 MB of float64


def generated_data(sizes: dict[str, int], seed: int) -> BenchData:
    """Learnable CIFAR-10 look-alikes (``tools.synthetic.make_images``) of the given split sizes,
    made in memory: no archive and no prepare step, which at 50 000 images would cost the GPU
    proof many seconds of gzip and pickling. Drawn in chunks on threads (numpy's generators and
    ufuncs release the GIL), each chunk from its own seed; statistics from the train split."""
    from concurrent.futures import ThreadPoolExecutor

    from cifar_alexnet.tools.synthetic import make_images

    if set(sizes) != set(SPLITS) or min(sizes.values()) < 1:
        raise PipelineError(f"generated_data needs sizes >= 1 for exactly the splits "
                            f"{', '.join(SPLITS)}; got {sizes}")
    chunks = [(split, min(GENERATED_CHUNK, sizes[split] - start))
              for split in SPLITS for start in range(0, sizes[split], GENERATED_CHUNK)]

    def draw(job: tuple[int, tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
        index, (_split, n) = job
        rows, labels = make_images(n, np.random.default_rng([seed, index]))
        return rows.reshape(n, *IMAGE_SHAPE), np.asarray(labels, dtype=np.int64)

    with ThreadPoolExecutor(max_workers=min(len(chunks), os.cpu_count() or 1) or 1) as pool:
        drawn = list(pool.map(draw, enumerate(chunks)))
    arrays: dict[str, Any] = {}
    for split in SPLITS:
        parts = [d for (s, _), d in zip(chunks, drawn) if s == split]
        arrays[f"{split}_images"] = np.concatenate([p[0] for p in parts])
        arrays[f"{split}_labels"] = np.concatenate([p[1] for p in parts])
    # Per channel, in [0, 1] units as prepare's statistics; float32 torch reductions are
    # multi-threaded and need no float64 copy of the whole split.
    pixels = torch.from_numpy(arrays["train_images"]).transpose(0, 1).reshape(3, -1).float()
    mean, std = pixels.mean(1) / 255, pixels.std(1) / 255
    return BenchData(**arrays, mean=tuple(mean.tolist()), std=tuple(std.tolist()),
                     source=f"generated ({', '.join(f'{s} {n}' for s, n in sizes.items())})")


# ---------------------------------------------------------------------------------------------
# FLOPs and peaks


def multiply_adds(model: nn.Module, input_shape: tuple[int, ...] = IMAGE_SHAPE) -> int:
    """Multiply-accumulates of one image's forward pass."""
    return forward_flops(model, input_shape) // 2


def flops_per_image(model: nn.Module, input_shape: tuple[int, ...] = IMAGE_SHAPE) -> int:
    """Training FLOPs per image: forward and backward as counted (about 3x the forward: the
    backward computes weight and input gradients, except the input gradient of the first
    layer, which nothing needs)."""
    return forward_flops(model, input_shape, backward=True)


def peak_tflops_for_name(device_name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name, or None when the device is not in the table."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of ``device`` in TFLOP/s; None for CPUs and GPUs not in the table."""
    return peak_tflops_for_name(device_name(device)) if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# Timing


class _Timer:
    """Seconds between two marks: CUDA events on the current stream, else a wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._start: Any = None
        self._end: Any = None

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._mark()

    def stop(self) -> None:
        self._end = self._mark()

    def seconds(self) -> float:
        if self._start is None or self._end is None:
            raise PipelineError("the timed window was not reached: too few training steps")
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return self._end - self._start


class _WindowDone(Exception):
    """Raised from the step hook to leave fit() once the timed window is over."""


def _check_steps(warmup_steps: int, steps: int) -> None:
    if warmup_steps < 1 or steps < 1:
        raise PipelineError(f"need --warmup-steps >= 1 and --steps >= 1, got {warmup_steps} "
                            f"and {steps}")


def _throughput(images: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images, **extra}


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# (a) Tutorial baseline


def tutorial_transform(mean: tuple[float, ...], std: tuple[float, ...],
                       augment: bool = True) -> Callable[[Any], torch.Tensor]:
    """The tutorial's per-image PIL pipeline: RandomCrop(32, 4), flip, ToTensor, Normalize."""
    from torchvision import transforms as T

    steps = [T.RandomCrop(IMAGE_SHAPE[1], padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class TutorialDataset(torch.utils.data.Dataset):
    """Like ``torchvision.datasets.CIFAR10``: HWC uint8 arrays, a PIL image per ``__getitem__``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 transform: Callable[[Any], torch.Tensor]) -> None:
        self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # (N, H, W, C)
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _dataloader_worker_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a DataLoader worker dying or failing to start, rather than the
    training itself failing: a worker killed by SIGBUS when /dev/shm is too small for its
    batches ("DataLoader worker (pid 123) is killed by signal: Bus error"), an exception in a
    worker ("Caught ... in DataLoader worker process 0"), or the OS refusing the worker
    processes or their shared memory (OSError)."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError)
                                        and "DataLoader worker" in str(exc))


def baseline_throughput(model_config: ModelConfig, data: BenchData, cfg: TrainConfig,
                        device: torch.device, seed: int,
                        warmup_steps: int = DEFAULT_WARMUP_STEPS, steps: int = DEFAULT_STEPS,
                        workers: int | None = None) -> dict[str, Any]:
    """Images/s of the tutorial recipe: PIL transforms in DataLoader workers, fp32, batch 128.

    Same network and optimizer algorithm as the trainer (``params.train.optimizer``), but with
    torch's defaults everywhere the project chose speed settings: no autocast, NCHW, no fused
    optimizer, no cuDNN autotuning, and the images cross from the host every step.

    Workers pass their batches through /dev/shm, which containers often keep small (64 MB):
    where the workers die, the measurement is taken again with 0 workers (the images are
    transformed in this process) and ``worker_failure`` says why, so one small machine setting
    does not cost the figure.
    """
    _check_steps(warmup_steps, steps)
    workers = default_workers() if workers is None else workers
    try:
        return {**_baseline_throughput(model_config, data, cfg, device, seed, warmup_steps,
                                       steps, workers), "worker_failure": None}
    except (RuntimeError, OSError) as exc:
        if workers == 0 or not _dataloader_worker_failure(exc):
            raise
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        log.warning("baseline: %d DataLoader workers failed (%s); measuring with 0 workers",
                    workers, reason)
    result = _baseline_throughput(model_config, data, cfg, device, seed, warmup_steps, steps, 0)
    return {**result, "worker_failure": f"{workers} workers: {reason}"}


def _baseline_throughput(model_config: ModelConfig, data: BenchData, cfg: TrainConfig,
                         device: torch.device, seed: int, warmup_steps: int, steps: int,
                         workers: int) -> dict[str, Any]:
    net = initial_model(model_config, data.mean, data.std, seed=seed, device=device).net
    optimizer = make_optimizer(net, dataclasses.replace(cfg, fused_optimizer=False), device)
    dataset = TutorialDataset(data.train_images, data.train_labels,
                              tutorial_transform(data.mean, data.std))
    batches = warmup_steps + steps
    # One long shuffled stream (several epochs if needed) so no epoch restart falls in the window.
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=batches * BASELINE_BATCH_SIZE)
    loader = torch.utils.data.DataLoader(dataset, BASELINE_BATCH_SIZE, sampler=sampler,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         drop_last=True)
    benchmark_was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    timer = _Timer(device)
    log.info("baseline: %d warm-up + %d timed steps, batch %d, %d DataLoader workers",
             warmup_steps, steps, BASELINE_BATCH_SIZE, workers)
    try:
        net.train()
        for step, (images, labels) in enumerate(loader, start=1):
            images, labels = images.to(device), labels.to(device)
            loss = F.cross_entropy(net(images), labels, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Marks after the optimizer step, as for the trainer: the window holds `steps`
            # complete steps, data loading included.
            if step == warmup_steps:
                timer.start()
            elif step == batches:
                timer.stop()
        seconds = timer.seconds()
    finally:
        torch.backends.cudnn.benchmark = benchmark_was
        del net, optimizer, loader
        _release(device)
    result = _throughput(steps * BASELINE_BATCH_SIZE, seconds, steps=steps,
                         warmup_steps=warmup_steps, batch_size=BASELINE_BATCH_SIZE,
                         workers=workers, precision="fp32")
    log.info("baseline: %.0f images/s", result["images_per_s"])
    return result


# ---------------------------------------------------------------------------------------------
# (b) The project's trainer


def trainer_throughput(model_config: ModelConfig, data: BenchData, cfg: TrainConfig,
                       device: torch.device, seed: int,
                       warmup_steps: int = DEFAULT_WARMUP_STEPS,
                       steps: int = DEFAULT_STEPS) -> dict[str, Any]:
    """Images/s of :func:`train.fit` with ``cfg`` (bf16, channels_last, fused optimizer...).

    fit() runs unchanged on the train split; a global optimizer-step hook starts the timer
    after step ``warmup_steps`` and stops it (and fit) after step ``warmup_steps + steps``.
    The split is repeated if one epoch is shorter than that, so no per-epoch evaluation
    falls inside the window.
    """
    _check_steps(warmup_steps, steps)
    model = initial_model(model_config, data.mean, data.std, seed=seed, device=device)
    images, labels = to_device(data.train_images, data.train_labels, device)
    # At least 8 steps: the schedule's length does not change a step's cost, and OneCycleLR
    # cannot schedule exactly 4 steps (its warm-up phase would be 0 steps long).
    needed = max(warmup_steps + steps + 1, 8) * cfg.batch_size
    if len(labels) < needed:
        repeat = torch.arange(needed, device=device) % len(labels)
        images, labels = images[repeat], labels[repeat]
    val = to_device(data.val_images[:1], data.val_labels[:1], device)  # never reached

    timer = _Timer(device)
    count = 0

    def on_step(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        nonlocal count
        count += 1
        if count == warmup_steps:
            timer.start()
        elif count == warmup_steps + steps:
            timer.stop()
            raise _WindowDone

    accel = Accel.for_config(cfg, device)
    precision = "bf16" if accel.autocast_dtype == torch.bfloat16 else "fp32"
    log.info("trainer: %d warm-up + %d timed steps, batch %d, %s", warmup_steps, steps,
             cfg.batch_size, precision)
    handle = register_optimizer_step_post_hook(on_step)
    try:
        fit(model, ((images, labels), val), dataclasses.replace(cfg, epochs=1), seed=seed)
    except _WindowDone:
        pass
    finally:
        handle.remove()
        del model, images, labels
        _release(device)
    result = _throughput(steps * cfg.batch_size, timer.seconds(), steps=steps,
                         warmup_steps=warmup_steps, batch_size=cfg.batch_size,
                         precision=precision, channels_last=accel.channels_last,
                         fused_optimizer=cfg.fused_optimizer and device.type == "cuda",
                         compile=cfg.compile)
    log.info("trainer: %.0f images/s", result["images_per_s"])
    return result


# ---------------------------------------------------------------------------------------------
# The train stage's wall time


class _Split:
    """Wall seconds per part of a run, each part timed between device syncs so that GPU work
    queued by one part is not charged to the next."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self, part: str) -> Iterator[None]:
        self.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - started
            self.calls[part] = self.calls.get(part, 0) + 1

    @contextlib.contextmanager
    def calls_of(self, module: Any, name: str, part: str,
                 seen: Callable[[tuple[Any, ...], Any], None] | None = None) -> Iterator[None]:
        """Time every call of ``module.name`` as ``part`` while inside: for functions that fit()
        looks up in its module at each call (its validation pass, its checkpoint writes), so
        fit itself is measured unchanged. ``seen(args, result)`` is told of each call after
        it, outside the timing."""
        original = getattr(module, name)  # AttributeError: fit's helper was renamed

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.measure(part):
                result = original(*args, **kwargs)
            if seen is not None:
                seen(args, result)
            return result

        setattr(module, name, timed)
        try:
            yield
        finally:
            setattr(module, name, original)


STAGE_PARTS = ("load", "to_device", "loop", "evaluation", "checkpoint", "logging", "model_file",
               "other")


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _timed_context(split: _Split, factory: Callable[..., Any], part: str) -> Callable[..., Any]:
    """``factory`` (a context-manager function) whose entering and leaving count as ``part``."""

    @contextlib.contextmanager
    def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        manager = factory(*args, **kwargs)
        with split.measure(part):
            value = manager.__enter__()
        try:
            yield value
        except BaseException as exc:
            with split.measure(part):
                if not manager.__exit__(type(exc), exc, exc.__traceback__):
                    raise
        else:
            with split.measure(part):
                manager.__exit__(None, None, None)

    return timed


# What the train stage logs through (tracking.X, looked up at each call): timed as logging.
_STAGE_LOGGING_CALLS = ("lineage_tags", "log_dataset", "log_text", "log_dict", "log_figure",
                        "log_metrics")


def _time_stage(stage: Any, params: Params, data: BenchData, tmp: Path,
                split: _Split) -> tuple[list[dict[str, float]], float]:
    """The real train stage on ``data`` (written as a prepared directory), logging to a
    throwaway sqlite store; the parts timed through the names it looks up at each call."""
    from cifar_alexnet import tracking
    from cifar_alexnet.core.cifar10 import OFFICIAL_CLASS_NAMES
    from cifar_alexnet.core.archive import Batch
    from cifar_alexnet.stages.prepare import write_prepared

    prepared = tmp / "prepared"
    write_prepared(prepared, {name: Batch(getattr(data, f"{name}_images"),
                                          getattr(data, f"{name}_labels")) for name in SPLITS},
                   OFFICIAL_CLASS_NAMES, {"source": data.source})
    outputs = stage.TrainOutputs(tmp / "models", tmp / "train.json", tmp / "history.csv",
                                 checkpoint=tmp / "train.pt")
    fits: list[Any] = []
    with contextlib.ExitStack() as patches:
        patches.enter_context(_environment("MLFLOW_TRACKING_URI",
                                           f"sqlite:///{tmp / 'mlflow.db'}"))
        for name in ("load_meta", "load_split"):
            patches.enter_context(split.calls_of(stage, name, "load"))
        patches.enter_context(split.calls_of(stage, "to_device", "to_device"))
        patches.enter_context(split.calls_of(stage, "save_trained_model", "model_file"))
        for name in _STAGE_LOGGING_CALLS:
            patches.enter_context(split.calls_of(tracking, name, "logging"))
        patches.enter_context(split.calls_of(tracking.EpochLogger, "on_epoch_end",
                                             "epoch_logging"))
        original_run = tracking.training_run
        tracking.training_run = _timed_context(split, original_run, "logging")
        patches.callback(setattr, tracking, "training_run", original_run)
        patches.enter_context(split.calls_of(stage, "fit", "fit",
                                             seen=lambda _args, result: fits.append(result)))
        with split.measure("wall"):
            stage.train_stage(params, prepared, outputs)
    (result,) = fits
    return result.history, result.best_val_acc


def _time_training_core(params: Params, data: BenchData, device: torch.device, tmp: Path,
                        split: _Split) -> tuple[list[dict[str, float]], float]:
    """What the train stage runs of torch alone, as it calls it: no load, no logging."""
    from cifar_alexnet.core.trainer import Checkpointer
    from cifar_alexnet.stages.artifacts import save_trained_model

    with split.measure("wall"):
        model = initial_model(params.model, data.mean, data.std, seed=params.base.seed,
                              device=device)
        with split.measure("to_device"):
            train = to_device(data.train_images, data.train_labels, device)
            val = to_device(data.val_images, data.val_labels, device)
        with split.measure("fit"):
            result = fit(model, (train, val), params.train, seed=params.base.seed,
                         checkpointer=Checkpointer(tmp / "train.pt"),
                         eval_batch_size=params.evaluate.batch_size)
        model.load_state_dict(result.best_state)
        with split.measure("model_file"):
            save_trained_model(tmp, model, [str(i) for i in range(10)], result.best_epoch,
                               result.best_val_acc, "bench")
    del model, train, val
    _release(device)
    return result.history, result.best_val_acc


def stage_wall_time(params: Params, data: BenchData, device: torch.device,
                    epochs: int) -> dict[str, Any]:
    """The train stage's wall time for ``epochs`` epochs on ``data``, split into its parts.

    Where MLflow is installed this is the stage itself (``stages.train.train_stage``) on
    ``data`` written as a prepared directory, logging to a throwaway sqlite store; with torch
    alone (a GPU box) the stage cannot run, and its training core runs as the stage calls it:
    :func:`initial_model`, :func:`fit` with a checkpointer, the model file (``mlflow_logging``
    False, ``load`` 0). The parts, each timed between device syncs:

    - ``load``: the prepared splits from disk; ``to_device``: onto the training device;
    - ``loop``: fit's training steps and per-epoch bookkeeping (fit's time less the parts below
      that happen inside it); ``evaluation``: the per-epoch validation pass;
    - ``checkpoint``: the resume checkpoints (every ``train.checkpoint_seconds`` and after the
      last epoch);
    - ``logging``: the MLflow run (its start and end, params, per-epoch metrics, inputs,
      figures, results);
    - ``model_file`` (the best weights into ``model.pt``) and ``other`` (the rest: building the
      model and its summary, the metrics and history files).

    ``overhead`` is everything but the loop, as a fraction of the loop.
    """
    from cifar_alexnet.core import trainer

    params = dataclasses.replace(params, train=dataclasses.replace(
        params.train, epochs=epochs, device=device.type))
    split, checkpoint_bytes = _Split(device), []

    def measure_file(args: tuple[Any, ...], _result: Any) -> None:
        checkpointer = args[0]
        checkpoint_bytes.append(checkpointer.path.stat().st_size)

    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp, \
            split.calls_of(trainer, "batched_logits", "evaluation"), \
            split.calls_of(trainer.Checkpointer, "save", "checkpoint", seen=measure_file):
        try:
            stage = importlib.import_module("cifar_alexnet.stages.train")
        except ImportError as exc:  # MLflow (or matplotlib) missing: torch alone
            log.info("stage wall time: the train stage cannot run here (%s); timing its "
                     "training core", exc)
            history, best_val_acc = _time_training_core(params, data, device, Path(tmp), split)
            mlflow_logging = False
        else:
            history, best_val_acc = _time_stage(stage, params, data, Path(tmp), split)
            mlflow_logging = True
    seconds = {part: split.seconds.get(part, 0.0) for part in STAGE_PARTS}
    seconds["loop"] = (split.seconds["fit"] - seconds["evaluation"] - seconds["checkpoint"]
                       - split.seconds.get("epoch_logging", 0.0))
    seconds["logging"] += split.seconds.get("epoch_logging", 0.0)
    wall = split.seconds["wall"]
    seconds["other"] = max(wall - sum(v for k, v in seconds.items() if k != "other"), 0.0)
    images = epochs * len(data.train_labels)
    return {"epochs": epochs, "train_images": len(data.train_labels),
            "batch_size": params.train.batch_size, "wall_seconds": wall,
            "seconds": seconds, "overhead": (wall - seconds["loop"]) / seconds["loop"],
            "loop_images_per_s": images / seconds["loop"],
            "checkpoints": len(checkpoint_bytes),
            "checkpoint_bytes": max(checkpoint_bytes, default=0),
            "checkpoint_seconds_setting": params.train.checkpoint_seconds,
            "mlflow_logging": mlflow_logging, "best_val_acc": best_val_acc,
            "history": [{k: row[k] for k in ("epoch", "seconds", "train_loss", "val_acc")}
                        for row in history]}


# ---------------------------------------------------------------------------------------------
# Time to accuracy


class _BudgetSpent(Exception):
    """Raised from the epoch callback to stop fit() once the time budget is used up."""


class TestAccuracyClock:
    """Epoch callback: test accuracy (flip TTA per params) against wall time since creation."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 accel: Accel, batch_size: int, flip_tta: bool, budget_seconds: float) -> None:
        self.model, self.images, self.labels = model, images, labels
        self.accel, self.batch_size, self.flip_tta = accel, batch_size, flip_tta
        self.budget_seconds = budget_seconds
        self.rows: list[dict[str, float]] = []
        self.started = time.perf_counter()

    def on_epoch_end(self, row: dict[str, float]) -> None:
        logits = batched_logits(self.model, self.images, self.batch_size, self.accel, self.flip_tta)
        acc = (logits.argmax(1) == self.labels).float().mean().item()  # .item() syncs the GPU
        seconds = time.perf_counter() - self.started
        self.rows.append({"epoch": row["epoch"], "seconds": seconds, "test_acc": acc,
                          "train_loss": row["train_loss"], "val_acc": row["val_acc"]})
        log.info("epoch %d: test acc %.4f at %.1f s", row["epoch"], acc, seconds)
        if seconds >= self.budget_seconds:
            raise _BudgetSpent


def time_to_accuracy(params: Params, data: BenchData, device: torch.device, target_acc: float,
                     budget_seconds: float = DEFAULT_BUDGET_SECONDS) -> dict[str, Any]:
    """Train with the params' recipe; wall time to ``target_acc`` and best accuracy in budget.

    The clock starts when fit() is called (data and model already on the device) and includes
    everything the trainer does, per-epoch validation and this test evaluation included. The
    run ends after the recipe's last epoch or after the first epoch that ends past the budget;
    only epochs that end within the budget count for ``best_acc_within_budget``.
    """
    model = initial_model(params.model, data.mean, data.std, seed=params.base.seed,
                          device=device)
    train = to_device(data.train_images, data.train_labels, device)
    val = to_device(data.val_images, data.val_labels, device)
    test_images, test_labels = to_device(data.test_images, data.test_labels, device)
    log.info("time to accuracy: target %.3f, budget %.0f s, %d epochs of %d images",
             target_acc, budget_seconds, params.train.epochs, len(data.train_labels))
    clock = TestAccuracyClock(model, test_images, test_labels,
                              Accel.for_config(params.train, device), params.evaluate.batch_size,
                              params.evaluate.flip_tta, budget_seconds)
    try:
        fit(model, (train, val), params.train, seed=params.base.seed, callbacks=[clock],
            eval_batch_size=params.evaluate.batch_size)
    except _BudgetSpent:
        pass
    finally:
        del model, train, val, test_images, test_labels
        _release(device)
    rows = clock.rows
    stopped_by = "recipe finished" if len(rows) == params.train.epochs else "budget spent"
    reached = next((r for r in rows if r["test_acc"] >= target_acc), None)
    in_budget = [r for r in rows if r["seconds"] <= budget_seconds]
    best = max(in_budget, key=lambda r: r["test_acc"], default=None)
    return {
        "target_acc": target_acc,
        "seconds_to_target": reached["seconds"] if reached else None,
        "epoch_at_target": reached["epoch"] if reached else None,
        "budget_seconds": budget_seconds,
        "best_acc_within_budget": best["test_acc"] if best else None,
        "epoch_of_best": best["epoch"] if best else None,
        "seconds_of_best": best["seconds"] if best else None,
        "epochs_run": len(rows),
        "recipe_epochs": params.train.epochs,
        "stopped_by": stopped_by,
        "flip_tta": params.evaluate.flip_tta,
        "history": rows,
    }


# ---------------------------------------------------------------------------------------------
# Everything, in one run


@dataclass(frozen=True)
class BenchOptions:
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    steps: int = DEFAULT_STEPS
    target_acc: float | None = None    # None: FULL_TARGET_ACC on full CIFAR-10, else SUBSET_...
    budget_seconds: float = DEFAULT_BUDGET_SECONDS
    baseline: bool = True
    time_to_accuracy: bool = True
    workers: int | None = None         # None: default_workers()
    peak_tflops: float | None = None   # None: look the device up in PEAK_BF16_TFLOPS


def achieved(result: dict[str, Any], flops: int, peak: float | None) -> dict[str, Any]:
    tflops = result["images_per_s"] * flops / 1e12
    return {**result, "tflops": tflops, "fraction_of_peak": tflops / peak if peak else None}


def run_benchmark(params: Params, data: BenchData, device: torch.device,
                  options: BenchOptions = BenchOptions()) -> dict[str, Any]:
    """Baseline and trainer throughput, TFLOP/s against the bf16 peak and time to accuracy."""
    model = build_model(params.model, data.mean, data.std)
    flops, macs = flops_per_image(model), multiply_adds(model)
    parameters = count_parameters(model)
    del model
    name = device_name(device)
    peak = options.peak_tflops or device_peak_tflops(device)
    results: dict[str, Any] = {
        "device": name, "device_type": device.type,
        "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
        "peak_bf16_tflops": peak,
        "data": {"source": data.source, "sizes": data.sizes, "full_cifar10": data.full_size},
        "model": {"parameters": parameters, "flops_per_train_image": flops,
                  "macs_per_image": macs},
        "options": dataclasses.asdict(options),
        "params": params.to_dict(),
    }
    try:
        import torchvision
        results["torchvision"] = torchvision.__version__
    except ImportError:
        results["torchvision"] = None
    log.info("%s: %s, %.3f GFLOP per training image, bf16 peak %s", name,
             params.model.arch, flops / 1e9, _num(peak, ".0f", " TFLOP/s"))

    baseline = None
    if options.baseline:
        baseline = achieved(baseline_throughput(
            params.model, data, params.train, device, params.base.seed, options.warmup_steps,
            options.steps, options.workers), flops, peak)
    trainer = achieved(trainer_throughput(params.model, data, params.train, device,
                                           params.base.seed, options.warmup_steps, options.steps),
                        flops, peak)
    results["throughput"] = {
        "baseline": baseline, "trainer": trainer,
        "speedup": trainer["images_per_s"] / baseline["images_per_s"] if baseline else None,
    }
    if options.time_to_accuracy:
        target = options.target_acc if options.target_acc is not None else (
            FULL_TARGET_ACC if data.full_size else SUBSET_TARGET_ACC)
        results["time_to_accuracy"] = {
            **time_to_accuracy(params, data, device, target, options.budget_seconds),
            "subset": not data.full_size}
    else:
        results["time_to_accuracy"] = None
    return results


# ---------------------------------------------------------------------------------------------
# Report


LABEL = 58  # width of the table's label column


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, fmt) + suffix


def format_table(results: dict[str, Any]) -> str:
    """The human-readable summary, last thing the script prints."""
    p, model = results["params"], results["model"]
    lines = [
        f"device  {results['device']}  (torch {results['torch']}, bf16 peak "
        f"{_num(results['peak_bf16_tflops'], '.0f', ' TFLOP/s')})",
        f"model   {p['model']['arch']} width {p['model']['width']}, "
        f"{model['parameters'] / 1e6:.1f} M parameters, "
        f"{model['flops_per_train_image'] / 1e9:.3f} GFLOP per training image (fwd+bwd)",
        f"data    {results['data']['source']}  {results['data']['sizes']}"
        + ("" if results["data"]["full_cifar10"] else "  [SUBSET]"),
        "",
        f"{'training throughput':<{LABEL}}{'images/s':>10}{'TFLOP/s':>10}{'% peak':>8}",
    ]
    tp = results["throughput"]
    b, t = tp["baseline"], tp["trainer"]
    rows = []
    if b:
        rows.append((f"(a) tutorial: PIL+DataLoader({b['workers']} workers), fp32, "
                     f"bs {b['batch_size']}", b))
    rows.append((f"(b) trainer: {t['precision']}"
                 + (", channels_last" if t["channels_last"] else "")
                 + (", fused" if t["fused_optimizer"] else "")
                 + (", compiled" if t["compile"] else "") + f", bs {t['batch_size']}", t))
    for label, r in rows:
        frac = r["fraction_of_peak"]
        lines.append(f"{label:<{LABEL}}{r['images_per_s']:>10.0f}{r['tflops']:>10.3f}"
                     f"{_num(None if frac is None else 100 * frac, '.1f'):>8}")
    lines.append(f"{'speed-up (b)/(a)':<{LABEL}}{_num(tp['speedup'], '.2f', 'x'):>10}")
    if b and b.get("worker_failure"):
        lines.append(f"  ((a) with 0 workers: {b['worker_failure']})")
    lines.append(f"  ({t['steps']} timed steps after {t['warmup_steps']} warm-up steps each)")
    tta = results["time_to_accuracy"]
    if tta:
        tag = " [subset]" if tta["subset"] else ""
        reached = (f"{tta['seconds_to_target']:.1f} s (epoch {tta['epoch_at_target']})"
                   if tta["seconds_to_target"] is not None else "not reached")
        best = (f"{100 * tta['best_acc_within_budget']:.2f}% (epoch {tta['epoch_of_best']}, "
                f"{tta['seconds_of_best']:.1f} s)"
                if tta["best_acc_within_budget"] is not None else "no epoch finished in budget")
        lines += [
            "",
            f"time to {100 * tta['target_acc']:.1f}% test acc{tag}".ljust(LABEL) + reached,
            f"best test acc within {tta['budget_seconds']:.0f} s{tag}".ljust(LABEL) + best,
            f"  ({tta['epochs_run']} of {tta['recipe_epochs']} recipe epochs run, "
            f"{tta['stopped_by']}; flip TTA {'on' if tta['flip_tta'] else 'off'})",
        ]
    return "\n".join(lines) + "\n"
