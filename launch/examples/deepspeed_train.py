"""Plain DeepSpeed: the JSON config names a shardopt optimizer; the script adds one import.

    deepspeed --num_gpus 2 launch/examples/deepspeed_train.py --deepspeed_config launch/deepspeed/zero1_muon.json
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 launch/examples/deepspeed_train.py \\
        --deepspeed_config launch/deepspeed/zero2_adamw.json          # CPU, gloo

Any of launch/deepspeed/*.json works. Each rank prints one ``RESULT {...}`` line.
"""
import argparse
import json
import sys

import deepspeed
import torch

import shardopt
import shardopt.deepspeed  # noqa: F401  registers "shardopt.Lion" / "shardopt.AdamW" / "shardopt.Muon"


class ToyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(32, 64)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.inp(x))
        for b in self.blocks:
            x = x + torch.nn.functional.gelu(b(x))
        return self.head(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--local_rank", type=int, default=-1)
    ap = deepspeed.add_config_arguments(ap)
    args = ap.parse_args()

    if not torch.cuda.is_available():
        deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = ToyNet()
    engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(32, 8, generator=g) / 32**0.5
    rank, world = engine.global_rank, engine.world_size
    micro = engine.train_micro_batch_size_per_gpu()
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    losses = []
    for _ in range(args.steps):
        x = torch.randn(world * micro, 32, generator=g)  # the same global batch on every rank; take our rows
        y = torch.tanh(x @ teacher)
        x, y = x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]
        loss = torch.nn.functional.mse_loss(engine(x.to(engine.device, dtype)), y.to(engine.device, dtype))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    inner = engine.basic_optimizer
    sys.stdout.write("RESULT " + json.dumps({
        "rank": rank, "optimizer": type(inner).__name__, "zero_stage": engine.zero_optimization_stage(),
        "layout": inner.layout.name, "state_bytes": inner.state_bytes(), "first_losses": losses[:3],
        "last_losses": losses[-3:],
    }) + "\n")
    # barrier, destroy the process group, exit: see its docstring for why not a plain return
    shardopt.exit_distributed()


if __name__ == "__main__":
    main()
