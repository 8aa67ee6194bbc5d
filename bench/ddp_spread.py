"""How far a DistributedDataParallel training lands from the one-process training with the same
global batch, seed by seed, and whether its ranks end with identical weights. One table.

    python bench/ddp_spread.py --archive cifar10-real-dev-subset.tar.gz --nproc 2 \\
        --seeds 0,1,2,3,4 --set model.width=0.0625 --set train.epochs=4 --set train.device=cpu

For each seed: `fit` in this process, then `fit` under torchrun in --nproc processes (gloo on the
CPU, NCCL on GPUs), each rank writing its weights; the table gives best and final validation
accuracy and final training loss of both, their differences, and the largest weight difference
between the ranks (0 when they agree bit for bit). The one-process spread across seeds is the
scale to read the differences against. Torch alone (`PYTHONPATH=src` works).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from cifar_alexnet.config import load_params
from cifar_alexnet.core.distributed import current_world, process_group, training_device
from cifar_alexnet.core.trainer import fit, initial_model, to_device
from cifar_alexnet.tools import throughput


def train(params, data: throughput.BenchData, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """One training (of this process's world); its summary and final weights (on the CPU)."""
    device = training_device(params.train.device, current_world())
    model = initial_model(params.model, data.mean, data.std, seed=seed, device=device)
    result = fit(model, (to_device(data.train_images, data.train_labels, device),
                         to_device(data.val_images, data.val_labels, device)),
                 params.train, seed=seed, eval_batch_size=params.evaluate.batch_size)
    last = result.history[-1]
    summary = {"best_val_acc": result.best_val_acc, "final_val_acc": last["val_acc"],
               "final_train_loss": last["train_loss"]}
    return summary, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: train, then write its summary and weights to --out."""
    params = load_params(args.params, args.set)
    data = throughput.load_archive(args.archive, params.data.val_size, params.base.seed)
    with process_group(params.train.device) as world:
        summary, weights = train(params, data, args.seed)
        torch.save({"summary": summary, "weights": weights}, Path(args.out) / f"{world.rank}.pt")


def compare(args: argparse.Namespace) -> list[dict]:
    params = load_params(args.params, args.set)
    data = throughput.load_archive(args.archive, params.data.val_size, params.base.seed)
    rows = []
    for seed in args.seeds:
        single, _ = train(params, data, seed)
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={args.nproc}", __file__, "--worker", "--out", out,
                       "--seed", str(seed), "--archive", str(args.archive), "--params",
                       str(args.params), *(a for s in args.set for a in ("--set", s))]
            env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
            subprocess.run(command, check=True, env=env)
            ranks = [torch.load(Path(out) / f"{r}.pt", weights_only=True)
                     for r in range(args.nproc)]
        weight_gap = max((ranks[0]["weights"][k].float() - r["weights"][k].float()).abs().max()
                         .item() for r in ranks[1:] for k in ranks[0]["weights"])
        multi = ranks[0]["summary"]
        rows.append({"seed": seed, "one": single, "ddp": multi, "rank_weight_gap": weight_gap,
                     "delta": {k: multi[k] - single[k] for k in single}})
    return rows


def table(rows: list[dict], nproc: int, val_images: int) -> str:
    lines = [f"DDP ({nproc} processes) against one process, same global batch "
             f"({val_images} validation images)",
             "| seed | best val acc 1 / DDP | final val acc 1 / DDP | final train loss 1 / DDP "
             "| max weight gap between ranks |", "|---|---|---|---|---:|"]
    for r in rows:
        one, ddp = r["one"], r["ddp"]
        lines.append(f"| {r['seed']} | {one['best_val_acc']:.3f} / {ddp['best_val_acc']:.3f} | "
                     f"{one['final_val_acc']:.3f} / {ddp['final_val_acc']:.3f} | "
                     f"{one['final_train_loss']:.4f} / {ddp['final_train_loss']:.4f} | "
                     f"{r['rank_weight_gap']:.1e} |")
    deltas = {k: max(abs(r["delta"][k]) for r in rows) for k in rows[0]["delta"]}
    spread = {k: max(r["one"][k] for r in rows) - min(r["one"][k] for r in rows)
              for k in rows[0]["one"]}
    lines.append("")
    lines.append("largest |DDP - one process|: " + ", ".join(
        f"{k} {v:.4f}" for k, v in deltas.items()))
    lines.append("one process, spread across seeds: " + ", ".join(
        f"{k} {v:.4f}" for k, v in spread.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    parser.add_argument("--json", type=Path, help="write every figure here too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = compare(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    params = load_params(args.params, args.set)
    data = throughput.load_archive(args.archive, params.data.val_size, params.base.seed)
    print(table(rows, args.nproc, len(data.val_labels)))


if __name__ == "__main__":
    main()
