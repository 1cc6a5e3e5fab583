"""int8 optimizer state (``state_dtype="int8"``) in the ``cpu`` backend against the torch reference.

The reference is :mod:`shardopt.kernels.state_precision` (``Q8`` blocks: dequantize, the fp32 math of
``torch_ops``, quantize with the value-keyed stochastic rounding). Lists mix ``Q8`` state and plain fp32
state (parameters too small to quantize), with odd sizes: blocks with a short tail, one-element blocks,
2-D scales, a tensor large enough to run threaded.

* Quantization: the kernels' own block code (the test entries ``_quantize_int8`` / ``_dequantize_int8``)
  equals ``state_precision.quantize`` / ``dequantize`` bitwise for both mappings, on random values over
  many decades and on random bit patterns (subnormals, inf, NaN), all-zero blocks, blocks with inf or NaN,
  blocks whose scale underflows; and so do the step kernels themselves (a step that stores the gradient).
* Lion: params, codes and scales bitwise equal to the reference over several steps, with every step
  option, fp32/bf16 params and fp32/bf16/fp16 grads.
* AdamW: the reference takes its square roots with ``torch.sqrt`` / ``torch._foreach_sqrt``, which on
  some CPU builds (MKL's vector math) are not correctly rounded (about 0.7% of fp32 values 1 ulp off); the
  kernels' sqrt is IEEE's. With the reference's sqrt replaced by a correctly rounded one (numpy's), AdamW
  is bitwise equal too: params, all codes and scales, every option and amsgrad. With torch's own sqrt, one
  step from the same state gives params within the fp32 AdamW tolerance, ``exp_avg`` bitwise and the
  "sqrt" codes within one code of the reference.
* A found_inf flag that is set leaves params, codes and scales untouched; results do not depend on where
  a tensor is cut at block boundaries nor on the thread count; the default ``cpu`` backend serves int8
  state itself (a torch fallback fails the test); state that mixes formats within a parameter, or an
  unexpected mapping, is left to the torch backend; bad inputs raise.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import cases
import shardopt.kernels as kernels
from shardopt.kernels import cpu, torch_ops
from shardopt.kernels import state_precision as sp

LION_HP = dict(lr=1e-2, beta1=0.9, beta2=0.99)
ADAMW_HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
STEPS = 3
PARAM_DTYPES = (torch.float32, torch.bfloat16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (shape, int8 state?): short tails (257, 4109), one-element and empty Q8 blocks, 2-D scales (16, 512),
# plain fp32 state of small parameters in the same call
SHAPES = [((257,), True), ((1000,), True), ((4096 + 13,), True), ((7,), False), ((16, 512), True),
          ((3, 5), False), ((0,), True), ((1,), True), ((2, 300), False)]
# threaded (> 2 x 128K elements), several units per tensor
BIG_SHAPES = [((300_001,), True), ((32768 * 3 + 13,), True), ((5,), False), ((40_000,), False)]

OPTION_CASES = {
    "plain": lambda: {},
    "maximize": lambda: dict(maximize=True),
    "clip_value": lambda: dict(clip_value=0.3),
    "clip_value_inexact": lambda: dict(clip_value=0.1),
    "grad_scale_lt1": lambda: dict(grad_scale=torch.tensor(0.37)),
    "grad_scale_eq1": lambda: dict(grad_scale=torch.tensor(1.0)),
    "found_inf_zero": lambda: dict(found_inf=torch.tensor(0.0)),
    "combined": lambda: dict(maximize=True, clip_value=0.5, grad_scale=torch.tensor(0.61),
                             found_inf=torch.tensor(0.0)),
}
OPTION_PARAMS = [
    pytest.param(opt, case, ams, id=f"{opt}{'-amsgrad' if ams else ''}-{case}")
    for opt in ("lion", "adamw")
    for ams in ((False, True) if opt == "adamw" else (False,))
    for case in OPTION_CASES
    if not ams or case in ("plain", "combined", "grad_scale_lt1")
]


@pytest.fixture(scope="module")
def ext():
    if not cpu.available():
        pytest.skip(f"C++ CPU extension unavailable: {cpu.build_error()}")
    return cpu.load()


def _ieee(orig):
    def sqrt(x, *a, **k):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu" and not (a or k):
            with np.errstate(invalid="ignore"):  # NaN in, NaN out, as torch.sqrt
                return torch.from_numpy(np.sqrt(x.detach().contiguous().numpy()))
        return orig(x, *a, **k)
    return sqrt


@pytest.fixture
def ieee_sqrt(monkeypatch):
    """The reference with a correctly rounded fp32 sqrt (numpy's), as state_precision defines the format;
    torch's CPU sqrt may be 1 ulp off."""
    sqrt = _ieee(torch.sqrt)
    monkeypatch.setattr(torch, "sqrt", sqrt)
    monkeypatch.setattr(torch, "_foreach_sqrt", lambda xs: [sqrt(x) for x in xs])


@contextlib.contextmanager
def single_threaded():
    """For the torch reference only (many small foreach ops); elementwise results do not depend on it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _dtype_id(dt):
    return str(dt)[6:]


# ----------------------------------------------------------------- helpers

def q8(x: torch.Tensor, step: int, kind: str, block: int = sp.BLOCK) -> sp.Q8:
    """``x`` quantized by the reference in blocks of ``block``; an eligible parameter's scales are shaped
    (rows, row / block)."""
    codes, scale = sp.quantize(x.float().contiguous(), step, kind, block)
    if sp.int8_eligible(x.shape):
        scale = scale.view(sp.scale_shape(x.shape, block))
    return sp.Q8(codes, scale, kind, block)


def _with_zeros(t, every, offset=0):
    t.view(-1)[offset::every] = 0
    return t


def fresh(shapes, pdtype, seed, amsgrad):
    """[params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or None]: Q8 state where ``shapes`` says so (fp32
    otherwise), exact zeros in the moments, exp_avg_sq >= exp_avg**2 as in a real run."""
    g = torch.Generator().manual_seed(seed)
    sh = [s for s, _ in shapes]
    params = [p.detach() for p in cases.make_params(pdtype, seed=seed, shapes=sh)]
    m = [_with_zeros(torch.randn(s, generator=g) * 0.1, 4) for s in sh]
    v = [_with_zeros(x * x + torch.rand(s, generator=g) * 0.01, 8) for x, s in zip(m, sh)]
    vmax = [x * (torch.rand(x.shape, generator=g) + 0.5) for x in v] if amsgrad else None

    def state(ts, kind):
        # i8: True (blocks of 256), an int (that block), or False (fp32 state)
        return [q8(t, 1, kind, sp.BLOCK if i8 is True else i8) if i8 else t for t, (_, i8) in zip(ts, shapes)]

    return [params, state(m, "signed"), state(v, "sqrt"), state(vmax, "sqrt") if amsgrad else None]


def grads_for(shapes, gdtype, step, factor=0.4):
    return [g * factor for g in cases.make_grads(step, [s for s, _ in shapes], gdtype)]


def copy_state(st):
    return [None if x is None else [t.clone() for t in x] for x in st]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, any NaN equal to any NaN (torch's NaN bits depend on its code path)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    z = torch.zeros((), dtype=a.dtype)
    iv = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return torch.equal(torch.where(na, z, a).contiguous().view(iv), torch.where(nb, z, b).contiguous().view(iv))


def assert_same(a, b, what):
    if isinstance(a, sp.Q8):
        assert isinstance(b, sp.Q8) and a.kind == b.kind, what
        bad = (a.codes.int() - b.codes.int()).abs()
        assert torch.equal(a.codes, b.codes), f"{what}: codes differ at {bad.nonzero()[:5].view(-1).tolist()}, " \
                                               f"by up to {bad.max().item()}"
        assert same_bits(a.scale, b.scale), f"{what}: scales differ"
    else:
        assert same_bits(a, b), f"{what} not bitwise equal"


def assert_state_same(opt, got, ref, params=True):
    for name, k in (("params", 0), ("exp_avgs", 1), ("exp_avg_sqs", 2), ("max_exp_avg_sqs", 3)):
        if (opt == "lion" and k > 1) or got[k] is None or (k == 0 and not params):
            continue
        for i, (a, b) in enumerate(zip(got[k], ref[k])):
            assert_same(a, b, f"{name}[{i}]")


def step_kw(opt, step, wd):
    return dict(weight_decay=wd, **LION_HP) if opt == "lion" else dict(weight_decay=wd, step=step, **ADAMW_HP)


def run(impl, opt, st, grads, step, wd, opts, state_step=None):
    kw = dict(step_kw(opt, step, wd), **opts)
    if opt == "lion":
        impl(st[0], grads, st[1], state_step=step if state_step is None else state_step, **kw)
    else:
        impl(st[0], grads, st[1], st[2], st[3], state_step=state_step, **kw)


def impls(opt):
    return (cpu.lion_step, torch_ops.lion_step) if opt == "lion" else (cpu.adamw_step, torch_ops.adamw_step)


def trajectories(opt, shapes, pdtype, gdtype, amsgrad, opts_factory, seed, steps=STEPS, wd=0.1):
    """(start, kernels' state, reference's state) after ``steps`` steps from the same start."""
    st = fresh(shapes, pdtype, seed=seed, amsgrad=amsgrad)
    mine, theirs = impls(opt)
    got, ref = copy_state(st), copy_state(st)
    for step in range(1, steps + 1):
        grads = grads_for(shapes, gdtype, seed * 100 + step)
        run(mine, opt, got, grads, step, wd, opts_factory())
        with single_threaded():
            run(theirs, opt, ref, grads, step, wd, opts_factory())
    return st, got, ref


def assert_stepped(st, got):
    """The step changed a Q8 state and a parameter (1000 elements, index 1)."""
    assert not torch.equal(got[0][1], st[0][1])
    assert not torch.equal(got[1][1].codes, st[1][1].codes)


# ----------------------------------------------------------- quantization

def random_bits(n, seed):
    """fp32 values from random bit patterns: every exponent, subnormals, inf and NaN (blocks with a NaN or
    an inf are common)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)


def special_values(seed, nonneg):
    """Blocks of 256: values over 12 decades with exact (and negative) zeros; all zero; one +inf; one -inf;
    one NaN; a subnormal absmax; an absmax whose scale underflows to 0; one value repeated; the largest
    finite fp32; then random bit patterns; and a short tail of 13."""
    g = torch.Generator().manual_seed(seed)

    def r(n=256):
        return torch.randn(n, generator=g)

    wide = r(1024) * 10.0 ** torch.randint(-6, 6, (1024,), generator=g).float()
    wide[::7] = 0.0
    wide[3::11] = -0.0
    blocks = [wide, torch.zeros(256)]
    for bad in (float("inf"), -float("inf"), float("nan")):
        b = r()
        b[37] = bad
        blocks.append(b)
    fp32_max = torch.full((256,), 0x7F7FFFFF, dtype=torch.int32).view(torch.float32)
    blocks += [r() * 1e-40, r() * 1e-44, torch.full((256,), 0.3), fp32_max, random_bits(2048, seed), r(13)]
    x = torch.cat(blocks)
    if nonneg:  # second moments: no negative values, no -0.0 (sqrt(-0) = -0 would make an all -0 block's scale -0)
        x = x.abs()
    return x


QUANT_SIZES = [1, 255, 257, 1000, 4096 + 13, 100_000]
QUANT_STEPS = [1, 77, 2**31 + 5, 2**40 + 7]  # steps past 2^32 wrap like the reference's salt


def _quant_inputs(n, step, kind):
    g = torch.Generator().manual_seed(n + step % 1000)
    if kind == "signed":
        return [special_values(step % 1000, nonneg=False), torch.randn(n, generator=g) * 0.01]
    return [special_values(step % 1000, nonneg=True), torch.rand(n, generator=g) * 1e-3,
            torch.rand(n, generator=g) ** 8]  # second moments over many decades


def _check_quantize(ext, x, step, kind):
    codes, scales = ext._quantize_int8(x, step, kind == "sqrt")
    want_codes, want_scales = sp.quantize(x, step, kind)
    assert codes.dtype == sp.code_dtype(kind) and codes.shape == x.shape
    assert_same(sp.Q8(codes, scales, kind), sp.Q8(want_codes, want_scales, kind), kind)


@pytest.mark.parametrize("step", QUANT_STEPS)
@pytest.mark.parametrize("n", QUANT_SIZES)
def test_quantize_signed_is_state_precision(ext, n, step):
    for x in _quant_inputs(n, step, "signed"):
        _check_quantize(ext, x, step, "signed")


@pytest.mark.parametrize("step", QUANT_STEPS)
@pytest.mark.parametrize("n", QUANT_SIZES)
def test_quantize_sqrt_is_state_precision(ext, ieee_sqrt, n, step):
    for x in _quant_inputs(n, step, "sqrt"):
        _check_quantize(ext, x, step, "sqrt")


def test_quantize_sqrt_with_torch_sqrt_within_one_code(ext):
    """Unpatched, the reference's torch.sqrt may be 1 ulp off: codes within one, scales within one ulp."""
    x = torch.rand(300_000) ** 4
    codes, scales = ext._quantize_int8(x, 3, True)
    want_codes, want_scales = sp.quantize(x, 3, "sqrt")
    assert (codes.int() - want_codes.int()).abs().max().item() <= 1
    torch.testing.assert_close(scales, want_scales, rtol=2.0**-23, atol=0)


def test_dequantize_is_state_precision(ext):
    """Every code of both mappings (the "sqrt" table exactly, codes above 240 included) times scales of
    every kind: normal, subnormal, zero, inf, NaN; a short last block."""
    scales = torch.tensor([1.0, 0.37, 3e-39, 0.0, float("inf"), float("nan"), 1e30, 2.0**-20])
    n = 256 * scales.numel() - 9
    for dtype, kind in ((torch.int8, "signed"), (torch.uint8, "sqrt")):
        lo = -128 if dtype == torch.int8 else 0
        codes = (torch.arange(n) % 256 + lo).to(dtype)
        assert same_bits(ext._dequantize_int8(codes, scales), sp.dequantize(codes, scales, kind)), kind
    table = ext._dequantize_int8(torch.arange(256, dtype=torch.uint8), torch.ones(1))
    assert same_bits(table, sp.SQRT_TABLE * sp.SQRT_TABLE)


@pytest.mark.parametrize("step", [1, 5, 2**33 + 1])
def test_step_kernels_quantize_like_state_precision(ext, ieee_sqrt, step):
    """A step that stores the gradient itself (beta = 0 from a zero state: m = 0*0 + g*1, v = 0*0 + (g*g)*1)
    writes state_precision.quantize's codes and scales, special blocks included."""
    g = special_values(step % 1000, nonneg=False)
    g[g.abs() > 1e19] = 1e19  # keep g*g finite in most blocks (the inf/NaN blocks stay)
    n = g.numel()

    def zero(kind):
        return sp.Q8(torch.zeros(n, dtype=sp.code_dtype(kind)), torch.zeros(sp.n_blocks(n)), kind)

    m = zero("signed")
    cpu.lion_step([torch.zeros(n)], [g], [m], lr=0.0, beta1=0.9, beta2=0.0, weight_decay=0.0, state_step=step)
    assert_same(m, sp.Q8(*sp.quantize(0.0 + g * 1.0, step, "signed"), "signed"), "lion exp_avg")
    m, v, vmax = zero("signed"), zero("sqrt"), zero("sqrt")
    cpu.adamw_step([torch.zeros(n)], [g], [m], [v], [vmax], lr=0.0, beta1=0.0, beta2=0.0, eps=1e-8,
                   weight_decay=0.0, step=step)
    assert_same(m, sp.Q8(*sp.quantize(0.0 + g * 1.0, step, "signed"), "signed"), "adamw exp_avg")
    want_v = sp.Q8(*sp.quantize(0.0 + (g * g) * 1.0, step, "sqrt"), "sqrt")
    assert_same(v, want_v, "adamw exp_avg_sq")
    assert_same(vmax, want_v, "adamw max_exp_avg_sq")


# ------------------------------------------------------- steps vs torch

@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("pdtype", PARAM_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_lion_int8_matches_torch(ext, case, pdtype, gdtype):
    """Every option, mixed Q8 + fp32 state, several steps: params, codes and scales bitwise."""
    st, got, ref = trajectories("lion", SHAPES, pdtype, gdtype, False, OPTION_CASES[case], seed=31)
    assert_state_same("lion", got, ref)
    assert_stepped(st, got)


@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("pdtype", PARAM_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("opt,case,amsgrad", [p for p in OPTION_PARAMS if p.values[0] == "adamw"])
def test_adamw_int8_matches_torch_with_ieee_sqrt(ext, ieee_sqrt, opt, case, amsgrad, pdtype, gdtype):
    """With the reference's sqrt correctly rounded, AdamW is bitwise too: params, every code and scale."""
    st, got, ref = trajectories("adamw", SHAPES, pdtype, gdtype, amsgrad, OPTION_CASES[case], seed=32)
    assert_state_same("adamw", got, ref)
    assert_stepped(st, got)


# blocks under 256 (state_precision.int8_block of narrow rows): rows of 96 (one block each), of 384 (two
# of 192), of 64; threaded (> 2 x 128K elements) with several units per tensor cut on 96-element blocks;
# beside 256-blocks and fp32 state in the same call
NARROW_SHAPES = [((48, 96), 96), ((12, 384), 192), ((1000,), True), ((70, 64), 64), ((3001, 96), 96),
                 ((5,), False)]


@pytest.mark.parametrize("opt,case,amsgrad", [("lion", "plain", False), ("lion", "combined", False),
                                              ("adamw", "plain", False), ("adamw", "combined", True)])
def test_int8_narrow_blocks_match_torch(ext, ieee_sqrt, opt, case, amsgrad, monkeypatch):
    """Blocks of 64-192 run in the compiled kernels too (no torch fallback), bitwise equal to the
    reference: params, codes and scales, over several steps."""
    assert sp.int8_block((48, 96)) == 96 and sp.int8_block((12, 384)) == 192
    assert sp.int8_block((3001, 96)) == 96 and sp.int8_block((70, 64)) == 64
    st, got, ref = trajectories(opt, NARROW_SHAPES, torch.float32, torch.float32, amsgrad, OPTION_CASES[case],
                                seed=35)
    assert_state_same(opt, got, ref)
    assert not torch.equal(got[1][0].codes, st[1][0].codes)
    # the dispatcher sends them to the cpu backend, not to torch
    def no_fallback(*a, **k):
        raise AssertionError("torch fallback")
    monkeypatch.setattr(torch_ops, "lion_step", no_fallback)
    monkeypatch.setattr(torch_ops, "adamw_step", no_fallback)
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "cpu"
    st2 = copy_state(got)
    grads = grads_for(NARROW_SHAPES, torch.float32, 99)
    if opt == "lion":
        kernels.lion_step(st2[0], grads, st2[1], state_step=STEPS + 1, weight_decay=0.1, **LION_HP)
    else:
        kernels.adamw_step(st2[0], grads, st2[1], st2[2], st2[3], weight_decay=0.1, step=STEPS + 1, **ADAMW_HP)
    assert not torch.equal(st2[0][0], got[0][0])


def test_int8_block_argument_is_checked(ext):
    p, g = torch.randn(2, 96), torch.randn(2, 96)
    codes, scale = torch.zeros(2, 96, dtype=torch.int8), torch.zeros(2)
    with pytest.raises(RuntimeError, match="scales"):
        ext.lion_step_int8([p], [g], [codes], [scale], 1e-3, 0.9, 0.99, 0.0, [1], blocks=[64])
    with pytest.raises(RuntimeError, match="a block holds 1 to 256"):
        ext.lion_step_int8([p], [g], [codes], [scale], 1e-3, 0.9, 0.99, 0.0, [1], blocks=[512])


def _assert_adamw_close(got, ref):
    """One AdamW step from the same state with torch's own sqrt: params within the fp32 AdamW tolerance
    (1 bf16 ulp for bf16 params), exp_avg bitwise, the "sqrt" codes within one code and their scales within
    one ulp; plain fp32 moments bitwise (no sqrt in them)."""
    for i, (a, b) in enumerate(zip(got[0], ref[0])):
        if a.dtype == torch.bfloat16:
            torch.testing.assert_close(a.float(), b.float(), rtol=2.0**-7, atol=1e-7, msg=f"params[{i}]")
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"params[{i}]")
    for i, (a, b) in enumerate(zip(got[1], ref[1])):
        assert_same(a, b, f"exp_avgs[{i}]")
    for k in (2, 3):
        for i, (a, b) in enumerate(zip(got[k] or [], ref[k] or [])):
            if not isinstance(a, sp.Q8):
                assert_same(a, b, f"state {k}[{i}]")
                continue
            if a.numel():
                assert (a.codes.int() - b.codes.int()).abs().max().item() <= 1, f"state {k}[{i}]"
            torch.testing.assert_close(a.scale, b.scale, rtol=2.0**-23, atol=0)


@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("pdtype", PARAM_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case,amsgrad", [("plain", False), ("combined", False), ("combined", True)])
def test_adamw_int8_one_step_matches_torch(ext, case, amsgrad, pdtype, gdtype):
    st = fresh(SHAPES, pdtype, seed=33, amsgrad=amsgrad)
    for step in range(1, STEPS + 1):
        grads = grads_for(SHAPES, gdtype, 3300 + step)
        got, ref = copy_state(st), copy_state(st)
        run(cpu.adamw_step, "adamw", got, grads, step, 0.1, OPTION_CASES[case]())
        with single_threaded():
            run(torch_ops.adamw_step, "adamw", ref, grads, step, 0.1, OPTION_CASES[case]())
        _assert_adamw_close(got, ref)
        assert_stepped(st, got)
        st = got


@pytest.mark.parametrize("opt,amsgrad", [("lion", False), ("adamw", False), ("adamw", True)])
def test_int8_big_tensors_and_per_tensor_steps(ext, ieee_sqrt, opt, amsgrad):
    """Threaded calls (several units per tensor, cut at block boundaries), fp32/bf16 params mixed in the
    call, one salt per tensor."""
    shapes = BIG_SHAPES + SHAPES
    st = fresh(shapes, torch.float32, seed=34, amsgrad=amsgrad)
    for k in range(1, len(shapes), 3):
        st[0][k] = st[0][k].to(torch.bfloat16)
    mine, theirs = impls(opt)
    got, ref = copy_state(st), copy_state(st)
    opts = dict(maximize=True, clip_value=0.7, grad_scale=torch.tensor(0.8))
    for step in (1, 2):
        grads = grads_for(shapes, torch.bfloat16, 3400 + step)
        salts = [1000 * step + i for i in range(len(shapes))]
        run(mine, opt, got, grads, step, 0.1, opts, state_step=salts)
        with single_threaded():
            run(theirs, opt, ref, grads, step, 0.1, opts, state_step=salts)
    assert_state_same(opt, got, ref)
    assert_stepped(st, got)


def test_int8_non_finite_and_zero_blocks_like_torch(ext, ieee_sqrt):
    """A zero state (codes 0, scale 0), gradients with an all-zero block, an inf block and a NaN block:
    the blocks turn to inf/NaN scales and back to what the reference stores, over three steps."""
    n = 256 * 6 + 100
    g = torch.randn(n)
    g[256:512] = 0.0  # the block stays all zero (scale 0, codes 0)
    g[512 + 5] = float("inf")
    g[768 + 9] = -float("inf")
    g[1024 + 200] = float("nan")
    g[1280:] *= 1e-41  # subnormal values, a scale that underflows
    shapes = [((n,), True), ((300,), False)]
    grads = [g, torch.randn(300)]
    for opt, amsgrad in (("lion", False), ("adamw", False), ("adamw", True)):
        st = fresh(shapes, torch.float32, seed=35, amsgrad=amsgrad)
        for x in st[1:]:
            if x is not None:
                x[0] = sp.Q8(torch.zeros_like(x[0].codes), torch.zeros_like(x[0].scale), x[0].kind)
        mine, theirs = impls(opt)
        got, ref = copy_state(st), copy_state(st)
        for step in range(1, 4):
            for impl, s in ((mine, got), (theirs, ref)):
                run(impl, opt, s, grads, step, 0.1, dict(clip_value=None) if step == 1 else dict(maximize=True))
        assert_state_same(opt, got, ref)
        scale = got[1][0].scale
        assert scale[1].item() == 0.0 and torch.isnan(scale).any(), scale  # the zero block; the inf one


@pytest.mark.parametrize("opt,amsgrad", [("lion", False), ("adamw", False), ("adamw", True)])
def test_int8_found_inf_set_leaves_state_untouched(ext, opt, amsgrad):
    st = fresh(SHAPES, torch.float32, seed=36, amsgrad=amsgrad)
    grads = grads_for(SHAPES, torch.float32, 3600)
    got = copy_state(st)
    for flag in (1.0, float("inf"), float("nan")):
        run(impls(opt)[0], opt, got, grads, 1, 0.1, dict(found_inf=torch.tensor(flag), grad_scale=torch.tensor(0.5)))
        # through the dispatcher too
        kw = dict(step_kw(opt, 1, 0.1), found_inf=torch.tensor(flag), backend="cpu")
        if opt == "lion":
            kernels.lion_step(got[0], grads, got[1], state_step=1, **kw)
        else:
            kernels.adamw_step(got[0], grads, got[1], got[2], got[3], **kw)
    assert_state_same(opt, got, st)
    run(impls(opt)[0], opt, got, grads, 1, 0.1, dict(found_inf=torch.tensor(0.0)))
    assert_stepped(st, got)


# Cuts at block boundaries (ZeRO-1 cuts int8 parameters at multiples of 256): slices see the same blocks.
CUTS = [0, 256, 1024, 32768 + 256 * 3, 70_144, 100_003]


def _slice(t, a, b):
    if isinstance(t, sp.Q8):
        return sp.Q8(t.codes.view(-1)[a:b], t.scale.view(-1)[a // sp.BLOCK:sp.n_blocks(b)], t.kind)
    return t.view(-1)[a:b]


@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_int8_partition_and_thread_invariance(ext, opt):
    n = CUTS[-1]
    base = fresh([((n,), True)], torch.float32, seed=37, amsgrad=opt == "adamw")
    grads = [grads_for([((n,), True)], torch.float32, 3700 + k)[0] for k in range(STEPS)]

    def go(st, cut, nt=None):
        old = torch.get_num_threads()
        if nt:
            torch.set_num_threads(nt)
        try:
            for step, g in enumerate(grads, start=1):
                pieces = list(zip(CUTS[:-1], CUTS[1:])) if cut else [(0, n)]
                lists = [None if x is None else [_slice(x[0], a, b) for a, b in pieces] for x in st]
                run(impls(opt)[0], opt, lists, [g[a:b] for a, b in pieces], step, 0.1, {})
        finally:
            torch.set_num_threads(old)
        return st

    whole = go(copy_state(base), cut=False)
    for other in (go(copy_state(base), cut=True), go(copy_state(base), cut=False, nt=1)):
        assert_state_same(opt, whole, other)


# ------------------------------------------------- through the dispatcher

def test_cpu_backend_serves_int8_state(ext):
    """The default and the explicit cpu backend take int8 state (mixed with fp32) with every option
    themselves: torch_ops' steps and state_precision's load/store are patched to fail the test."""
    needs = {"maximize", "clip_value", "grad_scale", "found_inf", "amsgrad", "state_int8", "state_bf16"}
    assert "state_int8" in cpu.FEATURES
    for dt in PARAM_DTYPES:
        assert kernels.serves("cpu", dt, needs)
    opts = dict(maximize=True, clip_value=0.5, grad_scale=torch.tensor(0.5), found_inf=torch.tensor(0.0))
    for opt, amsgrad in (("lion", False), ("adamw", False), ("adamw", True)):
        st = fresh(SHAPES, torch.float32, seed=38, amsgrad=amsgrad)
        grads = grads_for(SHAPES, torch.bfloat16, 3800)
        ref = copy_state(st)
        with single_threaded():
            run(torch_ops.lion_step if opt == "lion" else torch_ops.adamw_step, opt, ref, grads, 1, 0.1, opts)
        for backend in ("cpu", "auto"):
            got = copy_state(st)
            with pytest.MonkeyPatch.context() as mp:
                for name in ("lion_step", "adamw_step", "effective_grads"):
                    mp.setattr(torch_ops, name, lambda *a, _n=name, **k: pytest.fail(f"torch_ops.{_n} was called"))
                for name in ("load", "store"):
                    mp.setattr(sp, name, lambda *a, _n=name, **k: pytest.fail(f"state_precision.{_n} was called"))
                kw = dict(step_kw(opt, 1, 0.1), backend=backend, **opts)
                if opt == "lion":
                    kernels.lion_step(got[0], grads, got[1], state_step=1, **kw)
                else:
                    kernels.adamw_step(got[0], grads, got[1], got[2], got[3], **kw)
            if opt == "lion":
                assert_state_same(opt, got, ref)
            else:  # the kernels' sqrt vs torch's: see test_adamw_int8_one_step_matches_torch
                _assert_adamw_close(got, ref)
            assert_stepped(st, got)


def test_unexpected_formats_go_to_the_torch_backend(ext):
    """A Lion momentum in the "sqrt" mapping, an AdamW parameter whose exp_avg is a Q8 but whose exp_avg_sq
    is fp32: those parameters are updated by torch_ops (its result exactly), the others by the kernels."""
    shapes = [((1000,), True), ((300,), True)]
    st = fresh(shapes, torch.float32, seed=39, amsgrad=False)
    grads = grads_for(shapes, torch.float32, 3900)
    lion = copy_state(st)
    lion[1][0] = q8(lion[1][0].dequantize().abs(), 1, "sqrt")
    got, ref = copy_state(lion), copy_state(lion)
    run(cpu.lion_step, "lion", got, grads, 1, 0.1, {})
    run(torch_ops.lion_step, "lion", ref, grads, 1, 0.1, {})
    assert_state_same("lion", got, ref)
    adamw = copy_state(st)
    adamw[2][0] = adamw[2][0].dequantize()
    got, ref = copy_state(adamw), copy_state(adamw)
    run(cpu.adamw_step, "adamw", got, grads, 1, 0.1, {})
    run(torch_ops.adamw_step, "adamw", ref, grads, 1, 0.1, {})
    assert_same(got[0][0], ref[0][0], "the torch-served parameter")
    assert_same(got[1][0], ref[1][0], "its exp_avg")
    assert_same(got[2][0], ref[2][0], "its exp_avg_sq")
    _assert_adamw_close([got[0][1:], got[1][1:], got[2][1:], None], [ref[0][1:], ref[1][1:], ref[2][1:], None])


def test_int8_version_counters_are_bumped(ext):
    n = 1000
    p, g = torch.randn(n), torch.randn(n)
    m, v = q8(torch.randn(n), 1, "signed"), q8(torch.rand(n), 1, "sqrt")
    before = [t._version for t in (p, m.codes, m.scale, v.codes, v.scale, g)]
    cpu.adamw_step([p], [g], [m], [v], step=1, weight_decay=0.0, **ADAMW_HP)
    cpu.lion_step([p], [g], [m], state_step=1, weight_decay=0.0, **LION_HP)
    after = [t._version for t in (p, m.codes, m.scale, v.codes, v.scale, g)]
    assert all(b > a for a, b in zip(before[:5], after[:5])) and after[5] == before[5]


def test_int8_bad_input_raises(ext):
    n = 300
    p, g = [torch.zeros(n)], [torch.ones(n)]
    m = [q8(torch.randn(n), 1, "signed")]
    with pytest.raises(ValueError, match=r"int8 optimizer state needs state_step"):
        cpu.lion_step(p, g, m, weight_decay=0.0, **LION_HP)
    with pytest.raises(RuntimeError, match=r"exp_avg_codes\[0\] has dtype Byte"):
        ext.lion_step_int8(p, g, [m[0].codes.view(torch.uint8)], [m[0].scale], 1e-2, 0.9, 0.99, 0.0, [1])
    with pytest.raises(RuntimeError, match=r"exp_avg_scales\[0\] has 1 scales but params\[0\] has 300 elements"):
        ext.lion_step_int8(p, g, [m[0].codes], [m[0].scale[:1]], 1e-2, 0.9, 0.99, 0.0, [1])
    with pytest.raises(RuntimeError, match=r"exp_avg_scales\[0\] must be a contiguous float32"):
        ext.lion_step_int8(p, g, [m[0].codes], [m[0].scale.double()], 1e-2, 0.9, 0.99, 0.0, [1])
    with pytest.raises(RuntimeError, match=r"exp_avg_codes\[0\] has shape"):
        ext.lion_step_int8(p, g, [m[0].codes[:10]], [m[0].scale], 1e-2, 0.9, 0.99, 0.0, [1])
    with pytest.raises(RuntimeError, match=r"state_step=2"):
        ext.lion_step_int8(p, g, [m[0].codes], [m[0].scale], 1e-2, 0.9, 0.99, 0.0, [1, 2])
    v = q8(torch.rand(n), 1, "sqrt")
    with pytest.raises(RuntimeError, match=r"amsgrad needs both"):
        ext.adamw_step_int8(p, g, [m[0].codes], [m[0].scale], [v.codes], [v.scale], 1e-2, 0.9, 0.999, 1e-8,
                            0.0, 1, [v.codes], None)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq_codes\[0\] has dtype Char"):
        ext.adamw_step_int8(p, g, [m[0].codes], [m[0].scale], [m[0].codes], [m[0].scale], 1e-2, 0.9, 0.999,
                            1e-8, 0.0, 1)
    assert torch.equal(p[0], torch.zeros(n))
