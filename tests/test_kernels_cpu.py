"""The ``cpu`` backend (C++/OpenMP kernels) against the ``torch`` reference backend.

* Lion with fp32 params is bitwise equal to ``torch_ops.lion_step``; AdamW is
  within rtol 1e-6 / atol 1e-7 (torch's CPU sqrt is not always correctly
  rounded, the kernel's is); bf16 params are within one bf16 ulp.
* Results do not depend on where a tensor is cut (ZeRO-1 partitions start
  anywhere) nor on the number of threads.
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

import shardopt.kernels as kernels
from shardopt.kernels import cpu, torch_ops

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
    assert "chunk=" in ext.build_info()


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
