"""What one rank of ``shardopt demo`` does: train each requested optimizer, report, checkpoint.

:func:`worker` runs inside a process group that is already initialised (by
:func:`spawn_main` for spawned ranks, or by torchrun). It composes the public
pieces only: ``shardopt.Lion/AdamW/Muon``, ``muon_param_groups``, FSDP2's
``fully_shard``, ``shardopt.deepspeed`` and ``shardopt.checkpoint``. Rank 0
returns one result dict per optimizer; the other ranks return ``None``.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import math
import os
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist

from ..sharding.comm import exit_distributed
from ._demo_model import SIZES, Corpus, ModelConfig, build_model

# Hyperparameters per optimizer. Lion takes a 5x smaller lr and a 5x larger
# weight decay than AdamW (lr * wd, the per-step decay, stays close); Muon's
# matrices use the "original" lr scaling with its usual lr of 0.02, while its
# auxiliary AdamW group (embeddings, head, norms) reuses AdamW's settings.
HPARAMS = {
    "adamw": dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "lion": dict(lr=6e-4, betas=(0.9, 0.99), weight_decay=0.5),
    "muon": dict(lr=0.02, momentum=0.95, weight_decay=0.01, adjust_lr_fn="original",
                 aux=dict(aux_lr=3e-3, aux_betas=(0.9, 0.95), aux_weight_decay=0.1)),
}
WARMUP_STEPS = 20


def lr_factor(step: int) -> float:
    """Linear warmup, then constant: a pure function of the global step, so a resume needs no scheduler state."""
    return min(1.0, (step + 1) / WARMUP_STEPS)


# ---------------------------------------------------------------------------- process setup
def spawn_main(rank: int, world: int, port: int, plan: dict, result_file: str) -> None:
    """Entry point of a spawned rank: set up the process group, run, hand rank 0's results back."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        results = run_rank(plan)
        if rank == 0:
            torch.save({"ok": results}, result_file)
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line + a log
        torch.save({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()},
                   f"{result_file}.rank{rank}")
        raise SystemExit(1)
    # run_rank left the process group at its final barrier; end without interpreter finalisation,
    # where a gloo thread can abort the process (exit_distributed's docstring)
    exit_distributed(0)


def run_rank(plan: dict):
    """Initialise the process group from the environment (spawn or torchrun) and train."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _device(plan["device"], local_rank)
    threads = plan.get("threads_per_rank")
    if threads:
        torch.set_num_threads(threads)
    if plan["layout"] == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
    initialised_here = False
    if not dist.is_initialized():
        backend = plan["dist_backend"]
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=plan.get("timeout_s", 300)), **kw)
        initialised_here = True
    # deprecation chatter from inside torch/DeepSpeed would bury the demo's own output
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return worker(rank, world, device, plan)
    finally:
        if initialised_here:
            try:
                dist.barrier()
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a failed rank must not hide the real error
                pass


def _device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda":
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


# ---------------------------------------------------------------------------- progress
class _Progress:
    """tqdm when available, else a line every 10% of the run; only rank 0 draws."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0):
        self.bar, self.total, self.desc, self.enabled = None, total, desc, enabled
        self.n, self.next_print = 0, max(1, total // 10)
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            print(f"{desc}: {total} steps (pip install tqdm for a progress bar)", flush=True)
            return
        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5,
                        file=sys.stdout, leave=True)

    def update(self, loss: float):
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            self.bar.update(1)
        elif self.n >= self.next_print or self.n == self.total:
            print(f"{self.desc}: step {self.n}/{self.total} loss {loss:.3f}", flush=True)
            self.next_print += max(1, self.total // 10)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- layouts
class Trainer:
    """One model + one optimizer in one layout, behind ``train_step`` / ``evaluate``."""

    def __init__(self, name: str, cfg: ModelConfig, plan: dict, device: torch.device, world: int):
        import shardopt

        self.name, self.cfg, self.device, self.world = name, cfg, device, world
        self.layout_arg = plan["layout"]
        self.model = build_model(cfg, plan["seed"]).to(device)  # same weights on every rank
        self.engine = None
        self.forward_module = self.model
        hp = dict(HPARAMS[name])
        common = dict(backend=plan.get("backend", "auto"), state_dtype=plan.get("state_dtype", "fp32"))
        layout = self.layout_arg

        if layout == "deepspeed":
            self._setup_deepspeed(name, hp, plan)
            return
        if layout == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world,))
            for blk in self.model.blocks:
                fully_shard(blk, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            common["sharding"] = "fsdp2"
        elif layout == "zero1":
            # No DDP: the optimizer reduce-scatters the gradients into the shards it owns.
            common.update(sharding="auto", reduce_gradients=world > 1)
        elif layout == "none":
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.forward_module = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            common["sharding"] = "none"
        else:  # pragma: no cover - the CLI validates choices
            raise ValueError(f"unknown layout {layout!r}")

        if name == "muon":
            aux = hp.pop("aux")
            groups = shardopt.muon_param_groups(self.model, **aux)
            self.opt = shardopt.Muon(groups, **hp, **common)
        else:
            cls = shardopt.AdamW if name == "adamw" else shardopt.Lion
            self.opt = cls(self.model.parameters(), **hp, **common)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]

    def _setup_deepspeed(self, name, hp, plan):
        try:
            import deepspeed
        except ImportError as e:
            raise RuntimeError(f"--layout deepspeed needs DeepSpeed: pip install deepspeed ({e})") from None
        try:
            import shardopt.deepspeed  # noqa: F401 - registers the "shardopt.*" optimizer types
        except ImportError as e:
            raise RuntimeError(f"--layout deepspeed needs shardopt.deepspeed, which is not available here ({e})") from None
        if name == "muon":
            # shardopt.deepspeed builds the Muon/aux groups itself (muon_param_groups) from these keys
            hp.update(hp.pop("aux"))
        opt_params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()}
        opt_params["backend"] = plan.get("backend", "auto")
        opt_params["state_dtype"] = plan.get("state_dtype", "fp32")
        config = {
            "train_micro_batch_size_per_gpu": self.cfg.global_batch // self.world,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 1},
            "optimizer": {"type": f"shardopt.{ {'adamw': 'AdamW', 'lion': 'Lion', 'muon': 'Muon'}[name] }",
                          "params": opt_params},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed prints some notices on every rank ("... built successfully"): keep rank 0's
        quiet = contextlib.redirect_stdout(io.StringIO()) if dist.get_rank() != 0 else contextlib.nullcontext()
        with quiet:
            engine, optimizer, _, _ = deepspeed.initialize(model=self.model, model_parameters=self.model.parameters(),
                                                           config=config)
        self.engine, self.forward_module = engine, engine
        self.opt = optimizer
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]

    # -- reporting ------------------------------------------------------
    @property
    def shard_opt(self):
        """The shardopt optimizer inside whatever wraps it (DeepSpeed keeps it as ``.optimizer``)."""
        import shardopt

        o = self.opt
        for _ in range(4):
            if isinstance(o, shardopt.ShardedOptimizer):
                return o
            o = getattr(o, "optimizer", None)
        return None

    def layout_name(self) -> str:
        so = self.shard_opt
        inner = so.layout.name if so is not None else "?"
        if self.engine is None:
            return inner
        # e.g. "ds-zero1": DeepSpeed partitions (Muon too, on shardopt's flat-partition layout);
        # "ds-zero0+zero1": stage 0 with shardopt's own sharding
        label = f"ds-zero{self.engine.zero_optimization_stage()}"
        return label if inner == "none" or inner.startswith("deepspeed") else f"{label}+{inner}"

    # -- training -------------------------------------------------------
    def set_lr(self, step: int):
        f = lr_factor(step)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * f

    def train_step(self, x, y) -> torch.Tensor:
        if self.engine is not None:
            loss = self.engine(x, y)
            self.engine.backward(loss)
            self.engine.step()
            return loss.detach()
        loss = self.forward_module(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, batch) -> float:
        """Loss on the fixed held-out batch; every rank runs it (FSDP2 forwards are collective)."""
        x, y = (t.to(self.device) for t in batch)
        loss = float(self.forward_module(x, y))
        if self.layout_arg == "fsdp2":
            # FSDP2 keeps the root's parameters unsharded after a forward that no backward
            # follows; put the sharded DTensors (the ones the optimizer holds) back
            self.model.reshard()
        return loss

    # -- checkpoints ----------------------------------------------------
    def save(self, path: str, extra: dict):
        from shardopt import checkpoint

        # a DeepSpeed engine goes in as the model; the checkpoint finds its optimizer
        if self.engine is not None:
            checkpoint.save(path, self.engine, extra=extra)
        else:
            checkpoint.save(path, self.model, self.opt, extra=extra)

    def load(self, path: str) -> dict:
        from shardopt import checkpoint

        if self.engine is not None:
            return checkpoint.load(path, self.engine) or {}
        return checkpoint.load(path, self.model, self.opt) or {}


# ---------------------------------------------------------------------------- the run
def int8_tensors(opt) -> int:
    """How many of this rank's parameters hold int8 state (codes and block scales)."""
    from ..kernels.state_precision import SCALE_SUFFIX

    return sum(1 for st in opt.state.values() if any(k.endswith(SCALE_SUFFIX) for k in st))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _uses_cpu_kernels(plan: dict) -> bool:
    return plan["device"] == "cpu" and plan.get("backend", "auto") in ("auto", "cpu")


def prepare_kernels(plan: dict, say=print) -> bool:
    """Build (or load) the C++ CPU kernels now, before any progress bar, with one line of their own.

    Returns whether they are available. The kernels' own build notice is folded into this line.
    """
    import contextlib
    import io

    from ..kernels import cpu

    building = cpu.needs_build()
    if building:
        say("C++ CPU kernels: building them (first run only; about a minute on 2 cores) ...", end=" ", flush=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        ok = cpu.available()
    dt = time.perf_counter() - t0
    if not ok:
        why = f"unavailable ({cpu.build_error()}); the optimizers use the slower torch backend"
        say(why if building else f"C++ CPU kernels: {why}", flush=True)
    elif building:
        say(f"built in {dt:.0f} s and cached for the next runs", flush=True)
    else:
        say("C++ CPU kernels: ready (built on an earlier run)", flush=True)
    return ok


def _kernels_ready(plan: dict, rank: int, world: int) -> dict:
    """Every rank has its kernels loaded before training starts; rank 0 says so unless the parent did."""
    if not _uses_cpu_kernels(plan):
        return plan
    from ..kernels import cpu

    if not plan.get("kernels_announced"):
        if rank == 0:
            prepare_kernels(plan)
        if world > 1:
            dist.barrier()  # the others load what rank 0 built
    if not cpu.available():
        plan = dict(plan, backend="torch")  # said once above; no per-rank fallback warnings
    return plan


def worker(rank: int, world: int, device: torch.device, plan: dict):
    plan = _kernels_ready(plan, rank, world)
    cfg = SIZES[plan["size"]]
    corpus = Corpus(cfg, plan["seed"])
    heldout = corpus.heldout()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    results = []
    for name in plan["optimizers"]:
        tr = Trainer(name, cfg, plan, device, world)
        start, history, resumed = 0, {"step": [], "loss": []}, None
        ckpt_dir = os.path.join(plan["checkpoint_dir"], name) if plan.get("checkpoint_dir") else None
        if plan.get("resume_dir"):
            src = os.path.join(plan["resume_dir"], name)
            extra = tr.load(src)
            start = int(extra.get("step", 0))
            history = extra.get("history", history)
            resumed = {
                "from_step": start,
                "saved_world_size": extra.get("world_size"),
                "saved_layout": extra.get("layout"),
                "eval_at_save": extra.get("eval_loss"),
                "eval_after_load": tr.evaluate(heldout),
            }
        steps = plan["steps"]
        bar = _Progress(steps, f"{name:<5} {tr.layout_name()} x{world}", rank == 0)
        losses, times = [], []
        loss_sum = torch.zeros((), device=device)
        for step in range(start, start + steps):
            x, y = (t.to(device) for t in corpus.batch(step, rank, world))
            tr.set_lr(step)
            _sync(device)
            t0 = time.perf_counter()
            loss = tr.train_step(x, y)
            _sync(device)
            times.append(time.perf_counter() - t0)
            # the global-batch loss: the mean over ranks (equal per-rank batch sizes)
            loss_sum.copy_(loss)
            if world > 1:
                dist.all_reduce(loss_sum)
            value = float(loss_sum) / world
            if not math.isfinite(value):
                raise FloatingPointError(f"{name}: the loss became {value} at step {step}")
            losses.append(value)
            bar.update(value)
        bar.close()
        eval_end = tr.evaluate(heldout)
        rows = tr.shard_opt.summary(print_fn=None if plan.get("quiet") else say)
        history = {"step": list(history["step"]) + list(range(start + 1, start + steps + 1)),
                   "loss": list(history["loss"]) + losses}
        saved = None
        if ckpt_dir:
            # each checkpoint describes itself; the folder's demo.json is rebuilt from these
            extra = {"step": start + steps, "history": history, "world_size": world,
                     "layout": tr.layout_name(), "eval_loss": eval_end, "optimizer": name,
                     "size": plan["size"], "seed": plan["seed"], "state_dtype": plan.get("state_dtype", "fp32")}
            tr.save(ckpt_dir, extra)
            saved = ckpt_dir
        warm = times[2:] if len(times) > 4 else times
        results.append({
            "optimizer": name,
            "layout": tr.layout_name(),
            "world_size": world,
            "steps": list(range(start + 1, start + steps + 1)),
            "losses": losses,
            "history": history,
            "step_time_s": sum(warm) / len(warm),
            "state_dtype": plan.get("state_dtype", "fp32"),
            "state_bytes": [r["state_bytes"] for r in rows],
            "owned_elements": [r["owned_elements"] for r in rows],
            "unsharded_state_bytes": rows[0]["unsharded_state_bytes"],
            "int8_tensors": int8_tensors(tr.shard_opt),
            "eval_loss": eval_end,
            "resumed": resumed,
            "checkpoint": saved,
        })
        del tr
    return results if rank == 0 else None
