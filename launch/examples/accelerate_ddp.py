"""accelerate + DDP with a shardopt ZeRO-1 optimizer.

DDP all-reduces the gradients; the shardopt optimizer keeps only this rank's
share of the state (sharding="zero1") and all-gathers the updated parameters.

    accelerate launch --config_file launch/accelerate/ddp.yaml launch/examples/accelerate_ddp.py          # GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 launch/examples/accelerate_ddp.py  # CPU

Each rank prints one ``RESULT {...}`` JSON line (losses, a parameter checksum,
the optimizer's state bytes) so runs can be checked.
"""
import argparse
import hashlib
import json
import sys

import torch
from accelerate import Accelerator

import shardopt


def toy_data(n=256, seed=0):
    """A fixed teacher regression task: every run sees the same data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 8, generator=g) / 32**0.5
    y = torch.tanh(x @ w) + 0.01 * torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def toy_model():
    torch.manual_seed(0)  # same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 8))


def report(result: dict) -> None:
    # one write per line, so the ranks' lines do not interleave on a shared stdout
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch_size", type=int, default=16, help="per rank")
    args = ap.parse_args()

    accelerator = Accelerator()
    model = toy_model()
    # Build the optimizer after Accelerator() so torch.distributed is up: sharding="zero1" needs the group.
    optimizer = shardopt.Lion(model.parameters(), lr=args.lr, weight_decay=0.1, sharding="zero1")
    data = toy_data()
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    def full_loss():
        with torch.no_grad():
            x, y = data.tensors
            return torch.nn.functional.mse_loss(model(x.to(accelerator.device)), y.to(accelerator.device)).item()

    start = full_loss()
    losses, step = [], 0
    model.train()
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

    end = full_loss()
    inner = optimizer.optimizer  # the shardopt optimizer inside accelerate's wrapper
    digest = hashlib.sha256()
    for p in accelerator.unwrap_model(model).parameters():
        digest.update(p.detach().cpu().float().numpy().tobytes())
    report({
        "rank": accelerator.process_index, "world": accelerator.num_processes, "loss_start": start, "loss_end": end,
        "losses": losses,
        "params_sha256": digest.hexdigest(), "layout": inner.layout.name, "state_bytes": inner.state_bytes(),
        "param_bytes": sum(p.numel() * 4 for p in model.parameters()),
    })
    accelerator.wait_for_everyone()  # leave together: no rank tears gloo down mid-collective
    accelerator.end_training()  # stops the trackers, destroys the process group
    shardopt.exit_distributed()  # exits without interpreter finalisation: see its docstring


if __name__ == "__main__":
    main()
