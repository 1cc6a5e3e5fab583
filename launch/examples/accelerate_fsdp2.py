"""accelerate + FSDP2 (``fully_shard``) with a shardopt optimizer.

Build the shardopt optimizer on the plain model and let ``accelerator.prepare``
shard both: accelerate swaps the optimizer's parameters for the DTensor shards,
and shardopt rebuilds its state on them before the first step (FSDP2 layout:
elementwise updates on the local shards, Muon's matrices gathered whole on an
owner rank by all-to-all).

    accelerate launch --config_file launch/accelerate/fsdp2.yaml launch/examples/accelerate_fsdp2.py

GPUs only: accelerate's FSDP2 does not shard on CPU. Each rank prints one
``RESULT {...}`` line.
"""
import argparse
import json
import sys

import torch
from accelerate import Accelerator

import shardopt


def toy_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 8, generator=g) / 32**0.5
    y = torch.tanh(x @ w) + 0.01 * torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, y)


class ToyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))
        self.inp = torch.nn.Linear(32, 64)
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.inp(x))
        for b in self.blocks:
            x = x + torch.nn.functional.gelu(b(x))
        return self.head(x)


def report(result: dict) -> None:
    # one write per line, so the ranks' lines do not interleave on a shared stdout
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--optimizer", choices=["muon", "lion", "adamw"], default="muon")
    args = ap.parse_args()

    accelerator = Accelerator()
    torch.manual_seed(0)
    model = ToyNet()
    if args.optimizer == "muon":
        groups = shardopt.muon_param_groups(model, aux_algorithm="adamw", aux_lr=1e-3, aux_weight_decay=0.1)
        optimizer = shardopt.Muon(groups, lr=1e-3, adjust_lr_fn="match_rms_adamw", weight_decay=0.1)
    elif args.optimizer == "lion":
        optimizer = shardopt.Lion(model.parameters(), lr=3e-4, weight_decay=0.1)
    else:
        optimizer = shardopt.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    data = toy_data()
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses, step = [], 0
    while step < args.steps:
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
            step += 1
            if step >= args.steps:
                break

    inner = optimizer.optimizer
    report({
        "rank": accelerator.process_index, "world": accelerator.num_processes, "losses": losses,
        "layout": inner.layout.name, "state_bytes": inner.state_bytes(),
    })
    accelerator.wait_for_everyone()  # leave together: no rank tears gloo down mid-collective
    accelerator.end_training()  # stops the trackers, destroys the process group
    shardopt.exit_distributed()  # exits without interpreter finalisation: see its docstring


if __name__ == "__main__":
    main()
