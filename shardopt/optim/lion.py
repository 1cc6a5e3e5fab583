"""Lion: sign of an interpolated momentum, decoupled weight decay, sign(0) = 0."""
from __future__ import annotations

from .. import kernels
from . import _checks, _steps
from .base import Algorithm, ShardedOptimizer, register


@register
class LionAlgorithm(Algorithm):
    name = "lion"
    defaults = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False}

    def state_keys(self, group):
        return ("momentum_buffer",)

    def validate(self, group, where):
        super().validate(group, where)
        _checks.betas(group.get("betas"), where)
        _checks.flag(group.get("maximize", False), "maximize", where)

    def step(self, opt, group, idx, params, grads, states, steps, gt):
        beta1, beta2 = (float(b) for b in group["betas"])
        bufs = states["momentum_buffer"]
        # Lion has no bias correction; only low-precision state needs the step (its rounding's salt),
        # one kernel call per distinct count (usually one)
        calls = ({None: range(len(params))} if group.get("state_dtype", "fp32") == "fp32"
                 else _steps.by_step(range(len(params)), steps))
        for t, ks in calls.items():
            kernels.lion_step(
                [params[k] for k in ks], [grads[k] for k in ks], [bufs[k] for k in ks], lr=float(group["lr"]),
                beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], maximize=group.get("maximize", False),
                clip_value=gt.clip_value, grad_scale=gt.grad_scale, found_inf=gt.found_inf, state_step=t,
                backend=opt.backend,
            )


class Lion(ShardedOptimizer):
    """Lion (Chen et al., 2023) with sharded state and fused kernels.

    Lion wants a 3-10x smaller lr and a 3-10x larger weight decay than AdamW.
    The positional arguments are those of the reference implementations;
    shardopt's own options (``sharding``, ``backend``, ``nonfinite``,
    ``grad_clip_norm``, ... see :class:`ShardedOptimizer`) are keyword-only.
    """

    algorithm = "lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, **kwargs):
        super().__init__(
            params, dict(lr=lr, betas=_tuple(betas), weight_decay=weight_decay, maximize=maximize), **kwargs,
        )


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
