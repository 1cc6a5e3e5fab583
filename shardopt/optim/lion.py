"""Lion: sign of an interpolated momentum, decoupled weight decay, sign(0) = 0."""
from __future__ import annotations

from .. import kernels
from .base import Algorithm, ShardedOptimizer, register


@register
class LionAlgorithm(Algorithm):
    name = "lion"
    state_keys = ("momentum_buffer",)
    defaults = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}

    def validate(self, group, describe):
        super().validate(group, describe)
        self.check_betas(group, describe)

    def step(self, opt, group, idx, params, grads, states, step):
        beta1, beta2 = group["betas"]
        kernels.lion_step(
            params, grads, states["momentum_buffer"], lr=float(group["lr"]), beta1=beta1, beta2=beta2,
            weight_decay=group["weight_decay"], backend=opt.backend,
        )


class Lion(ShardedOptimizer):
    """Lion (Chen et al., 2023) with sharded state and fused kernels.

    Lion wants a 3-10x smaller lr and a 3-10x larger weight decay than AdamW.
    See :class:`ShardedOptimizer` for ``sharding``, ``backend`` and the rest.
    """

    algorithm = "lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, grad_clip_norm=None,
                 grad_clip_value=None, backend="auto", **kwargs):
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay),
            grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value, backend=backend, **kwargs,
        )
