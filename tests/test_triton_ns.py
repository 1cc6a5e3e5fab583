"""Triton Newton-Schulz (shardopt.kernels.triton_ns) vs the reference math.

CI has no GPU, so the kernels run under Triton's interpreter on CPU tensors,
which is slow (every program is a Python loop iteration): the shapes are tiny
and the tiles are 16 so that every shape still has several, partial tiles.
``TRITON_INTERPRET`` must be set before anything imports triton:
tests/conftest.py sets it without a GPU.  The ``gpu`` tests at the bottom need
CUDA and compiled kernels (TRITON_INTERPRET unset, as conftest leaves it with a
GPU) and are what a GPU session must run.
"""
import pytest
import torch

pytest.importorskip("triton")

import shardopt
from shardopt.functional.muon import newton_schulz as reference_ns
from shardopt.kernels import triton_ns

BLOCKS = (16, 16, 16)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# CPU-tensor tests under the interpreter, the ``gpu`` ones compiled (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("triton_mode")


@pytest.mark.parametrize("shape", [(3, 5), (17, 33), (40, 24), (3, 16, 48)], ids=str)
def test_matches_reference_fp32(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = triton_ns.newton_schulz(G, dtype=torch.float32, blocks=BLOCKS)
    ref = reference_ns(G, dtype=torch.float32)
    assert out.shape == G.shape and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("steps", [5, 9])
def test_polar_express_matches_reference(steps):
    G = torch.randn(17, 33, generator=torch.Generator().manual_seed(5))
    out = triton_ns.newton_schulz(G, steps=steps, coefficients="polar_express", dtype=torch.float32, blocks=BLOCKS)
    ref = reference_ns(G, steps=steps, coefficients="polar_express", dtype=torch.float32)
    assert _rel(out, ref) < 1e-5


def test_gram_and_fused_square_are_exactly_symmetric():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(2, 37, 50, generator=gen)  # 3 row tiles, the last one partial
    A = torch.full((2, 37, 37), float("nan"))  # every element must be written
    triton_ns.syrk(X, A, blocks=BLOCKS)
    assert torch.equal(A, A.mT)
    torch.testing.assert_close(A, X @ X.mT, rtol=1e-5, atol=1e-5)
    B = torch.full_like(A, float("nan"))
    triton_ns.syrk(A, B, A=A, alpha=-4.775, beta=2.0315, blocks=BLOCKS)
    assert torch.equal(B, B.mT)
    torch.testing.assert_close(B, -4.775 * A + 2.0315 * (A @ A), rtol=1e-5, atol=1e-4)


def test_singular_values_in_quintic_band():
    gen = torch.Generator().manual_seed(2)
    # well conditioned: singular values spread over [0.5, 2]
    U, _ = torch.linalg.qr(torch.randn(24, 24, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(40, 24, generator=gen))
    G = U @ torch.diag(torch.linspace(0.5, 2.0, 24)) @ V.T
    s = torch.linalg.svdvals(triton_ns.newton_schulz(G, blocks=BLOCKS))
    assert s.min() >= 0.6 and s.max() <= 1.25, s


def test_bf16_close_to_fp32():
    G = torch.randn(17, 33, generator=torch.Generator().manual_seed(3))
    out = triton_ns.newton_schulz(G, dtype=torch.bfloat16, blocks=BLOCKS)
    # torch's bf16 NS is ~3.5% from fp32 here; the fused kernels round less often
    assert _rel(out, reference_ns(G, dtype=torch.float32)) < 0.04


def test_muon_step_triton_matches_torch():
    gen = torch.Generator().manual_seed(4)
    shapes = [(12, 20), (20, 12), (12, 20), (9, 9)]  # two same-shape matrices share a batch
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    results = {}
    for backend in ("torch", "triton"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = shardopt.Muon(params, lr=0.02, ns_dtype=torch.float32, ns_backend=backend, sharding="none")
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        results[backend] = [p.detach() for p in params]
    for ours, ref, p0 in zip(results["triton"], results["torch"], init):
        assert _rel(ours, ref) < 2e-5
        assert _rel(ours - p0, ref - p0) < 2e-5  # the update itself, not just the larger parameter


@pytest.mark.parametrize("backend", ["cuda", "Triton", None])
def test_bad_ns_backend_raises(backend):
    with pytest.raises(ValueError, match=r"invalid ns_backend .*valid: 'torch', 'triton', 'auto'"):
        shardopt.Muon([torch.nn.Parameter(torch.randn(4, 4))], ns_backend=backend)


def test_bad_dtype_and_rank_raise():
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        triton_ns.newton_schulz(torch.randn(4, 4), dtype=torch.float64)
    with pytest.raises(ValueError, match="2-D matrix or a 3-D batch"):
        triton_ns.newton_schulz(torch.randn(4))


# ---------------------------------------------------------------- GPU only
def _orthogonality_error(X):
    X = X.float()
    if X.size(-2) > X.size(-1):
        X = X.mT
    eye = torch.eye(X.size(-2), device=X.device)
    return (torch.linalg.matrix_norm(X @ X.mT - eye) / X.size(-2) ** 0.5).max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 1024, 4096), (3, 2048, 2048), (2, 8192, 2048), (1000, 1000)], ids=str)
def test_gpu_bf16_matches_reference(shape):
    G = torch.randn(shape, device="cuda")
    out = triton_ns.newton_schulz(G, dtype=torch.bfloat16)
    ref32 = reference_ns(G, dtype=torch.float32)
    ref16 = reference_ns(G, dtype=torch.bfloat16)
    assert _rel(out, ref32) <= max(1.2 * _rel(ref16, ref32), 1e-2)
    X = G.reshape(-1, *G.shape[-2:]).bfloat16()
    X = X.mT.contiguous() if X.size(-2) > X.size(-1) else X
    A = torch.empty(X.size(0), X.size(1), X.size(1), device="cuda", dtype=torch.bfloat16)
    triton_ns.syrk(X, A)
    assert torch.equal(A, A.mT)  # exact under the compiler too


@pytest.mark.gpu
def test_gpu_fp32_matches_reference():
    G = torch.randn(3, 768, 3072, device="cuda")
    assert _rel(triton_ns.newton_schulz(G, dtype=torch.float32), reference_ns(G, dtype=torch.float32)) < 1e-4


@pytest.mark.gpu
def test_gpu_orthogonality_no_worse_than_torch_muon():
    try:  # private helper of torch.optim.Muon; the bf16 reference does the same math
        from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns
    except ImportError:
        def torch_ns(G, coefficients, steps, eps):
            return reference_ns(G, steps=steps, coefficients=coefficients, eps=eps, dtype=torch.bfloat16)

    G = torch.randn(4096, 4096, device="cuda")
    ours = _orthogonality_error(triton_ns.newton_schulz(G, dtype=torch.bfloat16))
    theirs = _orthogonality_error(torch_ns(G, (3.4445, -4.7750, 2.0315), 5, 1e-7))
    assert ours <= theirs * 1.05, (ours, theirs)


# Speed is measured by `shardopt bench --device cuda` (the Muon rows include ns_backend="triton"),
# a command rather than a timed test.
