"""DeepSpeed integration (issue 5): shardopt optimizers named in a DeepSpeed JSON config.

One spawned 2-rank gloo job (the ``ds_run`` fixture) builds a DeepSpeed engine
for every row of ``CASES`` and every checkpoint case, trains it, and returns the
full parameters and what the engine chose. The parent compares each run with
the single-process shardopt optimizer fed the same global batch: per step the
two half-batch gradients are averaged, exactly what DeepSpeed's data-parallel
reduction computes, so fp32 Lion is bitwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

import shardopt

pytest.importorskip("deepspeed")

import dist_utils  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
GLOBAL = 16  # rows per step, split over the ranks
STEPS = 4
IN, HID, OUT = 32, 32, 4


# ---------------------------------------------------------------------------- model and data
class Net(torch.nn.Module):
    """Four hidden matrices (Muon), biases and a head (Muon's aux group)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HID)
        self.fc2 = torch.nn.Linear(HID, HID)
        self.fc3 = torch.nn.Linear(HID, HID)
        self.fc4 = torch.nn.Linear(HID, HID)
        self.head = torch.nn.Linear(HID, OUT)

    def forward(self, x):
        for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = torch.tanh(fc(x))
        return self.head(x)


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def param_groups(model, grouped: bool):
    if not grouped:
        return list(model.parameters())
    return [{"params": [p for p in model.parameters() if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def micro(world):
    return GLOBAL // world


def batch(step):
    """The global batch of ``step``. Input feature 0 is always zero, so fc1.weight[:, 0] never gets a gradient."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL, IN, generator=g)
    x[:, 0] = 0.0
    y = torch.randn(GLOBAL, OUT, generator=g)
    return x, y


# ---------------------------------------------------------------------------- the case table
@dataclass
class Case:
    name: str
    type: str
    stage: int
    params: dict
    bf16: bool = False
    clip: float = 0.0
    config_file: str | None = None  # start from a launch/deepspeed/*.json
    client: bool = False  # pass a built shardopt optimizer to deepspeed.initialize(optimizer=...)
    groups: bool = False  # model_parameters as decay / no-decay groups (DeepSpeed steps them one at a time)
    offload: bool = False  # "offload_optimizer": {"device": "cpu"}
    world: int = WORLD
    ga: int = 1  # gradient accumulation steps

    def config(self) -> dict:
        cfg = json.loads((ROOT / "launch/deepspeed" / self.config_file).read_text()) if self.config_file else {}
        cfg.update({"train_micro_batch_size_per_gpu": micro(self.world * self.ga),
                    "gradient_accumulation_steps": self.ga,
                    "gradient_clipping": self.clip, "steps_per_print": 10**9})
        if self.client:
            cfg["zero_optimization"] = {"stage": self.stage}
        elif not self.config_file:
            cfg["zero_optimization"] = {"stage": self.stage}
            cfg["optimizer"] = {"type": self.type, "params": dict(self.params)}
        else:
            cfg["optimizer"]["params"].update(self.params)
        if self.bf16:
            cfg["bf16"] = {"enabled": True}
        if self.offload:
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if self.stage == 3:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition the small ones too
        return cfg

    @property
    def algorithm(self):
        return self.type.split(".")[-1].lower()


LION = {"lr": 2e-2, "betas": [0.9, 0.99], "weight_decay": 0.0, "backend": "torch"}
ADAMW = {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.05, "backend": "torch"}
MUON = {"lr": 2e-2, "momentum": 0.9, "weight_decay": 0.05, "ns_dtype": "float32", "backend": "torch",
        "aux_algorithm": "adamw", "aux_lr": 1e-2, "aux_weight_decay": 0.01}

CASES = (
    [Case(f"lion-z{s}", "shardopt.Lion", s, LION) for s in (0, 1, 2, 3)]
    + [Case(f"adamw-z{s}", "shardopt.AdamW", s, ADAMW) for s in (0, 1, 2, 3)]
    + [Case(f"muon-z{s}", "shardopt.Muon", s, MUON) for s in (0, 1, 2, 3)]
    + [
        Case("lion-z2-bf16", "shardopt.Lion", 2, LION, bf16=True),
        Case("adamw-z0-bf16-clip", "shardopt.AdamW", 0, ADAMW, bf16=True, clip=0.05),
        Case("muon-z1-bf16", "shardopt.Muon", 1, dict(MUON, aux_algorithm="lion", aux_lr=1e-3), bf16=True),
        # the shipped JSON examples, with test-sized batches and no clipping
        Case("json-zero1_lion", "shardopt.Lion", 1, {"backend": "torch"}, config_file="zero1_lion.json"),
        Case("json-zero2_adamw", "shardopt.AdamW", 2, {"backend": "torch"}, config_file="zero2_adamw.json"),
        Case("json-zero1_muon", "shardopt.Muon", 1, {"backend": "torch", "ns_dtype": "float32"},
             config_file="zero1_muon.json"),
        Case("adamw-z2-groups", "shardopt.AdamW", 2, ADAMW, groups=True),
        # a user-built two-group optimizer under ZeRO-1 (DeepSpeed narrows param_groups per inner step)
        Case("lion-z1-groups-client", "shardopt.Lion", 1, LION, groups=True, client=True),
        Case("lion-z3-groups", "shardopt.Lion", 3, LION, groups=True),
        # a shardopt optimizer built by the user (sharding="auto") and handed to DeepSpeed ZeRO-2
        Case("client-lion-z2", "shardopt.Lion", 2, LION, client=True),
        Case("muon-z3-bf16", "shardopt.Muon", 3, MUON, bf16=True),
        # gradient accumulation: the reduce-scattered buckets add into the partitions across micro-steps
        Case("muon-z1-ga2", "shardopt.Muon", 1, MUON, ga=2),
        Case("muon-z2-ga2", "shardopt.Muon", 2, MUON, ga=2),
        # a Muon the user built (from muon_param_groups) and handed to DeepSpeed ZeRO-2
        Case("client-muon-z2", "shardopt.Muon", 2, MUON, client=True),
        # optimizer offload: the partitions on the CPU, updated by the C++ CPU kernels (backend "auto")
        *[Case(f"{a}-z{s}-offload", f"shardopt.{n}", s, dict(kw, backend="auto"), offload=True)
          for s in (2, 3) for a, n, kw in (("lion", "Lion", LION), ("adamw", "AdamW", ADAMW), ("muon", "Muon", MUON))],
        *[Case(f"{a}-z{s}-cpu", f"shardopt.{n}", s, dict(kw, backend="auto"))  # the same kernels, no offload
          for s in (2, 3) for a, n, kw in (("lion", "Lion", LION), ("adamw", "AdamW", ADAMW), ("muon", "Muon", MUON))],
        # DeepSpeed's own type goes through DeepSpeed's code, untouched
        Case("ds-AdamW-z2", "AdamW", 2, {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}),
    ]
)
CKPT_CASES = [
    *[Case(f"ckpt-{a}-z{s}", f"shardopt.{n}", s, kw)
      for s in (2, 3) for a, n, kw in (("lion", "Lion", LION), ("adamw", "AdamW", ADAMW), ("muon", "Muon", MUON))],
    Case("ckpt-muon-z1-bf16", "shardopt.Muon", 1, MUON, bf16=True),
]
BY_NAME = {c.name: c for c in CASES}


# ---------------------------------------------------------------------------- the 2-rank job
def _full_params(engine) -> dict:
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def _train(engine, rank, steps, bf16):
    """Each step's global batch in W x GA chunks: rank r's micro-step a takes chunk r * GA + a."""
    m, ga = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    for s in steps:
        for a in range(ga):
            x, y = batch(s)
            k = rank * ga + a
            x, y = x[k * m:(k + 1) * m], y[k * m:(k + 1) * m]
            if bf16:
                x, y = x.bfloat16(), y.bfloat16()
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()


def _opt_state(engine) -> list:
    """This rank's optimizer state, in parameter order (works for DeepSpeed's flat partitions too)."""
    opt = engine.basic_optimizer
    if engine.zero_optimization_stage() == 3:  # ZeRO-3 empties param_groups between steps
        params = list(engine.optimizer.fp32_partitioned_groups_flat)
    else:
        params = [p for g in opt.param_groups for p in g["params"]]
    out = []
    for p in params:
        st = opt.state.get(p, {})
        out.append({k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v)})
    return out


def _engine_cases(rank, world, cases, ckpt_cases, ckpt_dir):
    import logging

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    import shardopt.deepspeed  # noqa: F401
    import shardopt.optim.muon as muon_mod

    ns_calls: list = []
    real_ns = muon_mod.newton_schulz

    def counting_ns(batch_, **kw):
        ns_calls.append(tuple(batch_.shape))
        return real_ns(batch_, **kw)

    muon_mod.newton_schulz = counting_ns

    class Capture(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            msg = record.getMessage()
            if "shardopt" in msg:
                self.lines.append(msg)

    cap = Capture()
    ds_logger.addHandler(cap)
    ds_logger.setLevel(logging.INFO)  # the "shardopt: <optimizer> runs ..." line is an info line

    def init(case, seed=0):
        model = make_model(seed)
        client = None
        if case.client:
            kw = {k: tuple(v) if isinstance(v, list) else v for k, v in case.params.items()}
            if case.algorithm == "muon":
                aux, rest = _split_aux(kw)
                rest["ns_dtype"] = getattr(torch, rest.get("ns_dtype", "bfloat16"))
                client = shardopt.Muon(shardopt.muon_param_groups(model, **aux), **rest)
            else:
                client = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[case.algorithm](
                    param_groups(model, case.groups), **kw)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, case.groups),
                                               optimizer=client, config=case.config())
        return engine

    out = {}
    for case in cases:
        cap.lines.clear()
        engine = init(case)
        basic = engine.basic_optimizer
        is_ours = isinstance(basic, shardopt.ShardedOptimizer)
        per_step_ns = []
        for s in range(STEPS):
            ns_calls.clear()
            _train(engine, rank, [s], case.bf16)
            per_step_ns.append(list(ns_calls))
        printed: list = []
        summary = basic.summary(print_fn=printed.append) if is_ours else None  # collective
        out[case.name] = {
            "summary": summary, "printed": printed,
            "params": _full_params(engine),
            "stage": engine.zero_optimization_stage(),
            "basic": type(basic).__module__ + "." + type(basic).__name__,
            "engine_optimizer": type(engine.optimizer).__name__,
            "layout": basic.layout.name if is_ours else None,
            "state_bytes": basic.state_bytes() if is_ours else None,
            "opt_numel": sum(p.numel() for g in basic.param_groups for p in g["params"]),
            "state_numel": basic.state_numel() if is_ours else None,
            "ns_per_step": per_step_ns,
            "ns_shapes": list(basic.ns_shapes) if is_ours else None,
            "logs": list(cap.lines),
        }

    for case in ckpt_cases:
        tag = "t2"
        e1 = init(case)
        _train(e1, rank, range(2), case.bf16)
        e1.save_checkpoint(ckpt_dir, tag=tag)
        saved_state = _opt_state(e1)
        _train(e1, rank, range(2, STEPS), case.bf16)
        resumed_ref = _full_params(e1)

        e2 = init(case, seed=1)  # different initial weights: everything must come from the checkpoint
        e2.load_checkpoint(ckpt_dir, tag=tag)
        loaded_state = _opt_state(e2)
        _train(e2, rank, range(2, STEPS), case.bf16)

        e3 = init(case, seed=1)  # weights only: shows the optimizer state matters
        e3.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=False)
        _train(e3, rank, range(2, STEPS), case.bf16)
        out[case.name] = {
            "uninterrupted": resumed_ref, "resumed": _full_params(e2), "weights_only": _full_params(e3),
            "saved_state": saved_state, "loaded_state": loaded_state,
        }
    muon_mod.newton_schulz = real_ns
    return out


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ds_ckpt"))
    return dist_utils.run(_engine_cases, WORLD, CASES, CKPT_CASES, ckpt, timeout_s=600)


# ---------------------------------------------------------------------------- the reference
def _split_aux(params):
    aux_keys = ("aux_algorithm", "aux_lr", "aux_betas", "aux_weight_decay", "aux_eps", "muon", "aux")
    aux = {k: v for k, v in params.items() if k in aux_keys}
    rest = {k: v for k, v in params.items() if k not in aux_keys}
    return aux, rest


def reference_params(case: Case, steps: int = STEPS) -> tuple[dict, dict]:
    """(initial, final) parameters of the single-process optimizer on the same global batches."""
    model = make_model()
    if case.bf16:
        model = model.bfloat16()
    initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    params = dict(case.params) if case.client else dict(case.config()["optimizer"].get("params", {}))
    for k in ("betas", "aux_betas"):
        if k in params:
            params[k] = tuple(params[k])
    if params.get("ns_dtype") == "float32":
        params["ns_dtype"] = torch.float32
    clip = {"grad_clip_norm": case.clip} if case.clip else {}
    if case.type == "AdamW":  # DeepSpeed's own type with torch_adam: torch.optim.AdamW
        params.pop("torch_adam")
        opt = torch.optim.AdamW(model.parameters(), **params)
    elif case.algorithm == "muon":
        aux, rest = _split_aux(params)
        opt = shardopt.Muon(shardopt.muon_param_groups(model, **aux), sharding="none", **rest, **clip)
    else:
        cls = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[case.algorithm]
        opt = cls(param_groups(model, case.groups), sharding="none", **params, **clip)
    world = case.world * case.ga  # chunks of the global batch, averaged
    m = micro(world)
    for s in range(steps):
        x, y = batch(s)
        halves = []
        for r in range(world):
            model.zero_grad(set_to_none=True)
            xs, ys = x[r * m:(r + 1) * m], y[r * m:(r + 1) * m]
            if case.bf16:
                xs, ys = xs.bfloat16(), ys.bfloat16()
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            halves.append([p.grad.float() for p in model.parameters()])
        for p, *gs in zip(model.parameters(), *halves):
            p.grad = (sum(gs) / world).to(p.dtype)
        opt.step()
    return initial, {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in b) ** 0.5
    den = sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5
    return num / den


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_engine_matches_single_process(ds_run, name):
    case = BY_NAME[name]
    r0, r1 = ds_run[0][name], ds_run[1][name]
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"{name}: ranks disagree on {k}"
    initial, ref = reference_params(case)
    got = r0["params"]
    moved = _rel(ref, initial)
    assert moved > 1e-3, f"{name}: the reference barely trained ({moved:.2e}); the comparison would be vacuous"
    if case.bf16:
        # bf16 gradients are reduced in a different order than the reference averages them, so compare the
        # parameter *change*: a wrong or missing update moves it by O(1).
        delta_got = {k: got[k] - initial[k] for k in ref}
        delta_ref = {k: ref[k] - initial[k] for k in ref}
        err = _rel(delta_got, delta_ref)
        assert err < 1e-2, f"{name}: bf16 update differs from the reference by {err:.3e} (relative)"
    elif case.algorithm == "lion" and case.type.startswith("shardopt"):
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{name}: {k} is not bitwise equal to the single-process Lion"
    elif case.algorithm == "muon":
        err = _rel(got, ref)
        assert err <= 2e-3, f"{name}: Muon differs from the single-process optimizer by {err:.3e}"
    else:
        for k in ref:
            err = float((got[k] - ref[k]).abs().max() / ref[k].abs().max())
            assert err <= 1e-6, f"{name}: {k} differs by {err:.3e} (relative)"


@pytest.mark.parametrize("name", [c.name for c in CASES if c.type.startswith("shardopt")])
def test_engine_runs_the_layout_asked_for(ds_run, name):
    case = BY_NAME[name]
    r0, r1 = ds_run[0][name], ds_run[1][name]
    expected_cls = {"lion": "Lion", "adamw": "AdamW", "muon": "Muon"}[case.algorithm]
    assert r0["basic"] == f"shardopt.optim.{case.algorithm}.{expected_cls}"
    total = sum(p.numel() for p in make_model().parameters())
    if case.stage == 0:
        assert r0["stage"] == 0 and r0["layout"] == ("zero1" if case.algorithm == "muon" else "none")
        if case.algorithm == "muon":
            assert r0["engine_optimizer"] == "Muon"  # no DeepSpeed wrapper, bf16 included: shardopt keeps the master
        else:
            assert r0["opt_numel"] == total
        return
    # DeepSpeed partitions; the inner optimizer sees only its flat fp32 partition and must not shard again.
    # Muon runs on the same partitions with the flat-partition layout (whole matrices assembled on their owners).
    assert r0["stage"] == case.stage
    assert r0["layout"] == (f"deepspeed-zero{case.stage}" if case.algorithm == "muon" else "none")
    assert r0["engine_optimizer"].startswith("DeepSpeedZeroOptimizer")
    n_state = 1 if case.algorithm in ("lion", "muon") else 2
    if case.algorithm == "muon":
        return  # one momentum buffer for matrices, two AdamW buffers for the aux group: see test_muon_state_*
    for r in (r0, r1):
        per_buffer = r["state_numel"] / n_state  # elements of each state buffer this rank holds
        slack = 64 * 4 if case.stage == 3 else 64  # ZeRO-3 pads every parameter, ZeRO-1/2 every group
        assert total / WORLD <= per_buffer <= total / WORLD + slack, per_buffer
        assert r["state_bytes"] == 4 * r["state_numel"]
    # summary() reports DeepSpeed's partitioning, not the 'none' layout shardopt runs on each partition
    rows = r0["summary"]
    assert [t["rank"] for t in rows] == list(range(WORLD)) and rows == r1["summary"]
    assert {t["layout"] for t in rows} == {f"ds-zero{case.stage}"}
    assert [t["state_bytes"] for t in rows] == [r0["state_bytes"], r1["state_bytes"]]
    assert rows[0]["unsharded_state_bytes"] == sum(t["state_bytes"] for t in rows)
    assert r0["printed"][0].startswith(f"{expected_cls} layout=ds-zero{case.stage} world={WORLD}: DeepSpeed")
    assert r1["printed"] == []


# ---------------------------------------------------------------------------- Muon specifics
def _muon_shapes():
    groups = shardopt.muon_param_groups(make_model())
    return sorted(tuple(p.shape) for g in groups if g["algorithm"] == "muon" for p in g["params"])


def assert_each_matrix_once(ns_per_rank_per_step, world):
    """``[rank][step]`` lists of NS batch shapes -> every matrix exactly once per step, spread over ranks."""
    expected = _muon_shapes()
    assert len(expected) == 4
    for s in range(STEPS):
        per_rank = [sorted(tuple(c[1:]) for c in ns_per_rank_per_step[r][s] for _ in range(c[0]))
                    for r in range(world)]
        assert sorted(x for pr in per_rank for x in pr) == expected, f"step {s}: NS ran on {per_rank}"
        assert all(per_rank), f"step {s}: a rank ran no Newton-Schulz ({per_rank}); owners are balanced by cost"


@pytest.mark.parametrize("name", ["muon-z1", "muon-z2", "muon-z3", "muon-z1-bf16", "muon-z3-bf16",
                                  "client-muon-z2", "muon-z2-offload", "muon-z3-offload"])
def test_muon_orthogonalizes_each_matrix_once_per_step(ds_run, name):
    assert_each_matrix_once([ds_run[r][name]["ns_per_step"] for r in range(WORLD)], WORLD)


@pytest.mark.parametrize("name", ["muon-z0", "muon-z2", "muon-z3"])
def test_muon_state_is_sharded_1_over_w(ds_run, name):
    model = make_model()
    groups = shardopt.muon_param_groups(model)
    muon_elems = sum(p.numel() for g in groups if g["algorithm"] == "muon" for p in g["params"])
    aux_elems = sum(p.numel() for g in groups if g["algorithm"] != "muon" for p in g["params"])
    total = 4 * (muon_elems + 2 * aux_elems)  # momentum + AdamW's exp_avg/exp_avg_sq, fp32
    per_rank = [ds_run[r][name]["state_bytes"] for r in range(WORLD)]
    assert sum(per_rank) <= total + 2 * 4 * 64 * WORLD  # nothing held twice (alignment padding aside)
    for b in per_rank:
        assert b <= 0.55 * total, f"a rank holds {b} of {total} state bytes"


def test_what_runs_is_logged_and_nothing_falls_back(ds_run):
    for name in ("muon-z1", "muon-z2", "muon-z3"):
        logs = ds_run[0][name]["logs"]
        assert not any("stage 0" in m for m in logs), logs
        stage = BY_NAME[name].stage
        assert any(f"ZeRO-{stage}'s flat fp32 partitions" in m and "orthogonalized once" in m for m in logs), logs
    assert not any("stage 0" in m for m in ds_run[0]["lion-z2"]["logs"])
    logs = ds_run[0]["client-lion-z2"]["logs"]
    assert any("sharding='auto'" in m and "sharding='none'" in m for m in logs), logs
    for name in ("lion-z2-offload", "muon-z3-offload"):
        logs = ds_run[0][name]["logs"]
        assert sum("zero_force_ds_cpu_optimizer=false" in m for m in logs) == 1, logs
        assert any("C++ CPU kernels" in m for m in logs), logs


@pytest.mark.parametrize("name", [c.name for c in CASES if c.offload])
def test_offload_equals_no_offload(ds_run, name):
    """The offloaded run against the same run with the partitions in place (the same kernels)."""
    twin = name.replace("-offload", "-cpu")
    for rank in range(WORLD):
        got, ref = ds_run[rank][name]["params"], ds_run[rank][twin]["params"]
        if name.startswith("lion"):
            for k in ref:
                assert torch.equal(got[k], ref[k]), f"{name}: {k} differs from the run without offload"
        else:
            assert _rel(got, ref) <= 1e-6, f"{name}: {_rel(got, ref):.3e} from the run without offload"


# ---------------------------------------------------------------------------- Lion's sign(0)
@pytest.mark.parametrize("name", ["lion-z0", "lion-z1", "lion-z2", "lion-z3", "lion-z2-bf16"])
def test_lion_leaves_zero_gradient_zero_momentum_coordinate_in_place(ds_run, name):
    # DeepSpeed's FusedLion computes sign(0) as 1 and moves such a coordinate by -lr every step.
    model = make_model()
    w0 = model.fc1.weight.detach().float()
    if BY_NAME[name].bf16:
        w0 = model.fc1.weight.detach().bfloat16().float()
    w = ds_run[0][name]["params"]["fc1.weight"]
    assert torch.equal(w[:, 0], w0[:, 0]), "a coordinate with zero gradient and zero momentum moved"
    # the others move by +-lr per step (some return to the start after an even number of sign flips)
    assert (w[:, 1:] != w0[:, 1:]).float().mean() > 0.5, "the other coordinates should have moved"


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", [c.name for c in CKPT_CASES])
def test_checkpoint_round_trip(ds_run, name):
    for rank in range(WORLD):
        r = ds_run[rank][name]
        assert len(r["saved_state"]) == len(r["loaded_state"])
        for a, b in zip(r["saved_state"], r["loaded_state"]):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), f"rank {rank}: state {k} changed across save/load"
        for k in r["uninterrupted"]:
            assert torch.equal(r["resumed"][k], r["uninterrupted"][k]), f"rank {rank}: {k} differs after resume"
        assert any(not torch.equal(r["weights_only"][k], r["uninterrupted"][k]) for k in r["uninterrupted"]), \
            "resuming without the optimizer state gave the same result: the test cannot tell"


# ---------------------------------------------------------------------------- config validation (in process)
@pytest.fixture(scope="module")
def ds_config_cls():
    import shardopt.deepspeed  # noqa: F401
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig


def _cfg(opt, stage=0):
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "optimizer": opt}


def test_unknown_type_lists_valid_names(ds_config_cls):
    with pytest.raises(ValueError, match=r"shardopt\.Lamb.*shardopt\.Lion, shardopt\.AdamW, shardopt\.Muon"):
        ds_config_cls(_cfg({"type": "shardopt.Lamb", "params": {}}))


@pytest.mark.parametrize("typ,params,match", [
    ("shardopt.Lion", {"beta": [0.9, 0.99]}, r"unknown parameter.*'beta'.*valid: lr, betas, weight_decay"),
    ("shardopt.AdamW", {"max_grad_norm": 1.0}, r"'max_grad_norm'.*gradient_clipping"),
    ("shardopt.Lion", {"lr": -1.0}, r"invalid learning rate -1"),
    ("shardopt.AdamW", {"betas": [0.9, 1.5]}, r"invalid betas"),
    ("shardopt.Muon", {"aux_algorithm": "sgd"}, r"aux_algorithm must be 'adamw' or 'lion'"),
    ("shardopt.Muon", {"ns_dtype": "int8"}, r"invalid ns_dtype 'int8'"),
    ("shardopt.Muon", {"aux_lr": -2.0}, r"invalid learning rate -2"),
    ("shardopt.Muon", {"process_group": None}, r"unknown parameter.*'process_group'"),
])
def test_bad_params_raise_value_error(ds_config_cls, typ, params, match):
    with pytest.raises(ValueError, match=match):
        ds_config_cls(_cfg({"type": typ, "params": params}, stage=1))


def test_sharding_that_contradicts_zero_stage_is_refused(ds_config_cls):
    with pytest.raises(ValueError, match=r"already partitions"):
        ds_config_cls(_cfg({"type": "shardopt.Lion", "params": {"sharding": "zero1"}}, stage=2))
    with pytest.raises(ValueError, match=r"already partitions"):
        ds_config_cls(_cfg({"type": "shardopt.Muon", "params": {"sharding": "zero1"}}, stage=1))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_muon_keeps_the_zero_stage(ds_config_cls, stage):
    cfg = ds_config_cls(_cfg({"type": "shardopt.Muon", "params": {}}, stage=stage))
    assert cfg.zero_optimization_stage == stage and cfg._shardopt.kwargs["sharding"] == "none"


@pytest.mark.parametrize("fname,typ,requested,runs", [
    ("zero1_lion.json", "shardopt.Lion", 1, 1),
    ("zero2_adamw.json", "shardopt.AdamW", 2, 2),
    ("zero1_muon.json", "shardopt.Muon", 1, 1),
])
def test_shipped_json_configs_parse(ds_config_cls, fname, typ, requested, runs):
    cfg = ds_config_cls(str(ROOT / "launch/deepspeed" / fname))
    assert cfg.optimizer_name == typ
    assert cfg._shardopt.requested_stage == requested
    assert cfg.zero_optimization_stage == runs
    if typ == "shardopt.Muon":
        assert cfg._shardopt.kwargs["sharding"] == "none"
        assert cfg._shardopt.aux["aux_algorithm"] == "adamw"


def test_install_is_idempotent(ds_config_cls):
    import deepspeed.runtime.engine as eng

    import shardopt.deepspeed as sd

    before = (eng.DeepSpeedEngine._configure_basic_optimizer, ds_config_cls._initialize_params,
              eng.is_zero_supported_optimizer)
    sd.install()
    after = (eng.DeepSpeedEngine._configure_basic_optimizer, ds_config_cls._initialize_params,
             eng.is_zero_supported_optimizer)
    assert before == after


# ---------------------------------------------------------------------------- through deepspeed.initialize (subprocess)
_INIT_SCRIPT = textwrap.dedent("""
    import os, socket, torch
    os.environ["DS_ACCELERATOR"] = "cpu"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    def init(opt, stage=1):
        m = torch.nn.Linear(4, 4)
        cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "optimizer": opt}
        return deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)[0]

    def report(tag, fn):
        try:
            fn()
            print(tag, "OK", flush=True)
        except Exception as e:
            print(tag, type(e).__name__, str(e).splitlines()[0], flush=True)

    report("NOIMPORT", lambda: init({"type": "shardopt.Lion", "params": {"lr": 1e-3}}))
    import shardopt.deepspeed
    report("UNKNOWN", lambda: init({"type": "shardopt.Lamb", "params": {}}))
    report("BADPARAM", lambda: init({"type": "shardopt.AdamW", "params": {"learning_rate": 1e-3}}))
    report("MUON3", lambda: init({"type": "shardopt.Muon", "params": {}}, stage=3))
    report("LION1", lambda: init({"type": "shardopt.Lion", "params": {"lr": 1e-3}}))
    report("DSLION", lambda: init({"type": "Lion", "params": {"lr": 1e-3}}, stage=2))
""")
_TAGS = ("NOIMPORT", "UNKNOWN", "BADPARAM", "MUON3", "LION1", "DSLION")


@pytest.fixture(scope="module")
def init_lines():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _INIT_SCRIPT], capture_output=True, text=True, timeout=240,
                          env=env, cwd=ROOT)
    lines = {ln.split(" ", 1)[0]: ln for ln in proc.stdout.splitlines() if ln.split(" ", 1)[0] in _TAGS}
    assert len(lines) == len(_TAGS), proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines


def test_deepspeed_initialize_errors_and_missing_import(init_lines):
    lines = init_lines
    # Without `import shardopt.deepspeed`, DeepSpeed's usual refusal (docs/integrations.md says to add the import).
    assert lines["NOIMPORT"] == "NOIMPORT AssertionError shardopt.Lion is not a supported DeepSpeed Optimizer"
    assert "ValueError" in lines["UNKNOWN"] and "shardopt.Lion, shardopt.AdamW, shardopt.Muon" in lines["UNKNOWN"]
    bad = lines["BADPARAM"]
    assert "ValueError" in bad and "'learning_rate'" in bad and "valid: lr" in bad
    assert lines["MUON3"] == "MUON3 OK"
    assert lines["LION1"] == "LION1 OK"


def test_deepspeeds_own_lion_without_offload(init_lines):
    """DeepSpeed's own Lion without offload is FusedLion, a CUDA op. On its CPU accelerator the conversion and
    universal-checkpoint tests use DeepSpeedCPULion (offload_optimizer) instead; see docs/integrations.md."""
    line = init_lines["DSLION"]
    if line != "DSLION OK":
        pytest.skip(f"DeepSpeed's CPU accelerator cannot run its FusedLion ({line.split(' ', 1)[1]}); "
                    "GPU check list: DeepSpeed Lion at ZeRO-2 without offload -> shardopt ckpt convert")
    assert line == "DSLION OK"
