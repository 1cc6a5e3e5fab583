"""The ``cuda`` backend (multi-tensor-apply CUDA kernels) against the ``torch`` reference.

CPU tests (run everywhere):

* the chunk plan (``cuda.chunk_plan``, the Python mirror of the launcher's
  planner) covers every element exactly once within the launch limits, with
  int64 offsets for tensors beyond 2**31 elements (integers only, nothing is
  allocated);
* without CUDA, ``available()`` is False at once with a reason, and the
  backend choice on CUDA devices falls back cuda -> triton -> torch.

GPU tests (``@pytest.mark.gpu``, skipped without CUDA):

* Lion is bitwise equal to ``torch_ops`` in fp32, AdamW within rtol 1e-6
  (torch's CUDA ``_foreach_div_`` by a scalar multiplies by the reciprocal,
  the kernel divides); bf16 params within one bf16 ulp; odd sizes, many
  tensors (several launches), a tensor spanning several launches, mixed dtypes;
* the vector and scalar paths agree bitwise; misaligned views (offset by one
  element) take the scalar path and agree bitwise with aligned runs;
* bad inputs raise naming the list index, before anything is written;
* a tensor with more than 2**31 elements (bf16, ~13 GB, only when that much
  device memory is free) is updated right past the 32-bit boundary;
* maximize, clip_value, grad_scale and found_inf (device tensors the kernels
  read), amsgrad, alone and together, to the same tolerances; a set flag
  writes nothing, gradients are never written, and a captured CUDA graph
  reads the flag and the scale at replay time;
* grad_stats within 1e-6 relative of a float64 sum over many tensors, launches
  and dtypes, NaN ``bad`` for inf/NaN; the dispatcher really serves these
  calls with the cuda backend;
* with ``torch.cuda.set_sync_debug_mode("error")`` a default ``step()`` of
  every optimizer of the cases table raises nothing (no host sync).
"""
from __future__ import annotations

import random
import time

import pytest
import torch
from cases import CASE_IDS, assert_close_params, build, grad_stats_reference, make_params
from cases import make_grads as case_grads
from test_kernels_cpu import (
    ADAMW_HP,
    LION_HP,
    bf16_ulp_distance,
    clone,
    make_grads,
    make_state,
)

from shardopt import kernels
from shardopt.kernels import cuda, torch_ops

gpu = pytest.mark.gpu

# ======================================================== chunk plan (CPU)


def _check_plan(numels, plan, chunk, max_tensors, max_blocks):
    """Every element of every tensor is covered exactly once, in order, and no
    launch exceeds the limits."""
    seen = {t: [] for t, n in enumerate(numels) if n > 0}
    for tensors, blocks in plan:
        assert 1 <= len(tensors) <= max_tensors
        assert 1 <= len(blocks) <= max_blocks
        assert len(set(tensors)) == len(tensors)
        assert {slot for slot, _ in blocks} == set(range(len(tensors))), "a table entry without a block"
        for slot, start in blocks:
            t = tensors[slot]
            assert 0 <= start < numels[t] and start % chunk == 0
            seen[t].append(start)
    for t, starts in seen.items():
        assert starts == list(range(0, numels[t], chunk)), f"tensor {t}"


def test_chunk_plan_small_example():
    plan = cuda.chunk_plan([5, 0, 70000, 3], chunk_size=65536, max_tensors=38, max_blocks=256)
    assert plan == [([0, 2, 3], [(0, 0), (1, 0), (1, 65536), (2, 0)])]


def test_chunk_plan_limits_split_launches():
    # block limit: a tensor continues in the next launch at slot 0
    assert cuda.chunk_plan([10, 25], chunk_size=8, max_tensors=4, max_blocks=3) == [
        ([0, 1], [(0, 0), (0, 8), (1, 0)]),
        ([1], [(0, 8), (0, 16), (0, 24)]),
    ]
    # tensor limit
    assert cuda.chunk_plan([1, 2, 3, 4, 5], chunk_size=8, max_tensors=2, max_blocks=100) == [
        ([0, 1], [(0, 0), (1, 0)]),
        ([2, 3], [(0, 0), (1, 0)]),
        ([4], [(0, 0)]),
    ]
    assert cuda.chunk_plan([0, 0], chunk_size=8, max_tensors=2, max_blocks=2) == []
    with pytest.raises(ValueError):
        cuda.chunk_plan([1], chunk_size=0)


@pytest.mark.parametrize("seed", range(4))
def test_chunk_plan_random_lists_cover_everything(seed):
    rng = random.Random(seed)
    numels = [rng.choice([0, 1, 3, 8, 9, 15, 16, 17, 40, rng.randint(0, 200)]) for _ in range(rng.randint(1, 120))]
    for chunk, mt, mb in ((8, 3, 5), (16, 1, 1), (8, 38, 256), (1, 7, 13)):
        _check_plan(numels, cuda.chunk_plan(numels, chunk, mt, mb), chunk, mt, mb)


def test_chunk_plan_int64_offsets_beyond_2_31():
    """Sizes past 2**31 and 2**32: starts are exact int64 multiples of the
    chunk (a 32-bit chunk*index product would wrap), the default limits apply."""
    chunk, mt, mb = cuda.CHUNK_SIZE, cuda.max_tensors(3), cuda.MAX_BLOCKS
    numels = [2**31 + 7, 3, 0, 2**33 + 1, 2**32 - 1]
    plan = cuda.chunk_plan(numels, chunk, mt, mb)
    _check_plan(numels, plan, chunk, mt, mb)
    starts = {t: [] for t in range(len(numels))}
    for tensors, blocks in plan:
        for slot, start in blocks:
            starts[tensors[slot]].append(start)
    assert starts[0][-1] == 2**31  # holds the last 7 elements
    assert starts[3][-1] == 2**33 and starts[3][-1] % 2**32 == 0  # would be 0 in 32 bits
    assert starts[4][-1] == 2**32 - chunk
    total_blocks = sum(len(b) for _, b in plan)
    assert total_blocks == sum((n + chunk - 1) // chunk for n in numels)
    assert len(plan) == -(-total_blocks // mb)  # big tensors fill every launch


def test_launch_limits_fit_kernel_arguments():
    """The tables (8 bytes per pointer and size, 9 per block) stay within the
    4 KiB kernel-argument limit, and a chunk keeps 16-byte alignment."""
    assert cuda.CHUNK_SIZE % 8 == 0
    assert cuda.META_BYTES <= 4096 - 128
    for depth in (1, 3, 4, 5):  # grad_stats, Lion, AdamW, AdamW with amsgrad
        mt = cuda.max_tensors(depth)
        assert 8 <= mt <= 255
        assert 8 * (depth + 1) * mt + 9 * cuda.MAX_BLOCKS <= cuda.META_BYTES


# ======================================================= selection (CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_unavailable_without_cuda_reports_reason_quickly():
    t0 = time.perf_counter()
    assert cuda.available() is False
    assert time.perf_counter() - t0 < 5.0  # no compiler was started
    reason = cuda.build_error()
    assert reason and ("CUDA" in reason or "cuda" in reason)
    with pytest.raises(RuntimeError, match="CUDA kernels are unavailable"):
        cuda.load()


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.parametrize(
    "cuda_ok,triton_ok,expected",
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "triton"), (False, False, "torch")],
)
@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_backend_choice_on_cuda_devices(monkeypatch, requested, cuda_ok, triton_ok, expected):
    """The selection logic alone (availability faked; no CUDA needed):
    cuda, else triton, else torch, with one warning when falling back."""
    from shardopt.kernels import triton_ops

    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(cuda, "available", lambda: cuda_ok)
    monkeypatch.setattr(cuda, "build_error", lambda: None if cuda_ok else "no nvcc (faked)")
    monkeypatch.setattr(triton_ops, "available", lambda: triton_ok)
    dev = torch.device("cuda", 0)
    if cuda_ok:
        assert kernels.resolve_backend(requested, dev) == expected
        return
    with pytest.warns(RuntimeWarning, match=r"no nvcc \(faked\).*backend='" + expected):
        assert kernels.resolve_backend(requested, dev) == expected
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per process
        assert kernels.resolve_backend(requested, dev) == expected


# ================================================================ GPU tests

DEV = torch.device("cuda")


@pytest.fixture(scope="module")
def ext():
    from torch.utils import cpp_extension

    if not cuda.available():
        # no toolkit / ninja here: skip; anything else (a compile error) fails
        if cpp_extension.CUDA_HOME is None or not cpp_extension.is_ninja_available():
            pytest.skip(f"CUDA extension cannot be built here: {cuda.build_error()}")
        pytest.fail(f"CUDA extension failed to build: {cuda.build_error()}")
    return cuda.load()


def _dev(ts):
    return [t.to(DEV) for t in ts]


def _many_shapes(n, seed, hi=3000):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, hi, (n,), generator=g).tolist()
    return [(s,) if i % 3 else (s, 3) for i, s in enumerate(sizes)]


SHAPE_SETS = {
    "odd": [(1,), (7,), (10, 100), (65537 + 3,)],
    # more tensors than one launch's table holds (38 for AdamW, 48 for Lion)
    "many": _many_shapes(130, seed=3),
    # one tensor over more chunks than one launch's 256 blocks
    "spans_launches": [(3,), (256 * 65536 + 65536 * 2 + 5,), (11,)],
}


def assert_params_match(got, ref, *, exact):
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == torch.bfloat16:
            d = bf16_ulp_distance(a, b).max().item()
            assert d <= 1, f"params[{i}] differs by {d} bf16 ulps"
        elif exact:
            assert torch.equal(a, b), f"params[{i}] not bitwise equal"
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"params[{i}]")


def assert_equal_lists(got, ref, what):
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"{what}[{i}] not bitwise equal"


STEPS = 3

CASES = [
    pytest.param(sname, pdt, gdt, id=f"{sname}-p{str(pdt)[6:]}-g{str(gdt)[6:]}")
    for sname in SHAPE_SETS
    for pdt in (torch.float32, torch.bfloat16)
    for gdt in ((torch.float32, torch.bfloat16, torch.float16) if sname == "odd" else (torch.float32,))
]


@gpu
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("sname,pdtype,gdtype", CASES)
def test_lion_matches_torch(ext, sname, pdtype, gdtype, weight_decay):
    shapes = SHAPE_SETS[sname]
    params, exp_avgs, _ = make_state(shapes, pdtype, seed=0)
    params, exp_avgs = _dev(params), _dev(exp_avgs)
    grads = [_dev(make_grads(shapes, gdtype, seed=100 + k)) for k in range(STEPS)]
    p_c, m_c, p_t, m_t = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)
    for g in grads:
        cuda.lion_step(p_c, g, m_c, weight_decay=weight_decay, **LION_HP)
        torch_ops.lion_step(p_t, g, m_t, weight_decay=weight_decay, **LION_HP)
    assert_params_match(p_c, p_t, exact=True)
    assert_equal_lists(m_c, m_t, "exp_avgs")
    assert not all(torch.equal(a, b) for a, b in zip(p_c, params))


@gpu
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("sname,pdtype,gdtype", CASES)
def test_adamw_matches_torch(ext, sname, pdtype, gdtype, weight_decay):
    shapes = SHAPE_SETS[sname]
    params, exp_avgs, exp_avg_sqs = (_dev(x) for x in make_state(shapes, pdtype, seed=1))
    grads = [_dev(make_grads(shapes, gdtype, seed=200 + k)) for k in range(STEPS)]
    c = (clone(params), clone(exp_avgs), clone(exp_avg_sqs))
    t = (clone(params), clone(exp_avgs), clone(exp_avg_sqs))
    for step, g in enumerate(grads, start=1):
        cuda.adamw_step(c[0], g, c[1], c[2], weight_decay=weight_decay, step=step, **ADAMW_HP)
        torch_ops.adamw_step(t[0], g, t[1], t[2], weight_decay=weight_decay, step=step, **ADAMW_HP)
    assert_params_match(c[0], t[0], exact=False)
    # the moments involve no division: bitwise equal
    assert_equal_lists(c[1], t[1], "exp_avgs")
    assert_equal_lists(c[2], t[2], "exp_avg_sqs")
    assert not all(torch.equal(a, b) for a, b in zip(c[0], params))


@gpu
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_bf16_state_rounds_once_per_step(ext, pdtype):
    """bf16 moments: widened, updated in fp32, stored rounded; the same as the
    reference run on fp32 copies that are rounded back after every step."""
    shapes = SHAPE_SETS["odd"]
    params, exp_avgs, exp_avg_sqs = (_dev(x) for x in make_state(shapes, pdtype, seed=4))
    m16 = [m.bfloat16() for m in exp_avgs]
    v16 = [v.bfloat16() for v in exp_avg_sqs]
    # Lion
    p_c, m_c, p_t, m_t = clone(params), clone(m16), clone(params), clone(m16)
    for k in range(STEPS):
        g = _dev(make_grads(shapes, torch.bfloat16, seed=500 + k))
        cuda.lion_step(p_c, g, m_c, weight_decay=0.1, **LION_HP)
        m32 = [m.float() for m in m_t]
        torch_ops.lion_step(p_t, g, m32, weight_decay=0.1, **LION_HP)
        torch._foreach_copy_(m_t, m32)
    assert_params_match(p_c, p_t, exact=True)
    assert_equal_lists(m_c, m_t, "exp_avgs")
    # AdamW
    c = (clone(params), clone(m16), clone(v16))
    t = (clone(params), clone(m16), clone(v16))
    for step in range(1, STEPS + 1):
        g = _dev(make_grads(shapes, torch.float32, seed=600 + step))
        cuda.adamw_step(c[0], g, c[1], c[2], weight_decay=0.1, step=step, **ADAMW_HP)
        m32, v32 = [m.float() for m in t[1]], [v.float() for v in t[2]]
        torch_ops.adamw_step(t[0], g, m32, v32, weight_decay=0.1, step=step, **ADAMW_HP)
        torch._foreach_copy_(t[1], m32)
        torch._foreach_copy_(t[2], v32)
    assert_params_match(c[0], t[0], exact=False)
    assert_equal_lists(c[1], t[1], "exp_avgs")
    assert_equal_lists(c[2], t[2], "exp_avg_sqs")


@gpu
def test_mixed_dtypes_and_empty_tensors_in_one_call(ext):
    shapes = [(5,), (0,), (300,), (40000,), (0, 3), (77,)]
    pdts = [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32]
    gdts = [torch.float16, torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float16]
    g = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=g).to(DEV, d) for s, d in zip(shapes, pdts)]
    grads = [torch.randn(s, generator=g).to(DEV, d) for s, d in zip(shapes, gdts)]
    m = [torch.randn(s, generator=g).to(DEV) * 0.1 for s in shapes]
    v = [x * x for x in m]
    c, t = (clone(params), clone(m), clone(v)), (clone(params), clone(m), clone(v))
    cuda.adamw_step(c[0], grads, c[1], c[2], weight_decay=0.05, step=2, **ADAMW_HP)
    torch_ops.adamw_step(t[0], grads, t[1], t[2], weight_decay=0.05, step=2, **ADAMW_HP)
    assert_params_match(c[0], t[0], exact=False)
    c2, t2 = (clone(params), clone(m)), (clone(params), clone(m))
    cuda.lion_step(c2[0], grads, c2[1], weight_decay=0.05, **LION_HP)
    torch_ops.lion_step(t2[0], grads, t2[1], weight_decay=0.05, **LION_HP)
    assert_params_match(c2[0], t2[0], exact=True)
    assert_equal_lists(c2[1], t2[1], "exp_avgs")


# ------------------------------------------------- vector vs scalar paths

def _lion_ext(ext, p, g, m, vectorize):
    ext.lion_step(p, g, m, 1e-2, 0.9, 0.99, 0.1, vectorize=vectorize)


def _adamw_ext(ext, p, g, m, v, vectorize, step=3):
    ext.adamw_step(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, step, vectorize=vectorize)


DTYPE_COMBOS = [
    (pdt, gdt, sdt)
    for pdt in (torch.float32, torch.bfloat16)
    for gdt in (torch.float32, torch.bfloat16, torch.float16)
    for sdt in (torch.float32, torch.bfloat16)
]


def _random_lists(shapes, pdt, gdt, sdt, seed):
    gen = torch.Generator().manual_seed(seed)
    p = [torch.randn(s, generator=gen).to(DEV, pdt) for s in shapes]
    g = [torch.randn(s, generator=gen).to(DEV, gdt) for s in shapes]
    m = [(torch.randn(s, generator=gen) * 0.1).to(DEV, sdt) for s in shapes]
    v = [(x.float() * x.float() + 1e-3).to(sdt) for x in m]
    return p, g, m, v


@gpu
@pytest.mark.parametrize("pdt,gdt,sdt", DTYPE_COMBOS, ids=lambda d: str(d)[6:])
def test_vector_and_scalar_paths_are_bitwise_identical(ext, pdt, gdt, sdt):
    shapes = [(65536 * 2 + 13,), (8,), (4099,), (1,)]
    p, g, m, v = _random_lists(shapes, pdt, gdt, sdt, seed=11)
    a, b = (clone(p), clone(m), clone(v)), (clone(p), clone(m), clone(v))
    _adamw_ext(ext, a[0], g, a[1], a[2], vectorize=True)
    _adamw_ext(ext, b[0], g, b[1], b[2], vectorize=False)
    for xs, ys in zip(a, b):
        assert_equal_lists(xs, ys, "adamw")
    a, b = (clone(p), clone(m)), (clone(p), clone(m))
    _lion_ext(ext, a[0], g, a[1], vectorize=True)
    _lion_ext(ext, b[0], g, b[1], vectorize=False)
    for xs, ys in zip(a, b):
        assert_equal_lists(xs, ys, "lion")


def _offset_copy(t, offset=1):
    """A contiguous copy of t that starts `offset` elements into a buffer
    (misaligned for 16-byte vectors)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


@gpu
@pytest.mark.parametrize("which", ["params", "grads", "state", "all"])
@pytest.mark.parametrize("pdt,gdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)])
def test_misaligned_views_agree_with_aligned(ext, which, pdt, gdt):
    shapes = [(100003,), (40, 31)]
    p, g, m, v = _random_lists(shapes, pdt, gdt, torch.float32, seed=12)

    def mis(ts, on):
        return [_offset_copy(t) if on else t.clone() for t in ts]

    mp, mg = mis(p, which in ("params", "all")), mis(g, which in ("grads", "all"))
    mm, mv = mis(m, which in ("state", "all")), mis(v, which in ("state", "all"))
    a = (clone(p), clone(m), clone(v))
    _adamw_ext(ext, a[0], g, a[1], a[2], vectorize=True)
    _adamw_ext(ext, mp, mg, mm, mv, vectorize=True)
    for xs, ys in zip(a, (mp, mm, mv)):
        assert_equal_lists(xs, ys, "adamw")
    mp, mm = mis(p, which in ("params", "all")), mis(m, which in ("state", "all"))
    a = (clone(p), clone(m))
    _lion_ext(ext, a[0], g, a[1], vectorize=True)
    _lion_ext(ext, mp, mg, mm, vectorize=True)
    for xs, ys in zip(a, (mp, mm)):
        assert_equal_lists(xs, ys, "lion")


@gpu
def test_flat_partitions_starting_anywhere_are_bitwise_identical(ext):
    """ZeRO-1: updating a flat buffer in pieces cut at arbitrary elements gives
    the same bits as updating it whole."""
    n = 300_007
    p, g, m, v = _random_lists([(n,)], torch.float32, torch.bfloat16, torch.float32, seed=13)
    whole = (clone(p), clone(m), clone(v))
    _adamw_ext(ext, whole[0], g, whole[1], whole[2], vectorize=True)
    parts = (clone(p), clone(m), clone(v))
    cuts = [0, 1, 4099, 65536 + 3, 200_001, n]

    def sl(ts):
        return [ts[0][a:b] for a, b in zip(cuts, cuts[1:])]

    _adamw_ext(ext, sl(parts[0]), sl(g), sl(parts[1]), sl(parts[2]), vectorize=True)
    for xs, ys in zip(whole, parts):
        assert_equal_lists(xs, ys, "partitioned")


# ---------------------------------------------------------- edge numerics

@gpu
def test_subnormals_are_kept(ext):
    """A build with -ftz / fast math would flush these to zero; torch keeps them."""
    m = [torch.full((1000,), 1e-39, device=DEV)]  # subnormal fp32
    g = [torch.zeros(1000, device=DEV)]
    p = [torch.full((1000,), 1e-39, device=DEV)]
    m_t, p_t = clone(m), clone(p)
    cuda.lion_step(p, g, m, lr=1e-3, beta1=0.9, beta2=0.5, weight_decay=0.0)
    torch_ops.lion_step(p_t, g, m_t, lr=1e-3, beta1=0.9, beta2=0.5, weight_decay=0.0)
    assert m[0][0].item() != 0.0
    assert torch.equal(m[0], m_t[0]) and torch.equal(p[0], p_t[0])


@gpu
def test_bf16_store_rounds_to_nearest_even(ext):
    """Lion with g = m = 0 gives p = 1 - wd*lr*1: exact fp32 ties between bf16 values."""
    lr = 2.0**-9
    for wd, bits in ((1.0, 0x3F80), (3.0, 0x3F7E)):
        p = [torch.ones(37, dtype=torch.bfloat16, device=DEV)]
        cuda.lion_step(p, [torch.zeros(37, device=DEV)], [torch.zeros(37, device=DEV)],
                       lr=lr, beta1=0.9, beta2=0.99, weight_decay=wd)
        assert torch.all(p[0].view(torch.int16) == bits), p[0].view(torch.int16)


@gpu
def test_sign_of_zero_leaves_coordinate(ext):
    """sign(0) = 0: a coordinate with zero grad and momentum does not move."""
    p = [torch.tensor([1.0, -2.0, 3.0], device=DEV)]
    cuda.lion_step(p, [torch.tensor([0.0, 0.0, 1.0], device=DEV)], [torch.zeros(3, device=DEV)],
                   lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    assert p[0][:2].tolist() == [1.0, -2.0] and p[0][2].item() < 3.0


# ------------------------------------------------------------- bad input

def _lion_args(**over):
    base = {k: [torch.zeros(5, device=DEV), torch.zeros(10, device=DEV)] for k in "pgm"}
    for key, (i, t) in over.items():
        base[key][i] = t
    return base["p"], base["g"], base["m"]


BAD_LION = [
    (lambda: _lion_args(g=(1, torch.zeros(11, device=DEV))), r"grads\[1\] has shape"),
    (lambda: _lion_args(m=(1, torch.zeros(9, device=DEV))), r"exp_avgs\[1\] has shape"),
    (lambda: _lion_args(m=(1, torch.zeros(10, device=DEV, dtype=torch.float16))), r"exp_avgs\[1\].*dtype"),
    (lambda: _lion_args(g=(1, torch.zeros(10, device=DEV, dtype=torch.int32))), r"grads\[1\].*dtype"),
    (lambda: _lion_args(p=(0, torch.zeros(5, device=DEV, dtype=torch.float16))), r"params\[0\].*dtype"),
    (lambda: _lion_args(g=(1, torch.zeros(5, 2, device=DEV).t())), r"grads\[1\].*contiguous"),
    (lambda: _lion_args(p=(1, torch.zeros(5, 2, device=DEV).t())), r"params\[1\].*contiguous"),
    (lambda: _lion_args(g=(1, torch.zeros(10))), r"grads\[1\] is on cpu"),
    (lambda: _lion_args(m=(0, torch.zeros(5))), r"exp_avgs\[0\] is on cpu"),
    (lambda: ([torch.zeros(3, device=DEV)] * 2, [torch.zeros(3, device=DEV)], [torch.zeros(3, device=DEV)]),
     r"equal lengths"),
]


@gpu
@pytest.mark.parametrize("make,match", BAD_LION, ids=[f"bad{i}" for i in range(len(BAD_LION))])
def test_lion_bad_input_raises_before_writing(ext, make, match):
    params, grads, exp_avgs = make()
    for t in params + grads + exp_avgs:
        if t.dtype.is_floating_point:
            t.fill_(0.5)
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=match):
        cuda.lion_step(params, grads, exp_avgs, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@gpu
def test_adamw_bad_input_raises(ext):
    p, g, m = [torch.zeros(8, device=DEV)], [torch.zeros(8, device=DEV)], [torch.zeros(8, device=DEV)]
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\].*exp_avgs\[0\].*must match"):
        cuda.adamw_step(p, g, m, [torch.zeros(8, device=DEV, dtype=torch.bfloat16)], step=1,
                        weight_decay=0.0, **ADAMW_HP)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\]"):
        cuda.adamw_step(p, g, m, [torch.zeros(7, device=DEV)], step=1, weight_decay=0.0, **ADAMW_HP)
    with pytest.raises(RuntimeError, match=r"step"):
        cuda.adamw_step(p, g, m, [torch.zeros(8, device=DEV)], step=0, weight_decay=0.0, **ADAMW_HP)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_two_gpus_rejected(ext):
    p = [torch.zeros(4, device="cuda:0"), torch.zeros(4, device="cuda:1")]
    g = [torch.zeros(4, device="cuda:0"), torch.zeros(4, device="cuda:1")]
    m = [torch.zeros(4, device="cuda:0"), torch.zeros(4, device="cuda:1")]
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda:1 but params\[0\] is on cuda:0"):
        cuda.lion_step(p, g, m, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)


@gpu
def test_launch_limits_and_planner_match_python(ext):
    for depth in (1, 3, 4, 5):
        assert tuple(ext.launch_limits(depth)) == (
            cuda.CHUNK_SIZE, cuda.max_tensors(depth), cuda.MAX_BLOCKS, 512, cuda.META_BYTES)
    rng = random.Random(5)
    cases = [[2**31 + 7, 3, 0, 2**33 + 1], [rng.randint(0, 300_000) for _ in range(300)], [0, 0]]
    for numels in cases:
        for limits in ((cuda.CHUNK_SIZE, 38, 256), (cuda.CHUNK_SIZE, 3, 5)):
            got = [(list(t), [tuple(b) for b in bl]) for t, bl in ext._chunk_plan(numels, *limits)]
            assert got == cuda.chunk_plan(numels, *limits)


# ----------------------------------------------------------- big tensors

@gpu
def test_tensor_beyond_2_31_elements(ext):
    """One bf16 param/grad/state triple of 2**31 + 65536 + 3 elements: the
    windows around the 32-bit boundary and at the end match the reference."""
    n = 2**31 + 65536 + 3
    need = 3 * 2 * n + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free device memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device=DEV).manual_seed(0)
    p = torch.randn(n, device=DEV, dtype=torch.bfloat16, generator=gen)
    g = torch.randn(n, device=DEV, dtype=torch.bfloat16, generator=gen)
    m = torch.randn(n, device=DEV, dtype=torch.bfloat16, generator=gen)
    windows = [(0, 1000), (2**31 - 600, 2**31 + 600), (n - 1000, n)]  # the last spans a chunk start
    ref = []
    for a, b in windows:
        pw, mw = [p[a:b].clone()], [m[a:b].float()]
        torch_ops.lion_step(pw, [g[a:b]], mw, weight_decay=0.1, **LION_HP)
        ref.append((pw[0], mw[0].bfloat16()))
    cuda.lion_step([p], [g], [m], weight_decay=0.1, **LION_HP)
    for (a, b), (pw, mw) in zip(windows, ref):
        assert torch.equal(p[a:b], pw), f"params[{a}:{b}]"
        assert torch.equal(m[a:b], mw), f"exp_avgs[{a}:{b}]"


# ------------------------------------------------------ through the API

@gpu
def test_auto_picks_cuda_on_cuda_devices(ext):
    assert kernels.resolve_backend("auto", torch.device("cuda")) == "cuda"
    assert kernels.resolve_backend("cuda", torch.device("cuda")) == "cuda"


@gpu
@pytest.mark.parametrize("name", CASE_IDS)
def test_optimizers_with_cuda_backend_match_torch_backend(ext, name):
    """The one table of cases: each optimizer steps the same with backend='cuda'
    as with the reference backend, on CUDA params (plus bf16 params for Lion)."""
    for dtype in (torch.float32, torch.bfloat16) if name == "lion" else (torch.float32,):
        results = {}
        for backend in ("cuda", "torch"):
            ps = [torch.nn.Parameter(p.detach().to(DEV)) for p in make_params(dtype)]
            opt = build(name, ps, backend=backend, sharding="none")
            for k in range(3):
                for p, g in zip(ps, case_grads(k, dtype=dtype)):
                    p.grad = g.to(DEV)
                opt.step()
            results[backend] = [p.detach().clone() for p in ps]
        assert_close_params(results["cuda"], results["torch"], name)


@gpu
def test_cuda_graph_capture(ext):
    """Kernel arguments are passed by value, so a step can be captured and replayed."""
    shapes = SHAPE_SETS["odd"]
    p, g, m, _ = _random_lists(shapes, torch.float32, torch.float32, torch.float32, seed=21)
    p_ref, m_ref = clone(p), clone(m)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.lion_step(p, g, m, weight_decay=0.0, **LION_HP)  # warm-up, outside capture
    torch.cuda.current_stream().wait_stream(stream)
    torch_ops.lion_step(p_ref, g, m_ref, weight_decay=0.0, **LION_HP)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda.lion_step(p, g, m, weight_decay=0.0, **LION_HP)
    for _ in range(2):
        graph.replay()
        torch_ops.lion_step(p_ref, g, m_ref, weight_decay=0.0, **LION_HP)
    torch.cuda.synchronize()
    assert_equal_lists(p, p_ref, "params")
    assert_equal_lists(m, m_ref, "exp_avgs")


# -------------------------------------- gradient transform, skip flag, amsgrad

FEATURE_SETS = {
    "maximize": dict(maximize=True),
    "clip_value": dict(clip_value=0.7),
    "grad_scale": dict(grad_scale=0.3721),
    "found_inf_clear": dict(found_inf=0.0),
    "amsgrad": dict(amsgrad=True),
    "all": dict(maximize=True, clip_value=0.7, grad_scale=0.3721, found_inf=0.0, amsgrad=True),
}
FEATURE_CASES = [(opt, f) for opt in ("lion", "adamw") for f in FEATURE_SETS if not (opt == "lion" and f == "amsgrad")]


def _feature_kwargs(features):
    kw = {k: v for k, v in features.items() if k != "amsgrad"}
    for k in ("grad_scale", "found_inf"):
        if k in kw:
            kw[k] = torch.tensor(kw[k], dtype=torch.float32, device=DEV)
    return kw


def _feature_lists(shapes, pdt, gdt, seed, amsgrad):
    gen = torch.Generator().manual_seed(seed)
    p = [torch.randn(s, generator=gen).to(DEV, pdt) for s in shapes]
    g = [(torch.randn(s, generator=gen) * 1.5).to(DEV, gdt) for s in shapes]  # often beyond clip_value
    m = [(torch.randn(s, generator=gen) * 0.1).to(DEV) for s in shapes]
    v = [(torch.rand(s, generator=gen) * 0.1).to(DEV) for s in shapes]
    vmax = [(torch.rand(s, generator=gen) * 0.2).to(DEV) for s in shapes] if amsgrad else None
    return p, g, m, v, vmax


def _maybe(ts):
    return None if ts is None else clone(ts)


@gpu
@pytest.mark.parametrize("pdt,gdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)],
                         ids=["p32-g32", "pbf16-g16"])
@pytest.mark.parametrize("opt,fname", FEATURE_CASES, ids=[f"{o}-{f}" for o, f in FEATURE_CASES])
def test_features_match_torch(ext, opt, fname, pdt, gdt):
    features = FEATURE_SETS[fname]
    amsgrad = features.get("amsgrad", False) and opt == "adamw"
    shapes = SHAPE_SETS["odd"]
    p, g, m, v, vmax = _feature_lists(shapes, pdt, gdt, seed=len(fname) * 7 + (opt == "lion"), amsgrad=amsgrad)
    g_before = clone(g)
    kw = _feature_kwargs(features)
    c = (clone(p), clone(m), clone(v), _maybe(vmax))
    t = (clone(p), clone(m), clone(v), _maybe(vmax))
    if opt == "lion":
        cuda.lion_step(c[0], g, c[1], weight_decay=0.1, **LION_HP, **kw)
        torch_ops.lion_step(t[0], g, t[1], weight_decay=0.1, **LION_HP, **kw)
    else:
        cuda.adamw_step(c[0], g, c[1], c[2], c[3], weight_decay=0.1, step=3, **ADAMW_HP, **kw)
        torch_ops.adamw_step(t[0], g, t[1], t[2], t[3], weight_decay=0.1, step=3, **ADAMW_HP, **kw)
    assert_params_match(c[0], t[0], exact=opt == "lion")
    assert_equal_lists(c[1], t[1], "exp_avgs")
    if opt == "adamw":
        assert_equal_lists(c[2], t[2], "exp_avg_sqs")
    if amsgrad:
        assert_equal_lists(c[3], t[3], "max_exp_avg_sqs")
    assert_equal_lists(g, g_before, "grads (never written)")
    assert not all(torch.equal(a, b) for a, b in zip(c[0], p))


@gpu
@pytest.mark.parametrize("flag", [1.0, float("nan")])
@pytest.mark.parametrize("opt", ["lion", "adamw"])
def test_found_inf_set_writes_nothing(ext, opt, flag):
    shapes = SHAPE_SETS["odd"]
    lists = _feature_lists(shapes, torch.float32, torch.float32, seed=41, amsgrad=opt == "adamw")
    before = [_maybe(x) for x in lists]
    p, g, m, v, vmax = lists
    kw = dict(maximize=True, clip_value=0.7, grad_scale=torch.tensor(0.5, device=DEV),
              found_inf=torch.tensor(flag, device=DEV))
    if opt == "lion":
        cuda.lion_step(p, g, m, weight_decay=0.1, **LION_HP, **kw)
    else:
        cuda.adamw_step(p, g, m, v, vmax, weight_decay=0.1, step=2, **ADAMW_HP, **kw)
    for got, want in zip(lists, before):
        if got is not None:
            assert_equal_lists(got, want, "unchanged")


@gpu
def test_device_scalars_are_read_at_replay(ext):
    """A captured step reads found_inf and grad_scale when it runs, not when it was captured."""
    shapes = SHAPE_SETS["odd"]
    p, g, m, _, _ = _feature_lists(shapes, torch.float32, torch.float32, seed=43, amsgrad=False)
    scale = torch.tensor(1.0, device=DEV)
    flag = torch.tensor(0.0, device=DEV)
    kw = dict(weight_decay=0.1, grad_scale=scale, found_inf=flag, **LION_HP)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.lion_step(clone(p), g, clone(m), **kw)  # warm-up, outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda.lion_step(p, g, m, **kw)
    p_ref, m_ref = clone(p), clone(m)
    for s, f in ((0.25, 0.0), (0.5, 1.0), (2.0, 0.0)):
        scale.fill_(s)
        flag.fill_(f)
        graph.replay()
        torch_ops.lion_step(p_ref, g, m_ref, weight_decay=0.1, grad_scale=torch.tensor(s, device=DEV),
                            found_inf=torch.tensor(f, device=DEV), **LION_HP)
    torch.cuda.synchronize()
    assert_equal_lists(p, p_ref, "params")
    assert_equal_lists(m, m_ref, "exp_avgs")


# ------------------------------------------------------------- grad_stats

STATS_SETS = {
    "odd": [(1,), (7,), (10, 100), (65537 + 3,)],
    # three dtype groups of 100 tensors: more than one launch's table holds (96), blocks numbered
    # across launches and groups
    "many": _many_shapes(300, seed=5),
    "spans_launches": [(3,), (256 * 65536 + 65536 * 2 + 5,), (11,)],
}


@gpu
@pytest.mark.parametrize("clip_value", [None, 0.6])
@pytest.mark.parametrize("sname", list(STATS_SETS))
def test_grad_stats_matches_float64(ext, sname, clip_value):
    shapes = STATS_SETS[sname]
    gen = torch.Generator().manual_seed(51)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    grads = [(torch.randn(s, generator=gen) * 2).to(DEV, dtypes[k % 3]) for k, s in enumerate(shapes)]
    before = clone(grads)
    out = cuda.grad_stats(grads, clip_value=clip_value)
    assert out.dtype == torch.float64 and out.shape == (2,) and out.device == grads[0].device
    want = grad_stats_reference(grads, clip_value)[0]
    got = out.tolist()
    assert abs(got[0] - want) <= 1e-6 * want, (got, want)
    assert got[1] == 0.0
    assert_equal_lists(grads, before, "grads (never written)")
    torch.testing.assert_close(out, torch_ops.grad_stats(grads, clip_value=clip_value), rtol=1e-6, atol=0.0)


@gpu
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["first", "late_launch"])
def test_grad_stats_flags_non_finite(ext, bad, where):
    shapes = STATS_SETS["many"]
    gen = torch.Generator().manual_seed(52)
    grads = [torch.randn(s, generator=gen).to(DEV) for s in shapes]
    k = 0 if where == "first" else len(grads) - 1  # the last tensor sits in a later launch
    grads[k].view(-1)[-1] = bad
    for clip_value in (None, 0.6):
        out = cuda.grad_stats(grads, clip_value=clip_value).tolist()
        assert out[1] != out[1], "bad must be NaN"
        if clip_value is not None and bad == bad:  # a clamped inf counts as clip_value
            want = grad_stats_reference(grads, clip_value)[0]
            assert abs(out[0] - want) <= 1e-6 * want


def _refuse(*args, **kwargs):
    raise AssertionError("served by the torch backend, not by cuda")


@gpu
def test_dispatcher_serves_features_with_cuda(ext, monkeypatch):
    shapes = SHAPE_SETS["odd"]
    p, g, m, v, vmax = _feature_lists(shapes, torch.float32, torch.float32, seed=61, amsgrad=True)
    kw = _feature_kwargs(FEATURE_SETS["all"])
    ref_l = (clone(p), clone(m))
    torch_ops.lion_step(ref_l[0], g, ref_l[1], weight_decay=0.1, **LION_HP, **kw)
    ref_a = (clone(p), clone(m), clone(v), clone(vmax))
    torch_ops.adamw_step(*ref_a[:3], ref_a[3], weight_decay=0.1, step=2, **ADAMW_HP, **kw)
    ref_s = torch_ops.grad_stats(g, clip_value=0.7)
    for name in ("lion_step", "adamw_step", "grad_stats"):
        monkeypatch.setattr(torch_ops, name, _refuse)
    lp, lm = clone(p), clone(m)
    kernels.lion_step(lp, g, lm, weight_decay=0.1, backend="cuda", **LION_HP, **kw)
    assert_equal_lists(lp + lm, ref_l[0] + ref_l[1], "lion")
    a = (clone(p), clone(m), clone(v), clone(vmax))
    kernels.adamw_step(*a[:3], a[3], weight_decay=0.1, step=2, backend="cuda", **ADAMW_HP, **kw)
    assert_params_match(a[0], ref_a[0], exact=False)
    for got, want in zip(a[1:], ref_a[1:]):
        assert_equal_lists(got, want, "adamw state")
    torch.testing.assert_close(kernels.grad_stats(g, clip_value=0.7, backend="cuda"), ref_s, rtol=1e-6, atol=0.0)


# ------------------------------------------------------ no host syncs

@gpu
@pytest.mark.parametrize("extra", [{}, {"grad_clip_norm": 0.5, "grad_clip_value": 1.0}], ids=["defaults", "clipping"])
@pytest.mark.parametrize("name", CASE_IDS)
def test_default_step_does_not_sync(name, extra):
    """nonfinite='skip' (the default) and clipping: the skip flag and the clip coefficient stay on
    the device, so step() never waits for the host (after a warm-up step outside the mode)."""
    ps = [torch.nn.Parameter(p.detach().to(DEV)) for p in make_params()]
    opt = build(name, ps, sharding="none", **extra)
    grads = [[g.to(DEV) for g in case_grads(k)] for k in range(3)]  # copied before the mode is on
    bad = [g.clone() for g in grads[2]]
    bad[0].view(-1)[0] = float("inf")
    for p, gr in zip(ps, grads[0]):
        p.grad = gr
    opt.step()  # warm-up: builds kernels, allocates state
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in ps]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in (grads[1], bad):  # a normal step, then one the device flag skips
            for p, gr in zip(ps, gs):
                p.grad = gr
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert opt.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(ps, before))
