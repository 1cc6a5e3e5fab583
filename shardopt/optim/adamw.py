"""AdamW: the same function as torch.optim.AdamW, with sharded state and fused kernels."""
from __future__ import annotations

from .. import kernels
from . import _checks, _steps
from .base import Algorithm, ShardedOptimizer, register
from .lion import _tuple


@register
class AdamWAlgorithm(Algorithm):
    name = "adamw"
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False,
                "maximize": False}

    def state_keys(self, group):
        if group.get("amsgrad", False):
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def validate(self, group, where):
        super().validate(group, where)
        _checks.betas(group.get("betas"), where)
        _checks.in_range(group.get("eps"), "eps", where, lo=0.0, lo_open=True)
        _checks.flag(group.get("amsgrad", False), "amsgrad", where)
        _checks.flag(group.get("maximize", False), "maximize", where)

    def step(self, opt, group, idx, params, grads, states, steps, gt):
        beta1, beta2 = (float(b) for b in group["betas"])
        vmax = states.get("max_exp_avg_sq")
        # one kernel call per distinct step count (usually one): bias correction is per parameter
        for t, ks in _steps.by_step(range(len(params)), steps).items():
            kernels.adamw_step(
                [params[k] for k in ks], [grads[k] for k in ks], [states["exp_avg"][k] for k in ks],
                [states["exp_avg_sq"][k] for k in ks], [vmax[k] for k in ks] if vmax is not None else None,
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], step=t, maximize=group.get("maximize", False),
                clip_value=gt.clip_value, grad_scale=gt.grad_scale, found_inf=gt.found_inf, backend=opt.backend,
            )


class AdamW(ShardedOptimizer):
    """AdamW (decoupled weight decay, bias correction), matching ``torch.optim.AdamW``.

    The positional arguments are torch's, in torch's order (``params, lr,
    betas, eps, weight_decay, amsgrad``); ``maximize`` and shardopt's own
    options are keyword-only. ``foreach`` and ``fused`` are accepted so that
    torch code keeps working: shardopt always runs its fused kernels (or the
    foreach reference with ``backend="torch"``). ``capturable`` and
    ``differentiable`` are not supported.
    """

    algorithm = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, fused=None, capturable=False, differentiable=False, **kwargs):
        for name, v in (("capturable", capturable), ("differentiable", differentiable)):
            if v is not False:
                raise ValueError(f"shardopt.AdamW does not support {name}={v!r}; use torch.optim.AdamW for that")
        for name, v in (("foreach", foreach), ("fused", fused)):
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"invalid {name} {v!r} for the optimizer: use None, True or False")
        if fused and kwargs.get("backend") == "torch":
            raise ValueError("fused=True contradicts backend='torch' (the unfused foreach reference)")
        super().__init__(
            params, dict(lr=lr, betas=_tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize),
            **kwargs,
        )
