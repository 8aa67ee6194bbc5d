"""Training on several processes with torch.distributed: torchrun starts them, this module joins
them into one process group and says which one is which.

`torchrun --nproc_per_node=N pipeline/train.py …` runs N copies of the train stage (several
machines: `--nnodes`, `--rdzv-endpoint`); `train.nproc: N` makes the train script start them
itself with torchrun's own launcher. Each copy gets RANK, WORLD_SIZE and LOCAL_RANK from the
launcher, trains on its shard of every global batch (DistributedDataParallel averages the
gradients, SyncBatchNorm the batch statistics), and only rank 0 writes outputs, checkpoints and
the MLflow run. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from cifar_alexnet.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes outputs, checkpoints and the MLflow run."""
        return self.rank == 0

    def shard(self, batch: int) -> slice:
        """This rank's contiguous part of a global batch of ``batch`` samples: the parts of all
        ranks cover it exactly (the first ``batch % size`` ranks take one more)."""
        base, extra = divmod(batch, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def launched_world() -> World:
    """The world torchrun describes in the environment; World() when not launched by it."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                 int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))


def current_world() -> World:
    """The process group this process has joined, else a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    world = launched_world()
    return World(dist.get_rank(), dist.get_world_size(), world.local_rank, world.local_size)


def training_device(name: str, world: World) -> torch.device:
    """``auto`` is CUDA when present; each rank of a multi-GPU training takes its own GPU (its
    local rank). Asking for ``cuda`` without one is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is 'cuda' but no CUDA GPU is visible; "
                            "use train.device=auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", world.local_rank) if world.size > 1 else torch.device("cuda")


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[World]:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for the CPU) for the ``with``
    block; without torchrun, a world of one and no group."""
    world = launched_world()
    if world.size == 1:
        yield world
        return
    device = training_device(device_name, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks of one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    package_log = logging.getLogger("cifar_alexnet")
    level = package_log.level
    if world.rank != 0:  # rank 0 says what all ranks do
        package_log.setLevel(logging.WARNING)
    try:
        yield current_world()
    except RuntimeError as exc:
        if not _peer_lost(exc):
            raise
        # Another rank failed or was killed; that rank (or torchrun) says so. This one stops
        # without a message of its own and with an exit status that says why.
        raise SystemExit(PEER_LOST) from None
    finally:
        package_log.setLevel(level)
        dist.destroy_process_group()


PEER_LOST = 75  # exit status of a rank that stopped because another rank went away


def failing_rank(failures: Mapping[int, Any]) -> tuple[int, Any]:
    """The rank whose failure stopped the others, of torchrun's ``{rank: failure}`` (each with
    ``exitcode``, negative for a signal, and ``timestamp``): a rank killed by a signal, else one
    that failed (it printed its `error:` line). Not the ranks that stopped because it went away
    (PEER_LOST), nor those the agent then stopped with SIGTERM, whatever their timestamps."""
    return min(failures.items(), key=lambda item: (
        item[1].exitcode > 0, item[1].exitcode == PEER_LOST,
        item[1].exitcode == -signal.SIGTERM, item[1].timestamp, item[0]))


def _peer_lost(exc: RuntimeError) -> bool:
    """A collective failed because a peer is gone (gloo: the connection was reset or closed;
    NCCL: a backend error), not because of this rank's own work."""
    return (isinstance(exc, getattr(dist, "DistBackendError", ())) or "by peer" in str(exc)
            or "gloo/transport" in str(exc))


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank, in place (unchanged in a world of one)."""
    if current_world().size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_main(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank: a decision only rank 0 can make (its callbacks write to
    MLflow) that every rank must follow."""
    if current_world().size == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP hands them out at
    the start of each forward pass, so each rank's last training step leaves its own: after
    this, validation and checkpoints see one model on every rank."""
    if current_world().size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def share_from_main(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object, e.g. the checkpoint it read) on every rank: one
    reader, so every rank starts from the same state even where the ranks' machines do not
    share a file system."""
    if current_world().size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(nproc: int, script: str, args: Sequence[str],
           env: Mapping[str, str] | None = None) -> None:
    """Run ``script args`` as ``nproc`` processes on this machine (with ``env`` added to their
    environment) with torchrun's launcher (torch.distributed.run's, with a rendezvous on
    127.0.0.1), and wait for them. A rank that
    fails stops the others: one that exits with an error has printed its `error:` line, and its
    exit status is this one's; one killed by a signal becomes a PipelineError naming it."""
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # One machine: gloo talks over loopback (it would pick the first interface otherwise).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(env or {})  # the ranks inherit this process's environment
    # torchrun's agent logs each rank's exit and signal; the error below says what matters.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5)
    log.info("starting %d training processes (torchrun's launcher)", nproc)
    try:
        elastic_launch(config, sys.executable)("-u", script, *args)
    except SignalException:  # Ctrl-C or SIGTERM to the launcher: the ranks were stopped
        raise KeyboardInterrupt from None
    except ChildFailedError as exc:
        rank, failure = failing_rank(exc.failures)
        if failure.exitcode > 0:
            raise SystemExit(failure.exitcode) from None
        raise PipelineError(
            f"training rank {rank} of {nproc} was killed by "
            f"{signal.Signals(-failure.exitcode).name}, so every rank was stopped; rank 0's last "
            "checkpoint keeps the finished epochs: run the stage again to resume") from None
