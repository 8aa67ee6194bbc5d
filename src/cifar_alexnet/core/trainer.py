"""Training core: torch only (no MLflow, DVC or Optuna), so it runs anywhere torch does.

``fit`` returns the best validation accuracy, which is what a tuner needs; reporting goes through
callbacks. The dataset lives on the training device whole and batches are augmented there.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cifar_alexnet.config import ModelConfig, TrainConfig
from cifar_alexnet.errors import PipelineError, StopAfterCheckpoint
from cifar_alexnet.files import atomic_path
from cifar_alexnet.core.distributed import (World, all_sum, current_world, from_main,
                                            sync_buffers, training_device)
from cifar_alexnet.core.model import Classifier, FlipTTA, build_model
from cifar_alexnet.core.transforms import random_crop_flip

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


class EpochCallback(Protocol):
    def on_epoch_end(self, row: dict[str, float]) -> None:
        """Called once per epoch with a row holding :data:`HISTORY_FIELDS`."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without a GPU is an error."""
    return training_device(name, World())


def seed_everything(seed: int) -> None:
    """Seed every RNG the model's initialisation draws from (CUDA's follow torch.manual_seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initial_model(config: ModelConfig, mean: Iterable[float], std: Iterable[float], *,
                  seed: int, device: torch.device) -> Classifier:
    """The model every training starts from (the train stage, a trial, the benchmarks): its
    weights drawn from ``seed``, on ``device``, ready for :func:`fit`."""
    seed_everything(seed)
    return build_model(config, tuple(mean), tuple(std)).to(device)


@contextlib.contextmanager
def kernel_settings(device: torch.device, cudnn_benchmark: bool | None = None,
                    compiling: bool = False) -> Iterator[None]:
    """Deterministic kernels on CPU (bit-identical reruns), cuDNN autotuning on CUDA as asked
    (None: as the process has it); the process's previous settings come back on exit, so a
    caller of fit/batched_logits (a notebook, another library's tests) keeps its own.
    ``compiling``: code inside will be compiled (torch.compile), whose kernels are made
    deterministic too."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    try:
        if device.type == "cpu":
            _use_deterministic_algorithms(True, compiling=compiling)
        elif device.type == "cuda" and cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        yield
    finally:
        _use_deterministic_algorithms(previous[0], warn_only=previous[1], compiling=compiling)
        torch.backends.cudnn.benchmark = previous[2]


def _use_deterministic_algorithms(mode: bool, warn_only: bool = False,
                                  compiling: bool = False) -> None:
    """``torch.use_deterministic_algorithms``, which also sets the compiler's flag of the same
    name and so imports the compiler (torch._inductor: 1.2 s, a third of what `cifar-predict`
    takes). Eager code needs only the kernels' switch; the compiler's flag is set where code
    is compiled, or once something has loaded the compiler anyway."""
    if compiling or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def to_device(images: np.ndarray, labels: np.ndarray,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a whole split to ``device`` once: uint8 images (N,3,32,32), int64 labels (N,)."""
    return (torch.from_numpy(np.ascontiguousarray(images)).to(device),
            torch.from_numpy(np.ascontiguousarray(labels)).to(device))


@dataclass(frozen=True)
class Accel:
    """How tensors run on the device: autocast dtype and memory format (from TrainConfig)."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def for_config(cls, cfg: TrainConfig, device: torch.device) -> "Accel":
        # bf16 needs no loss scaling, and on CUDA it is what the tensor cores are fast at;
        # `auto` keeps CPU runs in fp32 so they stay exact and deterministic.
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        return cls(device, torch.bfloat16 if bf16 else None,
                   cfg.channels_last and device.type == "cuda")

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last \
            else images

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


@torch.no_grad()
def batched_logits(model: nn.Module, images: torch.Tensor, batch_size: int,
                   accel: Accel | None = None, flip_tta: bool = False) -> torch.Tensor:
    """Float32 logits (N, classes) for images on the model's device, in eval mode.

    ``flip_tta`` averages the logits of each image and its mirror image (:class:`FlipTTA`).
    """
    accel = accel or Accel(images.device)
    if flip_tta:
        model = FlipTTA(model)
    was_training = model.training
    model.eval()
    with kernel_settings(images.device):
        try:
            outputs = []
            for i in range(0, len(images), batch_size):
                batch = accel.layout(images[i:i + batch_size])
                with accel.autocast():
                    outputs.append(model(batch).float())
            return torch.cat(outputs)
        finally:
            model.train(was_training)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    loss = F.cross_entropy(logits.float(), labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


def make_optimizer(model: nn.Module, cfg: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    # Fused kernels update every parameter in one launch; CUDA only (CPU keeps the exact loop).
    fused = {"fused": True} if cfg.fused_optimizer and device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             **fused)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch. One-cycle warms up for 25% of the run, then anneals to ~0."""
    if cfg.schedule == "onecycle":
        # cycle_momentum=False: honour train.momentum instead of OneCycle's own 0.85..0.95.
        # OneCycleLR divides by the warm-up length, which is 0 for runs under 8 steps; such
        # tiny runs (tests, smoke benchmarks) just end before the schedule does.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 8), pct_start=0.25,
            cycle_momentum=False)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)


@dataclass
class TrainResult:
    best_val_acc: float
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0


@dataclass
class Checkpoint:
    """fit()'s state after an epoch, one file: a fit given it as ``resume`` continues after
    ``epoch`` exactly as if it had not stopped (bit-identical on CPU).

    ``owner`` is the caller's and fit stores it unread: which training the file belongs to (a
    fingerprint, the params) and where it logs (an MLflow run id). ``Checkpoint(owner)`` alone,
    epoch 0, says a training started and names its owner before any epoch is done. After the
    last epoch the checkpoint is ``finished``: the best weights and the history, nothing else,
    since nothing is left to train.
    """
    owner: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    finished: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    model_state: dict[str, torch.Tensor] | None = None
    best_state: dict[str, torch.Tensor] | None = None  # None: model_state holds the best
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    rng_states: dict[str, Any] | None = None

    @property
    def resumable(self) -> bool:
        return self.epoch > 0

    def save(self, path: str | Path) -> None:
        save_tensors(path, {f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        """The checkpoint at ``path``; ValueError for a file of tensors that is not one (a
        model file, another program's state), and torch's own errors for a damaged file."""
        payload = load_tensors(path)
        names = {f.name for f in fields(cls)}
        if not isinstance(payload, dict) or not isinstance(payload.get("epoch"), int) \
                or not set(payload) <= names:
            raise ValueError(f"{path} is not a checkpoint written by fit()")
        return cls(**payload)


@dataclass(frozen=True)
class Checkpointer:
    """Where fit() writes its :class:`Checkpoint` (atomically), with the caller's ``owner``:
    every ``train.checkpoint_seconds`` (0: every epoch), after the last epoch, and before a
    callback's stop. Only rank 0 of a process group writes."""
    path: Path
    owner: dict[str, Any] = field(default_factory=dict)

    def started(self) -> None:
        """An epoch-0 checkpoint: names the owner of a training killed in its first epoch."""
        Checkpoint(self.owner).save(self.path)

    def save(self, checkpoint: Checkpoint) -> None:
        checkpoint.owner = self.owner
        checkpoint.save(self.path)


def _rng_states(order_gen: torch.Generator, augment_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG a training epoch draws from: shuffling, augmentation, dropout (torch global)."""
    states = {"order": order_gen.get_state(), "augment": augment_gen.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any], order_gen: torch.Generator,
                        augment_gen: torch.Generator) -> None:
    order_gen.set_state(states["order"])
    augment_gen.set_state(states["augment"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


Split = tuple[torch.Tensor, torch.Tensor]  # images (N, 3, 32, 32) uint8 and labels, on a device


def fit(model: nn.Module, data: tuple[Split, Split], cfg: TrainConfig, *, seed: int,
        callbacks: Iterable[EpochCallback] = (), checkpointer: Checkpointer | None = None,
        resume: Checkpoint | None = None, eval_batch_size: int = 1000) -> TrainResult:
    """Train ``model`` (already on the data's device) on ``data`` = (train, val) and keep its
    best-validation weights; ``seed`` draws the batch order and the augmentation.

    Every callback gets each new epoch's row. ``checkpointer`` writes a :class:`Checkpoint`
    (model, optimizer, scheduler, every RNG state, the best weights so far, the history);
    passing one as ``resume`` continues after its epoch exactly as if the run had not stopped
    (bit-identical on CPU).

    In a process group (torchrun, :mod:`.distributed`), every rank calls ``fit`` with the same
    data and config: ``cfg.batch_size`` is the global batch, each rank trains on its shard
    (DistributedDataParallel; SyncBatchNorm on CUDA), and only rank 0 runs the callbacks and
    writes the checkpoint; when a callback of rank 0 stops training, every rank stops.
    """
    (train_images, _), _ = data
    with kernel_settings(train_images.device, cfg.cudnn_benchmark, compiling=cfg.compile):
        return _fit(model, data, cfg, seed, list(callbacks), checkpointer, resume,
                    eval_batch_size)


def _fit(model: nn.Module, data: tuple[Split, Split], cfg: TrainConfig, seed: int,
         callbacks: list[EpochCallback], checkpointer: Checkpointer | None,
         resume: Checkpoint | None, eval_batch_size: int) -> TrainResult:
    (train_images, train_labels), (val_images, val_labels) = data
    device = train_images.device
    accel = Accel.for_config(cfg, device)
    model = accel.prepare_model(model)
    world = current_world()
    trained: nn.Module = model
    if world.size > 1:
        if device.type == "cuda":  # batch statistics of the global batch, as one process has
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place: same root module
        # (PyTorch's SyncBatchNorm needs a GPU: on the CPU each rank normalises by its shard,
        # and DDP gives every rank rank 0's running statistics.)
        trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                          else None)
    # Only the training step is compiled, for its one batch shape (dynamic=False: the last,
    # shorter batch of an epoch gets a graph of its own, compiled once, instead of turning every
    # dimension dynamic). Validation runs the plain module: its batch sizes and eval mode would
    # otherwise compile graphs of their own. The compiled module shares parameters with `model`;
    # state dicts come from `model` so checkpoints load into an uncompiled network.
    step_model = torch.compile(trained, dynamic=False) if cfg.compile else trained
    callbacks = callbacks if world.main else []
    checkpointer = checkpointer if world.main else None  # rank 0 writes the one checkpoint
    n = len(train_labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)
    # Shuffling draws from a CPU generator so the order is the same on every device.
    order_gen = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator(device=device).manual_seed(seed + 1)

    best = TrainResult(best_val_acc=-1.0, best_epoch=0, best_state={})
    if resume is not None and resume.finished:  # after the last epoch: nothing to run
        model.load_state_dict(resume.model_state)
        log.info("training already finished (epoch %d of %d); using its best weights",
                 resume.epoch, cfg.epochs)
        return TrainResult(resume.best_val_acc, resume.best_epoch,
                           copy.deepcopy(model.state_dict()), list(resume.history),
                           resumed_from_epoch=resume.epoch)
    if resume is not None and resume.resumable:
        model.load_state_dict(resume.model_state)
        optimizer.load_state_dict(resume.optimizer_state)
        scheduler.load_state_dict(resume.scheduler_state)
        _restore_rng_states(resume.rng_states, order_gen, augment_gen)
        best = TrainResult(resume.best_val_acc, resume.best_epoch,
                           {k: v.to(device) for k, v in (resume.best_state or {}).items()},
                           list(resume.history), resumed_from_epoch=resume.epoch)
        if resume.best_state is None:  # the best epoch was the checkpointed one
            best.best_state = copy.deepcopy(model.state_dict())
        log.info("resuming after epoch %d of %d", resume.epoch, cfg.epochs)
    last_checkpoint = time.monotonic()

    for epoch in range(best.resumed_from_epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        order = torch.randperm(n, generator=order_gen).to(device)
        for start in tqdm(range(0, n, cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}",
                          unit="batch", leave=False, disable=None if world.main else True):
            idx = order[start:start + cfg.batch_size]  # the global batch
            # Every rank augments the whole global batch with the same generator, then takes
            # its shard: each image is seen exactly as one process would see it.
            images = random_crop_flip(train_images[idx], augment_gen)
            labels = train_labels[idx]
            if world.size > 1:
                shard = world.shard(len(idx))
                images, labels = images[shard], labels[shard]
            with accel.autocast():
                logits = step_model(accel.layout(images))
                if world.size == 1:
                    loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
                else:  # DDP averages gradients over ranks: this makes it the global batch's mean
                    loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing,
                                           reduction="sum") * world.size / len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # Accumulate on the device: no host sync inside the batch loop.
            loss_sum += loss.detach() * len(idx) / world.size
            correct += (logits.argmax(1) == labels).sum()

        all_sum(loss_sum)
        all_sum(correct)
        sync_buffers(model)
        train_loss = loss_sum.item() / n
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training loss became {train_loss} in epoch {epoch} (train.lr={cfg.lr}); "
                "lower train.lr (e.g. by 10x) and run again")
        val_loss, val_acc = loss_and_accuracy(
            batched_logits(model, val_images, eval_batch_size, accel), val_labels)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / n,
               "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
               "seconds": time.perf_counter() - started}
        best.history.append(row)
        if val_acc > best.best_val_acc:
            best.best_val_acc, best.best_epoch = val_acc, epoch
            best.best_state = copy.deepcopy(model.state_dict())
        log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs",
                 epoch, cfg.epochs, row["train_loss"], row["train_acc"], val_loss, val_acc,
                 row["seconds"])
        # Callbacks first: if the process dies between the two, a resume repeats this epoch
        # (same numbers, logged twice) rather than losing its metrics.
        stop: StopAfterCheckpoint | None = None
        for callback in callbacks:  # rank 0's only
            try:
                callback.on_epoch_end(row)
            except StopAfterCheckpoint as exc:
                stop = stop or exc
        if from_main(stop is not None, device) and stop is None:  # rank 0 stops: all ranks do
            stop = StopAfterCheckpoint("stopped with rank 0")
        # By time, not every epoch: on a GPU an epoch can take a second and the checkpoint of
        # the default model (weights, AdamW state, best weights) several. Always after the
        # last epoch (what follows, writing the model and logging it, may still fail) and
        # before stopping for a tracking outage.
        finished = epoch == cfg.epochs and stop is None
        due = (stop is not None or finished
               or time.monotonic() - last_checkpoint >= cfg.checkpoint_seconds)
        if checkpointer is None:
            pass
        elif finished:
            # What is left to do needs only the best weights: no optimizer state, no current
            # weights beside them (a third of the full checkpoint for AdamW).
            checkpointer.save(Checkpoint(
                epoch=epoch, finished=True, history=best.history, best_val_acc=best.best_val_acc,
                best_epoch=best.best_epoch, model_state=best.best_state))
        elif due:
            checkpointer.save(Checkpoint(
                epoch=epoch, history=best.history, best_val_acc=best.best_val_acc,
                best_epoch=best.best_epoch, model_state=model.state_dict(),
                # None when the best weights are this epoch's: written once, not twice
                best_state=None if best.best_epoch == epoch else best.best_state,
                optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                rng_states=_rng_states(order_gen, augment_gen)))
            last_checkpoint = time.monotonic()
        if stop is not None:
            raise stop
    return best


def save_tensors(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save`` of tensors in plain containers, atomically (a kill leaves the old file)."""
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:
            # torch's C++ writer reports a failed write as "basic_ios::clear" or "file write
            # failed", without the OS error: say what it nearly always is.
            raise OSError(_likely_write_errno(Path(tmp).parent),
                          f"torch.save could not write it ({str(exc).splitlines()[0][:120]})",
                          str(path)) from None


def _likely_write_errno(directory: Path) -> int:
    """Why a write failed when the library does not say: a full disk, a file size limit, or
    (neither) an I/O error."""
    import resource

    if shutil.disk_usage(directory).free < (64 << 20):
        return errno.ENOSPC
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    return errno.EIO


def load_tensors(path: str | Path) -> Any:
    """Load what :func:`save_tensors` wrote without executing pickled code (tensors and plain
    containers only: anything else is refused by torch's weights-only unpickler)."""
    return torch.load(path, map_location="cpu", weights_only=True)
