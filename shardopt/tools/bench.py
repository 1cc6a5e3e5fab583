"""``shardopt bench``: time optimizer steps against the peers, and count state and traffic.

    shardopt bench --device cpu            # one step of each optimizer, ~20 M fp32 params
    shardopt bench --distributed           # ZeRO-1 on W = 1, 2, 4 CPU ranks: state bytes, step time, bytes sent,
                                           # then step time with overlap on/off and the time waiting on comm
    shardopt bench --ns-only               # Newton-Schulz choices: time and orthogonality error
    shardopt bench --device cuda           # the same table on a GPU (torch / triton backends)

Ratios are measured side by side in one run; absolute times depend on the
machine. ``--json PATH`` writes the rows.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import torch


def transformer_shapes(hidden: int, layers: int, vocab: int) -> list[tuple]:
    """A GPT-style parameter set: embedding, per layer qkv/proj/fc1/fc2 + norms and biases."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,),
                   (hidden,), (hidden,), (4 * hidden, hidden), (4 * hidden,), (hidden, 4 * hidden), (hidden,)]
    shapes += [(hidden,), (hidden,)]
    return shapes


def muon_shapes(hidden: int, layers: int) -> list[tuple]:
    """The hidden matrices of :func:`transformer_shapes` (what the Muon rows orthogonalize)."""
    return [s for s in transformer_shapes(hidden, layers, 0)[1:] if len(s) == 2]


def _params(shapes, device, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=dtype) * 1e-3
    return ps


def _time(step, iters: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _roofline(n: int, device, iters: int) -> list[dict]:
    """The memory roofline the elementwise steps are held to: rows of ``label``, ``bytes_per_elem`` and
    ``GB/s``, the first being the one a step's "% roof" is of.

    On CPU with the C++ extension: its in-place stream ``a += s*b`` (2 reads + 1 write = 12 bytes per
    element, threaded like the steps; in place like an optimizer step, so no write-allocate traffic for a
    separate output, which makes torch's ``out=`` triad read low), then its read-only pass (4 bytes per
    element, like the gradient pass). Elsewhere torch's triad ``a = b + s*c``.
    """
    from ..kernels import cpu

    b = torch.randn(n, device=device)
    if device.type == "cpu" and cpu.available():
        a = torch.randn(n, device=device)
        cpu.stream_update(a, b, 1e-3)  # warm the extension (and the pages) before timing
        upd = _time(lambda: cpu.stream_update(a, b, 1e-3), iters, 2, device)
        rd = _time(lambda: cpu.stream_read(a), iters, 2, device)
        return [{"label": "roofline: in-place stream a += s*b (C++)", "bytes_per_elem": 12,
                 "GB/s": 12 * n / upd / 1e6},
                {"label": "roofline: read-only stream sum(a) (C++)", "bytes_per_elem": 4, "GB/s": 4 * n / rd / 1e6}]
    c = torch.randn(n, device=device)
    a = torch.empty_like(b)
    ms = _time(lambda: torch.add(b, c, alpha=0.5, out=a), iters, 2, device)
    return [{"label": "roofline: stream triad a = b + s*c (torch)", "bytes_per_elem": 12, "GB/s": 12 * n / ms / 1e6}]


# bytes each step reads and writes per parameter (fp32): Lion reads p, g, m and writes p, m (20); AdamW reads
# p, g, m, v and writes p, m, v (28); the default gradient pass (inf/NaN and norm) reads g once more (+4);
# clip_grad_norm_ reads g for the norm, then reads and writes it to scale it (+12)
_BYTES = {"lion": 20, "adamw": 28, "check": 4, "clip_grad_norm_": 12}
# bf16 state moves 2 bytes instead of 4 per state buffer read and write: Lion's one buffer saves 4, AdamW's two 8
_BF16_STATE_SAVES = {"lion": 4, "adamw": 8}
_STATE_BUFFERS = {"lion": 1, "adamw": 2}


def int8_state_bytes_per_elem(shapes, fp32_bytes: float, algo: str) -> float:
    """B/elem of a step with ``state_dtype="int8"``: a parameter that takes int8 state reads and writes 1 byte
    per element and state buffer plus its fp32 scales (4 bytes per 256 elements), instead of 4; the others
    keep fp32 state (see ``state_precision.int8_eligible``). Averaged over all the elements."""
    from ..kernels import state_precision as sp

    n = sum(math.prod(s) for s in shapes)
    q8 = sum(math.prod(s) for s in shapes if sp.int8_eligible(s))
    saves = 2 * (4 - (1 + 4 / sp.BLOCK)) * _STATE_BUFFERS[algo]  # per int8 element: read + write of each buffer
    return fp32_bytes - saves * q8 / n


def _elementwise_rows(shapes, device, iters, deepspeed: bool):
    """One step of each contender, timed round-robin. A shardopt row uses the constructor defaults
    unless its label says otherwise (the defaults check for inf/NaN in a fused gradient pass)."""
    import shardopt

    rows = []
    steps = []
    n = sum(torch.Size(s).numel() for s in shapes)

    def add(name, make, bytes_per_elem, algo, peer=False):
        try:
            step = make()
            step()
        except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
            print(f"  skip {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
            return
        rows.append({"name": name, "bytes_per_elem": bytes_per_elem, "peer": peer, "algo": algo})
        steps.append(step)

    def ours(cls, **kw):
        def make():
            return cls(_params(shapes, device), **kw).step
        return make

    def torch_adamw(clip=False, **kw):
        def make():
            ps = _params(shapes, device)
            opt = torch.optim.AdamW(ps, lr=1e-3, **kw)
            if not clip:
                return opt.step

            def step():  # the usual training loop: clip the gradients in place, then step
                torch.nn.utils.clip_grad_norm_(ps, 1.0)
                opt.step()
            return step
        return make

    def foreach_lion():
        ps = _params(shapes, device)
        ms_ = [torch.zeros_like(p) for p in ps]
        grads = [p.grad for p in ps]

        def step():  # the textbook foreach Lion (lerp/sign/add), as a user would write it
            with torch.no_grad():
                c = torch._foreach_lerp(ms_, grads, 0.1)
                torch._foreach_sign_(c)
                torch._foreach_add_(ps, c, alpha=-1e-4)
                torch._foreach_lerp_(ms_, grads, 0.01)
        return step

    L, A, C, CLIP = _BYTES["lion"], _BYTES["adamw"], _BYTES["check"], _BYTES["clip_grad_norm_"]
    add("torch.optim.AdamW foreach", torch_adamw(foreach=True), A, "adamw", peer=True)
    add("torch.optim.AdamW fused", torch_adamw(fused=True), A, "adamw", peer=True)
    add("clip_grad_norm_ + torch.optim.AdamW fused", torch_adamw(clip=True, fused=True), A + CLIP, "adamw clip",
        peer=True)
    add("foreach Lion (lerp/sign)", foreach_lion, L, "lion", peer=True)
    if deepspeed:
        def ds(module, cls_name):
            def make():
                cls = getattr(__import__(module, fromlist=[cls_name]), cls_name)
                return cls(_params(shapes, device), lr=1e-3).step
            return make

        # DeepSpeed's CPU optimizers on CPU, its fused CUDA ones on GPUs
        cpu = device.type == "cpu"
        add("DeepSpeed" + ("CPUAdam" if cpu else " FusedAdam"),
            ds("deepspeed.ops.adam", "DeepSpeedCPUAdam" if cpu else "FusedAdam"), A, "adamw", peer=True)
        add("DeepSpeed" + ("CPULion" if cpu else " FusedLion"),
            ds("deepspeed.ops.lion", "DeepSpeedCPULion" if cpu else "FusedLion"), L, "lion", peer=True)
    add("shardopt.Lion (defaults)", ours(shardopt.Lion, lr=1e-4), L + C, "lion")
    add("shardopt.Lion nonfinite=None", ours(shardopt.Lion, lr=1e-4, nonfinite=None), L, "lion")
    add("shardopt.Lion state_dtype=bf16", ours(shardopt.Lion, lr=1e-4, state_dtype="bf16"),
        L + C - _BF16_STATE_SAVES["lion"], "lion")
    add("shardopt.Lion state_dtype=int8", ours(shardopt.Lion, lr=1e-4, state_dtype="int8"),
        int8_state_bytes_per_elem(shapes, L + C, "lion"), "lion")
    add("shardopt.AdamW (defaults)", ours(shardopt.AdamW, lr=1e-3), A + C, "adamw")
    add("shardopt.AdamW nonfinite=None", ours(shardopt.AdamW, lr=1e-3, nonfinite=None), A, "adamw")
    add("shardopt.AdamW state_dtype=bf16", ours(shardopt.AdamW, lr=1e-3, state_dtype="bf16"),
        A + C - _BF16_STATE_SAVES["adamw"], "adamw")
    add("shardopt.AdamW state_dtype=int8", ours(shardopt.AdamW, lr=1e-3, state_dtype="int8"),
        int8_state_bytes_per_elem(shapes, A + C, "adamw"), "adamw")
    add("shardopt.AdamW grad_clip_norm=1.0", ours(shardopt.AdamW, lr=1e-3, grad_clip_norm=1.0), A + C,
        "adamw clip")
    if device.type == "cuda":
        from ..kernels import cuda

        if cuda.available():  # the defaults pick cuda; the Triton kernels are the fallback
            add("shardopt.Lion backend=triton", ours(shardopt.Lion, lr=1e-4, backend="triton"), L + C, "lion")
            add("shardopt.AdamW backend=triton", ours(shardopt.AdamW, lr=1e-3, backend="triton"), A + C, "adamw")
    add("shardopt.Lion backend=torch (reference)", ours(shardopt.Lion, lr=1e-4, backend="torch"), L + C, "lion")
    add("shardopt.AdamW backend=torch (reference)", ours(shardopt.AdamW, lr=1e-3, backend="torch"), A + C, "adamw")
    # round robin, median per step: load on a shared machine hits every contender alike
    times = [[] for _ in steps]
    for it in range(iters):
        print(f"  round {it + 1}/{iters}", file=sys.stderr)
        for k, step in enumerate(steps):
            times[k].append(_time(step, 1, 0, device))
    for r, t in zip(rows, times):
        r["ms"] = statistics.median(t)
        r["round_ms"] = t
        r["GB/s"] = n * r["bytes_per_elem"] / r["ms"] / 1e6
        print(f"  {r['name']:<44} {r['ms']:9.2f} ms", file=sys.stderr)
    return rows, n


def _ortho_error(make, shapes, device) -> float:
    """rms|1 - sigma| of one step's orthogonalized update, read off the parameter change
    (weight decay 0, lr 1, so the change is the lr-adjusted update of each matrix)."""
    ps = _params(shapes, device, seed=1)
    before = [p.detach().clone() for p in ps]
    make(ps, lr=1.0, weight_decay=0.0).step()
    errs = []
    for p, b in zip(ps, before):
        rows, cols = p.shape
        update = (b - p.detach()).double() / math.sqrt(max(1.0, rows / cols))
        errs.append(_singular_values(update) - 1)
    return float(torch.cat(errs).pow(2).mean().sqrt())


def _muon_rows(device, iters, hidden, layers):
    import shardopt

    from ..optim.muon import default_ns_dtype

    shapes = muon_shapes(hidden, layers)
    rows = []
    # the defaults' Newton-Schulz dtype depends on the machine (bf16, or fp32 on a CPU without a bf16
    # matmul): the other one gets its own row
    default = default_ns_dtype(device)
    other = torch.float32 if default == torch.bfloat16 else torch.bfloat16
    other_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[other]
    contenders = [
        ("torch.optim.Muon", lambda ps, **kw: torch.optim.Muon(ps, **kw)),
        ("shardopt.Muon (defaults)", lambda ps, **kw: shardopt.Muon(ps, **kw)),
        ("shardopt.Muon nonfinite=None", lambda ps, **kw: shardopt.Muon(ps, nonfinite=None, **kw)),
        (f"shardopt.Muon ns_dtype={other_name}", lambda ps, **kw: shardopt.Muon(ps, ns_dtype=other, **kw)),
    ]
    if device.type == "cuda":
        from ..kernels import triton_ops

        if triton_ops.available():
            contenders.append(("shardopt.Muon ns_backend=triton", lambda ps, **kw: shardopt.Muon(
                ps, ns_backend="triton", **kw)))
    print(f"  shardopt.Muon's default ns_dtype on {device.type}: {default}", file=sys.stderr)
    steps = [make(_params(shapes, device), lr=1e-3).step for _, make in contenders]
    for s in steps:
        s()
    times = [[] for _ in steps]
    for _ in range(iters):  # round robin, as the elementwise rows
        for k, s in enumerate(steps):
            times[k].append(_time(s, 1, 0, device))
    for (name, make), t in zip(contenders, times):
        row = {"name": name, "ms": statistics.median(t), "round_ms": t, "peer": name.startswith("torch"),
               "algo": "muon", "ortho_rms_err": _ortho_error(make, shapes, device)}
        rows.append(row)
        print(f"  {name:<44} {row['ms']:9.2f} ms", file=sys.stderr)
    return rows, shapes


def _print_table(rows, roofline=None):
    best_peer = {}
    for r in rows:
        if r["peer"]:
            best_peer[r["algo"]] = min(best_peer.get(r["algo"], float("inf")), r["ms"])
    hdr = (f"{'step':<44} {'ms':>9} {'B/elem':>7} {'GB/s':>7} {'% roof':>7} {'ortho err':>10} "
           f"{'vs best peer':>13}")
    print(hdr)
    print("-" * len(hdr))
    roofline = roofline or []
    roofline_gbs = roofline[0]["GB/s"] if roofline else None
    for roof in roofline:
        pct = f"{100 * roof['GB/s'] / roofline_gbs:6.1f}%"
        print(f"{roof['label']:<44} {'':>9} {roof['bytes_per_elem']:>7} {roof['GB/s']:7.1f} {pct:>7}")
    for r in rows:
        gbs = r.get("GB/s")
        pct = f"{100 * gbs / roofline_gbs:6.1f}%" if gbs and roofline_gbs else "      -"
        ratio = best_peer.get(r["algo"], float("nan")) / r["ms"]
        r["speedup_vs_best_peer"] = ratio
        err = f"{r['ortho_rms_err']:10.4f}" if "ortho_rms_err" in r else f"{'-':>10}"
        print(f"{r['name']:<44} {r['ms']:9.2f} {_fmt_bpe(r.get('bytes_per_elem', '-')):>7} {gbs or 0:7.1f} "
              f"{pct:>7} {err} {ratio:12.2f}x")
    print("B/elem: bytes a step must read and write per fp32 parameter (the defaults' gradient pass reads the "
          "gradients once more; bf16 state moves 2 bytes per state buffer read and write, int8 state 1 byte and "
          "a 4-byte scale per 256 elements on the matrices that take it, averaged over all elements); % roof: of "
          "the first roofline row; ortho err: rms|1 - sigma| of the orthogonalized update")
    return _print_targets(rows, roofline_gbs)


def _fmt_bpe(b) -> str:
    return f"{b:.2f}" if isinstance(b, float) and b != int(b) else str(int(b) if isinstance(b, float) else b)


# the ratios the defaults are held to, each (label, row, reference row, target)
TARGETS = (
    ("default Lion vs DeepSpeedCPULion", "shardopt.Lion (defaults)", "DeepSpeedCPULion", 1.0),
    ("default Lion vs Lion nonfinite=None (the check costs <= 15%)", "shardopt.Lion (defaults)",
     "shardopt.Lion nonfinite=None", 0.85),
    ("default AdamW vs torch fused AdamW", "shardopt.AdamW (defaults)", "torch.optim.AdamW fused", 0.95),
    ("AdamW grad_clip_norm=1.0 vs clip_grad_norm_ + torch fused", "shardopt.AdamW grad_clip_norm=1.0",
     "clip_grad_norm_ + torch.optim.AdamW fused", 1.3),
    ("default Muon vs torch.optim.Muon", "shardopt.Muon (defaults)", "torch.optim.Muon", 1.0),
    ("bf16-state Lion vs fp32-state Lion", "shardopt.Lion state_dtype=bf16", "shardopt.Lion (defaults)", 1.05),
    ("int8-state Lion vs fp32-state Lion", "shardopt.Lion state_dtype=int8", "shardopt.Lion (defaults)", 1.1),
)


def round_ratio_spread(ours: dict, ref: dict) -> tuple[float, float] | None:
    """The middle half (first to third quartile) of the per-round ratios ``ref / ours`` of two rows timed
    round-robin, or None with fewer than 4 rounds. Each round's ratio pairs the two steps timed moments
    apart, so it shows how much the ratio itself moves on a shared machine, which the medians hide."""
    a, b = ours.get("round_ms"), ref.get("round_ms")
    if not a or not b or len(a) != len(b) or len(a) < 4:
        return None
    q = statistics.quantiles([y / x for x, y in zip(a, b)], n=4, method="inclusive")
    return q[0], q[2]


def _print_targets(rows, roofline_gbs=None) -> list:
    by = {r["name"]: r for r in rows}
    out = []
    lines = []
    for label, ours, ref, target in TARGETS:
        if ours not in by or ref not in by:
            continue
        ratio = by[ref]["ms"] / by[ours]["ms"]
        ok = ratio >= target
        rec = {"target": label, "ratio": ratio, "min": target, "met": ok}
        line = f"  {label:<62} {ratio:5.2f}x  (target >= {target:.2f}x) {'met' if ok else 'NOT MET'}"
        spread = round_ratio_spread(by[ours], by[ref])
        if spread is not None:
            rec["round_ratio_middle_half"] = list(spread)
            line += f"; rounds {spread[0]:.2f}-{spread[1]:.2f}x"
        gbs = by[ours].get("GB/s")
        if roofline_gbs and gbs:
            # the ratio the row would reach moving its bytes at the roofline: a target above it cannot be met
            # here by a faster kernel, only by moving fewer bytes
            rec["at_roofline"] = ratio * roofline_gbs / gbs
            line += f"; at the roofline {rec['at_roofline']:.2f}x"
            if not ok and rec["at_roofline"] < target:
                line += " (out of reach by its bytes here)"
        out.append(rec)
        lines.append(line)
    if "shardopt.Muon (defaults)" in by and "torch.optim.Muon" in by:
        a, b = by["shardopt.Muon (defaults)"]["ortho_rms_err"], by["torch.optim.Muon"]["ortho_rms_err"]
        ok = a <= b * 1.05
        out.append({"target": "default Muon orthogonality error vs torch.optim.Muon", "ours": a, "torch": b, "met": ok})
        lines.append(f"  {'default Muon orthogonality error vs torch.optim.Muon':<62} {a:.4f} vs {b:.4f} "
                     f"{'met' if ok else 'NOT MET'}")
    if lines:
        print("\ntargets (ratios from this run; > 1 is faster; at the roofline: the ratio if the row ran at the "
              "first roofline row's GB/s with its bytes per element; rounds: the middle half of the ratios "
              "of single rounds):")
        print("\n".join(lines))
    return out


# ---------------------------------------------------------------- distributed
def _dist_worker(rank, world, port, shapes, iters, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    import shardopt
    from shardopt.sharding import comm

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {}
    for algo in ("lion", "adamw", "muon"):
        ps = _params(shapes, torch.device("cpu"))
        if algo == "muon":
            groups = [{"params": [p for p in ps if p.dim() == 2 and p.shape[0] != shapes[0][0]], "ns_dtype": torch.float32},
                      {"params": [p for p in ps if p.dim() != 2 or p.shape[0] == shapes[0][0]], "algorithm": "adamw"}]
            opt = shardopt.Muon(groups, lr=1e-3, nonfinite=None)
        else:
            opt = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[algo](ps, lr=1e-4, nonfinite=None)
        opt.step()
        comm.reset_counters()
        opt.step()
        traffic = dict(comm.COUNTERS)
        dist.barrier()
        ms = _time(opt.step, iters, 0, torch.device("cpu"))
        res[algo] = {"state_bytes": opt.state_bytes(), "ms": ms, "traffic": traffic, "layout": opt.layout.name}
    out[rank] = res
    comm.exit_distributed(0)


def _run_distributed(args):
    import torch.multiprocessing as mp

    shapes = transformer_shapes(args.hidden, args.layers, args.vocab)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"ZeRO-1 on CPU gloo ranks: {n / 1e6:.1f} M fp32 params in {len(shapes)} tensors", file=sys.stderr)
    table = []
    for world in args.worlds:
        from ..sharding import comm  # noqa: F401 - import check before spawning

        with mp.Manager() as mgr:
            out = mgr.dict()
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_dist_worker, args=(world, port, shapes, args.iters, out), nprocs=world,
                               start_method="spawn")
            res = dict(out)
        for algo in ("lion", "adamw", "muon"):
            for rank in range(world):
                r = res[rank][algo]
                table.append({"world": world, "rank": rank, "algo": algo, **r})
    print(f"{'W':>2} {'rank':>4} {'algo':<6} {'layout':<6} {'state MB':>9} {'step ms':>8} {'all-gather MB':>14} "
          f"{'reduce-scatter MB':>18} {'all-to-all MB':>14}")
    for t in table:
        tr = t["traffic"]
        print(f"{t['world']:>2} {t['rank']:>4} {t['algo']:<6} {t['layout']:<6} {t['state_bytes'] / 1e6:9.2f} {t['ms']:8.1f} "
              f"{tr.get('all_gather', 0) / 1e6:14.3f} {tr.get('reduce_scatter', 0) / 1e6:18.3f} "
              f"{tr.get('all_to_all', 0) / 1e6:14.3f}")
    for world in args.worlds:
        if world == 1:
            continue
        ag = {t["algo"]: t["traffic"].get("all_gather", 0) for t in table if t["world"] == world and t["rank"] == 0}
        other = {t["algo"]: sum(v for k, v in t["traffic"].items() if k not in ("all_gather", "all_reduce"))
                 for t in table if t["world"] == world and t["rank"] == 0}
        verdict = "equal" if ag["muon"] == ag["adamw"] and other["muon"] == 0 else "DIFFERENT"
        print(f"W={world}: Muon all-gather {ag['muon']:,} B vs AdamW {ag['adamw']:,} B per step ({verdict}); "
              f"Muon other traffic {other['muon']:,} B")
    return table


# ---------------------------------------------------------------- distributed, under DeepSpeed
def _run_deepspeed_budget(args):
    """``--distributed --deepspeed``: shardopt.Muon against DeepSpeed's own Muon at ZeRO-1/2/3.

    Per step and rank: bytes sent (every collective, DeepSpeed's included) and Newton-Schulz matrices.
    See :mod:`shardopt.tools._ds_comm_bench` for the model and the byte accounting.
    """
    import socket

    import torch.multiprocessing as mp

    from ._ds_comm_bench import worker

    hidden, layers, stages = args.ds_hidden, args.ds_layers, [1, 2, 3]
    worlds = [w for w in args.worlds if w > 1] or [2, 4]
    print(f"DeepSpeed Muon budget on CPU gloo ranks: hidden {hidden}, {layers} blocks (qkv, proj, up, down "
          f"+ lm_head), fp32, one measured step", file=sys.stderr)
    table = []
    for world in worlds:
        with mp.Manager() as mgr:
            out = mgr.dict()
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            mp.start_processes(worker, args=(world, port, hidden, layers, stages, out), nprocs=world,
                               start_method="spawn")
            res = dict(out)
        for stage in stages:
            for kind in ("shardopt", "deepspeed"):
                rows = [res[r][(stage, kind)] for r in range(world)]
                table.append({
                    "stage": stage, "world": world, "optimizer": "shardopt.Muon" if kind == "shardopt" else "DeepSpeed Muon",
                    "bytes_per_rank": [int(r["fwd_bwd"] + r["step"]) for r in rows],
                    "fwd_bwd_bytes": [int(r["fwd_bwd"]) for r in rows], "step_bytes": [int(r["step"]) for r in rows],
                    "by_op": [r["by_op"] for r in rows], "shardopt_comm": [r["shardopt_comm"] for r in rows],
                    "ns_per_rank": [r["ns"] for r in rows], "matrices": rows[0]["matrices"],
                })
    print(f"{'ZeRO':>4} {'W':>2} {'optimizer':<15} {'fwd+bwd MB':>10} {'step MB':>8} {'total MB':>9} "
          f"{'shardopt.comm MB':>16} {'NS per rank':<16} {'NS total':>8} {'matrices':>8}")
    for t in table:
        mb = max(t["bytes_per_rank"]) / 1e6
        ours = max(sum(c.values()) for c in t["shardopt_comm"]) / 1e6
        ns = t["ns_per_rank"]
        print(f"{t['stage']:>4} {t['world']:>2} {t['optimizer']:<15} {max(t['fwd_bwd_bytes']) / 1e6:10.3f} "
              f"{max(t['step_bytes']) / 1e6:8.3f} {mb:9.3f} {ours:16.3f} {str(ns):<16} {sum(ns):>8} "
              f"{t['matrices']:>8}")
    print("(MB per rank per step: the largest rank; ring bytes sent, all-reduce 2(W-1)/W N)")
    for world in worlds:
        for stage in stages:
            ours, theirs = (max(t["bytes_per_rank"]) for t in table
                            if t["world"] == world and t["stage"] == stage)
            verdict = "<=" if ours <= theirs else "MORE THAN"
            print(f"ZeRO-{stage} W={world}: shardopt.Muon {ours:,} B {verdict} DeepSpeed Muon {theirs:,} B per rank")
    return table


# ---------------------------------------------------------------- Newton-Schulz options
def _singular_values(X) -> torch.Tensor:
    return torch.linalg.svdvals(X.detach().double().cpu()).reshape(-1)


def _ns_choice_rows(device, iters, hidden, layers):
    """Each Newton-Schulz choice on the bench's Muon matrices: its time and its orthogonality error.

    Inputs have singular values spread log-uniformly over [1e-3, 1] (a gradient's spectrum decays;
    1e-3 is the smallest singular value Polar Express is designed for) and, separately, Gaussian
    ones. The error is the spread of the result's singular values around 1: the quintic (3.4445,
    -4.7750, 2.0315) is tuned to stop in a band, Polar Express converges."""
    from ..functional import newton_schulz, newton_schulz_split
    from ..functional.muon import DEFAULT_NS_COEFFICIENTS

    shapes = sorted(set(muon_shapes(hidden, layers)))
    g = torch.Generator(device="cpu").manual_seed(0)

    def spectrum(shape):
        m, n = shape
        k = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        return (U * torch.logspace(-3, 0, k, dtype=torch.float64)) @ V.T

    inputs = {"decaying": [spectrum(s).float().to(device) for s in shapes],
              "gaussian": [torch.randn(s, generator=g).to(device) for s in shapes]}
    choices = [("quintic (3.4445, -4.775, 2.0315)", DEFAULT_NS_COEFFICIENTS, None),
               ("polar_express", "polar_express", None),
               ("polar_express, ns_split=3 (q/k/v)", "polar_express", 3)]
    rows = []
    for label, coeffs, split in choices:
        for dtype in (torch.bfloat16, torch.float32):
            def ns(x, c=coeffs, d=dtype):
                return newton_schulz(x, coefficients=c, dtype=d)

            def step(kind="decaying", sp=split, f=ns):
                return [newton_schulz_split(x, f, ns_split=sp if x.shape[0] % 3 == 0 and sp else None)
                        for x in inputs[kind]]

            ms = _time(step, iters, 1, device)
            row = {"name": f"NS {label} {str(dtype).replace('torch.', '')}", "ms": ms}
            for kind in inputs:
                sv = torch.cat([_singular_values(o) for o in step(kind)])
                row[kind] = {"sigma_min": float(sv.min()), "sigma_max": float(sv.max()),
                             "rms_err": float((sv - 1).pow(2).mean().sqrt()),
                             "max_err": float((sv - 1).abs().max())}
            rows.append(row)
            print(f"  {row['name']:<48} {ms:8.2f} ms", file=sys.stderr)
    print(f"\nNewton-Schulz choices on {len(shapes)} matrix shapes {shapes}, 5 steps, device {device}")
    print(f"{'':<48} {'':>8}   {'decaying spectrum':^28}   {'gaussian':^28}")
    print(f"{'choice':<48} {'ms':>8}   {'sigma range':>16} {'rms|1-s|':>10}   {'sigma range':>16} {'rms|1-s|':>10}")
    for r in rows:
        d, n = r["decaying"], r["gaussian"]
        print(f"{r['name']:<48} {r['ms']:8.2f}   [{d['sigma_min']:.3f}, {d['sigma_max']:.3f}] {d['rms_err']:10.3f}"
              f"   [{n['sigma_min']:.3f}, {n['sigma_max']:.3f}] {n['rms_err']:10.3f}")
    print("sigma: singular values of the result (1 is orthogonal); rms|1-s|: their root-mean-square distance from 1")
    print("(ns_split=3 rows split the matrices whose rows divide by 3, e.g. a fused QKV, into three blocks)")
    return rows


# ---------------------------------------------------------------- overlapped communication
def _overlap_worker(rank, world, port, cfg, out):
    """One rank: iteration / step time and the time blocked in shardopt's collectives, overlap on and off."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    import shardopt
    from shardopt.sharding import comm, zero1
    from shardopt.tools._demo_model import SIZES, Corpus, build_model

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # bench knob: smaller ZeRO-1 buckets, so that several all-gathers can be in flight
    zero1.Zero1Layout.__init__.__kwdefaults__["bucket_elements"] = cfg["bucket_elements"]
    res = {}

    def measure(one_iter, n):
        one_iter()
        dist.barrier()  # once: a barrier between iterations would wait for the gathers left in flight
        waits, times = [], []
        for _ in range(n):
            comm.reset_counters()
            t0 = time.perf_counter()
            one_iter()
            times.append(time.perf_counter() - t0)
            waits.append(sum(comm.WAIT_SECONDS.values()))
        return statistics.median(times) * 1e3, statistics.median(waits) * 1e3

    # ZeRO-1: the demo model under DDP, a whole training iteration (forward, backward, step)
    mcfg = SIZES["default"]
    data = Corpus(mcfg, seed=0)
    for algo in ("adamw", "muon"):
        for mode in ("off", "on", "param_gather"):
            model = build_model(mcfg, seed=0)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            kw = dict(overlap_comm=mode != "off", overlap_param_gather=mode == "param_gather", backend="torch")
            if algo == "muon":
                opt = shardopt.Muon(shardopt.muon_param_groups(model, aux_lr=3e-3), lr=0.02, **kw)
            else:
                opt = shardopt.AdamW(model.parameters(), lr=3e-3, **kw)
            if mode == "param_gather":
                opt.attach(ddp)
            step = [0]

            def it():
                x, y = data.batch(step[0], rank, world)
                step[0] += 1
                opt.zero_grad()
                ddp(x, y).backward()
                opt.step()

            ms, wait = measure(it, cfg["iters"])
            res[("zero1", algo, mode)] = {"ms": ms, "wait_ms": wait, "buckets": len(opt.layout.buckets)}
    # FSDP2: Muon's gather step on the bench matrices, an optimizer step
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    shapes = muon_shapes(cfg["hidden"], cfg["layers"])
    mesh = init_device_mesh("cpu", (world,))
    for mode in ("off", "on"):
        holder = torch.nn.Module()
        holder.ps = torch.nn.ParameterList(_params(shapes, torch.device("cpu")))
        grads = [p.grad for p in holder.ps]
        fully_shard(holder, mesh=mesh)
        params = list(holder.parameters())
        for p, g in zip(params, grads):
            p.grad = distribute_tensor(g, mesh, p.placements)
        opt = shardopt.Muon(params, lr=1e-3, nonfinite=None, overlap_comm=mode == "on", backend="torch")
        ms, wait = measure(opt.step, cfg["iters"])
        res[("fsdp2", "muon", mode)] = {"ms": ms, "wait_ms": wait}
    out[rank] = res
    comm.exit_distributed(0)


def _run_overlap(args):
    """Step time with overlap on and off at each W > 1, and the time spent waiting on communication."""
    import socket

    import torch.multiprocessing as mp

    cfg = {"iters": args.iters, "hidden": args.muon_hidden, "layers": args.muon_layers,
           "bucket_elements": args.overlap_bucket_elements}
    table = []
    for world in [w for w in args.worlds if w > 1]:
        with mp.Manager() as mgr:
            out = mgr.dict()
            with socket.socket() as sk:
                sk.bind(("127.0.0.1", 0))
                port = sk.getsockname()[1]
            mp.start_processes(_overlap_worker, args=(world, port, cfg, out), nprocs=world, start_method="spawn")
            res = dict(out)
        for key in res[0]:
            ms = [res[r][key]["ms"] for r in range(world)]
            wait = [res[r][key]["wait_ms"] for r in range(world)]
            table.append({"world": world, "layout": key[0], "algo": key[1], "overlap": key[2],
                          "ms_max": max(ms), "wait_ms_max": max(wait), "wait_ms_mean": sum(wait) / world})
    print("\nOverlapped communication (CPU gloo ranks; median of "
          f"{args.iters}; ZeRO-1: one DDP training iteration of the demo model, buckets of "
          f"{args.overlap_bucket_elements:,} elements; FSDP2: one Muon step on the bench matrices)")
    print(f"{'W':>2} {'layout':<6} {'algo':<6} {'overlap':<13} {'ms (max rank)':>14} {'comm wait ms':>13} "
          f"{'wait / time':>11}")
    for t in table:
        print(f"{t['world']:>2} {t['layout']:<6} {t['algo']:<6} {t['overlap']:<13} {t['ms_max']:14.1f} "
              f"{t['wait_ms_max']:13.1f} {100 * t['wait_ms_max'] / t['ms_max']:10.1f}%")
    print("overlap: off = overlap_comm=False; on = default (async per-bucket all-gathers / chunked gather step); "
          "param_gather = overlap_param_gather=True with opt.attach(model). comm wait = time blocked in "
          "shardopt's collectives (sync calls and waits), max over ranks.")
    return table


# ---------------------------------------------------------------- entry points
def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark optimizer steps against torch/DeepSpeed peers",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--distributed", action="store_true", help="ZeRO-1 state bytes, step time and traffic on W CPU ranks")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hidden", type=int, default=None, help="default 512 on CPU, 1024 on CUDA")
    p.add_argument("--layers", type=int, default=None, help="default 6 on CPU, 12 on CUDA")
    p.add_argument("--vocab", type=int, default=None, help="default 8192 on CPU, 32000 on CUDA")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--muon-hidden", type=int, default=None,
                   help="hidden size of the Muon matrices (NS is O(n^3)); default 256 on CPU, 2048 on CUDA")
    p.add_argument("--muon-layers", type=int, default=None, help="default 4 on CPU, 6 on CUDA")
    p.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed peers (they JIT-build ~50 s each)")
    p.add_argument("--no-muon", action="store_true")
    p.add_argument("--ns-only", action="store_true",
                   help="only the Newton-Schulz choices: time and orthogonality error (singular value spread)")
    p.add_argument("--no-overlap", action="store_true", help="--distributed: skip the overlap on/off rows")
    p.add_argument("--overlap-bucket-elements", type=int, default=1 << 16,
                   help="--distributed overlap rows: ZeRO-1 bucket size in elements (default 65536, several "
                        "buckets for the demo model)")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--deepspeed", action="store_true",
                   help="with --distributed: shardopt.Muon vs DeepSpeed's own Muon at ZeRO-1/2/3, bytes and NS "
                        "per step and rank (W from --worlds, default 2 4)")
    p.add_argument("--ds-hidden", type=int, default=128, help="(--deepspeed) hidden size")
    p.add_argument("--ds-layers", type=int, default=2, help="(--deepspeed) blocks")
    return p


# CPU: ~20 M params, small NS matrices. CUDA: 184 M params (hidden 1024, 12 layers) and hidden-2048 Muon
# matrices in 6 layers (302 M): every contender holds its own parameters, gradients and state at once (they
# are timed round-robin), about 58 GiB and 18 GiB (cuda_bytes_needed), so the defaults fit an 80 GB GPU.
_DEFAULTS = {"cpu": dict(hidden=512, layers=6, vocab=8192, muon_hidden=256, muon_layers=4),
             "cuda": dict(hidden=1024, layers=12, vocab=32000, muon_hidden=2048, muon_layers=6)}
# bytes per parameter element held at once: the elementwise rows (parameters and gradients of each of 19
# contenders on CUDA with DeepSpeed's fused optimizers, 152, their state, about 110, and the temporaries of
# the foreach and reference rows: a CPU run of the same rows without DeepSpeed peaks at about 270 with four
# contenders fewer, tests/test_bench.py) and the Muon rows (5 contenders' parameters, gradients and
# momentum, 60, and Newton-Schulz work space)
_HELD_PER_ELEM = {"elementwise": 340, "muon": 64}


def cuda_bytes_needed(n_elementwise: int, n_muon: int) -> int:
    """About the most device memory ``shardopt bench --device cuda`` holds at once."""
    return max(n_elementwise * _HELD_PER_ELEM["elementwise"], n_muon * _HELD_PER_ELEM["muon"])


def run(args) -> int:
    for k, v in _DEFAULTS["cuda" if args.device == "cuda" and not args.distributed else "cpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.ns_only:
        rows = _ns_choice_rows(torch.device(args.device), args.iters, args.muon_hidden, args.muon_layers)
    elif args.distributed and args.deepspeed:
        rows = _run_deepspeed_budget(args)
    elif args.distributed:
        rows = _run_distributed(args)
        if not args.no_overlap:
            rows = {"zero1": rows, "overlap": _run_overlap(args)}
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("shardopt bench: --device cuda needs a CUDA GPU", file=sys.stderr)
            return 2
        shapes = transformer_shapes(args.hidden, args.layers, args.vocab)
        n = sum(torch.Size(s).numel() for s in shapes)
        if device.type == "cuda":
            n_muon = 0 if args.no_muon else sum(
                torch.Size(s).numel() for s in muon_shapes(args.muon_hidden, args.muon_layers))
            need, (free, _) = cuda_bytes_needed(n, n_muon), torch.cuda.mem_get_info()
            if need > free:
                print(f"shardopt bench: these sizes need about {need / 2**30:.0f} GiB of GPU memory and "
                      f"{free / 2**30:.0f} GiB are free: rows that do not fit are skipped (pass a smaller "
                      "--hidden/--layers or --muon-hidden/--muon-layers)", file=sys.stderr)
        print(f"one optimizer step, {n / 1e6:.1f} M fp32 params in {len(shapes)} tensors, device {device}, "
              f"{torch.get_num_threads()} threads", file=sys.stderr)
        roof = _roofline(n, device, args.iters)
        for r in roof:
            print(f"  {r['label']} {r['GB/s']:.1f} GB/s", file=sys.stderr)
        rows, _ = _elementwise_rows(shapes, device, args.iters, not args.no_deepspeed)
        if not args.no_muon:
            mrows, mshapes = _muon_rows(device, max(1, args.iters // 2), args.muon_hidden, args.muon_layers)
            rows += mrows
        targets = _print_table(rows, roof)
        if not args.no_muon:
            ns_rows = _ns_choice_rows(device, max(1, args.iters // 2), args.muon_hidden, args.muon_layers)
        rows = {"params": n, "tensors": len(shapes), "roofline_GBps": roof[0]["GB/s"], "roofline": roof,
                "rows": rows, "targets": targets}
        if not args.no_muon:
            rows["newton_schulz"] = ns_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0
