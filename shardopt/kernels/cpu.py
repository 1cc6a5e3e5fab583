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
salt is ``state_step``, one int for the call or one per tensor), int8
optimizer state (``state_dtype="int8"``, see below) and run the fused gradient
pass :func:`grad_stats`, so the optimizers' default path (non-finite check,
clipping) never falls back to the ``torch`` backend. Dense non-contiguous
tensors are still made contiguous by the dispatcher.

int8 state arrives as :class:`~.state_precision.Q8` objects (codes + one fp32
scale per block of 256), possibly in the same lists as plain fp32 (or bf16)
state of the parameters too small to quantize: :func:`lion_step` and
:func:`adamw_step` send the quantized parameters to the int8 kernels
(``lion_step_int8`` / ``adamw_step_int8``) and the others to the plain ones.
Per block the kernels dequantize the old codes, run the same fp32 math as the
fp32-state loops and requantize with the new block absmax (max square root)
and the value-keyed stochastic rounding of :func:`.state_precision.quantize`,
bit for bit. Their square roots (AdamW's denominator, the ``"sqrt"`` mapping)
are the correctly rounded IEEE ones the format is defined with; torch's own
CPU sqrt can be 1 ulp off (MKL builds), so against the ``torch`` backend there
AdamW's params agree within its usual fp32 tolerance and its ``"sqrt"`` codes
within one code. Lion's momenta must use the ``"signed"`` mapping, AdamW's
``exp_avg`` ``"signed"`` and its second moments ``"sqrt"`` (what the
optimizers store); a parameter whose state mixes formats otherwise is updated
by the ``torch`` backend.

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
from .state_precision import Q8

__all__ = ["available", "build_error", "build_name", "load", "needs_build", "source_path", "lion_step",
           "adamw_step", "grad_stats", "stream_update", "stream_read"]

# what the compiled kernels take themselves; anything else is served by the torch backend
FEATURES: frozenset = frozenset({"maximize", "clip_value", "grad_scale", "found_inf", "amsgrad", "grad_stats",
                                 "state_bf16", "state_int8", "state_int8_block"})
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
    """The per-tensor salts of low-precision state: ``None``, one int for the call, or one per tensor
    (as :func:`shardopt.kernels.state_precision.store` takes them)."""
    if state_step is None:
        return None
    if isinstance(state_step, (list, tuple)):
        if len(state_step) != n:
            raise ValueError(f"state_step has {len(state_step)} entries for {n} tensors")
        return [int(s) for s in state_step]
    return [int(state_step)] * n


def _route(state_lists, kinds):
    """Split a call's parameters by their state: ``(int8, plain, other)`` index lists. ``int8``: every state
    of the parameter is a :class:`Q8` of the mapping ``kinds`` names for its list; ``plain``: none is a
    Q8; ``other`` (a mix, or another mapping): left to the ``torch`` backend. ``None`` when no state is a
    Q8 (the usual call, unchanged)."""
    if not any(isinstance(t, Q8) for lst in state_lists for t in lst):
        return None
    q, plain, other = [], [], []
    for k, ts in enumerate(zip(*state_lists)):
        n_q = sum(isinstance(t, Q8) for t in ts)
        if n_q == 0:
            plain.append(k)
        elif n_q == len(ts) and all(t.kind == kind for t, kind in zip(ts, kinds)):
            q.append(k)
        else:
            other.append(k)
    return q, plain, other


def _pick(lst, idx):
    return None if lst is None else [lst[k] for k in idx]


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize=False, clip_value=None,
              grad_scale=None, found_inf=None, state_step=None):
    """bf16 and int8 (:class:`Q8`) ``exp_avgs`` need ``state_step`` (the parameters' step count, the
    rounding's salt)."""
    params, grads, exp_avgs = list(params), list(grads), list(exp_avgs)
    steps = _state_steps(state_step, len(params))
    hp = (float(lr), float(beta1), float(beta2), float(weight_decay))
    opts = (bool(maximize), None if clip_value is None else float(clip_value), grad_scale, found_inf)
    ext = _LOADER.load()
    route = _route([exp_avgs], ("signed",))
    if route is None:
        ext.lion_step(params, grads, exp_avgs, *hp, *opts, steps)
        return
    q, plain, other = route
    if steps is None:
        raise ValueError("int8 optimizer state needs state_step (the parameters' step count)")
    if plain:
        ext.lion_step(_pick(params, plain), _pick(grads, plain), _pick(exp_avgs, plain), *hp, *opts,
                      _pick(steps, plain))
    if q:
        ext.lion_step_int8(_pick(params, q), _pick(grads, q), [exp_avgs[k].codes for k in q],
                           [exp_avgs[k].scale for k in q], *hp, _pick(steps, q), *opts,
                           blocks=[exp_avgs[k].block for k in q])
    if other:
        _torch_ops().lion_step(_pick(params, other), _pick(grads, other), _pick(exp_avgs, other), lr=lr,
                               beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
                               clip_value=clip_value, grad_scale=grad_scale, found_inf=found_inf,
                               state_step=_pick(steps, other))


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, lr, beta1, beta2, eps,
               weight_decay, step, maximize=False, clip_value=None, grad_scale=None, found_inf=None,
               state_step=None):
    """``max_exp_avg_sqs`` given means amsgrad (as in :func:`shardopt.kernels.torch_ops.adamw_step`);
    bf16 and int8 state round with ``state_step`` as their salt (default: ``step``)."""
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    maxes = None if max_exp_avg_sqs is None else list(max_exp_avg_sqs)
    steps = _state_steps(state_step, len(params))
    hp = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step))
    opts = (bool(maximize), None if clip_value is None else float(clip_value), grad_scale, found_inf)
    ext = _LOADER.load()
    states = [exp_avgs, exp_avg_sqs] + ([maxes] if maxes is not None else [])
    route = _route(states, ("signed", "sqrt", "sqrt"))
    if route is None:
        ext.adamw_step(params, grads, exp_avgs, exp_avg_sqs, *hp, maxes, *opts, steps)
        return
    q, plain, other = route
    if plain:
        ext.adamw_step(_pick(params, plain), _pick(grads, plain), _pick(exp_avgs, plain),
                       _pick(exp_avg_sqs, plain), *hp, _pick(maxes, plain), *opts, _pick(steps, plain))
    if q:
        mq = None if maxes is None else [maxes[k] for k in q]
        ext.adamw_step_int8(
            _pick(params, q), _pick(grads, q), [exp_avgs[k].codes for k in q], [exp_avgs[k].scale for k in q],
            [exp_avg_sqs[k].codes for k in q], [exp_avg_sqs[k].scale for k in q], *hp,
            None if mq is None else [t.codes for t in mq], None if mq is None else [t.scale for t in mq],
            *opts, _pick(steps, q), blocks=[exp_avgs[k].block for k in q])
    if other:
        _torch_ops().adamw_step(
            _pick(params, other), _pick(grads, other), _pick(exp_avgs, other), _pick(exp_avg_sqs, other),
            _pick(maxes, other), lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
            maximize=maximize, clip_value=clip_value, grad_scale=grad_scale, found_inf=found_inf,
            state_step=_pick(steps, other))


def _torch_ops():
    from . import torch_ops

    return torch_ops


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
