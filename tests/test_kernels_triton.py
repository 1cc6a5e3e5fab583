"""Triton Lion/AdamW kernels vs the ``torch`` reference backend, on CPU.

There is no GPU in CI, so the kernels run under Triton's interpreter, which
executes each program with numpy on CPU tensors.  ``triton.jit`` reads
``TRITON_INTERPRET`` when it *decorates* a kernel to choose between compiling
for a GPU and interpreting, so it has to be set before anything jits a kernel;
tests/conftest.py sets it (without a GPU) before any test file, and so
triton, is imported; with a GPU it stays unset and the CPU-tensor tests skip, while the
``gpu`` ones run the same dtype cases and the gradient pass compiled on CUDA tensors.  (shardopt itself decorates its kernels lazily at first call, but
other code in the process might not.)  The whole module is skipped when triton
is not importable.

Expected agreement under the interpreter:
* Lion: bitwise, for every param/grad/state dtype (same fp32 op order, no FMA,
  bf16 params stored with explicit round-to-nearest-even, bf16 state with the
  value-keyed stochastic rounding of ``state_precision``).
* AdamW: params in fp32 within rtol 1e-6 / atol 1e-7, bf16 within one bf16
  ulp.  The kernel uses IEEE ``sqrt_rn``/``div_rn``; torch's vectorised CPU
  ``sqrt`` is not always correctly rounded (1 ulp off on some inputs), hence not
  bitwise.  The moments take no square root: bitwise.
  (int8 state: tests/test_kernels_triton_state.py.)
* The gradient transform (maximize, clip_value, grad_scale), the device skip
  flag found_inf and amsgrad, alone and together, to the same tolerances;
  gradients are never written and a set flag writes nothing.
* grad_stats within 1e-6 relative of a float64 sum, NaN ``bad`` for inf/NaN;
  and the dispatcher really hands these calls to triton (the torch backend's
  functions are replaced by ones that raise).
"""
import os
import zlib

# TRITON_INTERPRET=1 must precede any triton import: tests/conftest.py sets it without a GPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from shardopt.kernels import state_precision  # noqa: E402
from shardopt.kernels import torch_ops  # noqa: E402
from shardopt.kernels import triton_ops  # noqa: E402

from cases import grad_stats_reference  # noqa: E402

SHAPES = [(1,), (7,), (1000,), (4099,), (13, 17)]

LION_HP = dict(lr=1e-2, beta1=0.9, beta2=0.99)
ADAMW_HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


# CPU-tensor tests under the interpreter, the ``gpu`` ones compiled on CUDA tensors (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("triton_mode")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _with_zeros(t, every, offset=0):
    t = t.clone()
    t.view(-1)[offset::every] = 0
    return t


def _make_state(shapes, pdtype, sdtype, *, seed, adamw):
    gen = torch.Generator().manual_seed(seed)
    params, exp_avgs, exp_avg_sqs = [], [], []
    for shape in shapes:
        params.append(_with_zeros(torch.randn(shape, generator=gen), 7, 3).to(pdtype))
        # exact zeros in m at the same places as zeros in g -> Lion's c == 0
        exp_avgs.append(_with_zeros(torch.randn(shape, generator=gen), 5).to(sdtype))
        if adamw:
            v = torch.rand(shape, generator=gen) * 0.1
            exp_avg_sqs.append(_with_zeros(v, 5).to(sdtype))
    return params, exp_avgs, exp_avg_sqs


def _make_grads(shapes, gdtype, *, seed):
    gen = torch.Generator().manual_seed(seed)
    return [_with_zeros(torch.randn(s, generator=gen), 5).to(gdtype) for s in shapes]


def _bf16_ulp_distance(a, b):
    """Per-element distance in bf16 ulps (+0 and -0 count as equal)."""

    def ordered(t):
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        mag = bits & 0x7FFF
        return torch.where(bits < 0, -mag, mag)

    return (ordered(a) - ordered(b)).abs()


def _assert_close(name, got, want, *, bitwise):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if bitwise:
        assert torch.equal(got, want), f"{name}: max diff {(got.float() - want.float()).abs().max()}"
    elif got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    else:
        ulps = _bf16_ulp_distance(got, want)
        assert int(ulps.max()) <= 1, f"{name}: {int(ulps.max())} bf16 ulps apart"


def _on(ts, device):
    """The tensors on ``device`` (the same objects where already there)."""
    return [t if t.device == torch.device(device) else t.to(device) for t in ts]


def _run_and_compare(opt, pdtype, gdtype, sdtype, weight_decay, *, shapes=SHAPES, steps=3, device="cpu"):
    """Triton on ``device`` against the torch reference on CPU, each step from the kernel's own state."""
    adamw = opt == "adamw"
    params, exp_avgs, exp_avg_sqs = (_on(x, device) for x in _make_state(shapes, pdtype, sdtype, seed=1234,
                                                                        adamw=adamw))
    bitwise = not adamw
    for step in range(1, steps + 1):
        ref_grads = _make_grads(shapes, gdtype, seed=step)
        grads = _on(ref_grads, device)
        # Re-sync the reference from the triton state so every step is
        # compared on identical inputs (AdamW tolerances do not compound).
        # bf16 state is stored by value-keyed stochastic rounding with the
        # step as its salt (state_precision), the same in both.
        ref_p, ref_m, ref_v = ([t.clone() for t in _on(x, "cpu")] for x in (params, exp_avgs, exp_avg_sqs))
        if adamw:
            hp = dict(ADAMW_HP, weight_decay=weight_decay, step=step)
            triton_ops.adamw_step(params, grads, exp_avgs, exp_avg_sqs, **hp)
            torch_ops.adamw_step(ref_p, ref_grads, ref_m, ref_v, **hp)
        else:
            hp = dict(LION_HP, weight_decay=weight_decay, state_step=step)
            triton_ops.lion_step(params, grads, exp_avgs, **hp)
            torch_ops.lion_step(ref_p, ref_grads, ref_m, **hp)
        got_p, got_m, got_v = (_on(x, "cpu") for x in (params, exp_avgs, exp_avg_sqs))
        for i in range(len(shapes)):
            _assert_close(f"step{step} params[{i}]", got_p[i], ref_p[i], bitwise=bitwise)
            # the moments take no square root: bitwise for AdamW too
            _assert_close(f"step{step} exp_avgs[{i}]", got_m[i], ref_m[i], bitwise=True)
            if adamw:
                _assert_close(f"step{step} exp_avg_sqs[{i}]", got_v[i], ref_v[i], bitwise=True)


# ---------------------------------------------------------------------------
# agreement with the torch backend
# ---------------------------------------------------------------------------
DTYPE_CASES = [
    # (param dtype, grad dtype, state dtype)
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.float32, torch.float16, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32, torch.bfloat16),
]


def _dtype_id(case):
    return "-".join(str(d).replace("torch.", "") for d in case)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd0.1"])
@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=[_dtype_id(c) for c in DTYPE_CASES])
@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_matches_torch_backend(opt, dtypes, weight_decay):
    _run_and_compare(opt, *dtypes, weight_decay)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd0.1"])
@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=[_dtype_id(c) for c in DTYPE_CASES])
@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_compiled_on_cuda_matches_torch_backend(opt, dtypes, weight_decay):
    """The same cases compiled for CUDA tensors, against the torch reference on CPU."""
    _run_and_compare(opt, *dtypes, weight_decay, device="cuda")


@pytest.mark.parametrize("opt", ["lion", "adamw"])
@pytest.mark.parametrize("shape", [(1,), (7,), (4099,)])
def test_single_tensor_lists(opt, shape):
    _run_and_compare(opt, torch.float32, torch.float32, torch.float32, 0.05, shapes=[shape])


def test_lion_sign_of_zero_leaves_param():
    # c == 0 exactly (m == 0 and g == 0) and wd == 0: sign(0) = 0, p unchanged.
    p = torch.tensor([1.5, -2.0, 0.0, -0.0])
    m = torch.zeros(4)
    g = torch.tensor([0.0, -0.0, 0.0, -0.0])
    triton_ops.lion_step([p], [g], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    assert torch.equal(p, torch.tensor([1.5, -2.0, 0.0, -0.0]))
    assert torch.equal(torch.signbit(p), torch.tensor([False, True, False, True]))


def test_bf16_state_store_is_value_keyed_stochastic_rounding():
    # Lion with beta2 = 0 stores m = g: the bf16 state store against
    # state_precision.round_bf16 bit for bit, on ties, the largest finite
    # values (a carry to inf), subnormals and inf; NaN stays NaN.
    tie_bits = torch.tensor(
        [0x3F808000, 0x3F818000, 0x3F80C000, 0x3F804000, 0xBF808000, 0xBF818000,
         0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x00018000],
        dtype=torch.int64,
    ).to(torch.int32)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0, -3.25, 1e-40])
    g = torch.cat([tie_bits.view(torch.float32), specials, torch.randn(997)])
    nan = torch.isnan(g)
    for step in (1, 2, 3_000_000_001):
        m = torch.zeros(g.numel(), dtype=torch.bfloat16)
        p = torch.zeros(g.numel())
        triton_ops.lion_step([p], [g], [m], lr=0.0, beta1=0.9, beta2=0.0, weight_decay=0.0, state_step=step)
        want = state_precision.round_bf16(g, step)
        # NaN payloads differ between torch's conversion paths: compare NaN-ness only
        assert torch.equal(torch.isnan(m), nan)
        assert torch.equal(m[~nan].view(torch.int16), want[~nan].view(torch.int16)), step
        assert torch.equal(triton_ops.round_bf16(g, step)[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_bf16_state_needs_state_step():
    p, g, m = torch.zeros(4), torch.ones(4), torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="state_step"):
        triton_ops.lion_step([p], [g], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    assert not p.any()


def test_empty_list_and_empty_tensor_are_noops():
    triton_ops.lion_step([], [], [], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    p, g, m, v = torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0)
    triton_ops.adamw_step([p], [g], [m], [v], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                          weight_decay=0.0, step=1)


def test_dispatcher_backend_triton():
    from shardopt import kernels

    params, exp_avgs, _ = _make_state([(33,), (1000,)], torch.float32, torch.float32, seed=5, adamw=False)
    grads = _make_grads([(33,), (1000,)], torch.float32, seed=6)
    ref_p = [p.clone() for p in params]
    ref_m = [m.clone() for m in exp_avgs]
    hp = dict(LION_HP, weight_decay=0.1)
    kernels.lion_step(params, grads, exp_avgs, backend="triton", **hp)
    kernels.lion_step(ref_p, grads, ref_m, backend="torch", **hp)
    for a, b in zip(params + exp_avgs, ref_p + ref_m):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def _lion_lists():
    params = [torch.randn(5), torch.randn(8)]
    grads = [torch.randn(5), torch.randn(8)]
    exp_avgs = [torch.zeros(5), torch.zeros(8)]
    return params, grads, exp_avgs


def _break(kind, params, grads, exp_avgs):
    if kind == "numel":
        grads[1] = torch.randn(9)
    elif kind == "noncontiguous":
        exp_avgs[1] = torch.zeros(16)[::2]
    elif kind == "device":
        grads[1] = torch.randn(8, device="meta")
    elif kind == "dtype":
        grads[1] = torch.ones(8, dtype=torch.int32)
    elif kind == "param_dtype":
        params[1] = torch.randn(8, dtype=torch.float64)
    elif kind == "not_tensor":
        exp_avgs[1] = [0.0] * 8
    else:
        raise AssertionError(kind)


BAD = ["numel", "noncontiguous", "device", "dtype", "param_dtype", "not_tensor"]


@pytest.mark.parametrize("kind", BAD)
def test_lion_bad_input_raises(kind):
    params, grads, exp_avgs = _lion_lists()
    _break(kind, params, grads, exp_avgs)
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=r"\[1\] \(list index 1\)"):
        triton_ops.lion_step(params, grads, exp_avgs, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    # validation happens before any launch: nothing was updated
    assert torch.equal(params[0], before[0])


@pytest.mark.parametrize("kind", BAD)
def test_adamw_bad_input_raises(kind):
    params, grads, exp_avgs = _lion_lists()
    exp_avg_sqs = [torch.zeros(5), torch.zeros(8)]
    _break(kind, params, grads, exp_avgs)
    with pytest.raises(ValueError, match=r"\[1\] \(list index 1\)"):
        triton_ops.adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr=0.1, beta1=0.9, beta2=0.99,
                              eps=1e-8, weight_decay=0.0, step=1)


def test_list_length_mismatch_raises():
    params, grads, exp_avgs = _lion_lists()
    with pytest.raises(ValueError, match="exp_avgs"):
        triton_ops.lion_step(params, grads, exp_avgs[:1], lr=0.1, beta1=0.9, beta2=0.99,
                             weight_decay=0.0)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    triton_ops._kernels()
    monkeypatch.setitem(triton_ops._built, "interpret", False)
    params, grads, exp_avgs = _lion_lists()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_ops.lion_step(params, grads, exp_avgs, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)


_LATE_SWITCH = """
import os, sys
{before}
import triton
{after}
import torch
from shardopt.kernels import triton_ops
try:
    triton_ops.lion_step([torch.randn(9)], [torch.randn(9)], [torch.zeros(9)], lr=0.1, beta1=0.9, beta2=0.99,
                         weight_decay=0.0)
except RuntimeError as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.parametrize("late", ["set", "unset"])
def test_interpreter_switch_after_triton_import_is_refused(late):
    """TRITON_INTERPRET changed after triton's first import: its own library (tl.max) and these kernels would
    disagree (a kernel under the interpreter calling a compiled tl.max fails deep inside the interpreter);
    the first call says so instead, in a fresh process since triton decides once per process."""
    import subprocess
    import sys

    set_it, unset_it = 'os.environ["TRITON_INTERPRET"] = "1"', 'os.environ.pop("TRITON_INTERPRET", None)'
    before, after = (unset_it, set_it) if late == "set" else (set_it, unset_it)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _LATE_SWITCH.format(before=before, after=after)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    want = "set now but was unset" if late == "set" else "unset now but was set"
    assert f"TRITON_INTERPRET is {want} when triton was first imported" in r.stdout
    assert "before anything imports triton" in r.stdout


def test_missing_triton_gives_clear_import_error(monkeypatch):
    monkeypatch.setattr(triton_ops, "triton", None)
    monkeypatch.setattr(triton_ops, "_IMPORT_ERROR", ImportError("No module named 'triton'"))
    assert not triton_ops.available()
    params, grads, exp_avgs = _lion_lists()
    with pytest.raises(ImportError, match="needs the 'triton' package"):
        triton_ops.lion_step(params, grads, exp_avgs, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)


def test_available():
    assert triton_ops.available()


# ---------------------------------------------------------------------------
# gradient transform, skip flag, amsgrad (the torch_ops order of operations)
# ---------------------------------------------------------------------------
FEATURE_SHAPES = [(7,), (1000,), (4099,)]  # 4099: two programs under the interpreter
FEATURE_SETS = {
    "maximize": dict(maximize=True),
    "clip_value": dict(clip_value=0.7),
    "grad_scale": dict(grad_scale=0.3721),
    "found_inf_clear": dict(found_inf=0.0),
    "amsgrad": dict(amsgrad=True),
    "all": dict(maximize=True, clip_value=0.7, grad_scale=0.3721, found_inf=0.0, amsgrad=True),
}


def _feature_inputs(shapes, pdtype, gdtype, *, seed, amsgrad):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(pdtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1.5).to(gdtype) for s in shapes]  # |g| > clip_value often
    m = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    v = [torch.rand(s, generator=gen) * 0.1 for s in shapes]
    # amsgrad: about half the maxima above the new v, half below
    vmax = [torch.rand(s, generator=gen) * 0.2 for s in shapes] if amsgrad else None
    return params, grads, m, v, vmax


def _kwargs_for(features):
    kw = {k: v for k, v in features.items() if k != "amsgrad"}
    for k in ("grad_scale", "found_inf"):
        if k in kw:
            kw[k] = torch.tensor(kw[k], dtype=torch.float32)
    return kw


def _clone_all(ts):
    return None if ts is None else [t.clone() for t in ts]


FEATURE_CASES = [(opt, fname) for opt in ("lion", "adamw") for fname in FEATURE_SETS
                 if not (opt == "lion" and fname == "amsgrad")]  # amsgrad is AdamW's ("all" ignores it)


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=["p32", "pbf16"])
@pytest.mark.parametrize("opt,fname", FEATURE_CASES, ids=[f"{o}-{f}" for o, f in FEATURE_CASES])
def test_features_match_torch_backend(opt, fname, pdtype):
    features = FEATURE_SETS[fname]
    amsgrad = features.get("amsgrad", False) and opt == "adamw"
    gdtype = torch.bfloat16 if pdtype == torch.bfloat16 else torch.float32
    seed = zlib.crc32(f"{opt}-{fname}-{pdtype}".encode())  # fresh inputs per case, the same every run
    params, grads, m, v, vmax = _feature_inputs(FEATURE_SHAPES, pdtype, gdtype, seed=seed, amsgrad=amsgrad)
    grads_before = _clone_all(grads)
    kw = _kwargs_for(features)
    ref = (_clone_all(params), _clone_all(m), _clone_all(v), _clone_all(vmax))
    if opt == "lion":
        hp = dict(LION_HP, weight_decay=0.1, **kw)
        triton_ops.lion_step(params, grads, m, **hp)
        torch_ops.lion_step(ref[0], grads, ref[1], **hp)
    else:
        hp = dict(ADAMW_HP, weight_decay=0.1, step=4, **kw)
        triton_ops.adamw_step(params, grads, m, v, vmax, **hp)
        torch_ops.adamw_step(ref[0], grads, ref[1], ref[2], ref[3], **hp)
    bitwise = opt == "lion"
    for i in range(len(FEATURE_SHAPES)):
        _assert_close(f"params[{i}]", params[i], ref[0][i], bitwise=bitwise)
        _assert_close(f"exp_avgs[{i}]", m[i], ref[1][i], bitwise=bitwise)
        if opt == "adamw":
            _assert_close(f"exp_avg_sqs[{i}]", v[i], ref[2][i], bitwise=False)
        if amsgrad:
            _assert_close(f"max_exp_avg_sqs[{i}]", vmax[i], ref[3][i], bitwise=False)
        assert torch.equal(grads[i], grads_before[i]), "gradients are never written"


def test_transform_order_on_known_values():
    """maximize, then clamp, then scale: Lion with beta1 = beta2 = 0 stores m = g_eff."""
    g = torch.tensor([3.0, -3.0, 0.5, -0.25, float("inf"), float("-inf")])
    m = torch.zeros(6)
    p = torch.zeros(6)
    triton_ops.lion_step([p], [g], [m], lr=0.0, beta1=0.0, beta2=0.0, weight_decay=0.0, maximize=True,
                         clip_value=1.0, grad_scale=torch.tensor(0.5))
    assert m.tolist() == [-0.5, 0.5, -0.25, 0.125, -0.5, 0.5]


@pytest.mark.parametrize("flag", [1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_found_inf_set_writes_nothing(opt, flag):
    params, grads, m, v, vmax = _feature_inputs(FEATURE_SHAPES, torch.float32, torch.float32, seed=77,
                                                amsgrad=opt == "adamw")
    before = [_clone_all(x) for x in (params, grads, m, v, vmax)]
    kw = dict(found_inf=torch.tensor(flag), grad_scale=torch.tensor(0.5), maximize=True, clip_value=0.7)
    if opt == "lion":
        triton_ops.lion_step(params, grads, m, weight_decay=0.1, **LION_HP, **kw)
    else:
        triton_ops.adamw_step(params, grads, m, v, vmax, weight_decay=0.1, step=2, **ADAMW_HP, **kw)
    for got, want in zip((params, grads, m, v, vmax), before):
        if got is not None:
            assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------
# grad_stats: the fused gradient pass
# ---------------------------------------------------------------------------
STATS_SHAPES = [(1,), (5, 7), (4097,), (9000,)]  # 9000: three programs, the last partial


@pytest.mark.parametrize("clip_value", [None, 0.6])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_stats_matches_float64(gdtype, clip_value):
    gen = torch.Generator().manual_seed(31)
    grads = [(torch.randn(s, generator=gen) * 2.0).to(gdtype) for s in STATS_SHAPES]
    before = _clone_all(grads)
    out = triton_ops.grad_stats(grads, clip_value=clip_value)
    assert out.dtype == torch.float64 and out.shape == (2,) and out.device == grads[0].device
    want = grad_stats_reference(grads, clip_value)[0]
    assert abs(float(out[0]) - want) <= 1e-6 * want
    assert float(out[1]) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    ref = torch_ops.grad_stats(grads, clip_value=clip_value)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("clip_value", [None, 0.6])
def test_grad_stats_flags_non_finite_raw_values(bad, clip_value):
    gen = torch.Generator().manual_seed(32)
    grads = [torch.randn(s, generator=gen) for s in STATS_SHAPES]
    grads[3][8999] = bad  # in the last, partial program of the last tensor
    out = triton_ops.grad_stats(grads, clip_value=clip_value)
    assert torch.isnan(out[1])
    if clip_value is None or bad != bad:
        assert not torch.isfinite(out[0])
    else:  # a clamped inf counts as clip_value in the norm, and still flags the step
        want = grad_stats_reference(grads, clip_value)[0]
        assert abs(float(out[0]) - want) <= 1e-6 * want


@pytest.mark.gpu
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_grad_stats_on_cuda_matches_float64(gdtype):
    gen = torch.Generator().manual_seed(33)
    grads = [(torch.randn(s, generator=gen) * 2.0).to(gdtype) for s in STATS_SHAPES]
    for clip_value in (None, 0.6):
        out = triton_ops.grad_stats(_on(grads, "cuda"), clip_value=clip_value)
        assert out.dtype == torch.float64 and out.device.type == "cuda"
        want = grad_stats_reference(grads, clip_value)[0]
        assert abs(float(out[0]) - want) <= 1e-6 * want and float(out[1]) == 0.0
    grads[3][8999] = float("inf")
    assert torch.isnan(triton_ops.grad_stats(_on(grads, "cuda"))[1])


def test_grad_stats_empty():
    out = triton_ops.grad_stats([torch.empty(0)])
    assert out.dtype == torch.float64 and out.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------
# the dispatcher hands these features to the triton backend itself
# ---------------------------------------------------------------------------
def _refuse(*args, **kwargs):
    raise AssertionError("served by the torch backend, not by triton")


def test_dispatcher_serves_features_with_triton(monkeypatch):
    from shardopt import kernels

    assert kernels.serves("triton", torch.float32, {"maximize", "clip_value", "grad_scale", "found_inf", "amsgrad"})
    assert kernels.serves("triton", torch.bfloat16, {"amsgrad"})
    assert not kernels.serves("triton", torch.float64, set())
    shapes = [(33,), (1000,)]
    params, grads, m, v, vmax = _feature_inputs(shapes, torch.float32, torch.float32, seed=8, amsgrad=True)
    kw = dict(maximize=True, clip_value=0.7, grad_scale=torch.tensor(0.37), found_inf=torch.tensor(0.0))
    ref_l = (_clone_all(params), _clone_all(m))
    torch_ops.lion_step(ref_l[0], grads, ref_l[1], weight_decay=0.1, **LION_HP, **kw)
    ref_a = tuple(_clone_all(x) for x in (params, m, v, vmax))
    torch_ops.adamw_step(ref_a[0], grads, ref_a[1], ref_a[2], ref_a[3], weight_decay=0.1, step=2, **ADAMW_HP, **kw)
    ref_s = torch_ops.grad_stats(grads, clip_value=0.7)

    for name in ("lion_step", "adamw_step", "grad_stats"):
        monkeypatch.setattr(torch_ops, name, _refuse)
    # a CPU flag is normally read by the dispatcher; pass it through as a device flag would be
    monkeypatch.setattr(kernels, "_host_flag", lambda f: (False, f))
    lp, lm = _clone_all(params), _clone_all(m)
    kernels.lion_step(lp, grads, lm, weight_decay=0.1, backend="triton", **LION_HP, **kw)
    for a, b in zip(lp + lm, ref_l[0] + ref_l[1]):
        assert torch.equal(a, b)
    ap, am, av, ax = (_clone_all(x) for x in (params, m, v, vmax))
    kernels.adamw_step(ap, grads, am, av, ax, weight_decay=0.1, step=2, backend="triton", **ADAMW_HP, **kw)
    for got, want in zip((ap, am, av, ax), ref_a):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    stats = kernels.grad_stats(grads, clip_value=0.7, backend="triton")
    torch.testing.assert_close(stats, ref_s, rtol=1e-6, atol=0.0)


def test_dispatcher_grad_stats_mixes_backends():
    """fp64 gradients go to the reference, dense non-contiguous ones to triton in storage order."""
    from shardopt import kernels

    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(40, 30, generator=gen).t(), torch.randn(17, generator=gen, dtype=torch.float64),
             torch.randn(2, 3, 5, 7, generator=gen).to(memory_format=torch.channels_last).bfloat16(),
             torch.randn(10, 10, generator=gen)[:, ::2]]  # not dense: the reference
    out = kernels.grad_stats(grads, clip_value=1.1, backend="triton")
    ref = torch_ops.grad_stats(grads, clip_value=1.1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0.0)
