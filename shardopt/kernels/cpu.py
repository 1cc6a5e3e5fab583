"""The ``cpu`` backend: fused multi-tensor C++/OpenMP kernels.

The extension comes from, in order:

1. ``shardopt._C_cpu``, prebuilt by ``SHARDOPT_BUILD_OPS=1 pip install .``;
2. a JIT build of ``csrc/cpu/fused_optim.cpp`` with
   :func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja),
   cached by torch under ``TORCH_EXTENSIONS_DIR`` so only the first use pays.
   The build is named by a hash of the source, the flags and torch's version
   (``shardopt_cpu_ops_<10 hex>``, :func:`build_name`), so checkouts with
   different kernels keep separate builds.

The kernels take every option of the step calls themselves (``maximize``,
``clip_value``, ``grad_scale``, ``found_inf``, amsgrad), bf16 optimizer state
(``state_dtype="bf16"``: loaded exactly, the same fp32 math, stored with the
value-keyed stochastic rounding of :mod:`.state_precision`, bit for bit; the
salt is ``state_step``, one int for the call or one per tensor) and run the
fused gradient pass :func:`grad_stats`, so the optimizers' default path
(non-finite check, clipping) never falls back to the ``torch`` backend. Dense
non-contiguous tensors are still made contiguous by the dispatcher.

:func:`stream_update` and :func:`stream_read` are the memory-roofline kernels
of ``shardopt bench`` (threaded like the steps).

Nothing here raises when the extension cannot be had: :func:`available`
returns ``False`` and :func:`build_error` says why, and
:func:`shardopt.kernels.resolve_backend` warns once and uses the ``torch``
backend.  ``SHARDOPT_DISABLE_CPP=1`` forces that fallback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from . import _ext
from ._ext import ExtensionLoader, is_stale

__all__ = ["available", "build_error", "build_name", "load", "needs_build", "source_path", "lion_step",
           "adamw_step", "grad_stats", "stream_update", "stream_read"]

# what the compiled kernels take themselves; anything else is served by the torch backend
FEATURES: frozenset = frozenset({"maximize", "clip_value", "grad_scale", "found_inf", "amsgrad", "grad_stats",
                                 "state_bf16"})
PARAM_DTYPES = (torch.float32, torch.bfloat16)
# what grad_stats takes (any dense layout; fp64 squared and summed in fp64)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

EXT_NAME = "shardopt_cpu_ops"
# -ffp-contract=off: no FMA contraction (bitwise partition invariance).
# -fno-math-errno: lets std::sqrt vectorize (changes no result; not fast-math).
EXTRA_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-march=native"]
EXTRA_LDFLAGS = ["-fopenmp"]
# Second try when the first build fails (e.g. a compiler without OpenMP or
# -march=native, like Apple clang): same kernels, serial, baseline ISA.
PORTABLE_NAME = EXT_NAME + "_portable"
PORTABLE_CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]

def source_path() -> Path | None:
    """``fused_optim.cpp`` in the source tree (editable install) or in the wheel."""
    pkg = Path(__file__).resolve().parent.parent  # .../shardopt
    for cand in (
        pkg.parent / "csrc" / "cpu" / "fused_optim.cpp",
        pkg / "_csrc" / "cpu" / "fused_optim.cpp",
    ):
        if cand.is_file():
            return cand
    return None


def build_name(name: str = EXT_NAME, cflags=EXTRA_CFLAGS, ldflags=EXTRA_LDFLAGS) -> str:
    """The JIT build's name for this source and these flags (see :func:`shardopt.kernels._ext.build_name`)."""
    src = source_path()
    return _ext.build_name(name, [src] if src is not None else [], [*cflags, "|", *ldflags])


def _jit_build():
    src = source_path()
    if src is None:
        raise RuntimeError(
            "C++ source csrc/cpu/fused_optim.cpp not found next to the shardopt package"
        )
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    verbose = os.environ.get("SHARDOPT_VERBOSE_BUILD", "0") == "1"
    attempts = [(EXT_NAME, EXTRA_CFLAGS, EXTRA_LDFLAGS), (PORTABLE_NAME, PORTABLE_CFLAGS, [])]
    first_error = None
    for base, cflags, ldflags in attempts:
        name = build_name(base, cflags, ldflags)
        if is_stale(name, [src]):
            print("shardopt: building C++ CPU kernels (first use, about a minute)...", file=sys.stderr, flush=True)
        try:
            return cpp_extension.load(
                name=name,
                sources=[str(src)],
                # copies: torch appends its own flags to these lists
                extra_cflags=list(cflags),
                extra_ldflags=list(ldflags),
                verbose=verbose,
            )
        except Exception as exc:
            if first_error is None:
                first_error = exc
    raise first_error


def needs_build() -> bool:
    """Whether loading the kernels now would compile them (a JIT build that is missing or stale).

    False once loaded, when the prebuilt module imports, or when the kernels are disabled.
    """
    import importlib.util

    from ._ext import env_flag

    if _LOADER._tried or env_flag("SHARDOPT_DISABLE_CPP"):
        return False
    try:
        if importlib.util.find_spec("shardopt._C_cpu") is not None:
            return False
    except (ImportError, ValueError):
        pass
    src = source_path()
    return src is not None and is_stale(build_name(), [src])


_LOADER = ExtensionLoader("C++ CPU", "shardopt._C_cpu", "SHARDOPT_DISABLE_CPP", _jit_build)
available = _LOADER.available
build_error = _LOADER.build_error
load = _LOADER.load


def _state_steps(state_step, n):
    """The per-tensor salts of bf16 state: ``None``, one int for the call, or one per tensor
    (as :func:`shardopt.kernels.state_precision.store` takes them)."""
    if state_step is None:
        return None
    if isinstance(state_step, (list, tuple)):
        if len(state_step) != n:
            raise ValueError(f"state_step has {len(state_step)} entries for {n} tensors")
        return [int(s) for s in state_step]
    return [int(state_step)] * n


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize=False, clip_value=None,
              grad_scale=None, found_inf=None, state_step=None):
    """bf16 ``exp_avgs`` need ``state_step`` (the parameters' step count, the rounding's salt)."""
    params = list(params)
    _LOADER.load().lion_step(
        params, list(grads), list(exp_avgs), float(lr), float(beta1), float(beta2), float(weight_decay),
        bool(maximize), None if clip_value is None else float(clip_value), grad_scale, found_inf,
        _state_steps(state_step, len(params)),
    )


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, lr, beta1, beta2, eps,
               weight_decay, step, maximize=False, clip_value=None, grad_scale=None, found_inf=None,
               state_step=None):
    """``max_exp_avg_sqs`` given means amsgrad (as in :func:`shardopt.kernels.torch_ops.adamw_step`);
    bf16 state rounds with ``state_step`` as its salt (default: ``step``)."""
    params = list(params)
    _LOADER.load().adamw_step(
        params, list(grads), list(exp_avgs), list(exp_avg_sqs), float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), int(step),
        None if max_exp_avg_sqs is None else list(max_exp_avg_sqs), bool(maximize),
        None if clip_value is None else float(clip_value), grad_scale, found_inf,
        _state_steps(state_step, len(params)),
    )


def grad_stats(grads, *, clip_value=None) -> torch.Tensor:
    """The fused gradient pass: float64 ``[sum of squares, bad]`` as :func:`torch_ops.grad_stats` defines it.

    One multi-threaded read pass; squares in fp32 over small blocks, block sums
    in fp64 (within ~1e-7 relative of the fp64 reference; a block with an
    inf/NaN or an fp32 overflow is recomputed in fp64). Gradients may be fp32,
    bf16, fp16 or fp64; any dense layout is read as stored, others through a
    contiguous copy. All checks are in the extension (no per-tensor Python work).
    """
    return _LOADER.load().grad_stats(list(grads), None if clip_value is None else float(clip_value))


def stream_update(a: torch.Tensor, b: torch.Tensor, s: float) -> None:
    """``a += s*b`` in place (fp32, contiguous), threaded like the steps: 12 bytes per element."""
    _LOADER.load().stream_update(a, b, float(s))


def stream_read(a: torch.Tensor) -> float:
    """The sum of ``a`` (fp32, contiguous) in fp32 lanes, threaded like the steps: 4 bytes per element read."""
    return _LOADER.load().stream_read(a)
