"""AdamW: the same function as torch.optim.AdamW, with sharded state and fused kernels."""
from __future__ import annotations

from .. import kernels
from .base import Algorithm, ShardedOptimizer, register


@register
class AdamWAlgorithm(Algorithm):
    name = "adamw"
    state_keys = ("exp_avg", "exp_avg_sq")
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}

    def validate(self, group, describe):
        super().validate(group, describe)
        self.check_betas(group, describe)
        if not group.get("eps", 0) > 0:
            raise ValueError(f"invalid eps {group.get('eps')!r} for the group of {describe(0)}: it must be > 0")

    def step(self, opt, group, idx, params, grads, states, step):
        beta1, beta2 = group["betas"]
        kernels.adamw_step(
            params, grads, states["exp_avg"], states["exp_avg_sq"], lr=float(group["lr"]), beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], step=step, backend=opt.backend,
        )


class AdamW(ShardedOptimizer):
    """AdamW (decoupled weight decay, bias correction), matching ``torch.optim.AdamW``."""

    algorithm = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, backend="auto", **kwargs):
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), backend=backend, **kwargs
        )
