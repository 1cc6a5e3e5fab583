"""Kernels: how fast one elementwise optimizer step runs on one rank.

Every backend implements the same two entry points over *lists* of tensors
(one call updates many tensors, the multi-tensor-apply shape):

``lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay)``
``adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step)``

* ``params``: contiguous fp32 or bf16 tensors, updated in place (math in fp32,
  stored with round-to-nearest-even for bf16).
* ``grads``: same shapes, any float dtype (fp32/bf16/fp16); read only.
* state (``exp_avgs`` / ``exp_avg_sqs``): fp32 tensors of the same shapes,
  updated in place.
* ``step`` is the (already incremented, >= 1) step count shared by the call.

The per-element formulas are written out in :mod:`shardopt.kernels.torch_ops`
(the ``torch`` backend); every backend follows the same order of operations so
results agree to the last bit for Lion and to ~1 ulp for AdamW.

Backends: ``torch`` (foreach reference), ``cpu`` (C++/OpenMP extension built at
first use), ``triton`` (runs on CPU under ``TRITON_INTERPRET=1``), ``cuda``.
``auto`` picks the fastest one available for the tensors' device.
"""
from __future__ import annotations

import warnings

import torch

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")

_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}; valid backends are {', '.join(BACKENDS)}"
        )
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` (and unavailable explicit choices) to a concrete backend."""
    validate_backend(backend)
    if backend == "auto":
        if device.type == "cpu":
            from . import cpu

            if cpu.available():
                return "cpu"
            _warn_once(
                "cpu-fallback",
                "shardopt: the C++ CPU kernels could not be built "
                f"({cpu.build_error()}); using the slower torch backend. "
                "Install a C++ compiler and ninja to enable them.",
            )
            return "torch"
        if device.type == "cuda":
            return _cuda_or_fallback("auto")
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        from . import cpu

        if not cpu.available():
            _warn_once(
                "cpu-fallback",
                "shardopt: backend='cpu' requested but the C++ extension could not be "
                f"built ({cpu.build_error()}); falling back to backend='torch'.",
            )
            return "torch"
        return "cpu"
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        return _cuda_or_fallback("cuda")
    return backend


def _cuda_or_fallback(requested: str) -> str:
    """``cuda`` if its extension loads, else ``triton`` if importable, else ``torch``
    (with one warning naming the reason)."""
    from . import cuda

    if cuda.available():
        return "cuda"
    from . import triton_ops

    fallback = "triton" if triton_ops.available() else "torch"
    _warn_once(
        "cuda-fallback",
        f"shardopt: backend={requested!r} on a CUDA device but the CUDA kernels could not be "
        f"built ({cuda.build_error()}); using backend={fallback!r}.",
    )
    return fallback


def _module(backend: str):
    if backend == "torch":
        from . import torch_ops as m
    elif backend == "cpu":
        from . import cpu as m
    elif backend == "triton":
        from . import triton_ops as m
    elif backend == "cuda":
        from . import cuda as m
    else:  # pragma: no cover - resolve_backend never returns others
        raise ValueError(backend)
    return m


def _nonempty(*lists):
    keep = [i for i, t in enumerate(lists[0]) if t.numel() > 0]
    if len(keep) == len(lists[0]):
        return lists
    return tuple([lst[i] for i in keep] for lst in lists)


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, backend="auto"):
    if not params:
        return
    params, grads, exp_avgs = _nonempty(params, grads, exp_avgs)
    if not params:
        return
    b = resolve_backend(backend, params[0].device)
    _module(b).lion_step(
        params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay
    )


def adamw_step(
    params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step, backend="auto"
):
    if not params:
        return
    params, grads, exp_avgs, exp_avg_sqs = _nonempty(params, grads, exp_avgs, exp_avg_sqs)
    if not params:
        return
    b = resolve_backend(backend, params[0].device)
    _module(b).adamw_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
    )
