"""``shardopt demo``: the whole product on a laptop-class CPU, in about two minutes.

It trains a small character-level GPT on the text shipped in ``shardopt/data``
with 2 gloo ranks on CPU (on a machine with several GPUs: one rank per GPU,
NCCL), with Lion, AdamW and Muon one after another from the same seed and
data. It shows a progress bar, each optimizer's ``summary()`` table, and a
final table of per-rank optimizer-state bytes against unsharded, step time and
final loss; it draws ``loss.png`` and saves a world-size-agnostic checkpoint
that ``--resume PATH --nproc 1`` continues at another world size.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) it runs in place on the
launched ranks instead of spawning its own, and ends each rank's process with
``exit_distributed`` (status 0) once rank 0 has reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import tempfile
from pathlib import Path

from . import CommandError

OPTIMIZERS = ("lion", "adamw", "muon")
STATE_DTYPES = ("fp32", "bf16", "int8")  # the optimizers' state_dtype values the demo offers
# --compare-state-dtypes: the largest |mean difference| to fp32 state, in nats, each state dtype is held to
QUALITY_TARGETS = {"bf16": 0.01, "int8": 0.02}
LAYOUTS = ("zero1", "fsdp2", "deepspeed", "none")
DEFAULT_STEPS = 150
DEFAULT_RESUME_STEPS = 30
DEFAULT_OUT = "shardopt_demo_out"
META = "demo.json"
# A resumed run "continues without a jump" when the held-out loss right after
# loading matches the one measured at save time (the weights came back intact)
# and its first training losses sit no higher than the last ones before the save
# plus this margin (the optimizer state came back too: a fresh AdamW/Muon state
# at full lr makes the loss spike by more than this).
EVAL_RTOL = 1e-3
JUMP_MARGIN = 0.05


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="train a small GPT with Lion/AdamW/Muon on 2 CPU ranks, compare them, checkpoint and resume",
        description=(
            "Train a small GPT-style model on a text corpus shipped with shardopt, with sharded optimizer state. "
            "Runs 2 gloo ranks on CPU by default (one rank per GPU with NCCL when there are several GPUs). "
            "Prints per-rank optimizer-state bytes, step time and final loss, writes loss.png, saves a checkpoint, "
            "and with --resume PATH --nproc N continues that checkpoint at another world size."
        ),
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS + ("all",), default=None,
                   help="which optimizer to train (default: all three, one after another, same seed and data; "
                        "with --resume: every optimizer in the checkpoint)")
    p.add_argument("--layout", choices=LAYOUTS, default="zero1",
                   help="how the optimizer state is sharded: zero1 (default; the optimizer reduce-scatters the "
                        "gradients), fsdp2 (fully_shard over a device mesh), deepspeed (a DeepSpeed ZeRO-1 JSON "
                        "config naming shardopt's optimizer), none (DDP with replicated state, the baseline)")
    p.add_argument("--nproc", type=_positive_int, default=None,
                   help="number of ranks (default: one per GPU when there are 2 or more, else 2)")
    p.add_argument("--resume", metavar="PATH", default=None,
                   help="continue from a checkpoint directory written by an earlier demo "
                        "(e.g. shardopt_demo_out/checkpoint), at any --nproc")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (default: cuda if available, else cpu)")
    p.add_argument("--state-dtype", choices=STATE_DTYPES, default=None,
                   help="optimizer state precision for all three optimizers (state_dtype): fp32 (default), bf16 "
                        "(half the state bytes, stochastic rounding) or int8 (one byte per element and one fp32 "
                        "scale per 256 elements, for the matrices of at least 4096 elements whose rows are a "
                        "multiple of 256: those of --size wide; the default model's keep fp32 state); with "
                        "--resume: the checkpoint's")
    p.add_argument("--compare-state-dtypes", metavar="LIST", type=_state_dtype_list, default=None,
                   help="run the demo once per state dtype in LIST (e.g. fp32,bf16,int8; fp32 among them) from the "
                        "same seed, without checkpoints, and print a markdown table of each optimizer's final "
                        "held-out loss per state dtype and its difference to fp32 (with --seeds: per seed and the "
                        "mean), and the state bytes per rank")
    adv = p.add_argument_group("advanced")
    adv.add_argument("--steps", type=_positive_int, default=None,
                     help=f"training steps per optimizer (default {DEFAULT_STEPS}; {DEFAULT_RESUME_STEPS} when resuming)")
    adv.add_argument("--out", metavar="DIR", default=None,
                     help=f"output directory for loss.png, results.json and checkpoint/ (default ./{DEFAULT_OUT}; "
                          "with --resume: the directory holding the checkpoint)")
    adv.add_argument("--seed", type=int, default=None, help="seed for the model and the data stream (default 0)")
    adv.add_argument("--seeds", metavar="LIST", type=_seed_list, default=None,
                     help="with --compare-state-dtypes: the seeds to run each state dtype from, e.g. 0,1,2 "
                          "(default: --seed)")
    adv.add_argument("--backend", choices=("auto", "torch", "cpu", "triton"), default="auto",
                     help="optimizer kernel backend (default auto)")
    adv.add_argument("--no-checkpoint", action="store_true", help="do not save a checkpoint at the end")
    adv.add_argument("--size", choices=("default", "wide", "tiny"), default="default",
                     help="the model: default (d_model 96, 0.36M parameters), wide (d_model 256, 2.4M parameters, "
                          "int8 state in blocks of 256; several times slower) or tiny (for tests)")
    return p


def _state_dtype_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in STATE_DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected state dtypes from {', '.join(STATE_DTYPES)} separated by "
                                         f"commas, got {text!r}")
    if "fp32" not in names:
        raise argparse.ArgumentTypeError(f"the list needs fp32, the state the others are compared with, got {text!r}")
    return list(dict.fromkeys(["fp32"] + names))  # fp32 first, each once


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected seeds such as 0,1,2, got {text!r}")
    return list(dict.fromkeys(seeds))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# ---------------------------------------------------------------------------- planning
def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _resolve_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was given but torch sees no CUDA device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _read_meta(path: Path) -> dict:
    meta_file = path / META
    if not path.exists():
        raise CommandError(f"--resume {path}: no such directory")
    if not meta_file.is_file():
        hint = f"; did you mean {path.parent}?" if (path.parent / META).is_file() else ""
        raise CommandError(f"--resume {path}: not a demo checkpoint (no {META} in it){hint}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CommandError(f"--resume {path}: cannot read {meta_file}: {e}") from None
    from ._demo_model import SIZES

    if not (isinstance(meta, dict) and meta.get("optimizers") and set(meta["optimizers"]) <= set(OPTIMIZERS)
            and meta.get("size") in SIZES and isinstance(meta.get("seed"), int)):
        raise CommandError(f"--resume {path}: cannot read {meta_file}: it lacks the optimizers, size or seed")
    return meta


def _saved_run(path: Path, meta: dict, optimizers: list[str]) -> tuple[str, int]:
    """The model size and seed the chosen checkpoints were trained with; they must agree to resume together."""
    from ._demo_model import SIZES

    per = meta.get("checkpoints") or {}
    runs = {}
    for name in optimizers:
        e = per.get(name, {})
        size, seed = e.get("size", meta["size"]), e.get("seed", meta["seed"])
        if size not in SIZES or not isinstance(seed, int):
            raise CommandError(f"--resume {path}: cannot read {path / META}: it lacks the size or seed of {name}")
        runs.setdefault((size, seed), []).append(name)
    if len(runs) > 1:
        desc = "; ".join(f"{', '.join(names)}: seed {seed}, {size} model" for (size, seed), names in runs.items())
        raise CommandError(f"--resume {path}: its checkpoints come from different runs ({desc}); "
                           "resume them one at a time with --optimizer")
    return next(iter(runs))


def make_plan(args) -> dict:
    """Turn the parsed flags into the plan every rank follows; all user errors surface here."""
    import torch

    from ._demo_model import SIZES

    if getattr(args, "seeds", None) and not getattr(args, "compare_state_dtypes", None):
        raise CommandError("--seeds goes with --compare-state-dtypes; use --seed for one run")
    device = _resolve_device(args.device)
    ngpu = torch.cuda.device_count() if device == "cuda" else 0
    resume = Path(args.resume) if args.resume else None
    meta = _read_meta(resume) if resume else None

    if meta:
        saved = meta["optimizers"]
        if args.optimizer in (None, "all"):
            optimizers = list(saved)
        elif args.optimizer in saved:
            optimizers = [args.optimizer]
        else:
            raise CommandError(f"--resume {resume}: it holds {', '.join(saved)}, not {args.optimizer}")
        size, seed = _saved_run(resume, meta, optimizers)
        if args.seed is not None and args.seed != seed:
            raise CommandError(f"--seed {args.seed} differs from the checkpoint's seed {seed}; leave it out")
        saved_sd = {(meta.get("checkpoints") or {}).get(n, {}).get("state_dtype", "fp32") for n in optimizers}
        # the checkpoint's state precision unless asked otherwise (a load converts: bf16 <-> fp32 state)
        state_dtype = args.state_dtype or (saved_sd.pop() if len(saved_sd) == 1 else "fp32")
    else:
        optimizers = list(OPTIMIZERS) if args.optimizer in (None, "all") else [args.optimizer]
        size, seed = args.size, (0 if args.seed is None else args.seed)
        state_dtype = args.state_dtype or "fp32"

    if _under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.nproc is not None and args.nproc != world:
            raise CommandError(f"--nproc {args.nproc} disagrees with torchrun's WORLD_SIZE={world}; leave --nproc out")
    else:
        world = args.nproc or (ngpu if ngpu >= 2 else 2)
    cfg = SIZES[size]
    if cfg.global_batch % world:
        raise CommandError(
            f"--nproc {world}: the demo's global batch of {cfg.global_batch} sequences must split evenly across ranks; "
            f"use a divisor of {cfg.global_batch}"
        )
    if args.layout == "deepspeed":
        _check_deepspeed()

    # NCCL needs a GPU per rank; more ranks than GPUs share them over gloo.
    dist_backend = "nccl" if device == "cuda" and world <= ngpu else "gloo"
    # the cores this process may use (a container's share, not the host's count)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out = Path(args.out) if args.out else (resume.parent if resume else Path(DEFAULT_OUT))
    steps = args.steps or (DEFAULT_RESUME_STEPS if resume else DEFAULT_STEPS)
    return {
        "optimizers": optimizers,
        "layout": args.layout,
        "world": world,
        "device": device,
        "dist_backend": dist_backend,
        "backend": args.backend,
        "state_dtype": state_dtype,
        "size": size,
        "seed": seed,
        "steps": steps,
        "out": str(out),
        "checkpoint_dir": None if args.no_checkpoint else str(out / "checkpoint"),
        "checkpoint_skipped": None,
        "resume_dir": str(resume) if resume else None,
        "resume_meta": meta,
        "threads_per_rank": max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world))) if device == "cpu" else None,
    }


def _check_deepspeed():
    try:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise CommandError("--layout deepspeed needs DeepSpeed: pip install deepspeed")
        if importlib.util.find_spec("shardopt.deepspeed") is None:
            raise CommandError("--layout deepspeed needs shardopt.deepspeed, which this install does not have")
    except (ImportError, ValueError) as e:
        raise CommandError(f"--layout deepspeed: {e}") from None


# ---------------------------------------------------------------------------- running
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prebuild_kernels(plan: dict):
    """Build the C++ CPU kernels once here, before any rank starts (and any progress bar), and say so."""
    from ._demo_worker import _uses_cpu_kernels, prepare_kernels

    if _uses_cpu_kernels(plan):
        if not prepare_kernels(plan):
            plan["backend"] = "torch"
        plan["kernels_announced"] = True


def _quiet_deepspeed(plan: dict):
    """Name DeepSpeed's accelerator before anything imports it: it warns when it has to guess."""
    if plan["layout"] == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if plan["device"] == "cpu" else "cuda")


def _spawn(plan: dict):
    import torch.multiprocessing as mp

    from ._demo_worker import spawn_main

    world = plan["world"]
    with tempfile.TemporaryDirectory(prefix="shardopt-demo-") as tmp:
        result_file = os.path.join(tmp, "results.pt")
        try:
            mp.start_processes(spawn_main, args=(world, _free_port(), plan, result_file), nprocs=world,
                               join=True, start_method="spawn")
        except Exception as e:  # noqa: BLE001 - turned into one line below
            # rank 0 reports only after the final barrier, so its results mean every rank finished
            # training; a crash after that (in process teardown) loses nothing
            if not os.path.exists(result_file):
                _raise_rank_failure(tmp, result_file, world, plan, e)
        import torch

        return torch.load(result_file, weights_only=False)["ok"]


def _raise_rank_failure(tmp, result_file, world, plan, exc):
    import torch

    failures = []
    for r in range(world):
        f = f"{result_file}.rank{r}"
        if os.path.exists(f):
            failures.append((r, torch.load(f, weights_only=False)))
    if not failures:
        raise CommandError(f"a rank exited without reporting an error: {exc}") from None
    # the first rank to fail is usually the cause; the others time out or see a broken connection
    r, info = failures[0]
    log = Path(plan["out"]) / "demo_error.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(f"--- rank {rr} ---\n{i['traceback']}\n" for rr, i in failures))
        where = f" (tracebacks in {log})"
    except OSError:
        where = ""
    raise CommandError(f"rank {r} failed: {info['error']}{where}") from None


def run(args) -> int:
    if args.compare_state_dtypes:
        return compare(args)
    plan = make_plan(args)
    _quiet_deepspeed(plan)
    if _under_torchrun():
        from ..sharding.comm import exit_distributed
        from ._demo_worker import run_rank

        if int(os.environ["RANK"]) == 0:
            _announce(plan)
        results = run_rank(plan)
        if int(os.environ["RANK"]) == 0:
            report(plan, results)
        # torchrun's ranks end here, without interpreter finalisation (exit_distributed's docstring)
        exit_distributed(0)
    else:
        _announce(plan)
        _prebuild_kernels(plan)
        results = _spawn(plan)
    report(plan, results)
    return 0


def layout_label(plan: dict) -> str:
    """The layout that will run: ZeRO-1 on one rank has nothing to shard, so the optimizers run 'none'."""
    if plan["layout"] == "zero1" and plan["world"] == 1:
        return "none (zero1 needs 2 or more ranks)"
    return plan["layout"]


def _ranks(n) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _announce(plan: dict):
    from ._demo_model import SIZES, TinyGPT, num_params

    cfg = SIZES[plan["size"]]
    what = "resuming " + ", ".join(plan["optimizers"]) if plan["resume_dir"] else ", ".join(plan["optimizers"])
    ranks = f"{_ranks(plan['world'])} ({plan['dist_backend']}) on {plan['device']}"
    import torch

    with torch.device("meta"):
        n = num_params(TinyGPT(cfg))
    sd = plan.get("state_dtype", "fp32")
    print(f"shardopt demo: {what} | {layout_label(plan)} | {ranks} | {n / 1e6:.2f}M-param GPT, "
          f"{plan['steps']} steps of {cfg.global_batch}x{cfg.seq_len} tokens | {sd} optimizer state"
          + (f" ({int8_coverage(plan)})" if sd == "int8" else ""), flush=True)


def _int8_shapes(size: str) -> list:
    """The shapes of the ``size`` model's parameters that take int8 state (in ZeRO-1, FSDP2 or on one rank)."""
    from ..kernels import state_precision
    from ._demo_model import SIZES, TinyGPT
    import torch

    with torch.device("meta"):
        return [tuple(p.shape) for p in TinyGPT(SIZES[size]).parameters() if state_precision.int8_eligible(p.shape)]


def int8_coverage(plan: dict) -> str:
    """Which of the model's parameters take int8 state, in words (DeepSpeed: its flat partitions)."""
    from ..kernels import state_precision
    from ._demo_model import SIZES, TinyGPT

    if plan["layout"] == "deepspeed":
        return "int8 blocks of DeepSpeed's flat partitions"
    import torch

    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in TinyGPT(SIZES[plan["size"]]).parameters()]
    ok = [s for s in shapes if state_precision.int8_eligible(s)]
    if not ok:
        return (f"none of the model's {len(shapes)} tensors takes int8, so the state stays fp32: a matrix needs "
                f"{state_precision.INT8_MIN_NUMEL} elements and rows that a block of {state_precision.MIN_BLOCK} to "
                f"{state_precision.BLOCK} divides")
    n_ok, n = sum(math.prod(s) for s in ok), sum(math.prod(s) for s in shapes)
    return f"int8 for {len(ok)} of {len(shapes)} tensors, {n_ok / n:.1%} of the elements; the others fp32"


# ---------------------------------------------------------------------------- reporting
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def results_table(results: list[dict]) -> list[str]:
    """One row per (optimizer, rank): state bytes against unsharded, step time, final loss."""
    head = (f"{'optimizer':<9} {'layout':<16} {'rank':>4} {'state bytes':>12} {'unsharded':>11} {'share':>6} "
            f"{'step ms':>8} {'final loss':>10} {'state':>5}")
    lines = [head, "-" * len(head)]
    for res in results:
        full = res["unsharded_state_bytes"]
        for r, b in enumerate(res["state_bytes"]):
            if r == 0:
                name, layout = res["optimizer"], res["layout"]
                ms, loss = f"{res['step_time_s'] * 1e3:.1f}", f"{statistics.fmean(res['losses'][-10:]):.3f}"
                sd = res.get("state_dtype", "fp32")
            else:
                name = layout = ms = loss = sd = ""
            share = f"{b / full:.0%}" if full else "-"
            lines.append(f"{name:<9} {layout:<16} {r:>4} {_fmt_bytes(b):>12} {_fmt_bytes(full):>11} {share:>6} "
                         f"{ms:>8} {loss:>10} {sd:>5}".rstrip())
    lines.append("state bytes: optimizer state this rank holds (its real bytes: bf16 state is half of fp32, int8 "
                 "state a byte per element and a 4-byte scale per 256 where a matrix takes it); unsharded: what "
                 "each rank would hold without sharding; final loss: mean of the last 10 steps; state: the state "
                 "dtype")
    return lines


def continuity(res: dict) -> dict:
    """Whether a resumed run picked up where the saved one stopped (see EVAL_RTOL / JUMP_MARGIN)."""
    rz = res["resumed"]
    before = [l for s, l in zip(res["history"]["step"], res["history"]["loss"]) if s <= rz["from_step"]][-10:]
    after = res["losses"][:5]
    ev0, ev1 = rz.get("eval_at_save"), rz.get("eval_after_load")
    weights_ok = ev0 is not None and ev1 is not None and abs(ev1 - ev0) <= EVAL_RTOL * abs(ev0)
    b, a = (statistics.fmean(before) if before else float("nan")), statistics.fmean(after)
    loss_ok = bool(before) and a <= b + JUMP_MARGIN
    return {"before": b, "after": a, "eval_at_save": ev0, "eval_after_load": ev1,
            "weights_ok": weights_ok, "loss_ok": loss_ok, "ok": weights_ok and loss_ok}


def plot(results: list[dict], path: Path) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("loss.png skipped: matplotlib is not installed (pip install matplotlib)", flush=True)
        return False
    fig = Figure(figsize=(8, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"lion": "tab:orange", "adamw": "tab:blue", "muon": "tab:green"}
    for res in results:
        c = colors.get(res["optimizer"], None)
        rz = res["resumed"]
        if rz:
            hs = [(s, l) for s, l in zip(res["history"]["step"], res["history"]["loss"]) if s <= rz["from_step"]]
            if hs:
                ax.plot(*zip(*hs), color=c, lw=1.2,
                        label=f"{res['optimizer']} ({_ranks(rz.get('saved_world_size', '?'))}, {rz.get('saved_layout', '?')})")
            ax.plot(res["steps"], res["losses"], color=c, lw=1.2, ls="--",
                    label=f"{res['optimizer']} resumed ({_ranks(res['world_size'])}, {res['layout']})")
            ax.axvline(rz["from_step"], color="grey", lw=0.8, ls=":")
        else:
            ax.plot(res["steps"], res["losses"], color=c, lw=1.2,
                    label=f"{res['optimizer']} ({_ranks(res['world_size'])}, {res['layout']})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/char)")
    ax.set_title("shardopt demo: small GPT on the bundled corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def folder_meta(ckpt: Path, plan: dict) -> dict:
    """``demo.json``, rebuilt from the checkpoints in the folder: each one's own metadata (its ``extra``).

    A run of one optimizer leaves the others' checkpoints from earlier runs in place; they keep describing
    themselves (their step, layout, world size, model size and seed), whatever this run was.
    """
    from ..checkpoint import offline
    from ..checkpoint.errors import CheckpointError

    old_file = ckpt / META
    try:
        old = json.loads(old_file.read_text()) if old_file.is_file() else {}
    except (OSError, ValueError):
        old = {}
    entries = {}
    for name in OPTIMIZERS:
        d = ckpt / name
        if not (d / "shardopt.json").is_file():
            continue
        try:
            extra = offline.read_extra(str(d)) or {}
        except CheckpointError:
            continue  # damaged: not offered for --resume (`shardopt ckpt verify` says what is wrong)
        entries[name] = {
            "step": extra.get("step"), "layout": extra.get("layout"), "world_size": extra.get("world_size"),
            # checkpoints of older demos lack these; their demo.json had them for the whole folder
            "size": extra.get("size", old.get("size", plan["size"])),
            "state_dtype": extra.get("state_dtype", "fp32"),
            "seed": extra.get("seed", old.get("seed", plan["seed"])),
        }
    return {"version": 2, "optimizers": list(entries), "size": plan["size"], "seed": plan["seed"],
            "step": {n: e["step"] for n, e in entries.items()}, "checkpoints": entries}


def report(plan: dict, results: list[dict]):
    out = Path(plan["out"])
    out.mkdir(parents=True, exist_ok=True)
    print()
    for line in results_table(results):
        print(line)
    checks = {}
    for res in results:
        if res["resumed"]:
            c = continuity(res)
            checks[res["optimizer"]] = c
            rz = res["resumed"]
            verdict = "continues without a jump" if c["ok"] else "JUMPED: the state did not come back intact"
            print(f"{res['optimizer']}: resumed at step {rz['from_step']} "
                  f"(saved by {_ranks(rz.get('saved_world_size', '?'))}, {rz.get('saved_layout', '?')}; now "
                  f"{_ranks(res['world_size'])}, {res['layout']}): "
                  f"held-out loss {c['eval_at_save']:.4f} at save, {c['eval_after_load']:.4f} after load; "
                  f"training loss {c['before']:.3f} before -> {c['after']:.3f} after: {verdict}", flush=True)
    png = out / "loss.png"
    if plot(results, png):
        print(f"loss curves: {png}")
    summary = {"plan": {k: v for k, v in plan.items() if k != "resume_meta"}, "results": results, "continuity": checks}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    ckpt = plan.get("checkpoint_dir")
    if plan.get("checkpoint_skipped"):
        print(f"checkpoint: not saved: {plan['checkpoint_skipped']}")
    if ckpt:
        meta = folder_meta(Path(ckpt), plan)
        (Path(ckpt) / META).write_text(json.dumps(meta, indent=1))
        other = 1 if plan["world"] != 1 else 2
        print(f"checkpoint: {ckpt}, one checkpoint per optimizer ({', '.join(meta['optimizers'])})")
        print(f"  look inside:  shardopt ckpt inspect {ckpt}")
        print(f"  check it:     shardopt ckpt verify {ckpt}")
        print(f"  continue it at another world size:  shardopt demo --resume {ckpt} --nproc {other}")
    if checks and not all(c["ok"] for c in checks.values()):
        raise CommandError("the resumed loss curve did not continue from the checkpoint (see above)")


# ---------------------------------------------------------------------------- --compare-state-dtypes
NAMES = {"lion": "Lion", "adamw": "AdamW", "muon": "Muon"}


def compare(args) -> int:
    """``--compare-state-dtypes``: one demo per (seed, state dtype), then the held-out loss table."""
    dtypes = args.compare_state_dtypes
    if args.resume:
        raise CommandError("--compare-state-dtypes trains from scratch; it does not take --resume")
    if args.state_dtype:
        raise CommandError("--compare-state-dtypes sets the state dtype of each run; leave --state-dtype out")
    if args.seeds and args.seed is not None:
        raise CommandError("--seed and --seeds: give one of them")
    if _under_torchrun():
        raise CommandError("--compare-state-dtypes spawns its own ranks, one run after another; "
                           "run it without torchrun")
    seeds = args.seeds or [0 if args.seed is None else args.seed]
    out = Path(args.out) if args.out else Path(DEFAULT_OUT)
    runs, plan, kernels = {}, None, None
    for seed in seeds:
        for sd in dtypes:
            one = argparse.Namespace(**{**vars(args), "state_dtype": sd, "seed": seed, "seeds": None,
                                        "compare_state_dtypes": None, "no_checkpoint": True, "resume": None,
                                        "out": str(out / "compare" / f"seed{seed}-{sd}")})
            plan = make_plan(one)
            plan["quiet"] = True  # no summary() tables: the comparison at the end says it all
            _quiet_deepspeed(plan)
            _announce(plan)
            if kernels is None:
                _prebuild_kernels(plan)
                kernels = plan["backend"], plan.get("kernels_announced", False)
            plan["backend"], plan["kernels_announced"] = kernels[0], kernels[1] or plan.get("kernels_announced", False)
            results = _spawn(plan)
            runs[(seed, sd)] = results
            for r in results:
                print(f"  {r['optimizer']} {sd} seed {seed}: held-out loss {r['eval_loss']:.4f}, state "
                      f"{_fmt_bytes(max(r['state_bytes']))} per rank", flush=True)
    lines = compare_table(runs, dtypes, seeds, plan)
    print()
    for line in lines:
        print(line)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.json"
    path.write_text(json.dumps({
        "plan": {k: v for k, v in plan.items() if k not in ("resume_meta", "state_dtype", "seed", "out")},
        "state_dtypes": dtypes, "seeds": seeds, "table": lines,
        "runs": [{"seed": seed, "state_dtype": sd, "results": res} for (seed, sd), res in runs.items()],
    }, indent=1))
    print(f"\nruns: {path}")
    return 0


def _diff(d: float) -> str:
    return f"{round(d, 4) + 0.0:+.4f}"  # + 0.0: no "-0.0000"


def compare_table(runs: dict, dtypes: list[str], seeds: list[int], plan: dict) -> list[str]:
    """Markdown: final held-out loss per optimizer, seed and state dtype, the difference to fp32 and (with
    several seeds) the means; then the state bytes per rank and the quality targets."""
    from ._demo_model import SIZES, TinyGPT, num_params

    import torch

    with torch.device("meta"):
        n = num_params(TinyGPT(SIZES[plan["size"]]))
    others = [d for d in dtypes if d != "fp32"]
    opts = [r["optimizer"] for r in runs[(seeds[0], "fp32")]]
    loss = {(seed, sd, r["optimizer"]): r["eval_loss"] for (seed, sd), res in runs.items() for r in res}
    size = f"{plan['size']} model" if plan["size"] != "default" else "the demo model"
    lines = [f"Final held-out loss (nats/char), {size} ({n / 1e6:.2f}M parameters), {plan['steps']} steps, "
             f"{layout_label(plan)} on {_ranks(plan['world'])}, seed{'s' if len(seeds) > 1 else ''} "
             f"{', '.join(map(str, seeds))}:", ""]
    head = ["optimizer"] + (["seed"] if len(seeds) > 1 else []) + ["fp32 state"]
    for d in others:
        head += [f"{d} state", f"{d} - fp32"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means = {}
    for o in opts:
        for seed in seeds + (["mean"] if len(seeds) > 1 else []):
            if seed == "mean":
                vals = {d: statistics.fmean(loss[(s, d, o)] for s in seeds) for d in dtypes}
            else:
                vals = {d: loss[(seed, d, o)] for d in dtypes}
            cells = [NAMES.get(o, o)] + ([str(seed)] if len(seeds) > 1 else []) + [f"{vals['fp32']:.4f}"]
            for d in others:
                cells += [f"{vals[d]:.4f}", _diff(vals[d] - vals["fp32"])]
            lines.append("| " + " | ".join(cells) + " |")
            means[o] = vals
    # state bytes per rank (the largest rank), as each run's optimizers held them
    lines += ["", "Optimizer state per rank (the largest rank; real bytes):", "",
              "| optimizer | " + " | ".join(f"{d} state" for d in dtypes) + " |", "|" + "---|" * (len(dtypes) + 1)]
    for o in opts:
        res = {d: next(r for r in runs[(seeds[0], d)] if r["optimizer"] == o) for d in dtypes}
        lines.append(f"| {NAMES.get(o, o)} | " + " | ".join(_fmt_bytes(max(res[d]["state_bytes"])) for d in dtypes)
                     + " |")
    lines.append("")
    what = "the mean over the seeds" if len(seeds) > 1 else "one seed"
    for d in others:
        target = QUALITY_TARGETS.get(d)
        if target is None:
            continue
        diffs = {o: means[o][d] - means[o]["fp32"] for o in opts}
        met = [NAMES.get(o, o) for o in opts if abs(diffs[o]) <= target]
        # five decimals: a difference that the table rounds to the target itself shows which side it is on
        missed = [f"{NAMES.get(o, o)} ({round(diffs[o], 5) + 0.0:+.5f})" for o in opts if abs(diffs[o]) > target]
        verdict = (f"met for {', '.join(met)}" if met else "") + ("; " if met and missed else "") + \
                  (f"NOT met for {', '.join(missed)}" if missed else "")
        lines.append(f"target |{d} - fp32| <= {target} nats ({what}): {verdict}")
    if any(d in QUALITY_TARGETS for d in others):
        lines.append("(a negative difference is a lower held-out loss than with fp32 state)")
    if "int8" in others and not any(r.get("int8_tensors") for (_, sd), res in runs.items() if sd == "int8"
                                    for r in res):
        lines.append("int8: no parameter of this model took int8 state (a matrix needs 4096 elements and rows "
                     "that a block of 64 to 256 divides), so the int8 runs kept fp32 state")
    return lines
