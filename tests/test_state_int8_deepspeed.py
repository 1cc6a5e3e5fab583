"""int8 optimizer state through the DeepSpeed config entry, at ZeRO-1 and ZeRO-2.

``"params": {"state_dtype": "int8"}``: every flat partition of at least 4096
elements keeps its state as int8/uint8 codes with one fp32 scale per 256
elements, counted from the partition's own first element (see
``shardopt/kernels/state_precision.py``). One spawned 2-rank job trains each
case in ``CASES`` (and its fp32-state twin), saves and resumes, and checks
what cannot run with ZeRO-3 or elastic checkpoints; the parent compares with
the single-process optimizer fed the same global batches (``tests/test_deepspeed.py``'s
helpers, on a larger model: see ``SIZE``).

What the comparisons rest on:

* **Muon**: every Muon matrix has a multiple of 256 elements and its flat group
  splits at element 458752 = 1792 * 256, so each partition's blocks are the
  single process's blocks: bitwise equal to ``Muon(state_dtype="int8")``.
* **Lion / AdamW**: one flat group holds the weights *and* the biases, so
  DeepSpeed's cut and the biases shift the blocks (and the single process
  keeps fp32 state for the biases and the head). Two int8 runs then differ by
  the stochastic rounding of differently scaled blocks: at most one code step
  (1/127 of the block's largest momentum; 1/16 of sqrt(v) for AdamW's second
  moment) per element and step. Lion's update is ``lr * sign(c)``, so a
  coordinate differs only where ``c`` is that close to zero, and then by
  multiples of ``lr``; the flips then change every later gradient, so the
  two runs differ in about as many coordinates as int8 state itself changes
  against fp32 (bounded here by twice that). AdamW's
  update moves by under half a sqrt-code step on average (the rounding is
  unbiased): the parameter change within 1/32, relative.
* **Against fp32 state** DeepSpeed's int8 run is within twice the single
  process's int8 distance for Lion (the same noise, drawn again) and within
  25% for AdamW.
* **Checkpoints**: ``engine.save_checkpoint`` / ``load_checkpoint`` carry the
  codes and scales, so the resume is bitwise. ``shardopt.checkpoint`` saves the
  dequantized partitions as fp32 per parameter and quantizes them back on load
  (salt: the step): each value within one code step of the saved one. The
  universal checkpoint and the DeepSpeed rank files written from that
  checkpoint hold the same fp32 values, so they load into the same codes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

pytest.importorskip("deepspeed")

import dist_utils  # noqa: E402
import test_deepspeed as T  # noqa: E402
import shardopt  # noqa: E402
from shardopt.kernels import state_precision as sp  # noqa: E402

WORLD = 2
# test_deepspeed's model at int8 size: 512x512 / 512x256 Muon matrices (rows a multiple of 256, so the single
# process gives them int8 state too) and partitions far above 4096 elements; a global batch of 512 rows so the
# gradients are full rank (with 16 rows, Newton-Schulz would amplify the quantization noise in the directions
# a rank-16 momentum leaves empty)
SIZE = {"IN": 256, "HID": 512, "GLOBAL": 512}
INT8 = {"state_dtype": "int8"}
CASES = [T.Case(f"{a}-z{s}-int8", f"shardopt.{n}", s, dict(kw, **INT8))
         for s in (1, 2) for a, n, kw in (("lion", "Lion", T.LION), ("adamw", "AdamW", T.ADAMW))]
CASES.append(T.Case("muon-z1-int8", "shardopt.Muon", 1, dict(T.MUON, **INT8)))
BY_NAME = {c.name: c for c in CASES}
# DeepSpeed's engine.save_checkpoint / load_checkpoint, via test_deepspeed's checkpoint cases
CKPT = [dataclasses.replace(BY_NAME["adamw-z2-int8"], name="ckpt-adamw-z2-int8"),
        dataclasses.replace(BY_NAME["muon-z1-int8"], name="ckpt-muon-z1-int8")]
# optimizer offload: the partitions and their int8 state on the CPU, the default backend
OFFLOAD = T.Case("lion-z2-int8-offload", "shardopt.Lion", 2, dict(T.LION, backend="auto", **INT8), offload=True)
# what the ZeRO-3 refusal offers instead: bf16 state at ZeRO-3, equal to the single process with bf16 state
BF16_Z3 = [T.Case(f"{a}-z3-bf16", f"shardopt.{n}", 3, dict(kw, state_dtype="bf16"))
           for a, n, kw in (("lion", "Lion", T.LION), ("muon", "Muon", T.MUON))]
SO_CKPT = BY_NAME["adamw-z2-int8"]  # shardopt.checkpoint and a universal checkpoint
K = 2  # steps before a save


def fp32_twin(case):
    return dataclasses.replace(case, name=case.name.replace("int8", "fp32"),
                               params=dict(case.params, state_dtype="fp32"))


@contextlib.contextmanager
def sized():
    """test_deepspeed's model and batches at SIZE (its module globals, restored afterwards)."""
    old = {k: getattr(T, k) for k in SIZE}
    for k, v in SIZE.items():
        setattr(T, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(T, k, v)


# ---------------------------------------------------------------------------- the 2-rank job
def _storage_bytes(opt) -> int:
    """An independent count: the bytes of the storages behind this rank's state tensors."""
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if k != "step" and torch.is_tensor(v) and v.numel():
                total += v.untyped_storage().nbytes()
    return total


def _init(case, seed=0, universal=False):
    import deepspeed

    model = T.make_model(seed)
    cfg = case.config()
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=T.param_groups(model, case.groups), config=cfg)
    return engine


def _refused(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _job(rank, world, root):
    import shardopt.checkpoint as C
    import shardopt.deepspeed  # noqa: F401
    from shardopt.checkpoint import ds_convert

    out = {}
    with sized():
        for case in [c for base in CASES for c in (base, fp32_twin(base))] + [OFFLOAD, *BF16_Z3]:
            engine = _init(case)
            T._train(engine, rank, range(T.STEPS), False)
            opt = engine.basic_optimizer
            out[case.name] = {
                "params": T._full_params(engine), "state": T._opt_state(engine), "layout": opt.layout.name,
                "state_bytes": opt.state_bytes(), "storage": _storage_bytes(opt),
                "summary": opt.summary(print_fn=None),
            }
        # engine.save_checkpoint -> load_checkpoint at the same world size, one directory per case
        for case in CKPT:
            out.update(T._engine_cases(rank, world, [], [case], os.path.join(root, "ds", case.name)))

        # shardopt.checkpoint: the state saved dequantized per parameter, quantized back on load
        e1 = _init(SO_CKPT)
        T._train(e1, rank, range(K), False)
        C.save(os.path.join(root, "so"), e1)
        saved = T._opt_state(e1)
        T._train(e1, rank, range(K, T.STEPS), False)
        e2 = _init(SO_CKPT, seed=1)  # other initial weights: everything comes from the checkpoint
        C.load(os.path.join(root, "so"), e2)
        loaded = T._opt_state(e2)
        T._train(e2, rank, range(K, T.STEPS), False)
        # ... and the same state as a DeepSpeed universal checkpoint (ZeRO-2 reads it into fp32 tensors, which
        # the integration stores as int8 again)
        if rank == 0:
            ds_convert.to_deepspeed_universal(os.path.join(root, "so"), os.path.join(root, "uc"), tag="t2")
        torch.distributed.barrier()
        e3 = _init(SO_CKPT, seed=1, universal=True)
        e3.load_checkpoint(os.path.join(root, "uc"), tag="t2")
        universal = T._opt_state(e3)
        T._train(e3, rank, range(K, T.STEPS), False)
        # ... and as DeepSpeed ZeRO-2 rank files (fp32 state, which load_state_dict quantizes)
        if rank == 0:
            ds_convert.to_deepspeed(os.path.join(root, "so"), os.path.join(root, "to_ds"), world_size=world,
                                    tag="t2", zero_stage=2)
        torch.distributed.barrier()
        e4 = _init(SO_CKPT, seed=1)
        e4.load_checkpoint(os.path.join(root, "to_ds"), tag="t2")
        out["shardopt.checkpoint"] = {"saved": saved, "loaded": loaded, "universal": universal,
                                      "to_deepspeed": T._opt_state(e4),
                                      "uninterrupted": T._full_params(e1), "resumed": T._full_params(e2),
                                      "resumed_universal": T._full_params(e3)}

        # what int8 state cannot run with: ZeRO-3 (a user-built optimizer) and elastic checkpoints
        z3 = T.Case("client-z3", "shardopt.Lion", 3, dict(T.LION, **INT8), client=True)
        elastic_cfg = BY_NAME["lion-z2-int8"].config()
        elastic_cfg["zero_optimization"]["elastic_checkpoint"] = True

        def init_elastic():
            import deepspeed

            m = T.make_model(0)
            deepspeed.initialize(model=m, model_parameters=m.parameters(), config=elastic_cfg)

        def init_client_z3():
            import deepspeed

            m = T.make_model(0)
            deepspeed.initialize(model=m, model_parameters=m.parameters(), config=z3.config(),
                                 optimizer=shardopt.Lion(m.parameters(), lr=1e-3, state_dtype="int8",
                                                         sharding="none", backend="torch"))

        out["refused"] = {"elastic": _refused(init_elastic), "client-z3": _refused(init_client_z3)}
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("int8_ds"))
    return root, dist_utils.run(_job, WORLD, root, timeout_s=600)


@pytest.fixture(scope="module")
def refs():
    """Single-process (initial, final) parameters per case and state dtype."""
    with sized():
        return {c.name: T.reference_params(c) for c in [c for base in CASES for c in (base, fp32_twin(base))] + BF16_Z3}


def _delta_rel(got, ref, initial) -> float:
    return T._rel({k: got[k] - initial[k] for k in ref}, {k: ref[k] - initial[k] for k in ref})


def _differ(got, ref) -> float:
    """The fraction of coordinates that differ."""
    return sum(float((got[k] != ref[k]).sum()) for k in ref) / sum(v.numel() for v in ref.values())


# ---------------------------------------------------------------------------- the state
@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_state_is_int8_codes_and_fp32_scales_in_real_bytes(run, name):
    _, res = run
    case = BY_NAME[name]
    keys = {"lion": {"momentum_buffer"}, "adamw": {"exp_avg", "exp_avg_sq"}, "muon": {"momentum_buffer"}}
    for rank in range(WORLD):
        r, r32 = res[rank][name], res[rank][fp32_twin(case).name]
        assert r["layout"] == ("deepspeed-zero1" if case.algorithm == "muon" else "none")
        quantized = 0
        for st in r["state"]:  # one per DeepSpeed param group: this rank's flat partition
            state_keys = {k for k in st if not k.endswith(sp.SCALE_SUFFIX)}
            numel = st[next(iter(state_keys))].numel()
            if numel < sp.INT8_MIN_NUMEL:  # Muon's aux partition (biases and head, 2050 elements): fp32 state
                assert case.algorithm == "muon" and state_keys == {"exp_avg", "exp_avg_sq"}
                assert all(v.dtype == torch.float32 for v in st.values()) and len(st) == 2
                continue
            quantized += 1
            assert state_keys == keys[case.algorithm] and len(st) == 2 * len(state_keys)
            for k in state_keys:
                assert st[k].dtype == sp.code_dtype(sp.int8_kind(k)) and st[k].shape == (numel,), (k, st[k].dtype)
                scale = st[k + sp.SCALE_SUFFIX]
                assert scale.dtype == torch.float32 and scale.shape == (sp.n_blocks(numel),)
                assert float(scale.abs().min()) > 0  # trained: every block has a scale
        assert quantized == 1
        # state_bytes() is the storage behind the state, codes and scales; summary() reports the same per rank
        assert r["state_bytes"] == r["storage"]
        assert [t["state_bytes"] for t in r["summary"]] == [res[q][name]["state_bytes"] for q in range(WORLD)]
        # one rank's worth without partitioning: every partition's codes and scales (the blocks line up here)
        assert r["summary"][0]["unsharded_state_bytes"] == sum(res[q][name]["state_bytes"] for q in range(WORLD))
        assert r["state_bytes"] <= 0.27 * r32["state_bytes"], (r["state_bytes"], r32["state_bytes"])
        assert r32["state_bytes"] == r32["storage"]


# ---------------------------------------------------------------------------- the trajectory
@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_engine_stays_within_a_quantization_step_of_the_single_process(run, refs, name):
    _, res = run
    case = BY_NAME[name]
    got, got32 = res[0][name]["params"], res[0][fp32_twin(case).name]["params"]
    for k in got:
        assert torch.equal(got[k], res[1][name]["params"][k]), f"{name}: ranks disagree on {k}"
    initial, ref8 = refs[name]
    _, ref32 = refs[fp32_twin(case).name]
    assert all(torch.equal(got32[k], ref32[k]) for k in ref32), f"{name}: the fp32-state twin left the reference"
    assert T._rel(ref8, initial) > 1e-2, "the reference barely trained: the comparison would be vacuous"
    int8_vs_fp32 = _delta_rel(ref8, ref32, initial)  # what int8 state costs in one process
    assert int8_vs_fp32 > 0, "int8 state changed nothing: is it in effect?"
    if case.algorithm == "muon":
        assert all(torch.equal(got[k], ref8[k]) for k in ref8), f"{name}: not bitwise the single-process int8 Muon"
        return
    assert not all(torch.equal(got[k], ref8[k]) for k in ref8), "the blocks were expected to differ here"
    if case.algorithm == "lion":
        lr = case.params["lr"]
        for k in ref8:
            d = (got[k] - ref8[k]).double() / lr
            assert float((d - d.round()).abs().max()) < 1e-3, f"{name}: {k} differs by other than sign flips"
        # two int8 runs that round in different blocks are two draws of the same noise: each flips signs
        # where c is within a code step of zero, and a flip changes the later gradients everywhere. Measured
        # (4 steps): Xeon host within STEPS/127 and 1.25x; AMD EPYC host 3.4% apart, 3.9% and 2.1% from fp32
        noise = _differ(ref8, ref32)
        frac = _differ(got, ref8)
        assert frac <= 2 * noise, f"{name}: {frac:.2%} of the coordinates differ (int8 noise: {noise:.2%})"
        assert _differ(got, ref32) <= 2 * noise, "DeepSpeed's int8 is further from fp32"
    else:
        err = _delta_rel(got, ref8, initial)
        assert err <= 1 / 32, f"{name}: the parameter change differs by {err:.3e} (relative)"
        assert _delta_rel(got, ref32, initial) <= 1 / 32
        assert _delta_rel(got, ref32, initial) <= 1.25 * int8_vs_fp32, "DeepSpeed's int8 is further from fp32"


@pytest.mark.slow
def test_offload_equals_the_run_in_place(run):
    """Offloaded partitions (updated through the default backend) against the same run in place: bitwise."""
    _, res = run
    for rank in range(WORLD):
        got, ref = res[rank][OFFLOAD.name], res[rank]["lion-z2-int8"]
        assert [{k: v.dtype for k, v in st.items()} for st in got["state"]] == \
            [{k: v.dtype for k, v in st.items()} for st in ref["state"]]
        assert got["state_bytes"] == ref["state_bytes"]
        assert all(torch.equal(got["params"][k], ref["params"][k]) for k in ref["params"])


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in CKPT])
def test_deepspeed_checkpoint_resumes_bitwise(run, name):
    """engine.save_checkpoint -> load_checkpoint (same world size): the codes and scales come back bit for bit,
    and the next steps equal the uninterrupted run's."""
    _, res = run
    T.test_checkpoint_round_trip(res, name)
    for rank in range(WORLD):
        st = res[rank][name]["loaded_state"][0]
        assert any(k.endswith(sp.SCALE_SUFFIX) for k in st), "the checkpoint was not an int8 one"


def _within_one_step(a: dict, b: dict, what: str):
    """Two int8 states of one partition hold the same values within one quantization step per element: one
    code of the block's scale (signed), one code of the sqrt mapping, at most 1/16 of the block's largest
    sqrt(v) (AdamW's second moment). A dequantized value quantized again lands on its own code, or on a
    neighbour where it sits on a rounding boundary."""
    assert a.keys() == b.keys(), what
    for k in a:
        if k.endswith(sp.SCALE_SUFFIX):
            continue
        if a[k].dtype == torch.float32:
            assert torch.equal(a[k], b[k]), f"{what}: {k}"
            continue
        kind, sk = sp.int8_kind(k), k + sp.SCALE_SUFFIX
        va, vb = sp.dequantize(a[k], a[sk], kind), sp.dequantize(b[k], b[sk], kind)
        step = torch.maximum(a[sk], b[sk])
        if kind == "sqrt":
            va, vb, step = va.sqrt(), vb.sqrt(), step / 16
        n = va.numel()
        per_elem = step.repeat_interleave(sp.BLOCK)[:n]
        # one step, plus the fp32 rounding of the two dequantized values (a few ulps of values ~100 steps wide)
        slack = 2.0 ** -23 * torch.maximum(va.abs(), vb.abs())
        ok = (va.double() - vb.double()).abs() <= per_elem * (1 + 1e-6) + slack
        assert bool(ok.all()), f"{what}: {k} moved by more than a step"


@pytest.mark.slow
def test_shardopt_checkpoint_saves_dequantized_state_and_resumes_within_a_step(run):
    root, res = run
    from shardopt.checkpoint import _storage as S
    from shardopt.checkpoint import offline
    from shardopt.checkpoint._manifest import read_manifest

    info = offline.inspect(os.path.join(root, "so"))
    rows = [r for r in info["rows"] if r["kind"] == "param"]
    assert rows and {r["state_dtype"] for r in rows} == {"float32"}  # fp32 per parameter, no scales
    with sized():
        model = T.make_model()
    manifest = read_manifest(S.resolve(os.path.join(root, "so")))
    assert all(p["state"] == ["exp_avg", "exp_avg_sq"] for p in manifest["params"].values())
    # the saved values are the dequantized partitions, parameter by parameter
    full = {}
    for k in ("exp_avg", "exp_avg_sq"):
        parts = [sp.dequantize(res[r]["shardopt.checkpoint"]["saved"][0][k],
                               res[r]["shardopt.checkpoint"]["saved"][0][k + sp.SCALE_SUFFIX], sp.int8_kind(k))
                 for r in range(WORLD)]
        full[k] = torch.cat(parts)
    off = 0
    for n, p in model.named_parameters():
        for k in full:
            stored = offline.read_full(os.path.join(root, "so"), f"optim.{n}.{k}")
            assert torch.equal(stored.reshape(-1), full[k][off:off + p.numel()]), (n, k)
        off += p.numel()
    for rank in range(WORLD):
        r = res[rank]["shardopt.checkpoint"]
        _within_one_step(r["saved"][0], r["loaded"][0], f"rank {rank}: shardopt.checkpoint.load")
        # the universal checkpoint and the DeepSpeed rank files written from it carry the same fp32 values,
        # quantized the same way (salt: the step)
        for via in ("universal", "to_deepspeed"):
            assert r[via][0].keys() == r["loaded"][0].keys(), via
            for k, v in r["loaded"][0].items():
                assert r[via][0][k].dtype == v.dtype and torch.equal(r[via][0][k], v), (via, k)
        assert all(torch.equal(r["resumed_universal"][k], r["resumed"][k]) for k in r["resumed"])
        with sized():
            initial = {n: p.detach().float() for n, p in T.make_model().named_parameters()}
        err = _delta_rel(r["resumed"], r["uninterrupted"], initial)
        assert err <= 1 / 32, f"rank {rank}: the resumed run is {err:.3e} from the uninterrupted one"


@pytest.mark.slow
def test_convert_from_deepspeed_reads_int8_state_as_fp32(run, tmp_path):
    """``shardopt ckpt convert --from deepspeed`` on an int8 engine's checkpoint: fp32 state per parameter,
    the dequantized partitions; a single-process fp32-state AdamW resumes from it."""
    root, res = run
    import shardopt.checkpoint as C
    from shardopt.checkpoint import ds_convert

    name = "ckpt-adamw-z2-int8"
    ds_convert.from_deepspeed(os.path.join(root, "ds", name), str(tmp_path / "conv"), tag="t2")
    saved = [res[r][name]["saved_state"][0] for r in range(WORLD)]
    full = {k: torch.cat([sp.dequantize(s[k], s[k + sp.SCALE_SUFFIX], sp.int8_kind(k)) for s in saved])
            for k in ("exp_avg", "exp_avg_sq")}
    with sized():
        model = T.make_model()
    opt = shardopt.AdamW(model.parameters(), sharding="none", backend="torch")
    C.load(str(tmp_path / "conv"), model, opt)
    off = 0
    for p in model.parameters():
        st = opt.state[p]
        assert st["step"] == K
        for k in full:
            assert st[k].dtype == torch.float32 and torch.equal(st[k].reshape(-1), full[k][off:off + p.numel()])
        off += p.numel()


# ---------------------------------------------------------------------------- refused
@pytest.mark.slow
def test_zero3_and_elastic_checkpoints_are_refused(run):
    _, res = run
    for rank in range(WORLD):
        msg = res[rank]["refused"]
        assert msg["client-z3"] and "ZeRO-3" in msg["client-z3"] and "state_dtype='bf16'" in msg["client-z3"]
        assert msg["elastic"] and "elastic_checkpoint" in msg["elastic"] and "false" in msg["elastic"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in BF16_Z3])
def test_zero3_takes_bf16_state(run, refs, name):
    _, res = run
    r = res[0][name]
    assert {v.dtype for st in r["state"] for v in st.values()} == {torch.bfloat16}
    assert r["state_bytes"] == r["storage"]
    _, ref = refs[name]
    assert all(torch.equal(r["params"][k], ref[k]) for k in ref), f"{name}: not the single process with bf16 state"


def test_zero3_int8_config_is_refused_at_parse_time():
    import shardopt.deepspeed  # noqa: F401
    from deepspeed.runtime.config import DeepSpeedConfig

    for typ in ("shardopt.Lion", "shardopt.AdamW", "shardopt.Muon"):
        with pytest.raises(ValueError, match=r"state_dtype='int8' is not supported under DeepSpeed ZeRO-3.*bf16"):
            DeepSpeedConfig(T._cfg({"type": typ, "params": {"state_dtype": "int8"}}, stage=3))
    cfg = DeepSpeedConfig(T._cfg({"type": "shardopt.Lion", "params": {"state_dtype": "int8"}}, stage=2))
    assert cfg._shardopt.kwargs["state_dtype"] == "int8"
