"""The ``cpu`` backend (C++/OpenMP kernels) against the ``torch`` reference backend.

* Lion with fp32 params is bitwise equal to ``torch_ops.lion_step``; AdamW is
  within rtol 1e-6 / atol 1e-7 (torch's CPU sqrt is not always correctly
  rounded, the kernel's is); bf16 params are within one bf16 ulp.
* Results do not depend on where a tensor is cut (ZeRO-1 partitions start
  anywhere) nor on the number of threads.
* Every step option (``maximize``, ``clip_value``, ``grad_scale``,
  ``found_inf``, amsgrad), alone and combined, gives the torch backend's result
  (Lion bitwise for fp32 and bf16 params); gradients are never written.
* bf16 optimizer state (``state_dtype="bf16"``) with every option: the stored
  state bits equal the torch reference's (its value-keyed stochastic rounding,
  ``state_precision.round_bf16``), for any fp32 value, any cut and any thread
  count; Lion's params bitwise, AdamW's within the fp32 tolerance; the
  optimizers' bf16-state path is served by the C++ kernels.
* ``grad_stats`` is within 1e-6 relative of a float64 reference and flags
  inf/NaN exactly as ``torch_ops.grad_stats``; through the dispatcher the C++
  backend serves the optimizers' default path itself.
* The JIT build's name is keyed by the source, the flags and torch's version.
* Bad inputs raise; ``SHARDOPT_DISABLE_CPP=1`` falls back to ``torch`` with one
  warning.

Every test but the fallback one skips when the extension genuinely cannot be
built (no compiler / ninja); the skip message carries the build error.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import shardopt
import shardopt.kernels as kernels
from shardopt.kernels import _ext, cpu, torch_ops
from shardopt.kernels import state_precision as sp

from cases import grad_stats_reference

REPO = Path(__file__).resolve().parent.parent

LION_HP = dict(lr=1e-2, beta1=0.9, beta2=0.99)
ADAMW_HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.fixture(scope="module")
def ext():
    if not cpu.available():
        pytest.skip(f"C++ CPU extension unavailable: {cpu.build_error()}")
    return cpu.load()


# ----------------------------------------------------------------- helpers

def _many_small_shapes():
    g = torch.Generator().manual_seed(1234)
    sizes = torch.randint(1, 400, (50,), generator=g).tolist()
    return [(n,) if i % 3 else (n, 3) for i, n in enumerate(sizes)]


SHAPE_SETS = {
    "odd": [(1,), (7,), (10, 100), (65537 + 3,)],
    "many_small": _many_small_shapes(),
    # > 2 x 128K elements: the kernels run multi-threaded (work stealing)
    "parallel": [(300_001,), (5,), (130_000, 1)],
}


def _with_zeros(t: torch.Tensor, every: int, offset: int = 0) -> torch.Tensor:
    flat = t.view(-1)
    flat[offset::every] = 0
    return t


def make_state(shapes, pdtype, seed):
    """Fresh random params/state with exact zeros in the moments at every 4th
    element (where the grads are zero too: sign(0) for Lion, 0/eps for AdamW).
    exp_avg_sq >= exp_avg**2 as in a real run, so updates stay O(lr): a 1-ulp
    sqrt difference then stays far below atol."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(pdtype) for s in shapes]
    exp_avgs = [_with_zeros(torch.randn(s, generator=g) * 0.1, 4) for s in shapes]
    exp_avg_sqs = [
        _with_zeros(m * m + torch.rand(s, generator=g) * 0.01, 8) for m, s in zip(exp_avgs, shapes)
    ]
    return params, exp_avgs, exp_avg_sqs


def make_grads(shapes, gdtype, seed):
    """Random grads with exact zeros (every 4th element matches exp_avg's zeros)."""
    g = torch.Generator().manual_seed(seed)
    grads = [_with_zeros(torch.randn(s, generator=g), 4) for s in shapes]
    return [t.to(gdtype) for t in grads]


def clone(ts):
    return [t.clone() for t in ts]


@contextlib.contextmanager
def single_threaded():
    """For the torch reference only: dozens of small OpenMP-parallel foreach ops
    are slow on a busy machine, and elementwise results do not depend on it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def bf16_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of bf16 ulps (ordered integer distance)."""

    def ordered(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)

    return (ordered(a) - ordered(b)).abs()


def assert_params_match(p_cpu, p_ref, *, exact: bool):
    for i, (a, b) in enumerate(zip(p_cpu, p_ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.numel() == 0:
            continue
        if a.dtype == torch.bfloat16:
            d = bf16_ulp_distance(a, b).max().item()
            assert d <= 1, f"params[{i}] differs by {d} bf16 ulps"
        elif exact:
            assert torch.equal(a, b), f"params[{i}] not bitwise equal"
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"params[{i}]")


def run_lion(impl, params, grads_per_step, exp_avgs, weight_decay):
    for grads in grads_per_step:
        impl(params, grads, exp_avgs, weight_decay=weight_decay, **LION_HP)


def run_adamw(impl, params, grads_per_step, exp_avgs, exp_avg_sqs, weight_decay):
    for step, grads in enumerate(grads_per_step, start=1):
        impl(params, grads, exp_avgs, exp_avg_sqs, weight_decay=weight_decay, step=step, **ADAMW_HP)


STEPS = 3

# --------------------------------------------------------- cpu == torch

CASES = [
    pytest.param(shapes, pdt, gdt, id=f"{sname}-p{str(pdt)[6:]}-g{str(gdt)[6:]}")
    for sname, shapes in SHAPE_SETS.items()
    for pdt in (torch.float32, torch.bfloat16)
    for gdt in (torch.float32, torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shapes,pdtype,gdtype", CASES)
def test_lion_matches_torch(ext, shapes, pdtype, gdtype, weight_decay):
    params, exp_avgs, _ = make_state(shapes, pdtype, seed=0)
    grads = [make_grads(shapes, gdtype, seed=100 + k) for k in range(STEPS)]
    p_c, m_c = clone(params), clone(exp_avgs)
    p_t, m_t = clone(params), clone(exp_avgs)
    run_lion(cpu.lion_step, p_c, grads, m_c, weight_decay)
    with single_threaded():
        run_lion(torch_ops.lion_step, p_t, grads, m_t, weight_decay)
    assert_params_match(p_c, p_t, exact=True)
    for i, (a, b) in enumerate(zip(m_c, m_t)):
        assert torch.equal(a, b), f"exp_avgs[{i}] not bitwise equal"
    # the step did something
    assert not all(torch.equal(a, b) for a, b in zip(p_c, params))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shapes,pdtype,gdtype", CASES)
def test_adamw_matches_torch(ext, shapes, pdtype, gdtype, weight_decay):
    params, exp_avgs, exp_avg_sqs = make_state(shapes, pdtype, seed=1)
    grads = [make_grads(shapes, gdtype, seed=200 + k) for k in range(STEPS)]
    p_c, m_c, v_c = clone(params), clone(exp_avgs), clone(exp_avg_sqs)
    p_t, m_t, v_t = clone(params), clone(exp_avgs), clone(exp_avg_sqs)
    run_adamw(cpu.adamw_step, p_c, grads, m_c, v_c, weight_decay)
    with single_threaded():
        run_adamw(torch_ops.adamw_step, p_t, grads, m_t, v_t, weight_decay)
    assert_params_match(p_c, p_t, exact=False)
    # the moments involve no sqrt: bitwise equal
    for i in range(len(shapes)):
        assert torch.equal(m_c[i], m_t[i]), f"exp_avgs[{i}]"
        assert torch.equal(v_c[i], v_t[i]), f"exp_avg_sqs[{i}]"
    assert not all(torch.equal(a, b) for a, b in zip(p_c, params))


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_adamw_split_form_is_bitwise_identical(ext, gdtype):
    """Both compiled forms of the AdamW loop (one-pass and split) agree bitwise."""
    shapes = SHAPE_SETS["odd"]
    for pdtype in (torch.float32, torch.bfloat16):
        params, exp_avgs, exp_avg_sqs = make_state(shapes, pdtype, seed=2)
        a = (clone(params), clone(exp_avgs), clone(exp_avg_sqs))
        b = (clone(params), clone(exp_avgs), clone(exp_avg_sqs))
        for step in range(1, STEPS + 1):
            grads = make_grads(shapes, gdtype, seed=300 + step)
            ext.adamw_step(*a[:1], grads, *a[1:], 1e-2, 0.9, 0.999, 1e-8, 0.05, step)
            ext._adamw_step_split(*b[:1], grads, *b[1:], 1e-2, 0.9, 0.999, 1e-8, 0.05, step)
        for xs, ys in zip(a, b):
            for x, y in zip(xs, ys):
                assert torch.equal(x, y)


def test_mixed_param_dtypes_and_empty_tensors(ext):
    shapes = [(5,), (0,), (300,), (40000,), (0, 3)]
    dtypes = [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.float32]
    g = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
             for i, s in enumerate(shapes)]
    exp_avgs = [torch.randn(s, generator=g) for s in shapes]
    p_c, m_c, p_t, m_t = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)
    cpu.lion_step(p_c, grads, m_c, weight_decay=0.1, **LION_HP)
    torch_ops.lion_step(p_t, grads, m_t, weight_decay=0.1, **LION_HP)
    assert_params_match(p_c, p_t, exact=True)
    assert all(torch.equal(a, b) for a, b in zip(m_c, m_t))


def test_non_finite_values_like_torch(ext):
    """sign(nan) = 0 and inf/nan propagate exactly like the torch backend."""
    p = torch.tensor([1.0, -2.0, 3.0, 0.5, -0.0, 0.0, 4.0, float("inf")] * 5)
    g = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 0.0, -0.0, 1.0, 1.0] * 5)
    m = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, float("nan"), 0.0] * 5)
    for wd in (0.0, 0.1):
        a = ([p.clone()], [g.clone()], [m.clone()])
        b = ([p.clone()], [g.clone()], [m.clone()])
        cpu.lion_step(*a, weight_decay=wd, **LION_HP)
        torch_ops.lion_step(*b, weight_decay=wd, **LION_HP)
        for x, y in zip(a, b):
            torch.testing.assert_close(x[0], y[0], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------- partition invariance

CUTS = [0, 13, 1000, 1001, 32768 + 5, 65536 - 1, 70001, 100003]


def _slices(t, cuts):
    flat = t.view(-1)
    return [flat[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_partition_invariance(ext, opt, pdtype, gdtype):
    """Whole tensor vs. arbitrary slices of it (one call, and one call per slice)."""
    n = CUTS[-1]
    params, exp_avgs, exp_avg_sqs = make_state([(n,)], pdtype, seed=3)
    grads = [make_grads([(n,)], gdtype, seed=400 + k)[0] for k in range(STEPS)]
    whole = (clone(params), clone(exp_avgs), clone(exp_avg_sqs))
    sliced = (clone(params), clone(exp_avgs), clone(exp_avg_sqs))
    per_slice = (clone(params), clone(exp_avgs), clone(exp_avg_sqs))
    for step, g in enumerate(grads, start=1):
        if opt == "lion":
            cpu.lion_step(whole[0], [g], whole[1], weight_decay=0.1, **LION_HP)
            cpu.lion_step(_slices(sliced[0][0], CUTS), _slices(g, CUTS),
                          _slices(sliced[1][0], CUTS), weight_decay=0.1, **LION_HP)
            for ps, gs, ms in zip(_slices(per_slice[0][0], CUTS), _slices(g, CUTS),
                                  _slices(per_slice[1][0], CUTS)):
                cpu.lion_step([ps], [gs], [ms], weight_decay=0.1, **LION_HP)
        else:
            kw = dict(weight_decay=0.1, step=step, **ADAMW_HP)
            cpu.adamw_step(whole[0], [g], whole[1], whole[2], **kw)
            cpu.adamw_step(_slices(sliced[0][0], CUTS), _slices(g, CUTS),
                           _slices(sliced[1][0], CUTS), _slices(sliced[2][0], CUTS), **kw)
            for ps, gs, ms, vs in zip(_slices(per_slice[0][0], CUTS), _slices(g, CUTS),
                                      _slices(per_slice[1][0], CUTS), _slices(per_slice[2][0], CUTS)):
                cpu.adamw_step([ps], [gs], [ms], [vs], **kw)
    for other in (sliced, per_slice):
        for x, y in zip(whole, other):
            assert torch.equal(x[0], y[0])


@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_thread_count_invariance(ext, opt):
    shapes = [(3,), (250_000,), (77_777,)]
    params, exp_avgs, exp_avg_sqs = make_state(shapes, torch.float32, seed=4)
    grads = make_grads(shapes, torch.float32, seed=500)
    results = []
    old = torch.get_num_threads()
    try:
        for nt in (1, max(2, old)):
            torch.set_num_threads(nt)
            p, m, v = clone(params), clone(exp_avgs), clone(exp_avg_sqs)
            if opt == "lion":
                cpu.lion_step(p, grads, m, weight_decay=0.1, **LION_HP)
            else:
                cpu.adamw_step(p, grads, m, v, weight_decay=0.1, step=1, **ADAMW_HP)
            results.append(p + m + v)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------- worked example

def test_lion_worked_example(ext):
    p = torch.tensor([1.0])
    g = torch.tensor([0.1])
    m = torch.tensor([0.0])
    cpu.lion_step([p], [g], [m], lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.0)
    # c = 0.1*0.1 > 0 -> sign 1 -> p = 1 - 0.01 ; m = 0.01*0.1
    assert p.item() == pytest.approx(0.99, abs=1e-7)
    assert m.item() == pytest.approx(0.001, rel=1e-6)
    assert p.item() == torch.tensor(1.0).sub(torch.tensor(0.01)).item()


def test_bf16_store_rounds_to_nearest_even(ext):
    """Lion with g = m = 0 gives p = 1 - wd*lr*1: exact fp32 ties between bf16 values."""
    lr = 2.0**-9
    p = [torch.ones(37, dtype=torch.bfloat16) for _ in range(2)]
    g = [torch.zeros(37) for _ in range(2)]
    m = [torch.zeros(37) for _ in range(2)]
    cpu.lion_step(p[:1], g[:1], m[:1], lr=lr, beta1=0.9, beta2=0.99, weight_decay=1.0)
    cpu.lion_step(p[1:], g[1:], m[1:], lr=lr, beta1=0.9, beta2=0.99, weight_decay=3.0)
    # 1 - 2^-9 lies halfway between 0x3F7F and 0x3F80 -> even 0x3F80 (1.0);
    # 1 - 3*2^-9 lies halfway between 0x3F7E and 0x3F7F -> even 0x3F7E.
    for t, fp32_value, bits in ((p[0], 1 - lr, 0x3F80), (p[1], 1 - 3 * lr, 0x3F7E)):
        assert torch.all(t.view(torch.int16) == bits), t.view(torch.int16)
        assert torch.equal(t, torch.full((37,), fp32_value).to(torch.bfloat16))


def test_public_api_cpu_backend(ext):
    assert kernels.resolve_backend("cpu", torch.device("cpu")) == "cpu"
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "cpu"
    shapes = [(10,), (0,), (33,)]
    params, exp_avgs, exp_avg_sqs = make_state(shapes, torch.float32, seed=5)
    grads = make_grads(shapes, torch.float32, seed=600)
    a = (clone(params), clone(exp_avgs), clone(exp_avg_sqs))
    b = (clone(params), clone(exp_avgs), clone(exp_avg_sqs))
    kernels.adamw_step(a[0], grads, a[1], a[2], weight_decay=0.0, step=1, backend="cpu", **ADAMW_HP)
    kernels.adamw_step(b[0], grads, b[1], b[2], weight_decay=0.0, step=1, backend="torch", **ADAMW_HP)
    assert_params_match(a[0], b[0], exact=False)


# ------------------------------------------------------------ bad input

def _lion_args(n_p=10, n_g=10, n_m=10, gdtype=torch.float32, mdtype=torch.float32):
    return [torch.zeros(5), torch.zeros(n_p)], [torch.zeros(5), torch.zeros(n_g, dtype=gdtype)], \
        [torch.zeros(5), torch.zeros(n_m, dtype=mdtype)]


BAD_LION = [
    pytest.param(lambda: _lion_args(n_g=11), r"grads\[1\]", id="numel-mismatch-grad"),
    pytest.param(lambda: _lion_args(n_m=9), r"exp_avgs\[1\]", id="numel-mismatch-state"),
    pytest.param(lambda: _lion_args(mdtype=torch.float16), r"exp_avgs\[1\].*float32", id="fp16-state"),
    pytest.param(lambda: _lion_args(gdtype=torch.int32), r"grads\[1\]", id="int-grad"),
    pytest.param(
        lambda: ([torch.zeros(4, 6)], [torch.zeros(6, 4).t()], [torch.zeros(4, 6)]),
        r"grads\[0\].*contiguous", id="non-contiguous-grad",
    ),
    pytest.param(
        lambda: ([torch.zeros(6, 4).t()], [torch.zeros(4, 6)], [torch.zeros(4, 6)]),
        r"params\[0\].*contiguous", id="non-contiguous-param",
    ),
    pytest.param(
        lambda: ([torch.zeros(4, dtype=torch.float16)], [torch.zeros(4)], [torch.zeros(4)]),
        r"params\[0\]", id="fp16-param",
    ),
    pytest.param(
        lambda: ([torch.zeros(4), torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)]),
        r"equal lengths", id="list-length",
    ),
]


@pytest.mark.parametrize("make,match", BAD_LION)
def test_lion_bad_input_raises(ext, make, match):
    params, grads, exp_avgs = make()
    before = [p.clone() for p in params]
    with pytest.raises((RuntimeError, ValueError), match=match):
        cpu.lion_step(params, grads, exp_avgs, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    # validation happens before any tensor is touched
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_adamw_bad_input_raises(ext):
    p, g, m = [torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)]
    with pytest.raises((RuntimeError, ValueError), match=r"exp_avg_sqs\[0\].*float32"):
        cpu.adamw_step(p, g, m, [torch.zeros(8, dtype=torch.bfloat16)], step=1,
                       weight_decay=0.0, **ADAMW_HP)
    with pytest.raises((RuntimeError, ValueError), match=r"exp_avg_sqs\[0\]"):
        cpu.adamw_step(p, g, m, [torch.zeros(7)], step=1, weight_decay=0.0, **ADAMW_HP)
    with pytest.raises((RuntimeError, ValueError), match=r"step"):
        cpu.adamw_step(p, g, m, [torch.zeros(8)], step=0, weight_decay=0.0, **ADAMW_HP)


# ------------------------------------------------------------- loader

def test_loader_reports_state(ext):
    assert cpu.available() is True
    assert cpu.build_error() is None
    assert cpu.load() is ext
    assert cpu.source_path() is not None and cpu.source_path().is_file()
    info = ext.build_info()
    assert "chunk=" in info
    # software prefetch follows the CPU the kernels were built for (-march=native): off on Zen, on elsewhere
    import subprocess

    macros = subprocess.run(["c++", "-march=native", "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True,
                            text=True).stdout
    zen = any(f"__znver{k}__" in macros for k in range(1, 6))
    assert ("prefetch=none" in info) == zen, info


def test_disable_env_falls_back_to_torch_with_one_warning():
    code = textwrap.dedent(
        """
        import warnings, torch
        import shardopt.kernels as K
        from shardopt.kernels import cpu
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = K.resolve_backend("auto", torch.device("cpu"))
            second = K.resolve_backend("auto", torch.device("cpu"))
            p, g, m = [torch.ones(3)], [torch.full((3,), 0.1)], [torch.zeros(3)]
            K.lion_step(p, g, m, lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.0)
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        print("RESULT", first, second, len(runtime), cpu.available(), round(p[0][0].item(), 6))
        print("ERROR", cpu.build_error())
        print("MSG", runtime[0].message if runtime else None)
        """
    )
    env = dict(os.environ, SHARDOPT_DISABLE_CPP="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True, text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.stdout.splitlines() if " " in ln}
    assert lines["RESULT"] == "torch torch 1 False 0.99", out.stdout
    assert "SHARDOPT_DISABLE_CPP" in lines["ERROR"]
    assert "SHARDOPT_DISABLE_CPP" in lines["MSG"]
    assert "building C++" not in out.stderr


def test_version_counters_are_bumped(ext):
    """Like an in-place ATen op, so autograd notices a modified saved tensor."""
    p, g, m, v = torch.ones(9), torch.ones(9), torch.zeros(9), torch.zeros(9)
    before = (p._version, m._version, v._version, g._version)
    cpu.adamw_step([p], [g], [m], [v], step=1, weight_decay=0.0, **ADAMW_HP)
    after = (p._version, m._version, v._version, g._version)
    assert all(b > a for a, b in zip(before[:3], after[:3]))
    assert after[3] == before[3]
    cpu.lion_step([p], [g], [m], weight_decay=0.0, **LION_HP)
    assert p._version > after[0] and m._version > after[1]


# ------------------------------------------------- step options (issue 12)

# one row per combination: (id, lion/adamw kwargs factory); a factory so every
# test gets fresh 0-d tensors
OPTION_CASES = {
    "plain": lambda: {},
    "maximize": lambda: dict(maximize=True),
    "clip_value": lambda: dict(clip_value=0.3),
    "clip_value_inexact": lambda: dict(clip_value=0.1),  # rounded to fp32 like torch_ops
    "grad_scale_lt1": lambda: dict(grad_scale=torch.tensor(0.37)),
    "grad_scale_eq1": lambda: dict(grad_scale=torch.tensor(1.0)),
    "found_inf_zero": lambda: dict(found_inf=torch.tensor(0.0)),
    "combined": lambda: dict(maximize=True, clip_value=0.5, grad_scale=torch.tensor(0.61),
                             found_inf=torch.tensor(0.0)),
}
OPTION_SHAPES = [(1,), (7,), (0,), (1_000_003,), (10, 100), (3, 0)]
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_id(dt):
    return str(dt)[6:]


def _step_kw(opt, step, wd):
    return dict(weight_decay=wd, **LION_HP) if opt == "lion" else dict(weight_decay=wd, step=step, **ADAMW_HP)


def _run_opt(impl, opt, st, grads_per_step, wd, opts):
    """st: [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or None]."""
    for step, grads in enumerate(grads_per_step, start=1):
        kw = dict(_step_kw(opt, step, wd), **opts)
        if opt == "lion":
            impl(st[0], grads, st[1], **kw)
        else:
            impl(st[0], grads, st[1], st[2], st[3], **kw)


def _fresh(shapes, pdtype, seed, amsgrad):
    params, exp_avgs, exp_avg_sqs = make_state(shapes, pdtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # around exp_avg_sq, so the max takes each side
    vmax = [v * (torch.rand(v.shape, generator=g) + 0.5) for v in exp_avg_sqs] if amsgrad else None
    return [params, exp_avgs, exp_avg_sqs, vmax]


def _copy(st):
    return [clone(x) if x is not None else None for x in st]


def _assert_state_equal(opt, got, ref):
    """Lion: every tensor bitwise (fp32 and bf16 params). AdamW: params as the existing tests
    (rtol 1e-6 / 1 bf16 ulp), moments and amsgrad maxima bitwise."""
    if opt == "lion":
        for i, (a, b) in enumerate(zip(got[0], ref[0])):
            assert torch.equal(a, b), f"params[{i}] ({a.dtype}) not bitwise equal"
    else:
        assert_params_match(got[0], ref[0], exact=False)
    for name, k in (("exp_avgs", 1), ("exp_avg_sqs", 2), ("max_exp_avg_sqs", 3)):
        if opt == "lion" and k > 1 or got[k] is None:
            continue
        for i, (a, b) in enumerate(zip(got[k], ref[k])):
            assert torch.equal(a, b), f"{name}[{i}] not bitwise equal"


OPTION_PARAMS = [
    pytest.param(opt, case, ams, id=f"{opt}{'-amsgrad' if ams else ''}-{case}")
    for opt in ("lion", "adamw")
    for ams in ((False, True) if opt == "adamw" else (False,))
    for case in OPTION_CASES
    if not ams or case in ("plain", "combined", "grad_scale_lt1")
]


@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("pdtype", (torch.float32, torch.bfloat16), ids=_dtype_id)
@pytest.mark.parametrize("opt,case,amsgrad", OPTION_PARAMS)
def test_step_options_match_torch(ext, opt, case, amsgrad, pdtype, gdtype):
    st = _fresh(OPTION_SHAPES, pdtype, seed=11, amsgrad=amsgrad)
    # grads of both signs and above/below the clip values; exact zeros every 4th element
    grads = [[g * 0.4 for g in make_grads(OPTION_SHAPES, gdtype, seed=700 + k)] for k in range(2)]
    grads_before = [clone(gs) for gs in grads]
    got, ref = _copy(st), _copy(st)
    _run_opt(cpu.lion_step if opt == "lion" else cpu.adamw_step, opt, got, grads, 0.1, OPTION_CASES[case]())
    with single_threaded():
        _run_opt(torch_ops.lion_step if opt == "lion" else torch_ops.adamw_step, opt, ref, grads, 0.1,
                 OPTION_CASES[case]())
    _assert_state_equal(opt, got, ref)
    # the step did something, and never wrote a gradient
    assert not torch.equal(got[0][3], st[0][3])
    for gs, gb in zip(grads, grads_before):
        assert all(torch.equal(a, b) for a, b in zip(gs, gb)), "a gradient was modified"


@pytest.mark.parametrize("opt,amsgrad", [("lion", False), ("adamw", False), ("adamw", True)])
def test_step_options_many_small_tensors(ext, opt, amsgrad):
    shapes = SHAPE_SETS["many_small"] + [(0,), (300_001,)]
    st = _fresh(shapes, torch.float32, seed=12, amsgrad=amsgrad)
    grads = [make_grads(shapes, torch.bfloat16, seed=800 + k) for k in range(2)]
    opts = dict(maximize=True, clip_value=0.7, grad_scale=torch.tensor(0.8))
    got, ref = _copy(st), _copy(st)
    _run_opt(cpu.lion_step if opt == "lion" else cpu.adamw_step, opt, got, grads, 0.0, opts)
    with single_threaded():
        _run_opt(torch_ops.lion_step if opt == "lion" else torch_ops.adamw_step, opt, ref, grads, 0.0, opts)
    _assert_state_equal(opt, got, ref)


def test_option_values_change_the_result(ext):
    """Each option really reaches the kernel (a kernel ignoring one would still match 'plain')."""
    shapes = [(1000,)]
    base = _fresh(shapes, torch.float32, seed=13, amsgrad=True)
    grads = [g * 3 for g in make_grads(shapes, torch.float32, seed=900)]

    def run(opt, **kw):
        st = _copy(base)
        _run_opt(cpu.lion_step if opt == "lion" else cpu.adamw_step, opt, st, [grads], 0.0, kw)
        return torch.cat([st[0][0], st[1][0]] + ([st[2][0], st[3][0]] if opt == "adamw" else []))

    for opt in ("lion", "adamw"):
        plain = run(opt)
        for kw in (dict(maximize=True), dict(clip_value=0.5), dict(grad_scale=torch.tensor(0.5))):
            assert not torch.equal(run(opt, **kw), plain), (opt, kw)
    st1, st2 = _copy(base), _copy(base)
    cpu.adamw_step(st1[0], grads, st1[1], st1[2], st1[3], step=1, weight_decay=0.0, **ADAMW_HP)
    cpu.adamw_step(st2[0], grads, st2[1], st2[2], None, step=1, weight_decay=0.0, **ADAMW_HP)
    assert not torch.equal(st1[0][0], st2[0][0])  # amsgrad's denominator is the max
    assert not torch.equal(st1[3][0], base[3][0])


@pytest.mark.parametrize("pdtype", (torch.float32, torch.bfloat16), ids=_dtype_id)
@pytest.mark.parametrize("opt,amsgrad", [("lion", False), ("adamw", False), ("adamw", True)])
def test_found_inf_set_leaves_state_unchanged(ext, opt, amsgrad, pdtype):
    shapes = [(5,), (70_001,)]
    st = _fresh(shapes, pdtype, seed=14, amsgrad=amsgrad)
    grads = make_grads(shapes, torch.float32, seed=1000)
    got = _copy(st)
    for flag in (1.0, float("inf"), float("nan")):
        _run_opt(cpu.lion_step if opt == "lion" else cpu.adamw_step, opt, got, [grads], 0.1,
                 dict(found_inf=torch.tensor(flag), grad_scale=torch.tensor(0.5)))
    for xs, ys in zip(got, st):
        if xs is not None:
            assert all(torch.equal(a, b) for a, b in zip(xs, ys))
    # and a zero flag steps
    _run_opt(cpu.lion_step if opt == "lion" else cpu.adamw_step, opt, got, [grads], 0.1,
             dict(found_inf=torch.tensor(0.0)))
    assert not torch.equal(got[0][1], st[0][1])


@pytest.mark.parametrize("gdtype", GRAD_DTYPES + (torch.float64,), ids=_dtype_id)
def test_adamw_split_form_with_options_is_bitwise_identical(ext, gdtype):
    shapes = SHAPE_SETS["odd"]
    for pdtype in (torch.float32, torch.bfloat16):
        a = _fresh(shapes, pdtype, seed=15, amsgrad=True)
        b = _copy(a)
        for step in range(1, STEPS + 1):
            grads = make_grads(shapes, gdtype, seed=1100 + step)
            kw = dict(max_exp_avg_sqs=None, maximize=True, clip_value=0.8, grad_scale=torch.tensor(0.9))
            ext.adamw_step(a[0], grads, a[1], a[2], 1e-2, 0.9, 0.999, 1e-8, 0.05, step,
                           **dict(kw, max_exp_avg_sqs=a[3]))
            ext._adamw_step_split(b[0], grads, b[1], b[2], 1e-2, 0.9, 0.999, 1e-8, 0.05, step,
                                  **dict(kw, max_exp_avg_sqs=b[3]))
        for xs, ys in zip(a, b):
            assert all(torch.equal(x, y) for x, y in zip(xs, ys))


def test_non_finite_grads_with_options_like_torch(ext):
    """clamp keeps NaN and clips inf; amsgrad's max propagates NaN (torch.maximum)."""
    g = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0, -2.0, 0.1] * 5)
    p = torch.linspace(-1, 1, g.numel())
    m = torch.full_like(p, 0.01)
    v = torch.full_like(p, 0.02)
    vmax = torch.full_like(p, 0.01)
    vmax[3] = float("nan")
    for opts in (dict(clip_value=1.0), dict(maximize=True, clip_value=1.0, grad_scale=torch.tensor(0.5)),
                 dict(grad_scale=torch.tensor(0.5))):
        a = [[p.clone()], [m.clone()], [v.clone()], [vmax.clone()]]
        b = [[p.clone()], [m.clone()], [v.clone()], [vmax.clone()]]
        cpu.lion_step(a[0], [g], a[1], weight_decay=0.1, **LION_HP, **opts)
        torch_ops.lion_step(b[0], [g], b[1], weight_decay=0.1, **LION_HP, **opts)
        cpu.adamw_step(a[0], [g], a[1], a[2], a[3], step=2, weight_decay=0.1, **ADAMW_HP, **opts)
        torch_ops.adamw_step(b[0], [g], b[1], b[2], b[3], step=2, weight_decay=0.1, **ADAMW_HP, **opts)
        for x, y in zip(a, b):
            torch.testing.assert_close(x[0], y[0], rtol=1e-6, atol=0, equal_nan=True)


BAD_OPTIONS = [
    pytest.param(dict(grad_scale=torch.tensor([0.5, 0.5])), r"grad_scale.*one-element", id="grad-scale-2"),
    pytest.param(dict(grad_scale=torch.tensor(1)), r"grad_scale.*float", id="grad-scale-int"),
    pytest.param(dict(found_inf=torch.zeros(3)), r"found_inf.*one-element", id="found-inf-3"),
]


@pytest.mark.parametrize("opts,match", BAD_OPTIONS)
def test_bad_options_raise(ext, opts, match):
    p, g, m = [torch.zeros(8)], [torch.ones(8)], [torch.zeros(8)]
    with pytest.raises((RuntimeError, ValueError), match=match):
        cpu.lion_step(p, g, m, weight_decay=0.0, **LION_HP, **opts)
    with pytest.raises((RuntimeError, ValueError), match=r"max_exp_avg_sqs\[0\].*float32"):
        cpu.adamw_step(p, g, m, [torch.zeros(8)], [torch.zeros(8, dtype=torch.bfloat16)], step=1,
                       weight_decay=0.0, **ADAMW_HP)
    assert torch.equal(p[0], torch.zeros(8))


# ------------------------------------------------------------ grad_stats

def _stats_grads(kind, gdtype):
    g = torch.Generator().manual_seed(16)
    if kind == "odd":
        shapes = [(1,), (7,), (1_000_003,), (0,), (511,), (513,)]
    elif kind == "many_small":
        shapes = [(int(n),) for n in torch.randint(1, 700, (300,), generator=g)]
    elif kind == "big":
        shapes = [(20_000_000,)]
    else:  # a dense transposed matrix and a few medium tensors
        shapes = [(300, 701), (65_537,), (32768 * 3 + 1,)]
    grads = [(torch.randn(s, generator=g) * 2).to(gdtype) for s in shapes]
    if kind == "strided":
        grads[0] = grads[0].t()
    return grads


STATS_CASES = [
    pytest.param(kind, gdt, id=f"{kind}-{_dtype_id(gdt)}")
    for kind in ("odd", "many_small", "strided")
    for gdt in GRAD_DTYPES + (torch.float64,)
] + [pytest.param("big", torch.float32, id="big-float32")]


@pytest.mark.parametrize("clip_value", [None, 0.5, 1e30], ids=["noclip", "clip0.5", "clip1e30"])
@pytest.mark.parametrize("kind,gdtype", STATS_CASES)
def test_grad_stats_matches_float64(ext, kind, gdtype, clip_value):
    grads = _stats_grads(kind, gdtype)
    before = clone(grads)
    out = cpu.grad_stats(grads, clip_value=clip_value)
    assert out.dtype == torch.float64 and out.shape == (2,) and out.device.type == "cpu"
    sq, bad = grad_stats_reference(grads, clip_value)
    assert bad == 0.0 and out[1].item() == 0.0
    assert abs(out[0].item() - sq) <= 1e-6 * sq, (out[0].item(), sq)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    torch.testing.assert_close(out, torch_ops.grad_stats(grads, clip_value=clip_value), rtol=1e-6, atol=0)


@pytest.mark.parametrize("gdtype", GRAD_DTYPES + (torch.float64,), ids=_dtype_id)
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", [0, 700, 99_999], ids=["first", "block-body", "tail"])
def test_grad_stats_non_finite(ext, gdtype, value, where):
    grads = [torch.randn(40).to(gdtype), torch.randn(100_000).to(gdtype), torch.randn(3).to(gdtype)]
    grads[1][where] = value
    for clip_value in (None, 0.5):
        out = cpu.grad_stats(grads, clip_value=clip_value)
        ref = torch_ops.grad_stats(grads, clip_value=clip_value)
        assert torch.isnan(out[1]), "bad must be NaN"
        if clip_value is not None and value != value:
            assert torch.isnan(out[0])
        elif clip_value is not None:  # an inf is clipped: the norm stays finite and exact
            sq, _ = grad_stats_reference([g.masked_fill(~torch.isfinite(g), 0.5) for g in grads], clip_value)
            assert abs(out[0].item() - sq) <= 1e-6 * sq
        else:
            assert not torch.isfinite(out[0])
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0, equal_nan=True)


def test_grad_stats_no_spurious_overflow_or_nan(ext):
    """Squares beyond the fp32 range are summed in fp64, like the reference."""
    grads = [torch.full((1000,), 3e19), torch.randn(70_000), torch.tensor([float(torch.finfo(torch.bfloat16).max)],
                                                                            dtype=torch.bfloat16)]
    out = cpu.grad_stats(grads)
    sq, bad = grad_stats_reference(grads)
    assert out[1].item() == 0.0 and torch.isfinite(out[0])
    assert abs(out[0].item() - sq) <= 1e-6 * sq


def test_grad_stats_thread_count_invariant(ext):
    grads = [torch.randn(700_001), torch.randn(3), torch.randn(400_000).to(torch.bfloat16)]
    old = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, max(2, old)):
            torch.set_num_threads(nt)
            outs.append(cpu.grad_stats(grads, clip_value=1.5))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


def test_grad_stats_empty_and_bad_input(ext):
    assert torch.equal(cpu.grad_stats([]), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(cpu.grad_stats([torch.zeros(0), torch.zeros(3, 0)]), torch.zeros(2, dtype=torch.float64))
    # not dense: read through a contiguous copy
    g = torch.randn(10, 10)[:, ::2]
    torch.testing.assert_close(cpu.grad_stats([g]), torch_ops.grad_stats([g]), rtol=1e-6, atol=0)
    g2 = torch.randn(6, 8).to(torch.bfloat16).t()[::2]
    torch.testing.assert_close(cpu.grad_stats([g, g2], clip_value=0.5),
                               torch_ops.grad_stats([g, g2], clip_value=0.5), rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype Int"):
        cpu.grad_stats([torch.zeros(3), torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be a dense"):
        ext.grad_stats([torch.zeros(3).to_sparse()])


# ------------------------------------------------- through the dispatcher

@pytest.fixture
def torch_backend_forbidden(monkeypatch):
    """Any call that falls back to the torch backend fails the test."""

    def forbidden(name):
        def fn(*a, **k):
            raise AssertionError(f"torch_ops.{name} was called: the cpu backend did not serve the call")
        return fn

    for name in ("lion_step", "adamw_step", "grad_stats", "effective_grads"):
        monkeypatch.setattr(torch_ops, name, forbidden(name))


def test_cpu_backend_serves_every_option(ext, torch_backend_forbidden):
    needs = {"maximize", "clip_value", "grad_scale", "found_inf", "amsgrad", "state_bf16"}
    for dt in (torch.float32, torch.bfloat16):
        assert kernels.serves("cpu", dt, needs)
    assert "grad_stats" in cpu.FEATURES
    shapes = [(10,), (0,), (33,)]
    st = _fresh(shapes, torch.float32, seed=17, amsgrad=True)
    grads = make_grads(shapes, torch.bfloat16, seed=1200)
    opts = dict(maximize=True, clip_value=0.5, grad_scale=torch.tensor(0.5), found_inf=torch.tensor(0.0))
    before = _copy(st)
    kernels.lion_step(st[0], grads, st[1], weight_decay=0.1, backend="cpu", **LION_HP, **opts)
    kernels.adamw_step(st[0], grads, st[1], st[2], st[3], weight_decay=0.1, step=1, backend="cpu",
                       **ADAMW_HP, **opts)
    kernels.adamw_step(st[0], grads, st[1], st[2], weight_decay=0.1, step=2, backend="auto", **ADAMW_HP, **opts)
    assert not torch.equal(st[0][0], before[0][0])
    out = kernels.grad_stats(grads, clip_value=0.5, backend="cpu")
    assert out.dtype == torch.float64 and out[1].item() == 0.0


@pytest.mark.parametrize("opt_kw", [dict(), dict(grad_clip_norm=1.0), dict(grad_clip_value=0.1),
                                    dict(nonfinite="raise", grad_clip_norm=0.5)], ids=lambda d: str(d) or "defaults")
@pytest.mark.parametrize("cls", [shardopt.Lion, shardopt.AdamW], ids=lambda c: c.__name__)
def test_optimizer_default_path_runs_on_cpu_kernels(ext, cls, opt_kw, monkeypatch):
    """The optimizers' default path (non-finite check, clipping) is served by the C++ kernels, and gives
    the torch backend's result."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(40, 30), (7,), (1000,)]]
    grads = [[torch.randn_like(p) * 3 for p in ps] for _ in range(3)]
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = cls(ref_ps, lr=1e-2, sharding="none", backend="torch", **opt_kw)
    for gs in grads:
        for p, g in zip(ref_ps, gs):
            p.grad = g.clone()
        ref.step()
    with monkeypatch.context() as mp:
        for name in ("lion_step", "adamw_step", "grad_stats", "effective_grads"):
            mp.setattr(torch_ops, name, lambda *a, _n=name, **k: pytest.fail(f"torch_ops.{_n} was called"))
        opt = cls(ps, lr=1e-2, sharding="none", backend="cpu", **opt_kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ps, ref_ps):
        if cls is shardopt.Lion:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if opt_kw.get("grad_clip_norm"):
        torch.testing.assert_close(torch.tensor(opt.last_grad_norm), torch.tensor(ref.last_grad_norm), rtol=1e-6,
                                   atol=0)


def test_optimizer_skips_non_finite_step_on_cpu_kernels(ext, torch_backend_forbidden):
    ps = [torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(5))]
    opt = shardopt.Lion(ps, lr=1e-2, sharding="none", backend="cpu", grad_clip_norm=1.0)
    before = [p.detach().clone() for p in ps]
    ps[0].grad = torch.randn(100)
    ps[1].grad = torch.tensor([1.0, float("inf"), 0.0, 0.0, 0.0])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, before))
    assert opt.skipped_steps == 1


# ------------------------------------------------------ build naming (item 6)

def test_build_name_is_keyed_by_source_flags_and_torch(tmp_path, monkeypatch):
    a, b = tmp_path / "k.cpp", tmp_path / "k.h"
    a.write_text("int f() { return 1; }\n")
    b.write_text("// header\n")
    name = _ext.build_name("shardopt_x", [a, b], ["-O3"])
    assert name.startswith("shardopt_x_") and len(name) == len("shardopt_x_") + 10
    int(name[-10:], 16)
    assert _ext.build_name("shardopt_x", [a, b], ["-O3"]) == name  # stable
    assert _ext.build_name("shardopt_x", [a, b], ["-O2"]) != name  # flags
    assert _ext.build_name("shardopt_x", [a, b], ["-O3", "-g"]) != name
    assert _ext.build_name("shardopt_y", [a, b], ["-O3"]) != name
    a.write_text("int f() { return 2; }\n")  # source text
    changed = _ext.build_name("shardopt_x", [a, b], ["-O3"])
    assert changed != name
    a.write_text("int f() { return 1; }\n")
    assert _ext.build_name("shardopt_x", [a, b], ["-O3"]) == name  # contents, not modification times
    b.write_text("// header 2\n")
    assert _ext.build_name("shardopt_x", [a, b], ["-O3"]) != name  # every file counts
    b.write_text("// header\n")
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert _ext.build_name("shardopt_x", [a, b], ["-O3"]) != name  # torch version


def test_cpu_build_name_follows_source_and_flags(tmp_path, monkeypatch):
    name = cpu.build_name()
    assert name.startswith(cpu.EXT_NAME + "_") and name == cpu.build_name()
    assert cpu.build_name(cpu.PORTABLE_NAME, cpu.PORTABLE_CFLAGS, []) != name
    assert cpu.build_name(cpu.EXT_NAME, cpu.EXTRA_CFLAGS + ["-DX"], cpu.EXTRA_LDFLAGS) != name
    src = tmp_path / "fused_optim.cpp"
    src.write_text(cpu.source_path().read_text() + "\n// edited\n")
    monkeypatch.setattr(cpu, "source_path", lambda: src)
    assert cpu.build_name() != name


def test_cuda_build_name_is_keyed_too():
    """The CUDA loader names its JIT build with the same helper (nothing is compiled here)."""
    from shardopt.kernels import cuda

    src = cuda.source_dir()
    files = [src / f for f in cuda.SOURCES + cuda.HEADERS] if src is not None else []
    assert cuda.EXT_NAME == _ext.build_name("shardopt_cuda_ops", files,
                                            cuda.EXTRA_CFLAGS + cuda.EXTRA_CUDA_CFLAGS)


def test_loaded_extension_uses_the_keyed_build(ext, tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("shardopt._C_cpu") is not None:
        pytest.skip("a prebuilt shardopt._C_cpu is installed")
    assert Path(ext.__file__).parent.name == cpu.build_name()
    assert not _ext.is_stale(cpu.build_name(), [cpu.source_path()])
    assert cpu.needs_build() is False
    # another source or flags: another folder, not built yet (looked up in an empty cache: the
    # lookup creates the folder)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _ext.is_stale(cpu.build_name(), [cpu.source_path()])


# ------------------------------------------------- bf16 optimizer state
#
# state_dtype="bf16": the kernels load the state exactly, run the fp32 math and store with the value-keyed
# stochastic rounding of state_precision. The reference is torch_ops (which rounds through
# state_precision.round_bf16); the state bits must be equal. Lion's params are bitwise equal too; AdamW's
# params keep the fp32 tolerance (the sqrt, as above), its moments and maxima involve no sqrt: bitwise.
# NaN is compared as NaN, not by its bits (torch's own fp32 -> bf16 gives 0xFFFF in its vector path and
# 0x7FC0 in its scalar one; the kernels write 0x7FC0).

def _bf16_state(st):
    """_fresh's state, stored in bf16 (round to nearest, as a checkpoint load would)."""
    return [st[0]] + [[t.to(torch.bfloat16) for t in x] if x is not None else None for x in st[1:]]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype and the same bits, NaN matching any NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    both_nan = torch.isnan(a) & torch.isnan(b)
    ia = a.view(torch.int16) if a.dtype == torch.bfloat16 else a.view(torch.int32)
    ib = b.view(torch.int16) if b.dtype == torch.bfloat16 else b.view(torch.int32)
    return bool(((ia == ib) | both_nan).all())


def _assert_adamw_params_close(got, ref):
    """fp32: rtol 1e-6 / atol 1e-7 (the sqrt). bf16: within one bf16 ulp, or within the same atol where the
    step cancels the parameter to ~1e-8 (a 1-ulp fp32 difference is then several bf16 ulps of a tiny value)."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.dtype == torch.bfloat16 and a.numel():
            far = (bf16_ulp_distance(a, b) > 1) & ((a.float() - b.float()).abs() > 1e-7)
            assert not far.any(), f"params[{i}] differs at {far.nonzero()[:5].tolist()}"
        else:
            assert_params_match([a], [b], exact=False)


def _assert_bf16_state_equal(opt, got, ref):
    if opt == "lion":
        for i, (a, b) in enumerate(zip(got[0], ref[0])):
            assert _bits_equal(a, b), f"params[{i}] ({a.dtype}) not bitwise equal"
    else:
        _assert_adamw_params_close(got[0], ref[0])
    for name, k in (("exp_avgs", 1), ("exp_avg_sqs", 2), ("max_exp_avg_sqs", 3)):
        if opt == "lion" and k > 1 or got[k] is None:
            continue
        for i, (a, b) in enumerate(zip(got[k], ref[k])):
            assert a.dtype == torch.bfloat16 and _bits_equal(a, b), f"{name}[{i}] not bitwise equal"


def _run_bf16(impl, opt, st, grads_per_step, wd, opts, steps=None):
    """Like _run_opt, with the step count as the rounding's salt (Lion: state_step; AdamW: its step)."""
    for k, grads in enumerate(grads_per_step):
        step = steps[k] if steps is not None else k + 1
        kw = dict(_step_kw(opt, step, wd), **opts)
        if opt == "lion":
            impl(st[0], grads, st[1], state_step=step, **kw)
        else:
            impl(st[0], grads, st[1], st[2], st[3], **kw)


BF16_SHAPE_SETS = {
    "odd": [(1,), (7,), (0,), (1_000_003,), (10, 100)],
    "many": _many_small_shapes() + [(300_001,), (3, 0)],
}


@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("pdtype", (torch.float32, torch.bfloat16), ids=_dtype_id)
@pytest.mark.parametrize("opt,case,amsgrad", OPTION_PARAMS)
def test_bf16_state_matches_torch(ext, opt, case, amsgrad, pdtype, gdtype):
    """Every step option (and combination) with bf16 state, odd sizes, vs the torch reference."""
    shapes = BF16_SHAPE_SETS["odd"]
    st = _bf16_state(_fresh(shapes, pdtype, seed=21, amsgrad=amsgrad))
    grads = [[g * 0.4 for g in make_grads(shapes, gdtype, seed=1300 + k)] for k in range(3)]
    grads_before = [clone(gs) for gs in grads]
    got, ref = _copy(st), _copy(st)
    _run_bf16(cpu.lion_step if opt == "lion" else cpu.adamw_step, opt, got, grads, 0.1, OPTION_CASES[case]())
    with single_threaded():
        _run_bf16(torch_ops.lion_step if opt == "lion" else torch_ops.adamw_step, opt, ref, grads, 0.1,
                  OPTION_CASES[case]())
    _assert_bf16_state_equal(opt, got, ref)
    # the step did something to the params and the state, and never wrote a gradient
    assert not torch.equal(got[0][3], st[0][3])
    assert not torch.equal(got[1][3], st[1][3])
    for gs, gb in zip(grads, grads_before):
        assert all(torch.equal(a, b) for a, b in zip(gs, gb)), "a gradient was modified"


@pytest.mark.parametrize("opt,amsgrad", [("lion", False), ("adamw", False), ("adamw", True)])
def test_bf16_state_many_tensors_mixed_dtypes(ext, opt, amsgrad):
    """Many small tensors (and one threaded one) in one call; params fp32 and bf16 and state fp32 and bf16
    mixed in the call (a complex parameter keeps fp32 state in a bf16 group); per-tensor steps."""
    shapes = BF16_SHAPE_SETS["many"]
    st = _fresh(shapes, torch.float32, seed=22, amsgrad=amsgrad)
    for k in range(len(shapes)):
        if k % 3 == 1:
            st[0][k] = st[0][k].to(torch.bfloat16)
        if k % 5 != 4:  # every 5th tensor keeps fp32 state
            for x in st[1:]:
                if x is not None:
                    x[k] = x[k].to(torch.bfloat16)
    grads = [make_grads(shapes, torch.bfloat16, seed=1400 + k) for k in range(2)]
    opts = dict(maximize=True, clip_value=0.7, grad_scale=torch.tensor(0.8))
    got, ref = _copy(st), _copy(st)
    for k, gs in enumerate(grads):
        salts = [1000 * k + i for i in range(len(shapes))]  # one salt per tensor
        kw = dict(_step_kw(opt, k + 1, 0.1), **opts)
        with single_threaded():
            if opt == "lion":
                cpu.lion_step(got[0], gs, got[1], state_step=salts, **kw)
                torch_ops.lion_step(ref[0], gs, ref[1], state_step=salts, **kw)
            else:
                cpu.adamw_step(got[0], gs, got[1], got[2], got[3], state_step=salts, **kw)
                torch_ops.adamw_step(ref[0], gs, ref[1], ref[2], ref[3], state_step=salts, **kw)
    for k in (1, 2, 3):
        if got[k] is not None:
            for a, b in zip(got[k], ref[k]):
                assert a.dtype == b.dtype and _bits_equal(a, b)
    if opt == "lion":
        assert all(_bits_equal(a, b) for a, b in zip(got[0], ref[0]))
    else:
        _assert_adamw_params_close(got[0], ref[0])


def _random_bits_fp32(n, seed):
    """fp32 values from random bit patterns (every exponent: subnormals, the top binade, inf, NaN), plus
    the edges: signed zeros, the largest finite fp32 and bf16 values, ties and near-ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.4028235e38, -3.4028235e38, 3.3895313e38, -3.3895313e38,
                          1e-45, -1e-45, 1.1754942e-38, float("inf"), -float("inf"), float("nan"),
                          1.0 + 2**-8, 1.0 + 2**-8 + 2**-23, 1.0 + 2**-7 - 2**-23])
    return torch.cat([x, edges])


@pytest.mark.parametrize("step", [1, 2, 3, 2**31 + 5, 2**40 + 7])
def test_bf16_state_rounding_of_any_value_is_state_precision(ext, step):
    """With beta2 = 0 Lion's new momentum is the gradient itself (0*0 + g*1), so the stored bits are
    state_precision.round_bf16(g, step) for any fp32 value g: the carry into the exponent and up to inf,
    subnormals, both signs, inf and NaN; steps past 2^32 wrap like the reference's salt."""
    g = _random_bits_fp32(100_003, seed=step % 1000)
    want = sp.round_bf16(0.0 + g * 1.0, step)  # -0.0 becomes +0.0, as in the kernels' 0*m + g*1
    m = torch.zeros(g.numel(), dtype=torch.bfloat16)
    p = torch.zeros(g.numel())
    cpu.lion_step([p], [g], [m], lr=0.0, beta1=0.9, beta2=0.0, weight_decay=0.0, state_step=step)
    assert _bits_equal(m, want)
    assert torch.equal(torch.isnan(m), torch.isnan(g))
    ref = torch.zeros(g.numel(), dtype=torch.bfloat16)
    torch_ops.lion_step([torch.zeros(g.numel())], [g], [ref], lr=0.0, beta1=0.9, beta2=0.0, weight_decay=0.0,
                        state_step=step)
    assert _bits_equal(m, ref)


def test_bf16_state_non_finite_grads_like_torch(ext):
    """inf/NaN gradients reach bf16 state as torch_ops stores them (inf stays inf, NaN stays NaN)."""
    g = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0, -2.0, 0.1] * 5)
    p = torch.linspace(-1, 1, g.numel())
    st = [[p], [torch.full_like(p, 0.01).bfloat16()], [torch.full_like(p, 0.02).bfloat16()],
          [torch.full_like(p, 0.01).bfloat16()]]
    for opts in (dict(), dict(clip_value=1.0), dict(maximize=True, grad_scale=torch.tensor(0.5))):
        a, b = _copy(st), _copy(st)
        for k in range(2):
            cpu.lion_step(a[0], [g], a[1], weight_decay=0.1, state_step=k + 1, **LION_HP, **opts)
            torch_ops.lion_step(b[0], [g], b[1], weight_decay=0.1, state_step=k + 1, **LION_HP, **opts)
            cpu.adamw_step(a[0], [g], a[1], a[2], a[3], step=k + 1, weight_decay=0.1, **ADAMW_HP, **opts)
            torch_ops.adamw_step(b[0], [g], b[1], b[2], b[3], step=k + 1, weight_decay=0.1, **ADAMW_HP, **opts)
        torch.testing.assert_close(a[0][0], b[0][0], rtol=1e-6, atol=0, equal_nan=True)
        for x, y in zip(a[1:], b[1:]):
            assert _bits_equal(x[0], y[0])


@pytest.mark.parametrize("opt,amsgrad", [("lion", False), ("adamw", False), ("adamw", True)])
def test_bf16_state_found_inf_set_leaves_state_unchanged(ext, opt, amsgrad):
    shapes = [(5,), (70_001,)]
    st = _bf16_state(_fresh(shapes, torch.float32, seed=23, amsgrad=amsgrad))
    grads = make_grads(shapes, torch.float32, seed=1500)
    before = [clone(g) for g in [grads]]
    got = _copy(st)
    for flag in (1.0, float("inf"), float("nan")):
        _run_bf16(cpu.lion_step if opt == "lion" else cpu.adamw_step, opt, got, [grads], 0.1,
                  dict(found_inf=torch.tensor(flag), grad_scale=torch.tensor(0.5)))
    for xs, ys in zip(got, st):
        if xs is not None:
            assert all(_bits_equal(a, b) for a, b in zip(xs, ys))
    assert all(torch.equal(a, b) for a, b in zip(grads, before[0]))
    _run_bf16(cpu.lion_step if opt == "lion" else cpu.adamw_step, opt, got, [grads], 0.1,
              dict(found_inf=torch.tensor(0.0)))
    assert not torch.equal(got[1][1], st[1][1])


@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_bf16_state_partition_and_thread_invariance(ext, opt):
    """The rounding is keyed by value, not position: slices of a tensor, one call or one per slice, and any
    thread count give the whole tensor's bits."""
    n = CUTS[-1]
    base = _bf16_state(_fresh([(n,)], torch.float32, seed=24, amsgrad=opt == "adamw"))
    grads = [make_grads([(n,)], torch.float32, seed=1600 + k)[0] for k in range(STEPS)]

    def run(st, cut, nt=None):
        old = torch.get_num_threads()
        if nt:
            torch.set_num_threads(nt)
        try:
            for step, g in enumerate(grads, start=1):
                sl = (lambda t: _slices(t, CUTS)) if cut else (lambda t: [t.view(-1)])
                lists = [sl(x[0]) if x is not None else None for x in st]
                if opt == "lion":
                    cpu.lion_step(lists[0], sl(g), lists[1], weight_decay=0.1, state_step=step, **LION_HP)
                else:
                    cpu.adamw_step(lists[0], sl(g), lists[1], lists[2], lists[3], weight_decay=0.1, step=step,
                                   **ADAMW_HP)
        finally:
            torch.set_num_threads(old)
        return st

    whole = run(_copy(base), cut=False)
    for other in (run(_copy(base), cut=True), run(_copy(base), cut=False, nt=1)):
        for x, y in zip(whole, other):
            if x is not None:
                assert _bits_equal(x[0], y[0])


@pytest.mark.parametrize("gdtype", GRAD_DTYPES + (torch.float64,), ids=_dtype_id)
def test_adamw_split_form_with_bf16_state_is_bitwise_identical(ext, gdtype):
    shapes = SHAPE_SETS["odd"]
    for pdtype in (torch.float32, torch.bfloat16):
        a = _bf16_state(_fresh(shapes, pdtype, seed=25, amsgrad=True))
        b = _copy(a)
        for step in range(1, STEPS + 1):
            grads = make_grads(shapes, gdtype, seed=1700 + step)
            kw = dict(maximize=True, clip_value=0.8, grad_scale=torch.tensor(0.9))
            ext.adamw_step(a[0], grads, a[1], a[2], 1e-2, 0.9, 0.999, 1e-8, 0.05, step, a[3], **kw)
            ext._adamw_step_split(b[0], grads, b[1], b[2], 1e-2, 0.9, 0.999, 1e-8, 0.05, step, b[3], **kw)
        for xs, ys in zip(a, b):
            assert all(_bits_equal(x, y) for x, y in zip(xs, ys))


def test_bf16_state_bad_input_raises(ext):
    p, g = [torch.zeros(8)], [torch.ones(8)]
    m = [torch.zeros(8, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] is bfloat16 state.*state_step"):
        cpu.lion_step(p, g, m, weight_decay=0.0, **LION_HP)
    with pytest.raises(ValueError, match=r"state_step has 2 entries for 1 tensors"):
        cpu.lion_step(p, g, m, weight_decay=0.0, state_step=[1, 2], **LION_HP)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] has dtype Float but exp_avgs\[0\] has BFloat16"):
        cpu.adamw_step(p, g, m, [torch.zeros(8)], step=1, weight_decay=0.0, **ADAMW_HP)
    assert torch.equal(p[0], torch.zeros(8)) and torch.equal(m[0], torch.zeros(8, dtype=torch.bfloat16))


@pytest.mark.parametrize("opt_kw", [dict(), dict(grad_clip_norm=1.0), dict(grad_clip_value=0.1, maximize=True)],
                         ids=lambda d: str(d) or "defaults")
@pytest.mark.parametrize("cls", [shardopt.Lion, shardopt.AdamW], ids=lambda c: c.__name__)
def test_optimizer_bf16_state_runs_on_cpu_kernels(ext, cls, opt_kw, monkeypatch):
    """shardopt.Lion/AdamW(state_dtype="bf16") with the default backend are served by the C++ kernels and
    give backend="torch"'s bits over several steps: fp32, bf16 and complex params (the complex one keeps
    fp32 state in the same call), a parameter that skips steps (its own step count salts its rounding)."""
    torch.manual_seed(1)
    shapes = [(40, 30), (7,), (1000,), (1,), (300_001,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float32]
    init = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)] + [torch.randn(33, dtype=torch.complex64)]
    grads = [[torch.randn_like(p) * 3 for p in init] for _ in range(4)]

    def run(backend, ctx):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        with ctx:
            opt = cls(ps, lr=1e-2, sharding="none", backend=backend, state_dtype="bf16", **opt_kw)
            for k, gs in enumerate(grads):
                for i, (p, g) in enumerate(zip(ps, gs)):
                    p.grad = None if (i == 2 and k == 1) else g.clone()
                opt.step()
        return ps, opt

    ref_ps, ref = run("torch", contextlib.nullcontext())
    with monkeypatch.context() as mp:
        for name in ("lion_step", "adamw_step", "grad_stats", "effective_grads"):
            mp.setattr(torch_ops, name, lambda *a, _n=name, **k: pytest.fail(f"torch_ops.{_n} was called"))
        ps, opt = run("auto", contextlib.nullcontext())
    assert opt.state[ps[2]]["step"] != opt.state[ps[0]]["step"]
    for i, (a, b) in enumerate(zip(ps, ref_ps)):
        if cls is shardopt.Lion:
            assert torch.equal(a, b), f"params[{i}]"
        elif a.is_complex():
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            _assert_adamw_params_close([a.detach()], [b.detach()])
        for key, v in opt.state[a].items():
            w = ref.state[b][key]
            if key == "step":
                assert float(v) == float(w)
                continue
            if key == "master_param":  # a bf16 parameter's fp32 copy: the params' rule
                assert torch.equal(v, w) if cls is shardopt.Lion else _assert_adamw_params_close([v], [w]) is None
                continue
            want_dtype = torch.complex64 if a.is_complex() else torch.bfloat16
            assert v.dtype == w.dtype == want_dtype, (i, key, v.dtype)
            assert _bits_equal(torch.view_as_real(v) if v.is_complex() else v,
                               torch.view_as_real(w) if w.is_complex() else w), (i, key)


# ------------------------------------------------- roofline kernels (shardopt bench)

@pytest.mark.parametrize("n", [0, 1, 7, 1_000_003])
def test_stream_kernels(ext, n):
    """stream_update is a += s*b (two plain fp32 ops, bitwise); stream_read sums in fp32 lanes (close to
    the fp64 sum); neither writes its inputs but a."""
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    want = a + b * 0.37
    b0, v0 = b.clone(), a._version
    cpu.stream_update(a, b, 0.37)
    assert torch.equal(a, want) and torch.equal(b, b0)
    assert a._version > v0 or n == 0
    total = cpu.stream_read(a)
    assert abs(total - a.double().sum().item()) <= 1e-5 * max(1.0, a.double().abs().sum().item())
    assert torch.equal(a, want)


def test_stream_kernels_bad_input(ext):
    with pytest.raises(RuntimeError, match="float32"):
        cpu.stream_update(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16), 1.0)
    with pytest.raises(RuntimeError, match=r"b\[0\] has shape"):
        cpu.stream_update(torch.zeros(4), torch.zeros(5), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu.stream_read(torch.zeros(4, 6).t())
