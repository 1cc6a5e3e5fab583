"""Triton Lion/AdamW kernels with low-precision optimizer state (bf16 and int8 blocks) vs the ``torch`` reference.

The kernels run under Triton's interpreter on CPU tensors (``TRITON_INTERPRET``
is set by tests/conftest.py, without a GPU, before anything imports triton;
with a GPU it stays unset and the CPU-tensor tests skip, while the ``gpu`` ones
below run the compiled kernels on CUDA tensors). The
tests that need triton are skipped when it cannot be imported; the routing
tests at the end (which backend a call with int8 state reaches) run without it.

What is checked, on fresh random inputs of odd sizes (one short block, 257,
1000, 4096 + 13) and lists that mix int8, bf16 and fp32 state tensor by tensor:

* the store and the load alone (``triton_ops.quantize`` / ``dequantize`` /
  ``round_bf16``, the helpers the step kernels use): bit for bit
  ``state_precision`` for both int8 mappings and bf16, on zero, tiny, huge,
  subnormal and non-finite blocks;
* Lion, every option: params (fp32 and bf16), codes, scales and bf16 state bit
  for bit the reference, per-tensor ``state_step`` included;
* AdamW, every option and amsgrad: params within the AdamW tolerance of
  tests/test_kernels_triton.py, the state bit for bit (the moments take no
  square root, and the ``"sqrt"`` store is the reference's correctly rounded
  one), so codes within +-1 holds a fortiori;
* blocks under 256 (the narrow rows of ``state_precision.int8_block``: 64, 96,
  192, and 1 / 255 for the store alone) beside blocks of 256 and fp32 state:
  the store, the load and both steps bit for bit the reference, served by
  triton itself; mixed or oversized blocks are refused;
* a set ``found_inf`` leaves params, codes and scales untouched; an all-zero
  block and a block with an inf follow the reference over two steps (the inf
  block reads back NaN);
* on a GPU (``gpu`` tests, skipped without CUDA): the same store, load and
  step cases compiled for CUDA tensors, against the reference on CPU;
* the dispatcher hands int8/bf16 state to triton itself, the optimizers'
  ``backend="triton"`` matches ``backend="torch"``, and a CUDA backend without
  ``state_int8`` sends such calls to the reference.
"""
import zlib

# TRITON_INTERPRET=1 must precede any triton import: tests/conftest.py sets it without a GPU

import pytest  # noqa: E402
import torch  # noqa: E402

import shardopt  # noqa: E402
from shardopt import kernels  # noqa: E402
from shardopt.kernels import state_precision as sp  # noqa: E402
from shardopt.kernels import torch_ops, triton_ops  # noqa: E402
from shardopt.kernels.state_precision import Q8  # noqa: E402

needs_triton = pytest.mark.skipif(not triton_ops.available(), reason="triton is not installed")
# 0/0 and inf*0 in all-zero / non-finite blocks, as the reference computes them too
# CPU-tensor tests under the interpreter, the ``gpu`` ones compiled on CUDA tensors (tests/conftest.py)
pytestmark = [pytest.mark.usefixtures("triton_mode"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]

SIZES = [7, 257, 1000, 4096 + 13]
LION_HP = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
ADAMW_HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
STEPS = 3


def _on(x, device):
    """``x`` (a tensor, a Q8, None, or a list of them) on ``device``; the same objects where already there."""
    if isinstance(x, list):
        return [_on(t, device) for t in x]
    if isinstance(x, Q8):
        return x if x.codes.device == torch.device(device) else Q8(x.codes.to(device), x.scale.to(device),
                                                                      x.kind, x.block)
    return x if x is None or x.device == torch.device(device) else x.to(device)


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# ---------------------------------------------------------------- comparing
def _same_float(a, b):
    """Bitwise equal, NaN-ness for NaNs (their payloads are no part of the format)."""
    nan = torch.isnan(a.float())
    if not torch.equal(nan, torch.isnan(b.float())):
        return False
    ia, ib = (t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32) for t in (a, b))
    return torch.equal(ia[~nan], ib[~nan])


def _assert_state(name, got, want):
    if isinstance(want, Q8):
        assert isinstance(got, Q8) and got.kind == want.kind, name
        assert got.codes.dtype == want.codes.dtype, name
        diff = (got.codes.to(torch.int32) - want.codes.to(torch.int32)).abs()
        assert torch.equal(got.codes, want.codes), f"{name}: {int((diff > 0).sum())} codes off, by {int(diff.max())}"
        assert _same_float(got.scale, want.scale), f"{name}: scales differ"
    else:
        assert got.dtype == want.dtype, name
        assert _same_float(got, want), f"{name}: state differs"


def _assert_params(name, got, want, bitwise, before=None):
    if bitwise or got.dtype != torch.float32:
        if not bitwise:  # bf16 params of AdamW: one bf16 step
            a, b = got.float(), want.float()
            ulp = torch.where(b == 0, torch.full_like(b, 2.0 ** -133), b.abs() * 2.0 ** -7)
            assert bool(((a - b).abs() <= ulp).all()), name
        else:
            assert _same_float(got, want), f"{name}: max diff {(got.float() - want.float()).abs().max()}"
    else:
        # fp32 rounding scales with the operands: where the update nearly cancels the parameter (a large
        # m / sqrt(v) at a tiny v), a few ulps of |p| are a large part of the small result
        a, b = got.float(), want.float()
        scale = torch.maximum(b.abs(), before.float().abs()) if before is not None else b.abs()
        nan = torch.isnan(b)
        assert torch.equal(torch.isnan(a), nan), f"{name}: NaNs differ"
        close = (a - b).abs() <= 1e-7 + 1e-6 * scale
        assert bool((close | nan).all()), f"{name}: off by {float((a - b)[~nan].abs().max())}"


def _clone(ts):
    return None if ts is None else [t.clone() for t in ts]


# ---------------------------------------------------------------- building state
def _q8(x, kind, step=0):
    c, s = sp.quantize(x, step, kind)
    return Q8(c, s, kind)


def _state(fmt, n, kind, gen):
    """A state tensor of ``n`` elements in format ``fmt`` (fp32 / bf16 / int8) with plausible values."""
    if kind == "signed":
        x = torch.randn(n, generator=gen) * 0.1
    else:  # second moments spread over decades
        x = torch.rand(n, generator=gen) * torch.logspace(-8, -1, n)[torch.randperm(n, generator=gen)]
    x.view(-1)[::11] = 0.0
    if fmt == "int8":
        return _q8(x, kind, step=int(torch.randint(1, 1000, (), generator=gen)))
    return x.to(torch.bfloat16) if fmt == "bf16" else x


# the state format of each tensor of SIZES, per case
FORMATS = {
    "int8": ["int8"] * len(SIZES),
    "bf16": ["bf16"] * len(SIZES),
    "mixed": ["fp32", "int8", "bf16", "int8"],
    "mixed2": ["int8", "fp32", "int8", "bf16"],
}
FEATURES = {
    "plain": {},
    "maximize": dict(maximize=True),
    "clip_value": dict(clip_value=0.7),
    "grad_scale": dict(grad_scale=0.3721),
    "found_inf_clear": dict(found_inf=0.0),
    "amsgrad": dict(amsgrad=True),
    "all": dict(maximize=True, clip_value=0.7, grad_scale=0.3721, found_inf=0.0, amsgrad=True),
}


def _kwargs(features, device="cpu"):
    kw = {k: v for k, v in features.items() if k != "amsgrad"}
    for k in ("grad_scale", "found_inf"):
        if k in kw:
            kw[k] = torch.tensor(kw[k], dtype=torch.float32, device=device)
    return kw


def _inputs(opt, fmts, pdtype, amsgrad, gen):
    params = [torch.randn(n, generator=gen).to(pdtype) for n in SIZES]
    m = [_state(f, n, "signed", gen) for f, n in zip(fmts, SIZES)]
    v = [_state(f, n, "sqrt", gen) for f, n in zip(fmts, SIZES)] if opt == "adamw" else None
    vmax = [_state(f, n, "sqrt", gen) for f, n in zip(fmts, SIZES)] if amsgrad else None
    return params, m, v, vmax


def _grads(gen, gdtype=torch.float32):
    out = []
    for n in SIZES:
        g = torch.randn(n, generator=gen) * 1.5  # |g| > clip_value often
        g[::5] = 0.0
        out.append(g.to(gdtype))
    return out


# ---------------------------------------------------------------- the store and the load alone
def _values(kind, n, gen):
    """fp32 values with the hard cases of a block: a wide dynamic range, zeros, subnormals, equal values."""
    x = torch.randn(n, generator=gen) * torch.logspace(-12, 3, n)[torch.randperm(n, generator=gen)]
    x[::13] = 0.0
    x[1::17] = 1e-42  # subnormal
    if n > 300:
        x[256:512] = -0.75  # one block of equal values: every code is the extreme one
    return x.abs() if kind == "sqrt" else x


@needs_triton
@pytest.mark.parametrize("step", [1, 7, 1_000_003, 2**31 + 5])
@pytest.mark.parametrize("n", [1, 7, 256, 257, 1000, 4096 + 13])
@pytest.mark.parametrize("kind", ["signed", "sqrt"])
def test_quantize_is_the_reference_bit_for_bit(kind, n, step):
    x = _values(kind, n, _gen("q", kind, n, step))
    codes, scale = triton_ops.quantize(x, step, kind)
    want_c, want_s = sp.quantize(x, step, kind)
    assert codes.dtype == want_c.dtype and scale.shape == want_s.shape == (sp.n_blocks(n),)
    assert torch.equal(codes, want_c)
    assert _same_float(scale, want_s)


@needs_triton
@pytest.mark.parametrize("kind", ["signed", "sqrt"])
def test_quantize_special_blocks(kind):
    """An all-zero block, a block of tiny values (absmax / 127 underflows), one with an inf, one with a NaN,
    one with the largest finite values, and a short last block."""
    x = torch.randn(6 * 256 + 3, generator=_gen("special", kind))
    x[:256] = 0.0
    x[256:512] = x[256:512] * 1e-44
    x[600] = float("inf")
    x[800] = float("nan")
    x[1024:1280] = x[1024:1280].sign() * 3.4e38
    if kind == "sqrt":
        x = x.abs()
    for step in (1, 2):
        codes, scale = triton_ops.quantize(x, step, kind)
        want_c, want_s = sp.quantize(x, step, kind)
        assert torch.equal(codes, want_c) and _same_float(scale, want_s)
        assert not codes[:256].any() and scale[0] == 0
        assert not codes[512:768].any() and not torch.isfinite(scale[2])


@needs_triton
@pytest.mark.parametrize("kind", ["signed", "sqrt"])
def test_dequantize_every_code_is_the_reference(kind):
    n = 4 * 256 + 9
    dt = sp.code_dtype(kind)
    lo, hi = (-127, 128) if kind == "signed" else (0, 256)
    codes = torch.arange(n, dtype=torch.int64).remainder(hi - lo).add(lo).to(dt)
    scale = torch.tensor([1.0, 3.7e-5, 0.0, float("inf"), 2.5e30])
    got = triton_ops.dequantize(codes, scale, kind)
    assert _same_float(got, sp.dequantize(codes, scale, kind))


@needs_triton
@pytest.mark.parametrize("step", [1, 2, 4_000_000_000])
def test_round_bf16_is_the_reference_bit_for_bit(step):
    x = _values("signed", 4096 + 13, _gen("bf16", step))
    x[:4] = torch.tensor([float("inf"), float("-inf"), 3.3895313e38, -3.3895313e38])  # largest bf16-ish
    assert _same_float(triton_ops.round_bf16(x, step), sp.round_bf16(x, step))


# ---------------------------------------------------------------- the steps
LION_CASES = [(fmt, feat, pd) for fmt in FORMATS for feat in FEATURES if feat != "amsgrad"
              for pd in ("fp32", "bf16") if pd == "fp32" or feat in ("plain", "all")]
ADAMW_CASES = [(fmt, feat, pd) for fmt in FORMATS for feat in FEATURES
               for pd in ("fp32", "bf16") if pd == "fp32" or feat in ("plain", "all")]
_PD = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _run(opt, fmt, feat, pd, *, per_tensor_step=False, device="cpu"):
    """Three steps of the Triton kernel on ``device`` against the torch reference on CPU (the reference's
    math is the same on every device), each step from the kernel's own state."""
    features = FEATURES[feat]
    amsgrad = opt == "adamw" and features.get("amsgrad", False)
    pdtype = _PD[pd]
    gen = _gen(opt, fmt, feat, pd)
    params, m, v, vmax = _on(list(_inputs(opt, FORMATS[fmt], pdtype, amsgrad, gen)), device)
    kw, ref_kw = _kwargs(features, device), _kwargs(features)
    for step in range(1, STEPS + 1):
        ref_grads = _grads(gen, torch.bfloat16 if pdtype == torch.bfloat16 else torch.float32)
        grads = _on(ref_grads, device)
        grads_before = _clone(grads)
        # the reference starts every step from the kernel's state: each step compares one call on equal inputs
        ref = [_clone(_on(x, "cpu")) for x in (params, m, v, vmax)]
        before = _clone(ref[0])
        if opt == "lion":
            salt = [step + 10 * k for k in range(len(SIZES))] if per_tensor_step else step
            triton_ops.lion_step(params, grads, m, state_step=salt, **LION_HP, **kw)
            torch_ops.lion_step(ref[0], ref_grads, ref[1], state_step=salt, **LION_HP, **ref_kw)
        else:
            triton_ops.adamw_step(params, grads, m, v, vmax, step=step, **ADAMW_HP, **kw)
            torch_ops.adamw_step(ref[0], ref_grads, ref[1], ref[2], ref[3], step=step, **ADAMW_HP, **ref_kw)
        got = [_on(x, "cpu") for x in (params, m, v, vmax)]
        for i in range(len(SIZES)):
            where = f"step {step} tensor {i} ({SIZES[i]}, {FORMATS[fmt][i]})"
            _assert_params(f"{where} param", got[0][i], ref[0][i], bitwise=opt == "lion", before=before[i])
            _assert_state(f"{where} exp_avg", got[1][i], ref[1][i])
            if v is not None:
                _assert_state(f"{where} exp_avg_sq", got[2][i], ref[2][i])
            if vmax is not None:
                _assert_state(f"{where} max_exp_avg_sq", got[3][i], ref[3][i])
            assert torch.equal(grads[i], grads_before[i]), "gradients are never written"
    return params, m, v, vmax


@needs_triton
@pytest.mark.parametrize("fmt,feat,pd", LION_CASES, ids=["-".join(c) for c in LION_CASES])
def test_lion_matches_the_reference_bitwise(fmt, feat, pd):
    _run("lion", fmt, feat, pd)


@needs_triton
@pytest.mark.parametrize("fmt", ["int8", "mixed"])
def test_lion_per_tensor_state_step(fmt):
    _run("lion", fmt, "all", "fp32", per_tensor_step=True)


@needs_triton
@pytest.mark.parametrize("fmt,feat,pd", ADAMW_CASES, ids=["-".join(c) for c in ADAMW_CASES])
def test_adamw_matches_the_reference(fmt, feat, pd):
    _run("adamw", fmt, feat, pd)


# ---------------------------------------------------------------- compiled, on a GPU
gpu = pytest.mark.gpu


@gpu
@needs_triton
@pytest.mark.parametrize("kind", ["signed", "sqrt"])
def test_compiled_quantize_dequantize_on_cuda_are_the_reference(kind):
    """The store and the load compiled for the GPU, on the hard blocks, bit for bit the CPU reference."""
    for n, step in ((1, 1), (257, 7), (4096 + 13, 2**31 + 5)):
        x = _values(kind, n, _gen("q-cuda", kind, n))
        codes, scale = triton_ops.quantize(x.cuda(), step, kind)
        want_c, want_s = sp.quantize(x, step, kind)
        assert torch.equal(codes.cpu(), want_c) and _same_float(scale.cpu(), want_s), (n, step)
        assert _same_float(triton_ops.dequantize(codes, scale, kind).cpu(), sp.dequantize(want_c, want_s, kind))
    x = _values("signed", 4096 + 13, _gen("bf16-cuda"))
    assert _same_float(triton_ops.round_bf16(x.cuda(), 3).cpu(), sp.round_bf16(x, 3))


@gpu
@needs_triton
@pytest.mark.parametrize("fmt,feat,pd", LION_CASES, ids=["-".join(c) for c in LION_CASES])
def test_compiled_lion_on_cuda_is_the_reference_bitwise(fmt, feat, pd):
    _run("lion", fmt, feat, pd, device="cuda")


@gpu
@needs_triton
@pytest.mark.parametrize("fmt,feat,pd", ADAMW_CASES, ids=["-".join(c) for c in ADAMW_CASES])
def test_compiled_adamw_on_cuda_is_the_reference(fmt, feat, pd):
    _run("adamw", fmt, feat, pd, device="cuda")


@needs_triton
def test_int8_state_changes_and_salts_differ():
    """The comparison is not vacuous: the codes move, and another salt rounds some elements the other way."""
    gen = _gen("salts")
    p, g = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    m0 = _state("int8", 1000, "signed", gen)
    outs = []
    for salt in (1, 2):
        m = m0.clone()
        triton_ops.lion_step([p.clone()], [g], [m], state_step=salt, **LION_HP)
        outs.append(m)
    assert not torch.equal(outs[0].codes, m0.codes)
    assert not torch.equal(outs[0].codes, outs[1].codes)


@needs_triton
@pytest.mark.parametrize("flag", [1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_found_inf_set_leaves_params_codes_and_scales(opt, flag):
    gen = _gen("found_inf", opt, flag)
    params, m, v, vmax = _inputs(opt, FORMATS["mixed"], torch.float32, opt == "adamw", gen)
    grads = _grads(gen)
    before = [_clone(x) for x in (params, m, v, vmax)]
    kw = dict(found_inf=torch.tensor(flag), grad_scale=torch.tensor(0.5), maximize=True, clip_value=0.7)
    if opt == "lion":
        triton_ops.lion_step(params, grads, m, state_step=3, **LION_HP, **kw)
    else:
        triton_ops.adamw_step(params, grads, m, v, vmax, step=3, **ADAMW_HP, **kw)
    for got, want in zip((params, m, v, vmax), before):
        for i, (a, b) in enumerate(zip(got or [], want or [])):
            if isinstance(b, Q8):
                assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), i
            else:
                assert torch.equal(a, b), i


@needs_triton
@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_zero_block_and_inf_block_follow_the_reference(opt):
    """Block 0 all zeros (state and gradients: it stays zero, scale 0); block 2 gets an inf gradient (its
    scale becomes inf, every code 0, and it reads back NaN at the next step); a short last block."""
    n = 5 * 256 + 100
    gen = _gen("edge", opt)
    p = torch.randn(n, generator=gen)
    m = _state("int8", n, "signed", gen)
    m.codes[:256] = 0
    m.scale[0] = 0.0
    states = [m]
    if opt == "adamw":
        v, vmax = _state("int8", n, "sqrt", gen), _state("int8", n, "sqrt", gen)
        for q in (v, vmax):
            q.codes[:256] = 0
            q.scale[0] = 0.0
        states += [v, vmax]
    for step in (1, 2):
        g = torch.randn(n, generator=gen)
        g[:256] = 0.0
        if step == 1:
            g[2 * 256 + 17] = float("inf")
        ref_p, ref_s = p.clone(), [q.clone() for q in states]
        if opt == "lion":
            triton_ops.lion_step([p], [g], states, state_step=step, **LION_HP)
            torch_ops.lion_step([ref_p], [g], ref_s, state_step=step, **LION_HP)
        else:
            triton_ops.adamw_step([p], [g], *[[q] for q in states], step=step, **ADAMW_HP)
            torch_ops.adamw_step([ref_p], [g], *[[q] for q in ref_s], step=step, **ADAMW_HP)
        _assert_params(f"step {step} param", p, ref_p, bitwise=opt == "lion")
        for k, (a, b) in enumerate(zip(states, ref_s)):
            _assert_state(f"step {step} state {k}", a, b)
        assert not m.codes[:256].any() and m.scale[0] == 0
        assert not m.codes[512:768].any()
        assert (m.scale[2] == float("inf")) if step == 1 else bool(torch.isnan(m.scale[2]))


@needs_triton
def test_bad_int8_state_is_refused_before_any_launch():
    p, g = torch.zeros(300), torch.ones(300)
    good = _q8(torch.randn(300), "signed")
    bad = Q8(good.codes.view(torch.uint8), good.scale, "signed")  # the signed mapping stores int8
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] \(list index 1\)"):
        triton_ops.lion_step([p, p.clone()], [g, g], [good.clone(), bad], state_step=1, **LION_HP)
    assert not p.any()
    with pytest.raises(ValueError, match="state_step"):
        triton_ops.lion_step([p], [g], [good], **LION_HP)
    short = Q8(torch.zeros(200, dtype=torch.int8), torch.zeros(1), "signed")
    with pytest.raises(ValueError, match="elements"):
        triton_ops.lion_step([p], [g], [short], state_step=1, **LION_HP)


# ---------------------------------------------------------------- blocks under 256
# state_precision.int8_block of narrow rows: rows of 96 (one block each, 128 lanes of which 32 are masked), of
# 384 (two blocks of 192), of 64 (a power of two, no masked lanes), and 1 / 255 for the store alone; beside
# blocks of 256 and fp32 state in the same call
NARROW = [((48, 96), 96), ((12, 384), 192), ((1000,), 256), ((70, 64), 64), ((301, 96), 96), ((5,), None)]


def _narrow_inputs(opt, amsgrad, gen):
    params = [torch.randn(shape, generator=gen) for shape, _ in NARROW]
    states = []
    for kind in ["signed"] + (["sqrt"] if opt == "adamw" else []) + (["sqrt"] if amsgrad else []):
        lst = []
        for shape, blk in NARROW:
            x = _state("fp32", int(torch.Size(shape).numel()), kind, gen).view(shape)
            if blk is None:
                lst.append(x)
            else:
                c, sc = sp.quantize(x, int(torch.randint(1, 1000, (), generator=gen)), kind, blk)
                lst.append(Q8(c, sc.view(sp.scale_shape(shape, blk)) if len(shape) > 1 else sc, kind, blk))
        states.append(lst)
    return params, states


@needs_triton
@pytest.mark.parametrize("block", [1, 64, 96, 192, 255])
@pytest.mark.parametrize("kind", ["signed", "sqrt"])
def test_quantize_in_narrow_blocks_is_the_reference_bit_for_bit(kind, block):
    for n in (block - 1 or 1, 3 * block + 7, 4096 + 13):
        x = _values(kind, n, _gen("qb", kind, block, n))
        codes, scale = triton_ops.quantize(x, 5, kind, block)
        want_c, want_s = sp.quantize(x, 5, kind, block)
        assert scale.shape == want_s.shape == (sp.n_blocks(n, block),)
        assert torch.equal(codes, want_c) and _same_float(scale, want_s), (n, block)
        assert _same_float(triton_ops.dequantize(codes, scale, kind, block), sp.dequantize(codes, scale, kind, block))
    # not vacuous: the same values in blocks of 256 get other scales
    assert not torch.equal(triton_ops.quantize(x, 5, kind)[0], codes)


@needs_triton
@pytest.mark.parametrize("opt,feat", [("lion", "plain"), ("lion", "all"), ("adamw", "plain"), ("adamw", "all")])
def test_narrow_blocks_step_like_the_reference(opt, feat, monkeypatch):
    """Blocks of 64-192 in the Triton step kernels: codes, scales (and Lion's params) bit for bit the
    reference over three steps, and the dispatcher hands them to triton, not to the reference."""
    features = FEATURES[feat]
    amsgrad = opt == "adamw" and features.get("amsgrad", False)
    gen = _gen("narrow", opt, feat)
    params, states = _narrow_inputs(opt, amsgrad, gen)
    start = [q.clone() for q in states[0]]
    kw = _kwargs(features)
    for step in range(1, STEPS + 1):
        grads = [torch.randn(p.shape, generator=gen) * 1.5 for p in params]
        ref_p, ref_s = _clone(params), [[q.clone() for q in lst] for lst in states]
        before = _clone(params)
        if opt == "lion":
            triton_ops.lion_step(params, grads, states[0], state_step=step, **LION_HP, **kw)
            torch_ops.lion_step(ref_p, grads, ref_s[0], state_step=step, **LION_HP, **kw)
        else:
            triton_ops.adamw_step(params, grads, *states, *([None] if not amsgrad else []), step=step,
                                  **ADAMW_HP, **kw)
            torch_ops.adamw_step(ref_p, grads, *ref_s, *([None] if not amsgrad else []), step=step,
                                 **ADAMW_HP, **kw)
        for i, (shape, blk) in enumerate(NARROW):
            where = f"step {step} {shape} in blocks of {blk}"
            _assert_params(f"{where} param", params[i], ref_p[i], bitwise=opt == "lion", before=before[i])
            for k, lst in enumerate(states):
                _assert_state(f"{where} state {k}", lst[i], ref_s[k][i])
    assert not torch.equal(states[0][0].codes, start[0].codes)
    # the dispatcher: triton serves every block size, the reference is not called
    assert kernels.serves("triton", torch.float32, {"state_int8", "state_int8_block"})
    assert "state_int8_block" in kernels._state_needs(states[0], 1)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    ref_p, ref_s = _clone(params), [[q.clone() for q in lst] for lst in states]
    if opt == "lion":
        torch_ops.lion_step(ref_p, grads, ref_s[0], state_step=9, **LION_HP)
        monkeypatch.setattr(torch_ops, "lion_step", _refuse)
        kernels.lion_step(params, grads, states[0], state_step=9, backend="triton", **LION_HP)
    else:
        extra = [] if amsgrad else [None]
        torch_ops.adamw_step(ref_p, grads, *ref_s, *extra, step=9, **ADAMW_HP)
        monkeypatch.setattr(torch_ops, "adamw_step", _refuse)
        kernels.adamw_step(params, grads, *states, *extra, step=9, backend="triton", **ADAMW_HP)
    for i in range(len(NARROW)):
        _assert_params(f"dispatched {i}", params[i], ref_p[i], bitwise=opt == "lion")
        for k, lst in enumerate(states):
            _assert_state(f"dispatched {i} state {k}", lst[i], ref_s[k][i])


@needs_triton
def test_bad_int8_blocks_are_refused():
    p, g = torch.randn(2, 96), torch.randn(2, 96)
    x = torch.randn(2, 96)
    m = Q8(*sp.quantize(x, 1, "signed", 96), "signed", 96)
    v = Q8(*sp.quantize(x.abs(), 1, "sqrt", 64), "sqrt", 64)
    with pytest.raises(ValueError, match=r"blocks of \[64, 96\]; one parameter's states share one block size"):
        triton_ops.adamw_step([p], [g], [m], [v], step=1, **ADAMW_HP)
    big = Q8(torch.zeros(2, 96, dtype=torch.int8), torch.zeros(1), "signed", 512)
    with pytest.raises(ValueError, match="a block holds 1 to 256 elements"):
        triton_ops.lion_step([p], [g], [big], state_step=1, **LION_HP)
    with pytest.raises(ValueError, match="a block holds 1 to 256 elements"):
        triton_ops.quantize(x, 1, "signed", 300)


# ---------------------------------------------------------------- the dispatcher and the optimizers
def _refuse(*args, **kwargs):
    raise AssertionError("this backend must not be called here")


def _lion_case(seed):
    gen = _gen("dispatch", seed)
    params, m, _, _ = _inputs("lion", FORMATS["mixed"], torch.float32, False, gen)
    return params, _grads(gen), m


def _adamw_case(seed):
    gen = _gen("dispatch-adamw", seed)
    params, m, v, vmax = _inputs("adamw", FORMATS["mixed2"], torch.float32, True, gen)
    return params, _grads(gen), m, v, vmax


@needs_triton
def test_dispatcher_hands_low_precision_state_to_triton(monkeypatch):
    for needs in ({"state_int8"}, {"state_bf16"}, {"state_int8", "state_bf16", "amsgrad", "found_inf"}):
        assert kernels.serves("triton", torch.float32, needs) and kernels.serves("triton", torch.bfloat16, needs)
    params, grads, m = _lion_case(1)
    ref_p, ref_m = _clone(params), _clone(m)
    torch_ops.lion_step(ref_p, grads, ref_m, state_step=4, **LION_HP)
    ap, ag, am, av, ax = _adamw_case(2)
    ref_a = [_clone(x) for x in (ap, am, av, ax)]
    torch_ops.adamw_step(ref_a[0], ag, *ref_a[1:], step=4, **ADAMW_HP)
    for name in ("lion_step", "adamw_step"):
        monkeypatch.setattr(torch_ops, name, _refuse)
    kernels.lion_step(params, grads, m, state_step=4, backend="triton", **LION_HP)
    kernels.adamw_step(ap, ag, am, av, ax, step=4, backend="triton", **ADAMW_HP)
    for i in range(len(SIZES)):
        assert torch.equal(params[i], ref_p[i])
        _assert_state(f"lion {i}", m[i], ref_m[i])
        _assert_params(f"adamw {i}", ap[i], ref_a[0][i], bitwise=False)
        for k, got in enumerate((am, av, ax)):
            _assert_state(f"adamw {i} state {k}", got[i], ref_a[k + 1][i])


def test_cuda_without_state_int8_routes_to_triton_or_the_reference(monkeypatch):
    """The CUDA kernels take no int8 state: the dispatcher sends such calls, mixed lists included, whole to
    the Triton kernels where they are there, else to the torch reference (checked on CPU tensors, the
    backends that must not serve them refusing)."""
    from shardopt.kernels import cuda

    assert "state_int8" not in cuda.FEATURES
    assert not kernels.serves("cuda", torch.float32, {"state_int8"})
    assert not kernels.serves("cuda", torch.bfloat16, {"state_int8", "state_bf16"})
    assert kernels.serves("cuda", torch.float32, {"amsgrad", "found_inf"})
    assert kernels.serves("torch", torch.float32, {"state_int8"})
    assert kernels._state_needs([torch.zeros(3), _q8(torch.randn(300), "signed")], 1) == {"state_int8"}
    assert kernels._state_needs([torch.zeros(3, dtype=torch.bfloat16), _q8(torch.randn(300), "sqrt")], 1) == {
        "state_int8", "state_bf16"}
    assert kernels._state_needs([torch.zeros(3)], None) == set()

    params, grads, m = _lion_case(3)
    ap, ag, am, av, ax = _adamw_case(4)
    want_l = [_clone(params), _clone(m)]
    torch_ops.lion_step(want_l[0], grads, want_l[1], state_step=2, **LION_HP)
    want_a = [_clone(x) for x in (ap, am, av, ax)]
    torch_ops.adamw_step(want_a[0], ag, *want_a[1:], step=2, **ADAMW_HP)

    monkeypatch.setattr(kernels, "resolve_backend", lambda backend, device: "cuda")
    monkeypatch.setattr(triton_ops, "available", lambda: False)  # below: with Triton, it serves them
    for mod in (cuda, triton_ops):
        for name in ("lion_step", "adamw_step"):
            monkeypatch.setattr(mod, name, _refuse)
    served = []
    for name in ("lion_step", "adamw_step"):
        real = getattr(torch_ops, name)

        def spy(*a, _real=real, _name=name, **kw):
            served.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(torch_ops, name, spy)
    kernels.lion_step(params, grads, m, state_step=2, backend="cuda", **LION_HP)
    kernels.adamw_step(ap, ag, am, av, ax, step=2, backend="cuda", **ADAMW_HP)
    assert served == ["lion_step", "adamw_step"]  # one call each: the lists are not split
    for i in range(len(SIZES)):
        assert torch.equal(params[i], want_l[0][i]) and torch.equal(ap[i], want_a[0][i])
        _assert_state(f"lion {i}", m[i], want_l[1][i])
        for k, got in enumerate((am, av, ax)):
            _assert_state(f"adamw {i} state {k}", got[i], want_a[k + 1][i])
    # where Triton is there and takes the state formats, the CUDA backend's gaps go to it, not the reference
    monkeypatch.setattr(triton_ops, "available", lambda: True)
    via = []
    for name in ("lion_step", "adamw_step"):
        monkeypatch.setattr(torch_ops, name, _refuse)
        monkeypatch.setattr(triton_ops, name, lambda *a, _n=name, **kw: via.append(_n))
    kernels.lion_step(params, grads, m, state_step=3, backend="cuda", **LION_HP)
    kernels.adamw_step(ap, ag, am, av, ax, step=3, backend="cuda", **ADAMW_HP)
    assert via == ["lion_step", "adamw_step"]


@needs_triton
@pytest.mark.parametrize("name", ["lion", "adamw_amsgrad_maximize"])
def test_optimizer_backend_triton_matches_torch_with_int8_state(name):
    """shardopt.Lion / AdamW with state_dtype="int8" (eligible and small parameters) on backend="triton"
    against backend="torch": Lion bit for bit, AdamW's params to its tolerance and its state bit for bit."""
    from cases import build, make_grads, make_params

    shapes = [(16, 256), (7, 5), (5, 768), (300,), (48, 96)]  # (48, 96): blocks of 96
    runs = []
    for backend in ("triton", "torch"):
        ps = make_params(torch.float32, 3, shapes)
        opt = build(name, ps, backend=backend, sharding="none", state_dtype="int8")
        for k in range(STEPS):
            for p, g in zip(ps, make_grads(k, shapes)):
                p.grad = g
            opt.step()
        runs.append((ps, opt))
    (ps, opt), (qs, ref) = runs
    assert any(k.endswith(sp.SCALE_SUFFIX) for st in opt.state.values() for k in st)
    key = ("momentum_buffer" if name == "lion" else "exp_avg") + sp.SCALE_SUFFIX
    assert opt.state[ps[-1]][key].shape == (48, 1)  # one block of 96 per row
    for p, q in zip(ps, qs):
        _assert_params(str(tuple(p.shape)), p.detach(), q.detach(), bitwise=name == "lion")
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                w = ref.state[q][k]
                assert v.dtype == w.dtype and (torch.equal(v, w) or _same_float(v, w)), (tuple(p.shape), k)
