"""Your first sharded run: plain torchrun + DDP, with a shardopt optimizer keeping 1/W of the state.

    launch/torchrun.sh --nproc 2 launch/examples/ddp_zero1.py              # CPU: 2 gloo ranks
    launch/torchrun.sh launch/examples/ddp_zero1.py --optimizer adamw      # one rank per GPU, NCCL

The script picks the device and the process-group backend itself (a GPU per
rank with NCCL when there are enough GPUs, else the CPU with gloo), so the same
command runs on a laptop and on a GPU node. ``python launch/examples/ddp_zero1.py``
without a launcher runs it as one rank.

DDP all-reduces the gradients; ``shardopt.Lion`` (or ``AdamW``/``Muon``) sees an
initialised process group with more than one rank and picks the ZeRO-1 layout:
each rank updates only the slice of the parameters it owns and keeps only that
slice's optimizer state, then one all-gather gives every rank the new
parameters. Rank 0 prints the loss and the optimizer's per-rank summary; every
rank prints one ``RESULT {...}`` JSON line (for the test suite).
"""
import argparse
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import shardopt


def setup() -> torch.device:
    """Join the process group torchrun describes (or make a one-rank group); return this rank's device."""
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29500")):
        os.environ.setdefault(k, v)  # plain `python ddp_zero1.py`: a group of one
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        # no GPU (or fewer GPUs than ranks, which NCCL refuses): gloo on the CPU
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


class MLP(torch.nn.Module):
    def __init__(self, width=256, depth=4):
        super().__init__()
        self.inp = torch.nn.Linear(32, width)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 8)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.inp(x))
        for layer in self.hidden:
            x = x + torch.nn.functional.gelu(layer(x))
        return self.head(x)


def make_optimizer(name: str, model: torch.nn.Module, backend: str):
    if name == "lion":  # Lion: ~5x smaller lr and ~5x larger weight decay than AdamW
        return shardopt.Lion(model.parameters(), lr=3e-4, weight_decay=0.5, backend=backend)
    if name == "adamw":
        return shardopt.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, backend=backend)
    # Muon takes the hidden matrices; the input layer, head and biases go to an AdamW group
    groups = shardopt.muon_param_groups(model.module if isinstance(model, DDP) else model, aux_lr=1e-3)
    return shardopt.Muon(groups, lr=0.02, weight_decay=0.01, backend=backend)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", choices=("lion", "adamw", "muon"), default="lion")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch, split across the ranks")
    ap.add_argument("--backend", default="auto", help="shardopt kernel backend (auto, torch, cpu, triton, cuda)")
    args = ap.parse_args()

    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} ranks")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(MLP().to(device), device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(args.optimizer, model, args.backend)

    # a fixed teacher task; every rank draws the same global batch and trains on its rows
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 8, generator=g) / 32**0.5
    losses = []
    for step in range(args.steps):
        x = torch.randn(args.batch_size, 32, generator=g)
        y = torch.tanh(x @ teacher)
        x, y = x[rank::world].to(device), y[rank::world].to(device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if rank == 0 and (step + 1) % max(1, args.steps // 5) == 0:
            print(f"step {step + 1:>4}  loss {loss.item():.4f}", flush=True)

    opt.summary()  # collective: every rank calls it, rank 0 prints the table
    digest = hashlib.sha256()
    for p in model.module.parameters():
        digest.update(p.detach().cpu().float().numpy().tobytes())
    # without sharding every rank would hold fp32 state for every parameter (AdamW: two tensors)
    full = sum(4 * p.numel() * (2 if g["algorithm"] == "adamw" else 1) for g in opt.param_groups for p in g["params"])
    sys.stdout.write("RESULT " + json.dumps({
        "rank": rank, "world": world, "device": str(device), "optimizer": type(opt).__name__,
        "layout": opt.layout.name, "state_bytes": opt.state_bytes(), "unsharded_state_bytes": full,
        "first_losses": losses[:5], "last_losses": losses[-5:], "params_sha256": digest.hexdigest(),
    }) + "\n")
    # barrier, destroy the process group, exit: see its docstring for why not a plain return
    shardopt.exit_distributed()


if __name__ == "__main__":
    main()
