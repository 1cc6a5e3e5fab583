"""``shardopt plan`` (issue 18) against the layouts it plans for.

The pure planning functions are checked against the loops they replaced; the
planner's per-rank figures for the demo model against real gloo runs at W = 1,
2 and 4 (ZeRO-1, FSDP2, HSDP 2 x 2, and DeepSpeed ZeRO-1/2/3 at W = 2): optimizer
``state_bytes()``, local parameter and gradient bytes, every ``comm.COUNTERS``
entry of one step, the Newton-Schulz owner of every matrix and ``opt.ns_shapes``; at W = 4
also FSDP2 x TP on 2 x 2 and HSDP x TP on (2, 1, 2) (``--tp 2``), the demo model cut by
``parallelize_module`` as the planner's default TP plan cuts it.
Three spawned jobs (one per W) cover all of it.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time

import pytest
import torch

import dist_utils
from test_sharding_plan import random_cases
import shardopt
from shardopt import cli
from shardopt.functional import ns_flops
from shardopt.sharding import comm
from shardopt.sharding.plan import fill_segments
from shardopt.tools import plan as planner

ADAMW = dict(lr=1e-3, weight_decay=0.01, backend="torch")


# ---------------------------------------------------------------------------- per-rank sums
def test_window_sums_equal_sums_over_the_pieces():
    """The planner sums each rank's window of a bucket's splittable stream; the layout walks its pieces."""
    rng = random.Random(7)
    for numels, owners, world, align in random_cases(300):
        if not numels:
            continue
        sp = fill_segments(numels, owners, world, align)
        weights = [[rng.randint(1, 9), 4] for _ in numels]
        got = planner._split_window_sums(sp, weights)
        for r in range(world):
            want = [sum((pc.end - pc.start) * weights[pc.index][k] for pc in sp.pieces[r]
                        if owners[pc.index] is None) for k in range(2)]
            assert got[r].tolist() == want, (numels, owners, world, r)


# ---------------------------------------------------------------------------- scale and the figures
def test_llama_70b_at_4096_ranks_in_time_with_ceil_state_per_rank():
    t0 = time.perf_counter()
    p = shardopt.plan("llama-70b", world_sizes=[4096], layout="zero1", optimizer="adamw", param_dtype="bf16")
    elapsed = time.perf_counter() - t0
    print(f"llama-70b x 4096 zero1 planned in {elapsed:.2f} s")
    assert elapsed < 10
    w = p.worlds[0]
    n = p.n_params
    assert n == 70_553_706_496 and len(p.tensors) == 723
    total = 8 * n  # AdamW: exp_avg + exp_avg_sq, fp32
    assert int(w.state.sum()) == total and int(w.master.sum()) == 4 * n  # every element owned exactly once
    n_buckets = int(w.detail.split()[0])
    unit = 128 // 2  # the alignment unit: 128 bytes of bf16 parameters
    assert math.ceil(total / 4096) <= w.state.max() <= math.ceil(total / 4096) + n_buckets * unit * 8
    assert (w.params == 2 * n).all()
    # the same model through the command, within the time too
    t0 = time.perf_counter()
    shardopt.plan("llama-70b", world_sizes=[4096], layout="fsdp2", optimizer="muon")
    assert time.perf_counter() - t0 < 10


def test_newton_schulz_imbalance_of_a_24_layer_llama():
    """The issue's figures: 168 matrices of a 24-layer h = 2048 Llama (MHA, MLP 5632), whole-matrix owners."""
    from shardopt.tools._presets import LlamaShape, llama

    model = llama(LlamaShape(hidden=2048, layers=24, heads=16, kv_heads=16, intermediate=5632, vocab=32000))
    ws = [2, 4, 8, 16, 32, 64, 128, 168, 256, 512]
    p = shardopt.plan(model, world_sizes=ws, layout="fsdp2", optimizer="muon")
    imb = {w.world: round(w.ns_imbalance, 2) for w in p.worlds}
    assert all(len(w.ns_owner) == 168 for w in p.worlds)
    assert all(imb[w] == 1.00 for w in (2, 4, 8)) and p.worlds[3].ns_imbalance < 1.006
    assert imb[32] == 1.06 and imb[64] == 1.10 and imb[128] == 1.10
    assert [w.idle_ranks for w in p.worlds] == [0] * 8 + [256 - 168, 512 - 168]
    text = p.format()
    assert "344 of 512 ranks run no Newton-Schulz: 168 matrices for 512 ranks" in text


# ---------------------------------------------------------------------------- real runs
def _demo_model(dtype=torch.float32):
    from shardopt.tools._demo_model import SIZES, build_model

    return build_model(SIZES["default"], seed=0).to(dtype)


def _grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) * 1e-2 for p in model.parameters()]


def _build(model, optimizer, **kw):
    if optimizer == "muon":
        return shardopt.Muon(shardopt.muon_param_groups(model), lr=2e-2, backend="torch", **kw)
    cls = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[optimizer]
    named = list(model.named_parameters())
    return cls([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], lr=1e-3,
               backend="torch", **kw)


def _measure(opt, params, set_grads):
    layout = opt.layout
    set_grads()
    comm.reset_counters()
    opt.step()
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    lg = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
    names = opt._flat_params()[1]
    owner = getattr(layout, "owner", None)
    return {
        "layout": layout.name, "state_bytes": opt.state_bytes(),
        "param_bytes": sum(t.numel() * t.element_size() for t in local),
        "grad_bytes": sum(t.numel() * t.element_size() for t in lg),
        "counters": dict(comm.COUNTERS), "ns_shapes": sorted(opt.ns_shapes),
        "owner": {n: o for n, o in zip(names, owner) if o is not None} if owner else None,
    }


def _zero1_case(optimizer, dtype=torch.float32, **kw):
    model = _demo_model(dtype)
    opt = _build(model, optimizer, **kw)
    params = opt._flat_params()[0]
    grads = dict(zip(map(id, model.parameters()), _grads(model)))

    def set_grads():
        for p in params:
            p.grad = grads[id(p)].clone()

    return _measure(opt, params, set_grads)


def _fsdp2_case(optimizer, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = _demo_model()
    full = dict(zip([n for n, _ in model.named_parameters()], _grads(model)))
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _build(model, optimizer)
    assert opt.layout.name == "fsdp2"
    named = dict((id(p), n) for n, p in model.named_parameters())
    params = opt._flat_params()[0]

    def set_grads():
        for p in params:
            p.grad = distribute_tensor(full[named[id(p)]], p.device_mesh, p.placements)

    return _measure(opt, params, set_grads)


def _tp_case(optimizer, mesh, dp_dims):
    """The demo model under parallelize_module (qkv/fc column-, proj/fc_out row-parallel, as the
    planner's default TP plan cuts it) and FSDP2 over ``dp_dims``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import tp_models

    model = _demo_model()
    full = dict(zip([n for n, _ in model.named_parameters()], _grads(model)))
    dp = mesh[dp_dims] if len(dp_dims) > 1 else mesh[dp_dims[0]]
    for blk in model.blocks:
        parallelize_module(blk, mesh["tp"], {"qkv": ColwiseParallel(), "fc": ColwiseParallel(),
                                             "proj": RowwiseParallel(), "fc_out": RowwiseParallel()})
        fully_shard(blk, mesh=dp)
    fully_shard(model, mesh=dp)
    opt = _build(model, optimizer)
    named = dict((id(p), n) for n, p in model.named_parameters())
    params = opt._flat_params()[0]

    def set_grads():
        for p in params:
            p.grad = None
        tp_models.set_grads(params, [full[named[id(p)]] for p in params])

    return _measure(opt, params, set_grads)


def _deepspeed_case(optimizer, stage, rank):
    import deepspeed

    import shardopt.deepspeed  # noqa: F401

    model = _demo_model()
    params = dict(ADAMW) if optimizer == "adamw" else {"lr": 2e-2, "backend": "torch"}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage},
           "optimizer": {"type": f"shardopt.{'AdamW' if optimizer == 'adamw' else 'Muon'}", "params": params}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    basic, zopt = engine.basic_optimizer, engine.optimizer
    if stage == 3:  # ZeRO-3 hands the optimizer its partitions at the first step
        idx = torch.randint(0, model.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(rank))
        engine.backward(engine(idx, idx))
        engine.step()
    ran = engine.zero_optimization_stage()
    if ran in (1, 2):
        master = sum(t.numel() for t in zopt.single_partition_of_fp32_groups) * 4
    elif ran == 3:
        master = sum(t.numel() for t in zopt.fp32_partitioned_groups_flat) * 4
    else:
        master = None
    owner = None
    if optimizer == "muon":  # the flat-partition layout's owner of each matrix
        owner = {it.name: it.owner for g in basic.layout.plan.groups.values() for it in g.matrices()}
    return {"state_bytes": basic.state_bytes(), "master_bytes": master, "layout": basic.layout.name,
            "owner": owner}


def _job(rank, world):
    out = {}
    for optimizer in ("lion", "adamw", "muon"):
        out[("zero1", optimizer, "fp32")] = _zero1_case(optimizer)
    out[("zero1", "adamw", "bf16")] = _zero1_case("adamw", torch.bfloat16)
    out[("zero1", "muon", "bf16")] = _zero1_case("muon", torch.bfloat16)
    if world > 1:
        out[("zero1-rg", "adamw", "fp32")] = _zero1_case("adamw", reduce_gradients=True)
        out[("zero1-rg", "muon", "bf16")] = _zero1_case("muon", torch.bfloat16, reduce_gradients=True)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for optimizer in ("adamw", "muon"):
        out[("fsdp2", optimizer, "fp32")] = _fsdp2_case(optimizer, mesh)
    if world == 4:
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for optimizer in ("adamw", "muon"):
            out[("hsdp:2x2", optimizer, "fp32")] = _fsdp2_case(optimizer, hsdp)
        # tensor parallelism: FSDP2 x TP on 2 x 2, HSDP x TP on (2, 1, 2)
        tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        hsdp_tp = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("rep", "shard", "tp"))
        for optimizer in ("adamw", "muon"):
            out[("fsdp2+tp2", optimizer, "fp32")] = _tp_case(optimizer, tp, ("dp",))
            out[("hsdp:2x1+tp2", optimizer, "fp32")] = _tp_case(optimizer, hsdp_tp, ("rep", "shard"))
    if world == 2:
        for stage in (1, 2, 3):
            out[(f"deepspeed-zero{stage}", "adamw", "fp32")] = _deepspeed_case("adamw", stage, rank)
        for stage in (1, 2, 3):
            out[(f"deepspeed-zero{stage}", "muon", "fp32")] = _deepspeed_case("muon", stage, rank)
    return out


@pytest.fixture(scope="module")
def real_runs():
    return {w: dist_utils.run(_job, w, timeout_s=300) for w in (1, 2, 4)}


def _plans(real_runs):
    model = _demo_model()
    cache = {}
    for w, ranks in real_runs.items():
        for (layout, optimizer, dtype) in ranks[0]:
            key = (layout, optimizer, dtype)
            if key not in cache:
                cache[key] = {}
            plan_layout = "zero1" if layout == "zero1-rg" else layout.split("+")[0]
            tp = int(layout.split("+tp")[1]) if "+tp" in layout else 1
            cache[key][w] = shardopt.plan(model, world_sizes=[w], layout=plan_layout, optimizer=optimizer,
                                          param_dtype=dtype, reduce_gradients=layout == "zero1-rg", tp=tp).worlds[0]
    return cache


def test_plan_matches_real_runs_memory_comm_and_ns_owners(real_runs):
    plans = _plans(real_runs)
    checked = 0
    for w, ranks in real_runs.items():
        for key, r0 in ranks[0].items():
            wp = plans[key][w]
            layout = key[0]
            if layout.startswith("deepspeed"):
                for r, res in enumerate(ranks):
                    assert res[key]["state_bytes"] == wp.optimizer_bytes[r], (key, r)
                    if res[key]["master_bytes"] is not None:
                        assert res[key]["master_bytes"] == wp.master[r], (key, r)
                    if res[key]["owner"] is not None:
                        assert res[key]["owner"] == wp.ns_owner, key
                checked += 1
                continue
            expect_layout = "none" if (layout.startswith("zero1") and w == 1) else layout.split("+")[0].split(":")[
                0].replace("zero1-rg", "zero1").replace("hsdp", "fsdp2")
            shards = w // wp.replicas
            for r, res in enumerate(ranks):
                got = res[key]
                assert got["layout"] == wp.layout == expect_layout, (key, w)
                assert got["state_bytes"] == wp.optimizer_bytes[r], (key, w, r, got["state_bytes"])
                assert got["param_bytes"] == wp.params[r] and got["grad_bytes"] == wp.grads[r], (key, w, r)
                # every collective shardopt issued, except the step-stats all-reduce (next test)
                for op in ("all_gather", "reduce_scatter", "all_to_all"):
                    assert got["counters"].get(op, 0) == wp.comm(op)[r], (key, w, r, op, got["counters"])
                assert set(got["counters"]) <= {"all_gather", "reduce_scatter", "all_to_all", "all_reduce"}
                # Newton-Schulz: the owner of every matrix, and what each rank orthogonalized
                if got["owner"] is not None:
                    assert got["owner"] == wp.ns_owner, (key, w)
                mine = sorted(t.shape for t in _tensors(key) if t.name in wp.ns_owner
                              and (wp.ns_owner[t.name] == r % shards or wp.layout == "none"))
                assert got["ns_shapes"] == mine, (key, w, r)
                assert sum(ns_flops(s) for s in mine) == wp.ns_flops[r]
            checked += 1
    assert checked == 7 + (7 + 2 + 6) + (7 + 2 + 2 + 4)  # every case of the W = 1, 2 and 4 jobs


def test_plan_matches_real_runs_step_stats_all_reduce(real_runs):
    """Needs the step pipeline's one stats all-reduce (comm.stats_numel(n_params) float64 values per step)."""
    plans = _plans(real_runs)
    for w, ranks in real_runs.items():
        for key in ranks[0]:
            if key[0].startswith("deepspeed"):
                continue
            wp = plans[key][w]
            for r, res in enumerate(ranks):
                assert res[key]["counters"].get("all_reduce", 0) == wp.comm("all_reduce")[r], (key, w, r)


def _tensors(key):
    return planner.optimizer_tensors(_demo_model(), key[1], key[2])


# ---------------------------------------------------------------------------- the command
def test_cli_prints_writes_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = cli.main(["plan", "--model", "gpt2", "--optimizer", "muon", "--layout", "hsdp:*x2", "--world-size", "2,4,8",
                   "--json", str(js), "--plot", str(png), "--gpu", "h200"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("shardopt plan: gpt2 (GPT-2 small (124 M)), 124.44 M parameters in 148 tensors, bf16")
    for s in ("W = 8  (fsdp2: HSDP: 4 replicas x 2 shards", "optimizer state (fp32)", "all_to_all x",
              "step stats", "FSDP2", "Muon Newton-Schulz per rank", "[estimate]", "summary, max per rank"):
        assert s in out, s
    d = json.loads(js.read_text())
    assert [w["world_size"] for w in d["worlds"]] == [2, 4, 8] and d["parameters"] == 124_439_808
    assert d["worlds"][0]["estimated_step"]["is_estimate"] and d["worlds"][0]["estimated_step"]["gpu"] == "h200"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    rc = cli.main(["plan", "--model", "llama-1b", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["parameters"] == 1_235_814_400  # tied embeddings are counted once


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--layout", "hsdp:3"], "use hsdp:RxS"),
    (["--layout", "zero9"], "unknown layout 'zero9'"),
    (["--layout", "hsdp:2x4", "--world-size", "16"], "does not fit world size 16"),
    (["--layout", "fsdp2", "--reduce-gradients"], "reduce_gradients applies to the zero1 layout only"),
    (["--model", "os:getcwd"], "returned str, not an nn.Module"),
    (["--layout", "zero1", "--tp", "2"], "tensor parallelism (tp=2) applies to the fsdp2 and hsdp layouts"),
    (["--layout", "fsdp2", "--tp", "3", "--world-size", "8"], "world size 8 is not a multiple of tp=3"),
    (["--layout", "hsdp:2x4", "--tp", "2", "--world-size", "8"], "replicas x shards x tp (2) must equal it"),
    (["--tp", "0"], "tp must be a whole number >= 1"),
])
def test_cli_errors_are_one_line(capsys, argv, fragment):
    rc = cli.main(["plan", "--model", "demo", *argv] if "--model" not in argv else ["plan", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and fragment in err[0], err


def test_model_sources_hf_config_and_module_function(tmp_path):
    pytest.importorskip("transformers")
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = shardopt.plan(str(tmp_path), world_sizes=[2], optimizer="muon")
    kv = 256 // 4 * 2
    per_layer = 2 * 256 * 256 + 2 * kv * 256 + 3 * 256 * 688 + 2 * 256
    assert p.n_params == 3 * per_layer + 2 * 1000 * 256 + 256
    assert sum(g["tensors"] for g in p.groups() if g["algorithm"] == "muon") == 3 * 7
    # module:function, built on the meta device
    p = shardopt.plan("shardopt.tools._presets:GPT2Shapes", world_sizes=[2], layout="fsdp2")
    assert p.n_params == 124_439_808


def test_tp_plans_llama_70b_on_4096_ranks():
    """--tp 8: each rank holds 1/8 of every TP-cut weight's shard; Muon owners span shards x TP."""
    t0 = time.perf_counter()
    p = shardopt.plan("llama-70b", world_sizes=[512, 4096], layout="hsdp:*x8", optimizer="muon", tp=8)
    assert time.perf_counter() - t0 < 20
    flat = shardopt.plan("llama-70b", world_sizes=[64], layout="hsdp:*x8", optimizer="muon").worlds[0]
    w = p.worlds[0]
    assert w.world // w.replicas == 64  # the group: 8 shards x 8 TP ranks, 8 replicas of it at W = 512
    # the TP-cut matrices (all of Muon's) are 8x smaller per rank than HSDP's 8 shards alone give
    assert int(w.state.max()) < int(flat.state.max()) / 4
    assert len(w.ns_owner) == 560 and w.idle_ranks == 0
    assert "HSDP x TP: 8 replicas x 8 shards x 8 TP ranks" in p.format()


def test_help_does_not_import_torch():
    code = ("import sys, shardopt.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'shardopt --help imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "plan" in proc.stdout


def test_docs_worked_example_is_what_the_command_prints(capsys):
    from pathlib import Path

    doc = (Path(cli.__file__).resolve().parent.parent / "docs" / "sharding.md").read_text()
    cmd = "$ shardopt plan --model llama-70b --optimizer muon --layout hsdp:*x8 --world-size 512\n"
    assert cmd in doc
    shown = doc.split(cmd, 1)[1].split("```", 1)[0].rstrip()
    assert cli.main(cmd.split()[2:]) == 0
    assert capsys.readouterr().out.rstrip() == shown
