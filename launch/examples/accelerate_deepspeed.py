"""accelerate + DeepSpeed ZeRO-1/2, with the optimizer named in the DeepSpeed config.

The DeepSpeed JSON says ``"optimizer": {"type": "shardopt.Lion", ...}`` (see
launch/deepspeed/); the script imports ``shardopt.deepspeed`` to register the
type and passes ``accelerate.utils.DummyOptim`` to ``accelerator.prepare``.

    accelerate launch --config_file launch/accelerate/deepspeed_zero1.yaml launch/examples/accelerate_deepspeed.py
    accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml launch/examples/accelerate_deepspeed.py

On CPU, add ``--use_deepspeed`` and set ``DS_ACCELERATOR=cpu``; the script then
asks accelerate for the gloo backend. Each rank prints one ``RESULT {...}`` line.
"""
import argparse
import hashlib
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, InitProcessGroupKwargs

import shardopt
import shardopt.deepspeed  # noqa: F401  registers "shardopt.Lion" / "shardopt.AdamW" / "shardopt.Muon"


def toy_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 8, generator=g) / 32**0.5
    y = torch.tanh(x @ w) + 0.01 * torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 8))


def report(result: dict) -> None:
    # one write per line, so the ranks' lines do not interleave on a shared stdout
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(kwargs_handlers=handlers)
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    model = toy_model()
    data = toy_data()
    loader = torch.utils.data.DataLoader(data, batch_size=ds_config["train_micro_batch_size_per_gpu"], shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    # The optimizer itself comes from the DeepSpeed config; DummyOptim only carries the parameters.
    model, optimizer, loader = accelerator.prepare(model, DummyOptim(model.parameters()), loader)

    def full_loss():
        with torch.no_grad():
            x, y = data.tensors
            return torch.nn.functional.mse_loss(model(x.to(accelerator.device)), y.to(accelerator.device)).item()

    start = full_loss()
    step = 0
    while step < args.steps:
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step >= args.steps:
                break
    end = full_loss()

    engine = model  # accelerate returns the DeepSpeed engine
    inner = engine.basic_optimizer
    digest = hashlib.sha256()
    for p in engine.module.parameters():
        digest.update(p.detach().cpu().float().numpy().tobytes())
    report({
        "rank": accelerator.process_index, "world": accelerator.num_processes, "loss_start": start, "loss_end": end,
        "params_sha256": digest.hexdigest(), "optimizer": type(inner).__module__ + "." + type(inner).__name__,
        "zero_stage": engine.zero_optimization_stage(), "state_bytes": inner.state_bytes(),
        "param_bytes": sum(p.numel() * 4 for p in engine.module.parameters()),
    })
    accelerator.wait_for_everyone()  # leave together: no rank tears gloo down mid-collective
    accelerator.end_training()  # stops the trackers, destroys the process group
    shardopt.exit_distributed()  # exits without interpreter finalisation: see its docstring


if __name__ == "__main__":
    main()
