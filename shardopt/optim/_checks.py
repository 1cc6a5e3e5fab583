"""Validation of hyperparameters and optimizer options, with errors that say where and what to do.

torch.optim checks ``lr >= 0`` and the like, which lets ``nan`` through
(``nan < 0`` is False) and gives raw ``TypeError`` s for strings. Here every
value is checked for type and finiteness first; each error names the param
group (its index, algorithm and first parameter) and the remedy.
"""
from __future__ import annotations

import math
from numbers import Real

import torch


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def scalar(v, what: str, where: str, *, allow_tensor: bool = False) -> float:
    """``v`` as a finite float, or a ValueError naming ``what`` and ``where``."""
    if allow_tensor and isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"invalid {what} for {where}: a Tensor {what} must have exactly 1 element, "
                             f"got shape {tuple(v.shape)}")
        if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"invalid {what} for {where}: a Tensor {what} must be a real number, got {v.dtype}")
        x = float(v.detach().cpu())
    elif _is_number(v):
        x = float(v)
    else:
        raise ValueError(f"invalid {what} {v!r} for {where}: it must be a number"
                         + (" (or a 1-element Tensor)" if allow_tensor else "") + f", got {type(v).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"invalid {what} {v!r} for {where}: it must be finite")
    return x


def in_range(v, what: str, where: str, *, lo=None, lo_open=False, hi=None, hi_open=False, allow_tensor=False,
             hint: str = "") -> float:
    x = scalar(v, what, where, allow_tensor=allow_tensor)
    bad = (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and (x >= hi if hi_open else x > hi))
    if bad:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        rng = f"in {lo_s}, {hi_s}" if lo is not None and hi is not None else (
            f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else f"{'<' if hi_open else '<='} {hi:g}")
        raise ValueError(f"invalid {what} {v!r} for {where}: it must be {rng}" + (f"; {hint}" if hint else ""))
    return x


def flag(v, what: str, where: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"invalid {what} {v!r} for {where}: it must be True or False")
    return v


def integer(v, what: str, where: str, *, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"invalid {what} {v!r} for {where}: it must be an int in [{lo}, {hi}]")
    return v


def choice(v, what: str, where: str, valid, word: str = "unknown") -> None:
    if not any(v is c or (type(v) is type(c) and v == c) for c in valid):
        raise ValueError(f"{word} {what} {v!r} for {where}; valid: {', '.join(repr(c) for c in valid)}")


def betas(v, where: str, name: str = "betas") -> None:
    if not (isinstance(v, (tuple, list)) and len(v) == 2):
        raise ValueError(f"invalid {name} {v!r} for {where}: it must be a pair (beta1, beta2)")
    for k, b in enumerate(v):
        in_range(b, f"{name}[{k}]", where, lo=0.0, hi=1.0, hi_open=True, allow_tensor=True)


def float_dtype(v, what: str, where: str) -> None:
    if v is not None and not (isinstance(v, torch.dtype) and v.is_floating_point):
        raise ValueError(f"invalid {what} {v!r} for {where}: use None or a floating torch.dtype such as torch.bfloat16")


def lr_and_decay(group: dict, where: str) -> None:
    """The two hyperparameters every algorithm has."""
    in_range(group.get("lr"), "learning rate", where, lo=0.0, allow_tensor=True)
    in_range(group.get("weight_decay", 0.0), "weight_decay", where, lo=0.0)


def state_dtype(v, where: str) -> None:
    """A state precision of :mod:`shardopt.kernels.state_precision`: a valid name, and one that is implemented."""
    from ..kernels import state_precision

    choice(v, "state_dtype", where, state_precision.STATE_DTYPES)
    fmt = state_precision.FORMATS[v]
    if not fmt.available:
        raise NotImplementedError(
            f"state_dtype={v!r} for {where} is not available yet ({fmt.doc}); "
            f"use one of {', '.join(repr(k) for k, f in state_precision.FORMATS.items() if f.available)}"
        )


def optimizer_options(*, sharding, nonfinite, grad_clip_norm, grad_clip_value, master_weights, reduce_gradients,
                      comm_dtype, nonfinite_choices, overlap_comm=True, overlap_param_gather=False) -> None:
    where = "the optimizer"
    choice(sharding, "sharding", where, ("auto", "zero1", "fsdp2", "none"))
    choice(nonfinite, "nonfinite", where, nonfinite_choices)
    for name, v in (("grad_clip_norm", grad_clip_norm), ("grad_clip_value", grad_clip_value)):
        if v is not None:
            in_range(v, name, where, lo=0.0, lo_open=True, hint="use None to turn it off")
    flag(master_weights, "master_weights", where)
    flag(reduce_gradients, "reduce_gradients", where)
    float_dtype(comm_dtype, "comm_dtype", where)
    flag(overlap_comm, "overlap_comm", where)
    flag(overlap_param_gather, "overlap_param_gather", where)
