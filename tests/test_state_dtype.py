"""Low-precision optimizer state (``state_dtype="bf16"``): the rounding, the option, every layout,
checkpoints and reporting.

The reference for every sharded run is the single-process optimizer with the
same ``state_dtype`` (``cases.run_single``); the rounding itself is checked
against a pure-Python transcription of the formula in
``shardopt/kernels/state_precision.py``.
"""
from __future__ import annotations

import copy
import math
import pickle
import struct

import pytest
import torch

import dist_utils
import shardopt
from cases import CASE_IDS, SHAPES, assert_close_params, build, make_grads, make_params, run_single
from shardopt.kernels import state_precision as sp

ALGOS = ["lion", "adamw", "muon"]
STEPS = 4


# ---------------------------------------------------------------- the rounding
def _py_round(x: float, step: int) -> int:
    """bf16 bits of fp32 ``x`` by the documented formula, in Python ints (uint32 arithmetic)."""
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    h = u ^ ((step * 0x9E3779B9) & 0xFFFFFFFF)
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    h ^= h >> 16
    return ((u + (h & 0xFFFF)) >> 16) & 0xFFFF


def _bits(t: torch.Tensor) -> list[int]:
    return [b & 0xFFFF for b in t.view(torch.int16).tolist()]


def test_rounding_matches_the_documented_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, generator=g) * 10 ** torch.randint(-30, 30, (200,), generator=g).float(),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 3.3895313e38, -3.3895313e38, 1e-42, -1e-42])])
    for step in (1, 2, 7, 123456789, 2**33 + 5):
        got = _bits(sp.round_bf16(x, step))
        want = [_py_round(v, step) for v in x.tolist()]
        assert got == want, step


def test_inf_and_nan_round_to_nearest():
    x = torch.tensor([float("inf"), float("-inf"), float("nan")])
    r = sp.round_bf16(x, 3)
    assert r[0] == float("inf") and r[1] == float("-inf") and torch.isnan(r[2])


def test_stochastic_rounding_is_unbiased():
    # (a) values strictly between two bf16 neighbours: the mean of the stores over many steps is the value
    g = torch.Generator().manual_seed(1)
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    frac = torch.rand(64, generator=g) * 0.9 + 0.05
    x = (1.0 + frac * ulp).float()
    n = 4000
    acc = torch.zeros(64, dtype=torch.float64)
    for s in range(1, n + 1):
        acc += sp.round_bf16(x, s).double()
    mean = acc / n
    f = (x.double() - 1.0) / ulp
    sigma = ulp * torch.sqrt(f * (1 - f)) / math.sqrt(n)
    z = (mean - x.double()) / sigma
    assert z.abs().max() < 5 and abs(float(z.mean())) < 0.6, (z.abs().max(), z.mean())
    # every store is one of the two neighbours
    for s in (1, 2, 3):
        r = sp.round_bf16(x, s).float()
        assert bool(((r == 1.0) | (r == 1.0 + ulp)).all())
    # round to nearest has a bias of up to half an ulp on the same values
    assert float((x.to(torch.bfloat16).double() - x.double()).abs().max()) > 0.4 * ulp
    # one step, many distinct values (as the elements of a state tensor): unbiased across them
    y = 1.0 + torch.rand(1 << 16, generator=g) * ulp
    err = (sp.round_bf16(y, 5).double() - y.double()).mean() / ulp
    assert abs(float(err)) < 0.01


def test_ema_tracks_a_constant_with_bf16_state_where_round_to_nearest_stalls():
    # (b) Lion's momentum m <- 0.99 m + 0.01 g with a constant g, lr = 0: through the optimizer
    g = torch.Generator().manual_seed(2)
    target = 0.5 + 1.5 * torch.rand(2000, generator=g)
    p = torch.nn.Parameter(torch.zeros(2000))
    opt = shardopt.Lion([p], lr=0.0, betas=(0.9, 0.99), state_dtype="bf16", backend="torch")
    rn = torch.zeros(2000, dtype=torch.bfloat16)
    exact = torch.zeros(2000, dtype=torch.float64)
    for _ in range(1500):
        p.grad = target.clone()
        opt.step()
        rn = (rn.float() * 0.99 + target * (1.0 - 0.99)).to(torch.bfloat16)
        exact = exact * 0.99 + target.double() * 0.01
    m = opt.state[p]["momentum_buffer"]
    assert m.dtype == torch.bfloat16
    sr_err = float(((m.double() - exact) / target.double()).mean())
    rn_err = float(((rn.double() - exact) / target.double()).mean())
    assert abs(sr_err) < 0.01, sr_err  # tracks the constant (the EMA has converged: exact ~ target)
    assert rn_err < -0.1, rn_err  # round to nearest stalls well below it
    assert float((exact - target.double()).abs().max()) < 1e-5


def test_rounding_is_deterministic_and_keyed_by_value_and_step_only():
    # (c)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g)
    a = sp.round_bf16(x, 11)
    assert torch.equal(a.view(torch.int16), sp.round_bf16(x.clone(), 11).view(torch.int16))
    perm = torch.randperm(5000, generator=g)
    assert torch.equal(sp.round_bf16(x[perm], 11).view(torch.int16), a[perm].view(torch.int16))
    # a shard rounds its elements as the whole tensor does, wherever it is cut
    for lo, hi in ((0, 1), (17, 2999), (2999, 5000)):
        assert torch.equal(sp.round_bf16(x[lo:hi], 11).view(torch.int16), a[lo:hi].view(torch.int16))
    # the same value at two positions rounds the same way
    dup = torch.full((64,), float(x[0]))
    assert len(set(_bits(sp.round_bf16(dup, 11)))) == 1
    # another step gives other bits for some elements (a fresh draw), and another value is another draw
    assert not torch.equal(sp.round_bf16(x, 12).view(torch.int16), a.view(torch.int16))
    # a long tensor (chunked internally) rounds like its pieces
    big = torch.randn((1 << 20) + 37, generator=g)
    whole = sp.round_bf16(big, 4)
    assert torch.equal(whole[-100:].view(torch.int16), sp.round_bf16(big[-100:], 4).view(torch.int16))


# ---------------------------------------------------------------- the option
def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 4, generator=g).to(dtype)), torch.nn.Parameter(torch.randn(5, generator=g))]


@pytest.mark.parametrize("cls", [shardopt.Lion, shardopt.AdamW, shardopt.Muon])
def test_bad_state_dtype_names_the_valid_choices(cls):
    ps = _params()
    mk = (lambda **kw: cls([{"params": ps[:1]}, {"params": ps[1:], "algorithm": "adamw"}], **kw)) \
        if cls is shardopt.Muon else (lambda **kw: cls(ps, **kw))
    for bad in ("int4", "bfloat16", torch.bfloat16, None, 16):
        with pytest.raises(ValueError, match=r"state_dtype .*valid: 'fp32', 'bf16', 'int8'"):
            mk(state_dtype=bad)
    # int8 is available: the optimizer takes it
    assert {g["state_dtype"] for g in mk(state_dtype="int8").param_groups} == {"int8"}
    # per group too, naming the group
    with pytest.raises(ValueError, match=r"param group 0 .*valid: 'fp32', 'bf16', 'int8'"):
        cls([{"params": ps[:1], "state_dtype": "int4"}])


def test_state_keys_dtypes_groups_and_copies():
    ps = _params()
    p64 = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    pc = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = shardopt.AdamW([{"params": ps + [p64, pc]}, {"params": [torch.nn.Parameter(torch.randn(4))],
                                                        "state_dtype": "fp32"}],
                         amsgrad=True, state_dtype="bf16")
    assert [g["state_dtype"] for g in opt.param_groups] == ["bf16", "fp32"]
    st = opt.state
    for p in ps:
        assert set(st[p]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert all(st[p][k].dtype == torch.bfloat16 for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    assert st[p64]["exp_avg"].dtype == torch.float64  # fp64 parameters keep fp64 state
    assert st[pc]["exp_avg"].dtype == torch.complex64  # complex ones their own dtype
    assert st[opt.param_groups[1]["params"][0]]["exp_avg"].dtype == torch.float32
    for p in ps + [p64, pc] + opt.param_groups[1]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert [g["state_dtype"] for g in clone.param_groups] == ["bf16", "fp32"]
        assert clone.defaults["state_dtype"] == "bf16"
        cp = clone.param_groups[0]["params"][0]
        assert clone.state[cp]["exp_avg"].dtype == torch.bfloat16
    # Muon: the optimizer's state_dtype fills its auxiliary groups, which may set their own
    m = shardopt.Muon([{"params": ps[:1]}, {"params": ps[1:], "algorithm": "lion"}], state_dtype="bf16")
    assert [g["state_dtype"] for g in m.param_groups] == ["bf16", "bf16"]
    assert m.state[ps[1]]["momentum_buffer"].dtype == torch.bfloat16
    m = shardopt.Muon([{"params": ps[:1]}, {"params": ps[1:], "algorithm": "adamw", "state_dtype": "fp32"}],
                      state_dtype="bf16")
    assert m.state[ps[0]]["momentum_buffer"].dtype == torch.bfloat16
    assert m.state[ps[1]]["exp_avg"].dtype == torch.float32


def _one_step_reference(name, p0, g, step_count=1):
    """The documented math by hand: load (zeros), fp32 update, SR store at the parameter's step."""
    from shardopt import functional as F

    p = p0.clone()
    if name == "lion":
        m = torch.zeros_like(p)
        F.lion([p], [g], [m], lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
        return p, {"momentum_buffer": sp.round_bf16(m, step_count)}
    if name == "adamw":
        from shardopt.kernels import torch_ops

        m, v = torch.zeros_like(p), torch.zeros_like(p)
        torch_ops.adamw_step([p], [g], [m], [v], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                             step=step_count)
        return p, {"exp_avg": sp.round_bf16(m, step_count), "exp_avg_sq": sp.round_bf16(v, step_count)}
    raise ValueError(name)


@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_one_step_is_the_documented_math_on_every_backend(name):
    g = torch.Generator().manual_seed(4)
    p0, grad = torch.randn(37, 5, generator=g), torch.randn(37, 5, generator=g)
    want_p, want_st = _one_step_reference(name, p0, grad)
    cls = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[name]
    for backend in ("torch", "auto"):
        p = torch.nn.Parameter(p0.clone())
        opt = cls([p], lr=1e-2, weight_decay=0.1, state_dtype="bf16", backend=backend)
        p.grad = grad.clone()
        opt.step()
        if name == "adamw" and backend == "auto":  # the C++ kernels' sqrt: AdamW's fp32 tolerance
            torch.testing.assert_close(p.detach(), want_p, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p.detach(), want_p), backend
        # the state bits match on every backend (no sqrt in the moments)
        for k, v in want_st.items():
            assert torch.equal(opt.state[p][k].view(torch.int16), v.view(torch.int16)), (backend, k)


def test_bf16_state_backends():
    """The C++ CPU and the Triton kernels take bf16 state themselves; the CUDA ones not yet (the dispatcher
    sends such calls to the torch reference); every call with bf16 state needs state_step."""
    from shardopt import kernels
    from shardopt.kernels import cpu, cuda, triton_ops

    assert "state_bf16" in kernels.FEATURES
    assert "state_bf16" in cpu.FEATURES
    assert "state_bf16" not in cuda.FEATURES and "state_bf16" in triton_ops.FEATURES
    assert kernels.serves("torch", torch.float32, {"state_bf16"})
    if cpu.available():
        assert kernels.serves("cpu", torch.float32, {"state_bf16"})
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="state_step"):
        kernels.lion_step([p], [p.clone()], [torch.zeros(4, dtype=torch.bfloat16)], lr=1.0, beta1=0.9, beta2=0.99,
                          weight_decay=0.0)


@pytest.mark.parametrize("name", CASE_IDS)
def test_backends_agree_bitwise_on_bf16_state(name):
    """auto (the C++ kernels on CPU, bf16 state included) and torch give the same state bits and the same
    params (bitwise but for AdamW's sqrt: its fp32 tolerance)."""
    a, ref = run_single(name, STEPS, state_dtype="bf16")
    ps = make_params()
    opt = build(name, ps, backend="auto", sharding="none", state_dtype="bf16")
    for k in range(STEPS):
        for p, g in zip(ps, make_grads(k)):
            p.grad = g
        opt.step()
    assert_close_params([p.detach() for p in ps], a, name)
    ours, theirs = ([p for g in o.param_groups for p in g["params"]] for o in (opt, ref))
    compared = 0
    for p, q in zip(ours, theirs):
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and v.dtype == torch.bfloat16:
                assert torch.equal(v.view(torch.int16), ref.state[q][k].view(torch.int16)), (name, k)
                compared += 1
    assert compared


@pytest.mark.parametrize("name", ["lion", "adamw", "muon"])
def test_bf16_state_follows_fp32_state_closely(name):
    ref, _ = run_single(name, 8)
    got, opt = run_single(name, 8, state_dtype="bf16")
    assert all(st[k].dtype == torch.bfloat16 for st in opt.state.values() for k in st if k != "step")
    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
    assert err < 2e-3, err
    assert err > 0 or name == "lion"  # Lion's signs rarely feel a bf16 rounding of its momentum


def test_steps_per_parameter_salt_the_rounding():
    """Lion groups its calls by each parameter's step count when the state is bf16 (its rounding's salt)."""
    p, q = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    opt = shardopt.Lion([p, q], lr=1e-2, state_dtype="bf16", backend="torch")
    seen = []
    from shardopt import kernels

    orig = kernels.lion_step

    def spy(*a, **kw):
        seen.append((len(a[0]), kw["state_step"]))
        return orig(*a, **kw)

    kernels.lion_step = spy
    try:
        p.grad = torch.randn(8)
        opt.step()  # q has no gradient: only p steps
        p.grad, q.grad = torch.randn(8), torch.randn(8)
        opt.step()
    finally:
        kernels.lion_step = orig
    assert seen == [(1, 1), (1, 2), (1, 1)]
    assert opt.state[p]["step"] == 2 and opt.state[q]["step"] == 1


def test_load_state_dict_converts_to_the_live_state_dtype():
    ps = make_params()
    src, _ = None, None
    for name in ALGOS:
        _, a = run_single(name, 3, state_dtype="bf16")
        _, b = run_single(name, 3)
        sd_bf16, sd_fp32 = a.state_dict(), b.state_dict()
        # bf16 state into an fp32-state optimizer: widened exactly; the group stays fp32
        o = build(name, make_params(), backend="torch", sharding="none")
        o.load_state_dict(sd_bf16)
        assert {g["state_dtype"] for g in o.param_groups} == {"fp32"}
        for i, st in sd_bf16["state"].items():
            mine = o.state[o._flat_params()[0][i]]
            for k, v in st.items():
                if k != "step":
                    assert mine[k].dtype == torch.float32 and torch.equal(mine[k], v.float())
        # fp32 state into a bf16-state optimizer: rounded to nearest, once; the group stays bf16
        o = build(name, make_params(), backend="torch", sharding="none", state_dtype="bf16")
        o.load_state_dict(sd_fp32)
        assert {g["state_dtype"] for g in o.param_groups} == {"bf16"}
        for i, st in sd_fp32["state"].items():
            mine = o.state[o._flat_params()[0][i]]
            for k, v in st.items():
                if k != "step":
                    assert mine[k].dtype == torch.bfloat16 and torch.equal(mine[k], v.to(torch.bfloat16))
        # a bf16 state_dict round trip is exact and resumes on the same bits
        o = build(name, make_params(), backend="torch", sharding="none", state_dtype="bf16")
        o.load_state_dict(copy.deepcopy(sd_bf16))
        for i, st in sd_bf16["state"].items():
            mine = o.state[o._flat_params()[0][i]]
            assert all(torch.equal(mine[k], v) for k, v in st.items() if k != "step")
    # torch.optim.AdamW's state_dict (fp32) loads into a bf16-state shardopt AdamW
    ps = make_params()
    t = torch.optim.AdamW(ps, lr=1e-2)
    for p, g in zip(ps, make_grads(0)):
        p.grad = g
    t.step()
    o = shardopt.AdamW(make_params(), lr=1e-2, state_dtype="bf16", sharding="none")
    o.load_state_dict(t.state_dict())
    assert o.state[o.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16


def test_state_bytes_and_summary_show_real_bytes_single_device():
    for name in ALGOS:
        _, a = run_single(name, 1, state_dtype="bf16")
        _, b = run_single(name, 1)
        storage = sum(v.untyped_storage().nbytes() for st in a.state.values() for k, v in st.items() if k != "step")
        assert a.state_bytes() == storage == b.state_bytes() // 2
        row = a.summary(print_fn=None)[0]
        assert row["state_bytes"] == storage and row["unsharded_state_bytes"] == storage
    # bf16 parameters: the fp32 master copy stays fp32 (only the state halves)
    _, a = run_single("lion", 1, dtype=torch.bfloat16, state_dtype="bf16")
    _, b = run_single("lion", 1, dtype=torch.bfloat16)
    n = sum(p.numel() for p in make_params())
    assert b.state_bytes() == 8 * n and a.state_bytes() == 6 * n


# ---------------------------------------------------------------- every layout (spawned gloo ranks)
K = 3  # steps before a checkpoint, and again after it


class Holder(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.ps = torch.nn.ParameterList(make_params(dtype))


def _model(layout, world):
    return dist_utils.shard(Holder(), layout, world)


_layouts = dist_utils.layouts
_full = dist_utils.full


def _train(opt, ps, k0, k1):
    dist_utils.train(opt, ps, k0, k1, make_grads)


def _storage_bytes(opt) -> int:
    """An independent count: the bytes of the storages behind this rank's state tensors."""
    seen, total = set(), 0
    for st in opt.state.values():
        for k, v in st.items():
            if k == "step" or not torch.is_tensor(v):
                continue
            loc = v.to_local() if hasattr(v, "to_local") else v
            s = loc.untyped_storage()
            if s.data_ptr() in seen or loc.numel() == 0:
                continue
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _layouts_job(rank, world, d, names, ckpt):
    import shardopt.checkpoint as C

    out = {}
    for name in names:
        for layout in _layouts(world):
            row = {}
            for sd in ("bf16", "fp32"):
                m, ps = _model(layout, world)
                opt = build(name, ps, backend="torch", sharding="zero1" if layout == "zero1" else "auto",
                            state_dtype=sd)
                _train(opt, ps, 0, STEPS)
                tensors = [v for st in opt.state.values() for k, v in st.items() if k != "step"]
                row[sd] = dict(params=_full(ps), bytes=opt.state_bytes(), storage=_storage_bytes(opt),
                               table=opt.summary(print_fn=None), layout=opt.layout.name,
                               dtypes={str(v.dtype) for v in tensors},
                               placed=all(v.placements == p.placements for p in ps for k, v in opt.state[p].items()
                                          if k != "step") if layout != "zero1" else True)
            out[(name, layout)] = row
            if not ckpt:
                continue
            # save after K steps; the uninterrupted run goes on to 2K; a fresh optimizer resumes from the save
            m, ps = _model(layout, world)
            opt = build(name, ps, backend="torch", state_dtype="bf16")
            _train(opt, ps, 0, K)
            C.save(f"{d}/{name}-{layout}", m, opt)
            _train(opt, ps, K, 2 * K)
            m2, ps2 = _model(layout, world)
            opt2 = build(name, ps2, backend="torch", state_dtype="bf16")
            C.load(f"{d}/{name}-{layout}", m2, opt2)
            _train(opt2, ps2, K, 2 * K)
            out[(name, layout, "resume")] = (_full(ps), _full(ps2))
    if ckpt:
        # ranks that disagree on the state dtype raise on every rank at construction
        try:
            build("lion", make_params(), backend="torch", state_dtype="bf16" if rank else "fp32")
            out["disagree"] = None
        except ValueError as e:
            out["disagree"] = str(e)
    return out


def _check_layouts(res, names, world):
    for name in names:
        ref, ref_opt = run_single(name, STEPS, state_dtype="bf16")
        ref32, _ = run_single(name, STEPS)
        for layout in _layouts(world):
            for rank in range(world):
                row = res[rank][(name, layout)]
                bf, fp = row["bf16"], row["fp32"]
                assert bf["layout"] == ({"zero1": "zero1" if world > 1 else "none", "fsdp2": "fsdp2",
                                         "hsdp": "fsdp2"}[layout])
                # the same parameters as the single process with the same state dtype (Lion: bitwise)
                assert_close_params(bf["params"], ref, name)
                assert_close_params(fp["params"], ref32, name)
                assert bf["dtypes"] == {"torch.bfloat16"} and fp["dtypes"] == {"torch.float32"}
                assert bf["placed"]
                # real bytes: the storage behind the state, half the fp32 state's
                assert bf["bytes"] == bf["storage"] and fp["bytes"] == fp["storage"]
                assert 2 * bf["bytes"] == fp["bytes"], (name, layout, rank, bf["bytes"], fp["bytes"])
                # the table lists the ranks of the shard group (HSDP: ranks 0, 1 and 2, 3 hold the same pieces)
                assert [t["state_bytes"] for t in bf["table"]] == [res[r][(name, layout)]["bf16"]["bytes"]
                                                                  for r in range(world // (2 if layout == "hsdp" else 1))]
            if name != "muon" and layout != "hsdp":  # shardopt plan counts the same bytes per rank (Muon: its own
                # group split; HSDP: the planner has no replica dimension)
                from shardopt.tools.plan import plan

                for sd in ("bf16", "fp32"):
                    pl = plan(Holder(), world_sizes=[world], layout=layout, optimizer=name, param_dtype="fp32",
                              state_dtype=sd)
                    assert pl.worlds[0].state.tolist() == [res[r][(name, layout)][sd]["bytes"] for r in range(world)]
            total = sum(res[r][(name, layout)]["bf16"]["bytes"] for r in range(world)) / (2 if layout == "hsdp" else 1)
            assert total >= ref_opt.state_bytes()
            assert {t["unsharded_state_bytes"] for t in res[0][(name, layout)]["bf16"]["table"]} == \
                {ref_opt.state_bytes()}


@pytest.mark.slow
def test_w1_fsdp2_and_zero1_state_bytes():
    res = dist_utils.run(_layouts_job, 1, None, ALGOS, False)
    _check_layouts(res, ALGOS, 1)


@pytest.mark.slow
def test_w2_layouts_equal_single_process_and_checkpoints_resume(tmp_path):
    """ZeRO-1 and FSDP2 at W=2 for every algorithm; resume 2 -> 2 (bitwise) and 2 -> 1; ckpt tools."""
    import shardopt.checkpoint as C
    from shardopt.checkpoint import cli, offline

    d = str(tmp_path)
    res = dist_utils.run(_layouts_job, 2, d, ALGOS, True)
    _check_layouts(res, ALGOS, 2)
    assert all(r["disagree"] and "ranks disagree" in r["disagree"] and "state_dtype" in r["disagree"] for r in res)
    for name in ALGOS:
        want, _ = run_single(name, 2 * K, state_dtype="bf16")
        for layout in ("zero1", "fsdp2"):
            for rank in range(2):
                full, resumed = res[rank][(name, layout, "resume")]
                assert all(torch.equal(a, b) for a, b in zip(full, resumed)), (name, layout, rank)  # 2 -> 2
                assert_close_params(full, want, name)
            # 2 -> 1: a single-process bf16-state optimizer resumes on the same stored bits
            m, ps = _model("single", 1)
            opt = build(name, ps, backend="torch", sharding="none", state_dtype="bf16")
            C.load(f"{d}/{name}-{layout}", m, opt)
            assert all(v.dtype == torch.bfloat16 for st in opt.state.values() for k, v in st.items() if k != "step")
            _train(opt, ps, K, 2 * K)
            assert_close_params(_full(ps), want, name)
            # ... and an fp32-state one widens the saved state exactly
            m, ps = _model("single", 1)
            opt = build(name, ps, backend="torch", sharding="none")
            C.load(f"{d}/{name}-{layout}", m, opt)
            _, at_k = run_single(name, K, state_dtype="bf16")
            for p, q in zip(opt._flat_params()[0], at_k._flat_params()[0]):
                for k, v in at_k.state[q].items():
                    if k != "step":
                        assert opt.state[p][k].dtype == torch.float32 and torch.equal(opt.state[p][k], v.float())
    # shardopt ckpt: inspect shows the state dtype and its bytes; consolidate writes fp32 state for torch
    path = f"{d}/adamw-zero1"
    info = offline.inspect(path)
    n = sum(math.prod(s) for s in SHAPES)
    assert {r["state_dtype"] for r in info["rows"] if r["kind"] == "param"} == {"bfloat16"}
    assert info["state_bytes"] == 2 * 2 * n  # exp_avg + exp_avg_sq, 2 bytes each
    assert cli.main(["--no-progress", "inspect", path]) == 0
    out = cli.main(["--no-progress", "consolidate", path, f"{d}/adamw.pt"])
    assert out == 0
    sd = torch.load(f"{d}/adamw.pt", weights_only=False)
    _, at_k = run_single("adamw", K, state_dtype="bf16")
    ref = at_k.state_dict()
    for i, st in ref["state"].items():
        for k, v in st.items():
            if k != "step":
                assert sd["state"][i][k].dtype == torch.float32 and torch.equal(sd["state"][i][k], v.float())
    # torch.optim.AdamW resumes from the consolidated file
    ps = make_params()
    for p, v in zip(ps, [sd["model"][f"ps.{i}"] for i in range(len(ps))]):
        p.data.copy_(v)
    t = torch.optim.AdamW([{"params": ps[::2]}, {"params": ps[1::2]}])
    t.load_state_dict(sd)
    assert t.state[ps[0]]["exp_avg"].dtype == torch.float32


def _resume_job(rank, world, d, name):
    import shardopt.checkpoint as C

    out = {}
    for layout in ("zero1", "fsdp2"):
        m, ps = _model(layout, world)
        opt = build(name, ps, backend="torch", state_dtype="bf16")
        C.load(f"{d}/{name}-{layout}", m, opt)
        _train(opt, ps, K, 2 * K)
        out[layout] = _full(ps)
    return out


@pytest.mark.slow
def test_w4_layouts_hsdp_and_resume_4_to_2(tmp_path):
    d = str(tmp_path)
    res = dist_utils.run(_layouts_job, 4, d, ALGOS, True)
    _check_layouts(res, ALGOS, 4)
    # saved at W=4 after K steps, resumed at W=2 in the same layout: the uninterrupted single-process run
    # (Lion bitwise), and 4 -> 4 resumes on the uninterrupted run's bits
    res2 = [dist_utils.run(_resume_job, 2, d, name) for name in ALGOS]
    for name, rs in zip(ALGOS, res2):
        want, _ = run_single(name, 2 * K, state_dtype="bf16")
        for r in res:
            for layout in _layouts(4):
                assert all(torch.equal(a, b) for a, b in zip(*r[(name, layout, "resume")])), (name, layout)
        for r in rs:
            for layout in ("zero1", "fsdp2"):
                assert_close_params(r[layout], want, name)


# ---------------------------------------------------------------- DeepSpeed config entry
@pytest.mark.slow
def test_deepspeed_config_state_dtype_bf16_at_zero1_and_zero2(tmp_path):
    """``"params": {"state_dtype": "bf16"}`` at ZeRO-1/2: DeepSpeed's flat partitions hold bf16 state and the
    engine equals the single-process optimizer with bf16 state (Lion bitwise)."""
    pytest.importorskip("deepspeed")
    import test_deepspeed as T

    cases = [T.Case(f"{a}-z{s}-state-bf16", f"shardopt.{n}", s, dict(kw, state_dtype="bf16"))
             for s in (1, 2) for a, n, kw in (("lion", "Lion", T.LION), ("adamw", "AdamW", T.ADAMW))]
    cases.append(T.Case("muon-z1-state-bf16", "shardopt.Muon", 1, dict(T.MUON, state_dtype="bf16")))
    res = dist_utils.run(T._engine_cases, 2, cases, [], str(tmp_path), timeout_s=300)
    n = sum(p.numel() for p in T.make_model().parameters())
    for case in cases:
        r = res[0][case.name]
        assert r["stage"] == case.stage
        # real bytes: 2 per state element (fp32 partitions, so no master copy)
        assert r["state_bytes"] == 2 * r["state_numel"]
        assert sum(x[case.name]["state_bytes"] for x in res) >= 2 * n * (2 if case.algorithm == "adamw" else 1)
        _, ref = T.reference_params(case)
        got = r["params"]
        if case.algorithm == "lion":
            assert all(torch.equal(got[k], ref[k]) for k in ref), case.name
        elif case.algorithm == "muon":
            assert T._rel(got, ref) <= 2e-3, case.name
        else:
            for k in ref:
                assert float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) <= 1e-6, (case.name, k)


# ---------------------------------------------------------------- shardopt plan
def test_plan_state_dtype_option(capsys):
    from shardopt import cli
    from shardopt.tools.plan import plan, state_element_bytes

    assert [state_element_bytes(a, "bf16") for a in ALGOS] == [2, 4, 2]
    assert [state_element_bytes(a) for a in ALGOS] == [4, 8, 4]
    # int8: 1 byte + one fp32 scale per 256 elements per state tensor where the shape takes it, else fp32
    assert [state_element_bytes(a, "int8", shape=(64, 256)) for a in ALGOS] == [1 + 4 / 256, 2 + 8 / 256,
                                                                                 1 + 4 / 256]
    for small in ((40, 100), (4096,), (8, 256), (70, 61)):
        assert [state_element_bytes(a, "int8", shape=small) for a in ALGOS] == [4, 8, 4], small
    # narrow rows: blocks of their largest divisor in [64, 256] (here 100)
    assert state_element_bytes("adamw", "int8", shape=(70, 100)) == 2 * (1 + 4 / 100)
    with pytest.raises(ValueError, match="shape"):
        state_element_bytes("lion", "int8")
    with pytest.raises(ValueError, match="fp32, bf16, int8"):
        plan("gpt2", state_dtype="int4")
    for opt in ALGOS:
        a = plan("gpt2", world_sizes=[8], optimizer=opt, state_dtype="bf16").worlds[0]
        b = plan("gpt2", world_sizes=[8], optimizer=opt).worlds[0]
        assert (2 * a.state == b.state).all() and (a.master == b.master).all()
    # int8 on one process: an independent count over the model's parameters
    from shardopt.tools.plan import load_model, optimizer_tensors

    _, gpt2 = load_model("gpt2")
    for opt in ALGOS:
        keys = {"adamw": 2, "lion": 1, "muon": 1}  # state tensors per parameter (Muon's aux group: AdamW)
        want = sum(keys[t.algorithm] * (t.numel + 4 * t.numel // 256 if sp.int8_eligible(t.shape) else 4 * t.numel)
                   for t in optimizer_tensors(gpt2, opt))
        got = plan("gpt2", world_sizes=[1], optimizer=opt, state_dtype="int8").worlds[0]
        assert got.state.tolist() == [want], opt
        w8 = plan("gpt2", world_sizes=[8], optimizer=opt, state_dtype="int8").worlds[0]
        assert want <= int(w8.state.sum()) < want + 8 * 1024 and 3 * w8.state.max() < want
    # DeepSpeed: each flat partition holds its own blocks (the last one short)
    ds = plan("gpt2", world_sizes=[8], layout="deepspeed-zero1", optimizer="lion", state_dtype="int8").worlds[0]
    part = int(plan("gpt2", world_sizes=[8], layout="deepspeed-zero1", optimizer="lion").worlds[0].state[0]) // 4
    assert ds.state.tolist() == [part + 4 * -(-part // 256)] * 8
    assert cli.main(["plan", "--model", "gpt2", "--world-size", "8", "--state-dtype", "bf16"]) == 0
    assert "optimizer state (bf16)" in capsys.readouterr().out
    assert cli.main(["plan", "--model", "gpt2", "--state-dtype", "int8"]) == 0
    assert "optimizer state (int8)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["plan", "--model", "gpt2", "--state-dtype", "fp16"])
    assert "--state-dtype" in capsys.readouterr().err


_INT8_SHAPES = [(64, 256), (5,), (40, 100), (3, 4096), (70, 100), (16, 512), (256,), (33, 256), (9, 2, 256)]


class _Int8Holder(torch.nn.Module):
    """Parameters int8 state takes (2-D and 3-D, rows of 256 and 512 in blocks of 256, rows of 100 in blocks of
    100) and ones it leaves fp32 (1-D, under 4096 elements)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g)) for s in _INT8_SHAPES])


def _int8_plan_job(rank, world, layout):
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for name in ALGOS:
        m = _Int8Holder()
        if layout == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
        ps = list(m.parameters())
        if name == "muon":
            opt = shardopt.Muon(shardopt.muon_param_groups(m), lr=1e-2, backend="torch", state_dtype="int8",
                                sharding="zero1" if layout == "zero1" else "auto")
        else:
            opt = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[name](
                ps, lr=1e-2, backend="torch", state_dtype="int8", sharding="zero1" if layout == "zero1" else "auto")
        for p in ps:
            g = torch.randn(p.shape)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        opt.step()
        out[name] = (opt.state_bytes(), _storage_bytes(opt), opt.summary(print_fn=None))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero1", "fsdp2"])
def test_plan_counts_the_int8_state_bytes_of_every_rank(layout):
    """shardopt plan --state-dtype int8 gives each rank the bytes the optimizers hold (ZeRO-1's cuts on
    256-element blocks, FSDP2's row chunks), W = 1, 2, 3."""
    from shardopt.tools.plan import plan

    single = {}
    for world in (1, 2, 3):
        res = dist_utils.run(_int8_plan_job, world, layout)
        for name in ALGOS:
            real = [r[name][0] for r in res]
            assert real == [r[name][1] for r in res]
            # summary(): each rank's real bytes, and "without sharding" is the one-process state, scales included
            table = res[0][name][2]
            assert [t["state_bytes"] for t in table] == real
            single.setdefault(name, real[0])
            assert {t["unsharded_state_bytes"] for t in table} == {single[name]}, (layout, world, name)
            pl = plan(_Int8Holder(), world_sizes=[world], layout=layout, optimizer=name, param_dtype="fp32",
                      state_dtype="int8")
            assert pl.worlds[0].state.tolist() == real, (layout, world, name)
    # the independent count, one process
    want = sum(math.prod(s) + 4 * math.prod(s) // sp.int8_block(s) if sp.int8_eligible(s) else 4 * math.prod(s)
               for s in _INT8_SHAPES)
    assert plan(_Int8Holder(), world_sizes=[1], layout=layout, optimizer="lion", param_dtype="fp32",
                state_dtype="int8").worlds[0].state.tolist() == [want]


# ---------------------------------------------------------------- shardopt demo
def test_demo_refuses_other_state_dtypes(capsys):
    from shardopt import cli
    from shardopt.tools import demo

    assert demo.STATE_DTYPES == sp.STATE_DTYPES == ("fp32", "bf16", "int8")
    for bad in ("fp16", "int4"):
        with pytest.raises(SystemExit):
            cli.main(["demo", "--state-dtype", bad])
        assert "--state-dtype" in capsys.readouterr().err
    # --compare-state-dtypes: a list of them, fp32 among them; --seeds only with it
    for bad, why in (("bf16,fp16", "expected state dtypes"), ("bf16,int8", "needs fp32"), ("", "expected")):
        with pytest.raises(SystemExit):
            cli.main(["demo", "--compare-state-dtypes", bad])
        assert why in capsys.readouterr().err, bad
    with pytest.raises(SystemExit):
        cli.main(["demo", "--compare-state-dtypes", "fp32", "--seeds", "0,x"])
    assert "expected seeds" in capsys.readouterr().err
    for argv, why in ((["--seeds", "0,1"], "--seeds goes with --compare-state-dtypes"),
                      (["--compare-state-dtypes", "fp32,bf16", "--state-dtype", "bf16"], "leave --state-dtype out"),
                      (["--compare-state-dtypes", "fp32,bf16", "--seed", "1", "--seeds", "0,1"], "give one of them"),
                      (["--compare-state-dtypes", "fp32,bf16", "--resume", "x"], "does not take --resume"),
                      (["--resume", "nowhere", "--state-dtype", "int8", "--size", "wide"], "no such directory")):
        assert cli.main(["demo", *argv]) == 1, argv
        assert why in capsys.readouterr().err, argv


def test_demo_int8_takes_the_default_models_matrices_and_saves_checkpoints(tmp_path):
    """The default model's matrices (rows of 96 and 384) take int8 state in blocks of 96 and 192, and an int8
    demo saves its checkpoint like any other (shardopt.checkpoint stores codes and block scales)."""
    import argparse

    from shardopt.tools import demo
    from shardopt.tools._demo_model import SIZES

    def args(**kw):
        base = dict(device="cpu", resume=None, optimizer=None, seed=None, size="default", state_dtype="int8",
                    nproc=2, layout="zero1", out=str(tmp_path), steps=None, no_checkpoint=False, backend="auto",
                    seeds=None, compare_state_dtypes=None)
        return argparse.Namespace(**{**base, **kw})

    default = demo._int8_shapes("default")
    assert default and {sp.int8_block(s) for s in default} <= {96, 192, 256}
    assert {sp.int8_block(s) for s in demo._int8_shapes("tiny")} == {192}  # d_model 48: the MLP's rows of 192
    wide = demo._int8_shapes("wide")
    assert len(wide) == 3 * 4 + 3 and all(sp.int8_block(s) == 256 for s in wide)
    assert set(SIZES) == {"default", "tiny", "wide"}
    for size in ("default", "wide"):
        p = demo.make_plan(args(size=size))
        assert p["checkpoint_dir"] and p["checkpoint_skipped"] is None
        assert demo.int8_coverage(p).startswith("int8 for ")


def test_compare_table_per_seed_mean_bytes_and_targets():
    from shardopt.tools import demo

    def res(seed, sd, o, loss):
        return {"optimizer": o, "eval_loss": loss, "state_bytes": [4096 * (2 if sd == "fp32" else 1)] * 2,
                "int8_tensors": 0}

    base = {"lion": 2.30, "adamw": 2.20, "muon": 1.80}
    shift = {"fp32": 0.0, "bf16": 0.004, "int8": 0.03}
    runs = {(seed, sd): [res(seed, sd, o, base[o] + shift[sd] + 0.01 * seed) for o in base]
            for seed in (0, 1) for sd in ("fp32", "bf16", "int8")}
    plan = {"size": "default", "steps": 150, "layout": "zero1", "world": 2}
    lines = demo.compare_table(runs, ["fp32", "bf16", "int8"], [0, 1], plan)
    text = "\n".join(lines)
    assert "| optimizer | seed | fp32 state | bf16 state | bf16 - fp32 | int8 state | int8 - fp32 |" in lines
    assert "| Lion | 0 | 2.3000 | 2.3040 | +0.0040 | 2.3300 | +0.0300 |" in lines
    assert "| Muon | mean | 1.8050 | 1.8090 | +0.0040 | 1.8350 | +0.0300 |" in lines
    assert "| AdamW | 8.0 KiB | 4.0 KiB | 4.0 KiB |" in lines
    assert "target |bf16 - fp32| <= 0.01 nats (the mean over the seeds): met for Lion, AdamW, Muon" in lines
    assert "target |int8 - fp32| <= 0.02 nats (the mean over the seeds): NOT met for Lion (+0.03000)" in text
    assert "no parameter of this model took int8 state" in text
    # one seed: no seed column and no mean rows
    one = demo.compare_table({k: v for k, v in runs.items() if k[0] == 0}, ["fp32", "bf16"], [0], plan)
    assert "| optimizer | fp32 state | bf16 state | bf16 - fp32 |" in one and not any("mean" in x for x in one)


def _independent_state_bytes(size: str, state_dtype: str) -> dict:
    """Optimizer-state bytes of each demo optimizer on one process, counted per parameter from the model's
    shapes: int8 takes 1 byte per element and state tensor + 4 bytes per block (int8_block) where the shape
    takes int8, else 4 bytes per element (fp32)."""
    from shardopt.tools._demo_model import SIZES, TinyGPT

    with torch.device("meta"):
        model = TinyGPT(SIZES[size])

    def nbytes(p, keys):
        n = p.numel()
        if state_dtype == "int8" and sp.int8_eligible(p.shape):
            return keys * (n + 4 * n // sp.int8_block(p.shape))
        return keys * n * {"fp32": 4, "bf16": 2, "int8": 4}[state_dtype]

    out = {"lion": sum(nbytes(p, 1) for p in model.parameters()),
           "adamw": sum(nbytes(p, 2) for p in model.parameters())}
    groups = shardopt.muon_param_groups(model)
    out["muon"] = sum(nbytes(p, 1 if g.get("algorithm", "muon") == "muon" else 2)
                      for g in groups for p in g["params"])
    return out


@pytest.mark.slow
def test_demo_int8_state_runs_all_three_and_shows_real_bytes(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "shardopt", "demo", "--size", "wide", "--steps", "2",
                           "--state-dtype", "int8", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "int8 optimizer state (int8 for 15 of 29 tensors" in proc.stdout
    assert (out / "checkpoint").is_dir()  # codes and block scales, like any other state
    res = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert sorted(res) == sorted(ALGOS) and all(r["state_dtype"] == "int8" for r in res.values())
    want = _independent_state_bytes("wide", "int8")
    fp32 = _independent_state_bytes("wide", "fp32")
    for name, r in res.items():
        assert r["unsharded_state_bytes"] == want[name], name
        assert 3.9 * want[name] < fp32[name] < 4 * want[name]  # about a quarter of fp32's
        assert want[name] <= sum(r["state_bytes"]) < want[name] + 2 * 4096, name  # ZeRO-1: split, whole blocks
        assert r["int8_tensors"] > 0 and math.isfinite(r["eval_loss"])
    # the table shows these bytes and the state dtype
    for name, r in res.items():
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"{name:<9} "))  # not a bar
        assert row.rstrip().endswith("int8")
        from shardopt.tools.demo import _fmt_bytes

        assert _fmt_bytes(r["state_bytes"][0]) in row and _fmt_bytes(r["unsharded_state_bytes"]) in row


@pytest.mark.slow
def test_demo_compare_state_dtypes_prints_the_quality_table(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "shardopt", "demo", "--compare-state-dtypes", "int8,bf16,fp32",
                           "--size", "tiny", "--steps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    # fp32 first, then the others in the order given
    assert "| optimizer | fp32 state | int8 state | int8 - fp32 | bf16 state | bf16 - fp32 |" in stdout
    data = json.loads((out / "compare.json").read_text())
    assert data["state_dtypes"] == ["fp32", "int8", "bf16"] and data["seeds"] == [0]
    loss = {(r["state_dtype"], x["optimizer"]): x["eval_loss"] for r in data["runs"] for x in r["results"]}
    for o in ALGOS:
        row = next(line for line in stdout.splitlines() if line.startswith(f"| {demo_name(o)} |"))
        assert f"{loss[('fp32', o)]:.4f}" in row and f"{loss[('bf16', o)]:.4f}" in row
        assert f"{loss[('int8', o)]:.4f}" in row
    assert "no parameter of this model took int8 state" not in stdout  # the tiny model's MLP takes it
    assert "target |bf16 - fp32| <= 0.01 nats (one seed)" in stdout
    bytes_rows = {o: next(line for line in stdout.splitlines() if line.startswith(f"| {demo_name(o)} |")
                          and "KiB" in line) for o in ALGOS}
    from shardopt.tools.demo import _fmt_bytes

    held = {(r["state_dtype"], x["optimizer"]): x["state_bytes"] for r in data["runs"] for x in r["results"]}
    for o in ALGOS:
        # the largest rank's real bytes; all ranks together hold at least the one-process count
        cells = " | ".join(_fmt_bytes(max(held[(sd, o)])) for sd in ("fp32", "int8", "bf16"))
        assert f"| {demo_name(o)} | {cells} |" == bytes_rows[o]
        for sd in ("fp32", "int8", "bf16"):
            assert sum(held[(sd, o)]) >= _independent_state_bytes("tiny", sd)[o]
        assert sum(held[("int8", o)]) < sum(held[("fp32", o)]) and 2 * sum(held[("bf16", o)]) == sum(held[("fp32", o)])
    assert not (out / "checkpoint").exists()


def demo_name(o):
    return {"lion": "Lion", "adamw": "AdamW", "muon": "Muon"}[o]


@pytest.mark.slow
def test_demo_bf16_state_runs_all_three_and_shows_real_bytes(tmp_path):
    import json
    import subprocess
    import sys

    from shardopt.tools._demo_model import SIZES, TinyGPT, num_params

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "shardopt", "demo", "--size", "tiny", "--steps", "4",
                           "--state-dtype", "bf16", "--out", str(out), "--no-checkpoint"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bf16 optimizer state" in proc.stdout
    res = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert sorted(res) == sorted(ALGOS) and all(r["state_dtype"] == "bf16" for r in res.values())
    with torch.device("meta"):
        n = num_params(TinyGPT(SIZES["tiny"]))
    assert res["lion"]["unsharded_state_bytes"] == 2 * n  # one bf16 buffer per element
    assert res["adamw"]["unsharded_state_bytes"] == 4 * n  # two
    assert all(sum(r["state_bytes"]) >= r["unsharded_state_bytes"] for r in res.values())
