"""Triton Newton-Schulz for Muon: batched, symmetric-aware, fused epilogues.

:func:`newton_schulz` has the signature and semantics of
:func:`shardopt.functional.muon.newton_schulz` (the reference): the input is
cast to the compute ``dtype``, transposed so rows <= cols, normalised by its
Frobenius norm (in fp32, in torch), then each quintic step

    A = X X^T ;  B = b*A + c*A@A ;  X = a*X + B@X

runs as three kernel launches over the whole batch (grid axis 1 = batch):

1. ``_syrk``: ``A = X X^T``.  A is symmetric, so only the tiles on and below
   the diagonal are computed (a triangular grid, T(T+1)/2 programs for T
   row tiles); each program stores its tile and its transpose.  On diagonal
   tiles the lower half (with the diagonal) comes from the tile and the strict
   upper half from its transpose, so A is *exactly* symmetric.
2. ``_syrk`` again, fused: ``B = b*A + c*A@A``.  Because A is exactly
   symmetric, ``A@A = A A^T`` is another symmetric rank-k product, so the same
   kernel computes one triangle and mirrors it, with ``b*A + c*acc`` in the
   epilogue.  B is exactly symmetric too.
3. ``_ns_update``: ``X' = a*X + B@X``, a general tiled matmul with the axpy in
   the epilogue, written to a second buffer (tiles of X' read whole columns of
   X, so it cannot be done in place).

Per step the dense products cost ``4 m^2 n + 2 m^3`` FLOPs; computing one
triangle of each symmetric product brings that to about ``3 m^2 n + m^3``
(4 m^3 instead of 6 m^3 for a square matrix, 1.5x fewer), and the fused
epilogues drop the separate elementwise passes over A and X.

Precision: operands stay in the compute dtype (bf16, fp16 or fp32), products
accumulate in fp32 (``tl.dot`` with an fp32 accumulator), and each kernel
rounds its output once to the compute dtype (bf16 with explicit
round-to-nearest-even, shared with :mod:`shardopt.kernels.triton_ops`, so the
interpreter, which truncates on a plain cast, rounds like the GPU).  fp32
uses ``input_precision="ieee"`` (no TF32), matching torch's fp32 matmul.  The
fused epilogues round once where the torch reference rounds after every op,
so bf16 results are slightly *more* accurate than the reference, not bitwise.

Block sizes are constexpr.  GPU defaults (128x128 tiles, K-step 64, 8 warps,
3 stages) are a starting point picked without a GPU; the interpreter uses 32
(tests pass 16 to exercise partial tiles).  ``blocks=(bm, bn, bk)`` overrides.

Triton is imported lazily, as in :mod:`shardopt.kernels.triton_ops`: importing
this module never fails, :func:`available` says whether Triton imports, and
the kernels are ``triton.jit``-decorated at first call so ``TRITON_INTERPRET``
only has to be set before then.  On CPU tensors the kernels need
``TRITON_INTERPRET=1``.

What a GPU session must still do (GitHub issue 7 stays open until then)
-----------------------------------------------------------------------
There was no GPU where this was written; only the interpreter (fp32, small
shapes) has run it.  On the H100 (Triton 3.6):

* run ``pytest -m gpu tests/test_triton_ns.py`` (compiles the kernels for real,
  bf16 agreement with the reference, orthogonality error on a 4096x4096 input
  no worse than ``torch.optim.Muon``'s Newton-Schulz, tall/wide/batched
  shapes, and the exact symmetry of A under the compiler);
* benchmark against ``torch.optim.Muon`` on the 96 hidden matrices of a
  hidden-2048, 24-layer transformer (per layer: qkv 6144x2048, out 2048x2048,
  fc1 8192x2048, fc2 2048x8192), bf16, wall time of ``optimizer.step()``
  after warm-up with CUDA synchronisation; target >= 1.5x faster than
  ``torch.optim.Muon`` (``shardopt.Muon(..., ns_backend="triton")``, which
  batches same-shape matrices into one launch per kernel);
* tune the block sizes / warps / stages (``_GPU_BLOCKS``, ``_GPU_NUM_WARPS``,
  ``_GPU_NUM_STAGES``) for m = 2048 and the batch sizes above, and consider a
  grouped tile order for L2 reuse in ``_ns_update`` if profiling shows it;
* only then consider making ``ns_backend="auto"`` the Muon default.
"""
from __future__ import annotations

import torch

from ..functional.muon import DEFAULT_NS_COEFFICIENTS, ns_schedule

try:  # pragma: no branch - depends on the environment
    import triton
    import triton.language as tl

    _IMPORT_ERROR: BaseException | None = None
except ImportError as _exc:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    _IMPORT_ERROR = _exc

# (BLOCK_M, BLOCK_N, BLOCK_K).  The symmetric kernels use square BLOCK_M tiles.
_GPU_BLOCKS = (128, 128, 64)
_GPU_NUM_WARPS = 8
_GPU_NUM_STAGES = 3
# Under the interpreter every program is a Python loop iteration over numpy
# blocks, so fewer, larger programs are faster; 32 still gives partial tiles.
_INTERPRET_BLOCKS = (32, 32, 32)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """True when Triton can be imported (kernels still need a GPU or the interpreter)."""
    return triton is not None


def _require_triton() -> None:
    if triton is None:
        raise ImportError(
            "shardopt ns_backend='triton' needs the 'triton' package, which could not be "
            f"imported ({_IMPORT_ERROR!r}). Install triton (pip install triton) or use "
            "ns_backend='torch'."
        ) from _IMPORT_ERROR


if triton is not None:

    def _syrk_kernel_src(
        x_ptr, a_ptr, out_ptr,
        M, K,
        stride_xb, stride_xm, stride_xk,
        stride_ab, stride_am, stride_an,
        stride_ob, stride_om, stride_on,
        alpha, beta,
        FUSE: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out = X X^T (M x M), or alpha*A + beta*X X^T when FUSE; one lower tile per program."""
        pid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        # Linear index -> lower-triangular tile (ti, tj), pid = ti(ti+1)/2 + tj.
        # The float sqrt can be one off near perfect squares; fix it in ints.
        ti = ((tl.sqrt(pid * 8.0 + 1.0) - 1.0) * 0.5).to(tl.int32)
        ti = tl.where((ti + 1) * (ti + 2) // 2 <= pid, ti + 1, ti)
        ti = tl.where(ti * (ti + 1) // 2 > pid, ti - 1, ti)
        tj = pid - ti * (ti + 1) // 2

        rows = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        x_base = x_ptr + bid * stride_xb
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            lhs = tl.load(
                x_base + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0,
            )
            # X[cols, kk]^T, loaded already transposed (BLOCK_K x BLOCK_M)
            rhs = tl.load(
                x_base + cols[None, :] * stride_xm + kk[:, None] * stride_xk,
                mask=(cols[None, :] < M) & (kk[:, None] < K), other=0.0,
            )
            if UPCAST:
                lhs = lhs.to(tl.float32)
                rhs = rhs.to(tl.float32)
            if IEEE:
                acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
            else:
                acc = tl.dot(lhs, rhs, acc)

        in_bounds = (rows[:, None] < M) & (cols[None, :] < M)
        if FUSE:
            a = tl.load(
                a_ptr + bid * stride_ab + rows[:, None] * stride_am + cols[None, :] * stride_an,
                mask=in_bounds, other=0.0,
            ).to(tl.float32)
            acc = a * alpha + acc * beta

        o_base = out_ptr + bid * stride_ob
        # The tile itself, on and below the diagonal ...
        _store_f32(
            o_base + rows[:, None] * stride_om + cols[None, :] * stride_on,
            acc, in_bounds & (rows[:, None] >= cols[None, :]), OUT_BF16,
        )
        # ... and its transpose strictly above it, so each diagonal element is
        # written once and out[p, q] == out[q, p] holds bit for bit.
        acc_t = tl.trans(acc)
        _store_f32(
            o_base + cols[:, None] * stride_om + rows[None, :] * stride_on,
            acc_t, (cols[:, None] < M) & (rows[None, :] < M) & (cols[:, None] < rows[None, :]), OUT_BF16,
        )

    def _ns_update_kernel_src(
        b_ptr, x_ptr, out_ptr,
        M, N,
        stride_bb, stride_bm, stride_bk,
        stride_xb, stride_xm, stride_xn,
        stride_ob, stride_om, stride_on,
        alpha,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out = alpha*X + B @ X with B (M x M), X (M x N)."""
        pid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        # Row tiles vary fastest: programs running together share one column
        # panel of X (M x BLOCK_N) and all of the smaller B.
        tiles_m = tl.cdiv(M, BLOCK_M)
        pm = pid % tiles_m
        pn = pid // tiles_m
        rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        b_base = b_ptr + bid * stride_bb
        x_base = x_ptr + bid * stride_xb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, M, BLOCK_K):
            kk = k0 + ks
            lhs = tl.load(
                b_base + rows[:, None] * stride_bm + kk[None, :] * stride_bk,
                mask=(rows[:, None] < M) & (kk[None, :] < M), other=0.0,
            )
            rhs = tl.load(
                x_base + kk[:, None] * stride_xm + cols[None, :] * stride_xn,
                mask=(kk[:, None] < M) & (cols[None, :] < N), other=0.0,
            )
            if UPCAST:
                lhs = lhs.to(tl.float32)
                rhs = rhs.to(tl.float32)
            if IEEE:
                acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
            else:
                acc = tl.dot(lhs, rhs, acc)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        x = tl.load(
            x_base + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0,
        ).to(tl.float32)
        _store_f32(
            out_ptr + bid * stride_ob + rows[:, None] * stride_om + cols[None, :] * stride_on,
            x * alpha + acc, mask, OUT_BF16,
        )


_built: dict = {}
# Looked up by name from the kernels' globals; _kernels() binds it to the
# jitted bf16 round-to-nearest-even store helper of triton_ops.
_store_f32 = None


def _kernels():
    """``triton.jit`` the kernels once, at first use (see triton_ops._kernels)."""
    _require_triton()
    if not _built:
        from . import triton_ops

        # the bf16 round-to-nearest-even store helper, jitted by triton_ops
        triton_ops._kernels()
        globals()["_store_f32"] = triton_ops._store_f32
        _built["syrk"] = triton.jit(_syrk_kernel_src)
        _built["update"] = triton.jit(_ns_update_kernel_src)
        _built["interpret"] = bool(triton.knobs.runtime.interpret)
    return _built


def _dot_flags(dtype, k) -> dict:
    # The interpreter stores bf16 as uint16 and its tl.dot multiplies the bit
    # patterns (triton-lang/triton#11584, unsupported upstream), so there the
    # operands are widened to fp32 first.  Products of bf16/fp16 values are
    # exact in fp32: the same math as a GPU MMA with an fp32 accumulator.
    upcast = k["interpret"] and dtype != torch.float32
    return {"IEEE": dtype == torch.float32 or upcast, "UPCAST": upcast}


def _check_blocks(blocks):
    if len(blocks) != 3 or not all(isinstance(b, int) and b >= 16 and b & (b - 1) == 0 for b in blocks):
        raise ValueError(f"blocks must be three powers of two >= 16 (BLOCK_M, BLOCK_N, BLOCK_K), got {blocks!r}")
    return tuple(blocks)


def syrk(X: torch.Tensor, out: torch.Tensor, *, A: torch.Tensor | None = None, alpha: float = 0.0,
         beta: float = 1.0, blocks=None) -> torch.Tensor:
    """``out = X X^T`` for a batch ``X`` (B, m, k), or ``alpha*A + beta*X X^T`` when ``A`` is given.

    Computes the lower tile triangle and mirrors it; ``out`` is exactly symmetric.
    ``X``, ``A`` and ``out`` share one dtype; any strides.
    """
    k = _kernels()
    bsz, m, kdim = X.shape
    bm, _, bk = _check_blocks(blocks or (_INTERPRET_BLOCKS if k["interpret"] else _GPU_BLOCKS))
    tiles = triton.cdiv(m, bm)
    fuse = A is not None
    a = A if fuse else out  # never read when not fused
    k["syrk"][(tiles * (tiles + 1) // 2, bsz)](
        X, a, out, m, kdim,
        X.stride(0), X.stride(1), X.stride(2),
        a.stride(0), a.stride(1), a.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        float(alpha), float(beta),
        FUSE=fuse, **_dot_flags(X.dtype, k), OUT_BF16=out.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_K=bk,
        num_warps=_GPU_NUM_WARPS, num_stages=_GPU_NUM_STAGES,
    )
    return out


def ns_update(Bm: torch.Tensor, X: torch.Tensor, out: torch.Tensor, *, alpha: float, blocks=None) -> torch.Tensor:
    """``out = alpha*X + Bm @ X`` for batches ``Bm`` (B, m, m) and ``X`` (B, m, n)."""
    k = _kernels()
    bsz, m, n = X.shape
    bm, bn, bk = _check_blocks(blocks or (_INTERPRET_BLOCKS if k["interpret"] else _GPU_BLOCKS))
    k["update"][(triton.cdiv(m, bm) * triton.cdiv(n, bn), bsz)](
        Bm, X, out, m, n,
        Bm.stride(0), Bm.stride(1), Bm.stride(2),
        X.stride(0), X.stride(1), X.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        float(alpha),
        **_dot_flags(X.dtype, k), OUT_BF16=out.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=_GPU_NUM_WARPS, num_stages=_GPU_NUM_STAGES,
    )
    return out


def newton_schulz(
    G: torch.Tensor,
    *,
    steps: int = 5,
    coefficients=DEFAULT_NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
    blocks=None,
) -> torch.Tensor:
    """Drop-in for :func:`shardopt.functional.muon.newton_schulz` on Triton kernels.

    ``G`` is 2-D or a 3-D batch of same-shape matrices; the result is fp32 with
    G's shape.  ``dtype`` (fp32, bf16 or fp16) is the compute dtype of the
    operands; products accumulate in fp32.  ``blocks`` overrides the tile
    sizes ``(BLOCK_M, BLOCK_N, BLOCK_K)`` (powers of two >= 16).
    """
    if G.dim() not in (2, 3):
        raise ValueError(f"newton_schulz needs a 2-D matrix or a 3-D batch, got shape {tuple(G.shape)}")
    if dtype not in _DTYPES:
        raise ValueError(f"triton newton_schulz computes in fp32, bf16 or fp16, got dtype={dtype}")
    k = _kernels()
    if G.device.type == "cpu" and not k["interpret"]:
        raise ValueError(
            f"triton newton_schulz got a CPU tensor of shape {tuple(G.shape)}; Triton kernels run on GPUs, "
            "or on CPU only under TRITON_INTERPRET=1 set before the first call. Use ns_backend='torch' for CPU."
        )
    schedule, scale = ns_schedule(coefficients, steps)  # a triple, or "polar_express" (per iteration)
    X = G.to(dtype)
    squeeze = X.dim() == 2
    if squeeze:
        X = X.unsqueeze(0)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    # the normalisation as in the reference: fp32 norm, fp32 divide, one cast
    norm = torch.linalg.vector_norm(X.float(), dim=(-2, -1), keepdim=True)
    if scale != 1.0:
        norm = norm * scale
    X = (X.float() / (norm + eps)).to(dtype).contiguous()
    bsz, m, _ = X.shape
    if X.numel() and schedule:
        A = torch.empty((bsz, m, m), dtype=dtype, device=X.device)
        Bm = torch.empty_like(A)
        Y = torch.empty_like(X)
        for a, b, c in schedule:
            a, b, c = float(a), float(b), float(c)
            syrk(X, A, blocks=blocks)
            syrk(A, Bm, A=A, alpha=b, beta=c, blocks=blocks)
            ns_update(Bm, X, Y, alpha=a, blocks=blocks)
            X, Y = Y, X
    if transposed:
        X = X.mT
    if squeeze:
        X = X.squeeze(0)
    return X.float().contiguous()
