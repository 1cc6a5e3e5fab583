"""Muon (Jordan et al., 2024): momentum, then orthogonalize the 2-D update.

    m = mu*m + (1-mu)*g                        (torch.optim.Muon's EMA: buf.lerp_(g, 1-mu))
    u = g.lerp(m, mu)  if nesterov else m
    X = u / (||u||_F + eps), transposed so rows <= cols
    5x: A = X X^T ; B = b*A + c*A^2 ; X = a*X + B X      (a, b, c) = (3.4445, -4.7750, 2.0315)
    p = p*(1 - lr*wd) - adjusted_lr * X
    adjusted_lr = lr*sqrt(max(1, rows/cols))   ("original")
                = lr*0.2*sqrt(max(rows, cols)) ("match_rms_adamw")
"""
from __future__ import annotations

import math

import torch

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """``torch.lerp`` written out as ATen's scalar formula, with no fused multiply-add.

    ATen may contract its vector path into FMAs but not its scalar tail, so the
    plain form gives the same bits wherever a shard boundary falls.
    """
    w = torch.tensor(weight, dtype=torch.float32)  # ATen takes the weight in fp32 and forms 1 - w there
    if w < 0.5:
        return start + (end - start) * w.item()
    return end - (end - start) * (1 - w).item()


def muon_momentum(grad: torch.Tensor, buf: torch.Tensor, *, momentum: float, nesterov: bool) -> torch.Tensor:
    """Update ``buf`` in place (``buf.lerp_(g, 1 - momentum)``, the EMA torch.optim.Muon keeps) and
    return the input to Newton-Schulz (fp32): ``g.lerp(buf, momentum)`` with Nesterov, else ``buf``."""
    g32 = grad.float()
    buf.copy_(_lerp(buf, g32, 1.0 - momentum))
    if nesterov:
        return _lerp(g32, buf, momentum)
    return buf.clone()


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
    a, b, c = coefficients
    X = G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT.contiguous()  # the same memory order as a wide input: the same BLAS path, the same bits
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X = (X / (norm + eps)).to(dtype)
    mm = torch.baddbmm if X.dim() == 3 else torch.addmm
    for _ in range(steps):
        A = X @ X.mT
        B = mm(A, A, A, beta=b, alpha=c)
        X = mm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.float().contiguous()


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
    ns_dtype: torch.dtype = torch.float32,
) -> None:
    """One Muon step on full 2-D matrices, in place."""
    for p, g, buf in zip(params, grads, momentum_buffers):
        if p.dim() != 2:
            raise ValueError(f"Muon needs 2-D parameters, got shape {tuple(p.shape)}")
        u = muon_momentum(g, buf, momentum=momentum, nesterov=nesterov)
        X = newton_schulz(u, steps=ns_steps, coefficients=ns_coefficients, eps=eps, dtype=ns_dtype)
        p32 = p.float()
        if weight_decay != 0:
            p32 = p32 * (1.0 - lr * weight_decay)
        p32 = p32 - X * adjust_lr(lr, adjust_lr_fn, p.shape)
        p.copy_(p32)
