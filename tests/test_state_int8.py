"""int8 optimizer state (``state_dtype="int8"``): the block format, the option, every layout and checkpoints.

The format is checked against a pure-Python transcription of the formulas in
``shardopt/kernels/state_precision.py``; every sharded run against the
single-process optimizer with the same ``state_dtype`` (bitwise: every layout
sees the same blocks), and the quantized trajectory against fp32 state.
"""
from __future__ import annotations

import copy
import math
import struct

import pytest
import torch

import dist_utils
import shardopt
from cases import CASE_BY_NAME, TOL, build, make_grads, make_params
from shardopt.kernels import state_precision as sp

ALGOS = ["lion", "adamw", "muon"]
# int8 in blocks of 256: (32, 256), (24, 512), (13, 768) (13 rows: FSDP2 cuts 4/4/4/1 at W=4); of 150: (40, 300);
# of 96: (64, 96); fp32 state: the rest (too small, 1-D, or rows no block in [64, 256] divides)
SHAPES = [(32, 256), (7, 5), (24, 512), (5000,), (40, 300), (13, 768), (3,), (64, 96), (100, 61)]
BLOCKS = [256, 0, 256, 0, 150, 256, 0, 96, 0]
ELIGIBLE = [b > 0 for b in BLOCKS]
STEPS = 4
K = 3


# ---------------------------------------------------------------- the format, by the documented formulas
def _mix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _from_bits(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u & 0xFFFFFFFF))[0]


def _py_quantize(xs: list[float], step: int, kind: str):
    """(codes, scale) of one block of fp32 values, in Python floats and ints (fp32 rounding by struct)."""
    salt = (step * 0x9E3779B9) & 0xFFFFFFFF
    codes = []
    if kind == "signed":
        scale = _f32(max(abs(x) for x in xs) / 127.0)
        for x in xs:
            if scale == 0.0:
                codes.append(0)
                continue
            q = _f32(x / scale)
            r = (_mix(_bits(x) ^ salt) >> 8) * 2.0 ** -24
            codes.append(int(max(-127, min(127, math.floor(_f32(q + r))))))
        return codes, scale
    s = [_f32(math.sqrt(x)) for x in xs]
    scale = max(s)
    for v in s:
        if scale == 0.0:
            codes.append(0)
            continue
        w = _f32(v / scale)
        h = _mix(_bits(v) ^ salt)
        if w >= 2.0 ** -14:
            codes.append(((_bits(w) + (h & 0x7FFFF)) >> 19) - 1792)
        else:
            codes.append(math.floor(_f32(_f32(w * 2.0 ** 18) + (h >> 8) * 2.0 ** -24)))
    return codes, scale


@pytest.mark.parametrize("block", [256, 96])
@pytest.mark.parametrize("kind", ["signed", "sqrt"])
def test_quantize_matches_the_documented_formula(kind, block):
    g = torch.Generator().manual_seed(3)
    n = 2 * block + 37  # a short last block
    x = torch.randn(n, generator=g) * torch.logspace(-6, 1, n)
    x[5] = 0.0
    if kind == "sqrt":
        x = x * x
    codes, scale = sp.quantize(x, 7, kind, block)
    assert codes.dtype == sp.code_dtype(kind) and scale.shape == (3,)
    for b in range(3):
        blk = x[b * block:(b + 1) * block].tolist()
        want_c, want_s = _py_quantize(blk, 7, kind)
        assert scale[b].item() == want_s
        assert codes[b * block:(b + 1) * block].tolist() == want_c, (kind, b)
    # and back: code * scale (signed), (table[code] * scale)^2 (sqrt), per block
    back = sp.dequantize(codes, scale, kind, block)
    sc = scale.repeat_interleave(block)[:n]
    want = codes.float() * sc if kind == "signed" else (sp.SQRT_TABLE[codes.long()] * sc) ** 2
    assert torch.equal(back, want)


def test_sqrt_table_is_the_documented_float():
    for c in range(241):
        e, m = c >> 4, c & 15
        want = c * 2.0 ** -18 if e == 0 else (1 + m / 16) * 2.0 ** (e - 15)
        assert sp.SQRT_TABLE[c].item() == want
    assert sp.SQRT_TABLE[240].item() == 1.0 and sp.SQRT_TABLE[16].item() == 2.0 ** -14


def test_zero_and_nonfinite_blocks():
    z = torch.zeros(300)
    for kind in ("signed", "sqrt"):
        c, s = sp.quantize(z, 1, kind)
        assert not c.any() and not s.any() and not sp.dequantize(c, s, kind).any()
    x = torch.randn(256)
    x[3] = float("inf")
    c, s = sp.quantize(x, 1, "signed")
    assert not c.any() and math.isinf(s[0].item())  # the block reads back NaN, as fp32 state would hold inf/NaN
    assert torch.isnan(sp.dequantize(c, s, "signed")).all()


def test_round_trip_error_is_below_one_step_and_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * sp.BLOCK, generator=g) * torch.rand(64, generator=g).repeat_interleave(sp.BLOCK)
    c, s = sp.quantize(x, 1, "signed")
    step = s.repeat_interleave(sp.BLOCK)
    assert ((sp.dequantize(c, s, "signed") - x).abs() <= step * (1 + 1e-6)).all()
    acc = torch.zeros_like(x)
    for t in range(1, 201):
        c, s = sp.quantize(x, t, "signed")
        acc += sp.dequantize(c, s, "signed")
    # 200 draws of error <= 1 step: the mean error is a few hundredths of a step, not a bias of half one
    assert float(((acc / 200 - x) / step).mean().abs()) < 0.01
    assert float(((acc / 200 - x).abs() / step).mean()) < 0.06


def test_sqrt_mapping_keeps_small_second_moments_nonzero_within_one_sixteenth():
    g = torch.Generator().manual_seed(1)
    n = 32 * sp.BLOCK
    v = 10.0 ** (-10 * torch.rand(n, generator=g))  # 10 decades inside every block
    c, s = sp.quantize(v, 2, "sqrt")
    back = sp.dequantize(c, s, "sqrt")
    blockmax = s.repeat_interleave(sp.BLOCK)
    normal = v.sqrt() >= blockmax * 2.0 ** -14
    rel = (back.sqrt() - v.sqrt()).abs() / v.sqrt()
    assert float(rel[normal].max()) <= 1 / 16 + 1e-6
    # a linear code of sqrt(v) would read every element below 1/510 of its block's max as 0
    linear_zero = v.sqrt() < blockmax / 510
    assert linear_zero.sum() > n // 10 and not (back[linear_zero & (v.sqrt() >= blockmax * 2.0 ** -18)] == 0).any()


def test_ema_tracks_a_constant_with_int8_state():
    """m <- 0.99 m + 0.01 g with g constant: round-to-nearest int8 would stall at its start; the value-keyed
    stochastic rounding follows the fp32 EMA on average."""
    g = torch.Generator().manual_seed(5)
    target = torch.rand(sp.BLOCK, generator=g) + 0.5
    m = torch.zeros(sp.BLOCK)
    m[0] = 2.0  # the block max: one step is 2/127
    ref = m.clone()
    codes, scale = sp.quantize(m, 0, "signed")
    for t in range(1, 401):
        x = sp.dequantize(codes, scale, "signed") * 0.99 + target * 0.01
        codes, scale = sp.quantize(x, t, "signed")
        ref = ref * 0.99 + target * 0.01
    got = sp.dequantize(codes, scale, "signed")
    assert float((got[1:] - ref[1:]).abs().mean()) < 0.02 * float(ref[1:].mean())


# ---------------------------------------------------------------- the option, one process
def _params(dtype=torch.float32, seed=0):
    return make_params(dtype, seed, SHAPES)


def run_single(name, steps, **extra):
    ps = _params()
    opt = build(name, ps, sharding="none", **extra)
    for k in range(steps):
        for p, g in zip(ps, make_grads(k, SHAPES)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in ps], opt


def _expected_bytes(name, shapes=SHAPES):
    total = 0
    for s, b in zip(shapes, BLOCKS):
        # Muon's auxiliary group (the non-matrices) runs AdamW
        n_state = {"lion": 1, "adamw": 2, "muon": 1 if len(s) == 2 else 2}[name]
        n = math.prod(s)
        total += n_state * ((n + 4 * sp.n_blocks(n, b)) if b else 4 * n)
    return total


@pytest.mark.parametrize("name", ALGOS)
def test_int8_state_keys_dtypes_bytes_and_fp32_tracking(name):
    got, opt = run_single(name, STEPS, state_dtype="int8")
    ref, ref_opt = run_single(name, STEPS)
    ps = opt._flat_params()[0]
    for p, ok in zip(ps, [ELIGIBLE[SHAPES.index(tuple(q.shape))] for q in ps]):
        st = opt.state[p]
        for k in [k for k in st if k != "step" and not k.endswith("_scale")]:
            if ok:
                assert st[k].dtype == sp.code_dtype(sp.int8_kind(k)) and st[k].shape == p.shape
                assert st[k + "_scale"].dtype == torch.float32
                assert st[k + "_scale"].shape == sp.scale_shape(p.shape, sp.int8_block(p.shape))
            else:
                assert st[k].dtype == torch.float32 and k + "_scale" not in st
    storage = sum(v.untyped_storage().nbytes() for st in opt.state.values() for k, v in st.items() if k != "step")
    assert opt.state_bytes() == storage == _expected_bytes(name)
    assert opt.summary(print_fn=None)[0]["state_bytes"] == storage
    # the quantized trajectory follows the fp32-state one (a few lr-sized steps of difference at most)
    lr = CASE_BY_NAME[name][2]["lr"]
    for a, b in zip(got, ref):
        assert float((a - b).abs().max()) <= 4 * STEPS * lr, name


def test_int8_memory_ratio_on_eligible_params():
    for name in ALGOS:
        _, a = run_single(name, 1, state_dtype="int8")
        _, b = run_single(name, 1)
        def nbytes(o):
            return sum(v.untyped_storage().nbytes() for p in o._flat_params()[0] if sp.int8_eligible(p.shape)
                       for k, v in o.state[p].items() if k != "step")

        qa, qb = nbytes(a), nbytes(b)
        assert qa <= 0.27 * qb, (name, qa / qb)


def test_block_size_follows_the_rows():
    assert [sp.int8_block(s) for s in SHAPES] == BLOCKS
    assert sp.int8_block((4096,)) == 0 and sp.int8_block((20, 255)) == 255 and sp.int8_block((100, 63)) == 0
    assert sp.int8_block((1, 8192)) == 256 and sp.int8_block((50, 2, 48)) == 96  # rows are numel / shape[0]


def test_bad_state_dtype_names_the_choices():
    with pytest.raises(ValueError, match=r"'fp32', 'bf16', 'int8'"):
        shardopt.Lion(_params(), state_dtype="int4")


@pytest.mark.parametrize("name", ALGOS)
def test_state_dict_resume_is_bitwise_and_converts(name):
    ps = _params()
    opt = build(name, ps, sharding="none", state_dtype="int8")
    for k in range(K):
        for p, g in zip(ps, make_grads(k, SHAPES)):
            p.grad = g
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in ps]

    def go(o, qs):
        for k in range(K, 2 * K):
            for p, g in zip(qs, make_grads(k, SHAPES)):
                p.grad = g
            o.step()
        return [p.detach().clone() for p in qs]

    want = go(opt, ps)
    qs = [torch.nn.Parameter(s.clone()) for s in saved]
    o2 = build(name, qs, sharding="none", state_dtype="int8")
    o2.load_state_dict(copy.deepcopy(sd))
    assert all(torch.equal(a, b) for a, b in zip(go(o2, qs), want))
    # into an fp32-state optimizer: dequantized exactly
    qs = [torch.nn.Parameter(s.clone()) for s in saved]
    o3 = build(name, qs, sharding="none")
    o3.load_state_dict(copy.deepcopy(sd))
    for i, st in sd["state"].items():
        for k, v in st.items():
            if k + "_scale" in st:
                q = o3._flat_params()[0][i]
                mine = o3.state[q][k]
                assert mine.dtype == torch.float32 and torch.equal(
                    mine, sp.dequantize(v, st[k + "_scale"], sp.int8_kind(k), sp.int8_block(q.shape)))
    # and back: fp32 state quantized on load (salt: the step) equals quantizing it directly
    o4 = build(name, [torch.nn.Parameter(s.clone()) for s in saved], sharding="none", state_dtype="int8")
    sd3 = o3.state_dict()
    o4.load_state_dict(sd3)
    p0 = o4._flat_params()[0][0]
    k0 = next(k for k in o4.state[p0] if k.endswith("_scale")).removesuffix("_scale")
    c, s = sp.quantize(sd3["state"][0][k0], K, sp.int8_kind(k0), sp.int8_block(p0.shape))
    assert torch.equal(o4.state[p0][k0], c) and torch.equal(o4.state[p0][k0 + "_scale"].view(-1), s)


def test_zero1_plan_cuts_blocked_items_on_block_boundaries():
    from shardopt.sharding.plan import plan_zero1

    g = torch.Generator().manual_seed(2)
    for world in (2, 3, 4):
        for _ in range(20):
            numels = [int(x) for x in torch.randint(1, 3000, (6,), generator=g)]
            blocks = [1] * 6
            for k in range(0, 6, 2):
                numels[k] = 256 * int(torch.randint(1, 40, (1,), generator=g))
                blocks[k] = 256
            whole = [False] * 6
            whole[5] = bool(torch.rand(1, generator=g) < 0.5)
            plan = plan_zero1(numels, [torch.float32] * 6, whole, [1.0] * 6, world, bucket_elements=1 << 20,
                              align_bytes=128, blocks=blocks)
            st = plan.streams[0]
            cover = [[] for _ in numels]
            for r in range(world):
                used = 0
                for pc in st.plan.pieces[r]:
                    cover[pc.index].append((pc.start, pc.end))
                    used = max(used, pc.offset + pc.end - pc.start)
                    if blocks[pc.index] > 1:
                        assert pc.start % 256 == 0 and (pc.end % 256 == 0 or pc.end == numels[pc.index])
                assert used <= st.plan.segment
            for i, rs in enumerate(cover):  # every element owned exactly once
                rs.sort()
                assert rs[0][0] == 0 and rs[-1][1] == numels[i]
                assert all(a[1] == b[0] for a, b in zip(rs, rs[1:]))


# ---------------------------------------------------------------- every layout (spawned gloo ranks)
class Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ps = torch.nn.ParameterList(_params())


def _model(layout, world):
    return dist_utils.shard(Holder(), layout, world)


_layouts = dist_utils.layouts
_full = dist_utils.full


def _train(opt, ps, k0, k1):
    dist_utils.train(opt, ps, k0, k1, lambda k: make_grads(k, SHAPES))


def _storage_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if k != "step":
                loc = v.to_local() if hasattr(v, "to_local") else v
                total += loc.untyped_storage().nbytes() if loc.numel() else 0
    return total


def _layouts_job(rank, world, d, names, save):
    import shardopt.checkpoint as C

    out = {}
    for name in names:
        for layout in _layouts(world):
            m, ps = _model(layout, world)
            opt = build(name, ps, sharding="zero1" if layout == "zero1" else "auto", state_dtype="int8")
            _train(opt, ps, 0, K)
            if save:
                C.save(f"{d}/{name}-{layout}-w{world}", m, opt)
            _train(opt, ps, K, 2 * K)
            out[(name, layout)] = dict(params=_full(ps), bytes=opt.state_bytes(), storage=_storage_bytes(opt),
                                       layout=opt.layout.name, table=opt.summary(print_fn=None),
                                       placed=all(v.placements == p.placements for p in ps for k, v in
                                                  opt.state[p].items() if k != "step") if layout != "zero1" else True)
    return out


def _resume_job(rank, world, d, names, src_world):
    import shardopt.checkpoint as C

    out = {}
    for name in names:
        for layout in ("zero1", "fsdp2"):
            m, ps = _model(layout, world)
            opt = build(name, ps, sharding="zero1" if layout == "zero1" else "auto", state_dtype="int8")
            C.load(f"{d}/{name}-{layout}-w{src_world}", m, opt)
            _train(opt, ps, K, 2 * K)
            out[(name, layout)] = _full(ps)
    return out


def _check(res, names, world):
    for name in names:
        ref, ref_opt = run_single(name, 2 * K, state_dtype="int8")
        for layout in _layouts(world):
            total = 0
            for r in range(world):
                row = res[r][(name, layout)]
                assert row["layout"] == ("fsdp2" if layout == "hsdp" else layout)
                _assert_same(row["params"], ref, name, (layout, world, r))
                assert row["bytes"] == row["storage"] and row["placed"]
                assert {t["unsharded_state_bytes"] for t in row["table"]} == {ref_opt.state_bytes()}
                total += row["bytes"]
            # the ranks of one shard group together hold the single process's state bytes (HSDP: 2 replicas)
            total /= 2 if layout == "hsdp" else 1
            assert ref_opt.state_bytes() <= total <= ref_opt.state_bytes() * 1.01 + 4096 * world


def _assert_same(got, ref, name, where):
    """Lion: bitwise. AdamW: the fp32-state parameters to AdamW's layout tolerance (the C++ kernels' fp32 math
    moves an ulp where a cut changes the threads' units); on the int8 ones such an ulp can move a stored code
    by one step, which moves the parameter by at most lr/127 per step: 1e-4 of its size. Muon: its layout
    tolerance (the Newton-Schulz exchange)."""
    for k, (a, b) in enumerate(zip(got, ref)):
        if name == "lion":
            assert torch.equal(a, b), (name, where, k, float((a - b).abs().max()))
        else:
            err = float((a - b).abs().max() / b.abs().max())
            tol = 1e-4 if name == "adamw" and ELIGIBLE[k] else TOL[name]
            assert err <= tol, (name, where, k, err)


@pytest.mark.slow
def test_w2_layouts_equal_single_process_and_resume_2_to_2_and_1(tmp_path):
    import shardopt.checkpoint as C

    d = str(tmp_path)
    res = dist_utils.run(_layouts_job, 2, d, ALGOS, True)
    _check(res, ALGOS, 2)
    res2 = dist_utils.run(_resume_job, 2, d, ALGOS, 2)
    for name in ALGOS:
        want, _ = run_single(name, 2 * K, state_dtype="int8")
        for layout in ("zero1", "fsdp2"):
            for r in range(2):
                # the same world size and layout resumes on the uninterrupted run's bits
                assert all(torch.equal(a, b) for a, b in zip(res2[r][(name, layout)], res[r][(name, layout)]["params"]))
            # 2 -> 1 (and a layout change: sharded -> one process)
            m = Holder()
            ps = list(m.parameters())
            opt = build(name, ps, sharding="none", state_dtype="int8")
            C.load(f"{d}/{name}-{layout}-w2", m, opt)
            _train(opt, ps, K, 2 * K)
            _assert_same(_full(ps), want, name, (layout, "2->1"))


@pytest.mark.slow
def test_w4_layouts_hsdp_and_resume_4_to_2(tmp_path):
    d = str(tmp_path)
    res = dist_utils.run(_layouts_job, 4, d, ALGOS, True)
    _check(res, ALGOS, 4)
    res2 = dist_utils.run(_resume_job, 2, d, ALGOS, 4)
    for name in ALGOS:
        want, _ = run_single(name, 2 * K, state_dtype="int8")
        for r in res2:
            for layout in ("zero1", "fsdp2"):
                _assert_same(r[(name, layout)], want, name, (layout, "4->2"))
