"""Muon (Jordan et al., 2024): momentum, then orthogonalize the 2-D update.

    m = mu*m + (1-mu)*g                        (torch.optim.Muon's EMA: buf.lerp_(g, 1-mu))
    u = g.lerp(m, mu)  if nesterov else m
    X = u / (||u||_F + eps), transposed so rows <= cols
    5x: A = X X^T ; B = b*A + c*A^2 ; X = a*X + B X      (a, b, c) = (3.4445, -4.7750, 2.0315)
    p = p*(1 - lr*wd) - adjusted_lr * X
    adjusted_lr = lr*sqrt(max(1, rows/cols))   ("original")
                = lr*0.2*sqrt(max(rows, cols)) ("match_rms_adamw")

``ns_coefficients="polar_express"`` replaces the fixed quintic by the Polar
Express schedule (Amsel, Persson, Musco, Gower, 2025, arXiv 2505.16932,
Algorithm 1): a different, optimal quintic at each iteration, each but the last
divided by a safety factor 1.01 (a/1.01, b/1.01^3, c/1.01^5), and X normalised
by 1.01*||X||_F + eps; past the 8 published iterations the last repeats.

``ns_split`` orthogonalizes blocks of a matrix on their own (the q, k, v row
blocks of a fused QKV, or one block per head): each block is normalised,
orthogonalized and lr-adjusted as if it were a matrix by itself.
"""
from __future__ import annotations

import math

import torch

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express, degree 5 (Amsel et al. 2025, arXiv 2505.16932, Algorithm 1): the published
# per-iteration coefficients, before the safety factor
POLAR_EXPRESS_COEFFICIENTS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),  # the iteration's limit: later steps repeat it
)
POLAR_EXPRESS_SAFETY = 1.01
NS_COEFFICIENT_NAMES = ("polar_express",)


def ns_schedule(coefficients, steps: int) -> tuple[list, float]:
    """``(per-iteration (a, b, c), normalisation factor)`` for ``ns_coefficients``.

    A triple is the fixed quintic of every iteration (factor 1: ``X = G / (||G|| + eps)``).
    ``"polar_express"`` is the paper's schedule with its bf16 safety margins: every polynomial
    but the last divided by 1.01 (a/1.01, b/1.01^3, c/1.01^5), the norm scaled by 1.01."""
    if isinstance(coefficients, str):
        if coefficients != "polar_express":
            raise ValueError(f"unknown ns_coefficients {coefficients!r}; use three numbers (a, b, c) or "
                             "'polar_express'")
        f = POLAR_EXPRESS_SAFETY
        safe = [(a / f, b / f ** 3, c / f ** 5) for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:-1]]
        safe.append(POLAR_EXPRESS_COEFFICIENTS[-1])
        return safe[:steps] + [safe[-1]] * max(0, steps - len(safe)), f
    a, b, c = coefficients
    return [(a, b, c)] * steps, 1.0


def split_blocks(size: int, ns_split) -> list[tuple[int, int]]:
    """``(start, length)`` of the blocks ``ns_split`` cuts a dimension of ``size`` into:
    None is one block, an int k is k equal blocks, a sequence gives the block lengths."""
    if ns_split is None:
        return [(0, size)]
    if isinstance(ns_split, int):
        if ns_split < 1 or size % ns_split:
            raise ValueError(f"ns_split={ns_split} does not divide a dimension of {size} into equal blocks")
        n = size // ns_split
        return [(k * n, n) for k in range(ns_split)]
    sizes = [int(x) for x in ns_split]
    if sum(sizes) != size or any(x < 1 for x in sizes):
        raise ValueError(f"ns_split={tuple(sizes)} does not add up to a dimension of {size}")
    starts = [0]
    for x in sizes[:-1]:
        starts.append(starts[-1] + x)
    return list(zip(starts, sizes))


def _lerp_weights(weight: float) -> tuple[bool, float]:
    """ATen's lerp takes the weight in fp32 and forms ``1 - w`` there: (small weight?, the multiplier).

    The momentum is written as ATen's scalar lerp formula with no fused multiply-add (ATen may
    contract its vector path into FMAs but not its scalar tail), so it gives the same bits wherever
    a shard boundary falls."""
    w = torch.tensor(weight, dtype=torch.float32)
    return (True, w.item()) if w < 0.5 else (False, (1 - w).item())


def muon_momentum(grad: torch.Tensor, buf: torch.Tensor, *, momentum: float, nesterov: bool) -> torch.Tensor:
    """Update ``buf`` in place (``buf.lerp_(g, 1 - momentum)``, the EMA torch.optim.Muon keeps) and
    return the input to Newton-Schulz (fp32): ``g.lerp(buf, momentum)`` with Nesterov, else ``buf``.

    The same operations as :func:`_lerp`, in place with one temporary (the same bits)."""
    g32 = grad.float()
    small, c = _lerp_weights(1.0 - momentum)
    d = torch.sub(g32, buf)
    if small:  # buf + (g - buf) * w
        buf.add_(d.mul_(c))
    else:  # g - (g - buf) * (1 - w)
        torch.sub(g32, d.mul_(c), out=buf)
    if not nesterov:
        return buf.clone()
    small, c = _lerp_weights(momentum)
    torch.sub(buf, g32, out=d)
    if small:  # g + (buf - g) * w
        return torch.add(g32, d.mul_(c), out=d)
    return torch.sub(buf, d.mul_(c), out=d)  # buf - (buf - g) * (1 - w)


def newton_schulz(
    G: torch.Tensor,
    *,
    steps: int = 5,
    coefficients=DEFAULT_NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Approximate the orthogonal polar factor of G (2-D, or a batch of same-shape 3-D).

    The normalisation is fp32; the iterations run in ``dtype`` with
    ``addmm``/``baddbmm``, so ``b*A + c*A@A`` and ``a*X + B@X`` each round once
    (accumulating in fp32), as torch.optim.Muon computes them. Returns fp32
    with G's shape.
    """
    if G.dim() not in (2, 3):
        raise ValueError(f"newton_schulz needs a 2-D matrix or a 3-D batch, got shape {tuple(G.shape)}")
    schedule, scale = ns_schedule(coefficients, steps)
    X = G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT.contiguous()  # the same memory order as a wide input: the same BLAS path, the same bits
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    if scale != 1.0:
        norm = norm * scale
    X = (X / (norm + eps)).to(dtype)
    mm = torch.baddbmm if X.dim() == 3 else torch.addmm
    for a, b, c in schedule:
        A = X @ X.mT
        B = mm(A, A, A, beta=b, alpha=c)
        X = mm(X, B, X, beta=a)
    if transposed:  # back to G's shape: one pass that widens and lays out the result
        return torch.empty(G.shape, dtype=torch.float32, device=X.device).copy_(X.mT)
    return X.float().contiguous()


def newton_schulz_split(G: torch.Tensor, ns, *, ns_split=None, ns_split_dim: int = 0, adjust_lr_fn=None):
    """Orthogonalize each ``ns_split`` block of G (2-D, or a 3-D batch) on its own with ``ns``
    (a Newton-Schulz function of a 2-D/3-D tensor), each block scaled by the ratio of its own lr
    adjustment to the whole matrix's (the caller applies the whole matrix's): the update of
    every block is then what it would be as a matrix by itself. Returns fp32 with G's shape."""
    if ns_split is None:
        return ns(G)
    d = G.dim() - 2 + ns_split_dim
    full = (G.shape[-2], G.shape[-1])
    blocks = split_blocks(G.shape[d], ns_split)
    out = torch.empty(G.shape, dtype=torch.float32, device=G.device)
    by_len: dict = {}
    for start, n in blocks:
        by_len.setdefault(n, []).append(start)
    for n, starts in by_len.items():
        parts = [G.narrow(d, s, n) for s in starts]
        batch = torch.stack(parts, dim=0).reshape(-1, *parts[0].shape[-2:])
        res = ns(batch).view(len(starts), *parts[0].shape)
        shape = tuple(parts[0].shape[-2:])
        ratio = adjust_lr(1.0, adjust_lr_fn, shape) / adjust_lr(1.0, adjust_lr_fn, full)
        if ratio != 1.0:
            res = res * ratio
        for k, s in enumerate(starts):
            out.narrow(d, s, n).copy_(res[k])
    return out


def ns_flops_split(shape, steps: int = 5, ns_split=None, ns_split_dim: int = 0) -> int:
    """Newton-Schulz FLOPs of one matrix under ``ns_split`` (the sum over its blocks)."""
    if ns_split is None:
        return ns_flops(shape, steps)
    other = shape[1 - ns_split_dim]
    total = 0
    for _, n in split_blocks(shape[ns_split_dim], ns_split):
        total += ns_flops((n, other) if ns_split_dim == 0 else (other, n), steps)
    return total


def adjust_lr(lr: float, adjust_lr_fn, shape) -> float:
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}; use None, 'original' or 'match_rms_adamw'")


def ns_flops(shape, steps: int = 5) -> int:
    """Matmul FLOPs of Newton-Schulz on one matrix (used to balance owners)."""
    m, n = sorted((int(shape[0]), int(shape[1])))
    # X X^T: 2m^2n, A@A: 2m^3, B@X: 2m^2n per iteration
    return steps * (4 * m * m * n + 2 * m * m * m)


def muon(
    params, grads, momentum_buffers, *, lr: float, momentum: float, nesterov: bool, weight_decay: float,
    ns_steps: int = 5, ns_coefficients=DEFAULT_NS_COEFFICIENTS, eps: float = 1e-7, adjust_lr_fn=None,
    ns_dtype: torch.dtype = torch.float32, ns_split=None, ns_split_dim: int = 0,
) -> None:
    """One Muon step on full 2-D matrices, in place."""
    def ns(x):
        return newton_schulz(x, steps=ns_steps, coefficients=ns_coefficients, eps=eps, dtype=ns_dtype)

    for p, g, buf in zip(params, grads, momentum_buffers):
        if p.dim() != 2:
            raise ValueError(f"Muon needs 2-D parameters, got shape {tuple(p.shape)}")
        u = muon_momentum(g, buf, momentum=momentum, nesterov=nesterov)
        X = newton_schulz_split(u, ns, ns_split=ns_split, ns_split_dim=ns_split_dim, adjust_lr_fn=adjust_lr_fn)
        p32 = p.float()
        if weight_decay != 0:
            p32 = p32 * (1.0 - lr * weight_decay)
        p32 = p32 - X * adjust_lr(lr, adjust_lr_fn, p.shape)
        p.copy_(p32)
