"""Interleaved CPU step timings: shardopt defaults vs. their no-check forms and peers.

    OMP_NUM_THREADS=2 python bench/cpu_step.py [--numel 20000000] [--tensors 4] [--rounds 11] [--no-ds]

Every configuration has its own parameters (fp32, ``--tensors`` equal tensors)
and runs one step per round, in turn, so load from other jobs hits them alike;
the table gives the median over the rounds (after one warm-up round) and the
ratios that the targets in issue 12 name.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's shardopt, not an installed one


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=20_000_000)
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--no-ds", action="store_true", help="skip DeepSpeedCPULion")
    args = ap.parse_args()
    torch.manual_seed(0)
    import shardopt
    from shardopt import kernels

    print("shardopt from", Path(shardopt.__file__).parent)

    n = args.numel // args.tensors
    grads = [torch.randn(n) for _ in range(args.tensors)]

    def params(own_grads=False):
        ps = [torch.nn.Parameter(torch.randn(n)) for _ in range(args.tensors)]
        for p, g in zip(ps, grads):
            p.grad = g.clone() if own_grads else g
        return ps

    cases = {}

    def add(name, opt, pre=None):
        def run(opt=opt, pre=pre):
            if pre is not None:
                pre()
            opt.step()
        cases[name] = run

    add("lion_default", shardopt.Lion(params(), lr=1e-4, sharding="none"))
    add("lion_nonfinite_none", shardopt.Lion(params(), lr=1e-4, sharding="none", nonfinite=None))
    if not args.no_ds:
        from deepspeed.ops.lion import DeepSpeedCPULion

        add("ds_cpu_lion", DeepSpeedCPULion(params(), lr=1e-4))
    add("adamw_default", shardopt.AdamW(params(), lr=1e-3, sharding="none"))
    add("torch_adamw_fused", torch.optim.AdamW(params(), lr=1e-3, fused=True))
    add("adamw_clip1", shardopt.AdamW(params(), lr=1e-3, sharding="none", grad_clip_norm=1.0))
    tp = params(own_grads=True)
    add("torch_clip_adamw_fused", torch.optim.AdamW(tp, lr=1e-3, fused=True),
        pre=lambda tp=tp: torch.nn.utils.clip_grad_norm_(tp, 1.0))
    cases["grad_stats"] = lambda: kernels.grad_stats(grads, backend="cpu")
    cases["grad_stats_clipvalue"] = lambda: kernels.grad_stats(grads, clip_value=0.5, backend="cpu")

    times = {k: [] for k in cases}
    for r in range(args.rounds + 1):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r:
                times[k].append(dt * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.numel} fp32 params in {args.tensors} tensors, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    for k, v in med.items():
        print(f"  {k:24s} {v:8.2f} ms")
    gb = args.numel * 4 / 1e9
    print(f"  grad_stats read bandwidth {gb / (med['grad_stats'] / 1e3):.1f} GB/s")

    def ratio(label, fast, slow, target):
        if fast in med and slow in med:
            r = med[slow] / med[fast]
            print(f"  {label:52s} {r:5.2f}x (target >= {target}) {'ok' if r >= target else 'MISSED'}")

    print("speed ratios (higher is faster for the first):")
    ratio("Lion default vs Lion(nonfinite=None)", "lion_default", "lion_nonfinite_none", 0.85)
    ratio("Lion default vs DeepSpeedCPULion", "lion_default", "ds_cpu_lion", 1.0)
    ratio("AdamW default vs torch AdamW(fused=True)", "adamw_default", "torch_adamw_fused", 0.95)
    ratio("AdamW(grad_clip_norm=1) vs clip_grad_norm_ + torch fused", "adamw_clip1", "torch_clip_adamw_fused", 1.3)


if __name__ == "__main__":
    main()
