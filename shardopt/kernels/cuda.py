"""The ``cuda`` backend: fused multi-tensor CUDA kernels.

One call updates every tensor of the argument lists with a handful of kernel
launches: ``csrc/cuda/multi_tensor_apply.cuh`` packs (tensor pointers, sizes,
chunk starts) tables into kernel arguments and runs one generic kernel whose
only per-algorithm code is a functor (``csrc/cuda/fused_optim.cu``).  Params
may be fp32 or bf16, grads fp32/bf16/fp16, state fp32 or bf16; the math is
fp32 in exactly the order of :mod:`shardopt.kernels.torch_ops`, so Lion agrees
with the ``torch`` backend bit for bit and AdamW to an ulp (torch's CUDA
``_foreach_div_`` by a scalar multiplies by the reciprocal; the kernel divides).
The functors also take ``maximize``, ``clip_value``, ``amsgrad`` and the two
device scalars of a step, ``grad_scale`` (the clip coefficient) and
``found_inf`` (the skip flag), which the kernels read themselves, so a step
never waits for the host; :func:`grad_stats` is the fused gradient pass.

The extension comes from, in order:

1. ``shardopt._C_cuda``, if a build ships one prebuilt;
2. a JIT build of ``csrc/cuda/*.cu, *.cpp`` with
   :func:`torch.utils.cpp_extension.load` (needs nvcc, i.e. ``CUDA_HOME``, and
   ninja), cached by torch under ``TORCH_EXTENSIONS_DIR``.

Nothing here raises when the extension cannot be had: :func:`available`
returns ``False`` (at once, without compiling, when there is no CUDA device or
torch is a CPU-only build) and :func:`build_error` says why;
:func:`shardopt.kernels.resolve_backend` then warns once and picks ``triton``
or ``torch``.  ``SHARDOPT_DISABLE_CUDA=1`` forces that fallback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ._ext import ExtensionLoader, build_name, is_stale

__all__ = [
    "adamw_step",
    "available",
    "build_error",
    "chunk_plan",
    "grad_stats",
    "lion_step",
    "load",
    "max_tensors",
    "source_dir",
]

# what the compiled kernels take themselves; anything else is served by the torch backend
FEATURES: frozenset = frozenset(
    {"maximize", "clip_value", "grad_scale", "found_inf", "amsgrad", "grad_stats"})
PARAM_DTYPES = (torch.float32, torch.bfloat16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what grad_stats takes

EXT_NAME = "shardopt_cuda_ops"
SOURCES = ("fused_optim.cu", "bindings.cpp")
HEADERS = ("multi_tensor_apply.cuh",)
# -fmad=false: no FMA contraction anywhere (the functors also use explicitly
# rounded intrinsics).  Never --use_fast_math / -ftz=true: they would flush
# subnormals and approximate division.
EXTRA_CUDA_CFLAGS = ["-O3", "-fmad=false"]
EXTRA_CFLAGS = ["-O3"]

# Launch limits of csrc/cuda/multi_tensor_apply.cuh (kChunkSize, kMaxBlocks,
# kMetaBytes); the extension's launch_limits() reports the compiled values and
# a GPU test checks they match.
CHUNK_SIZE = 65536
MAX_BLOCKS = 256
META_BYTES = 3840

# ------------------------------------------------------------ chunk planning

def max_tensors(depth: int) -> int:
    """Tensors per launch for a functor over ``depth`` lists (mirrors
    ``max_tensors_for_depth``: the kernel-argument bytes left after the block
    table, at one pointer per list plus one int64 size per tensor)."""
    return (META_BYTES - MAX_BLOCKS * 9) // (8 * (depth + 1))


def chunk_plan(numels, chunk_size: int = CHUNK_SIZE, max_tensors: int = max_tensors(4),
               max_blocks: int = MAX_BLOCKS):
    """Which (tensor, chunk) pairs each kernel launch covers.

    A line-for-line mirror of ``for_each_launch`` in
    ``csrc/cuda/multi_tensor_apply.cuh`` (change both together); the extension
    exposes the C++ one as ``_chunk_plan`` for comparison.  Returns one
    ``(tensors, blocks)`` pair per launch, in order: ``tensors`` lists indices
    into ``numels`` (the launch's tensor table, by slot) and each block is
    ``(slot, start)``, covering elements ``[start, min(start + chunk_size,
    numel))`` of ``tensors[slot]``.  Pure integer arithmetic (Python ints never
    overflow, like the launcher's int64), so sizes beyond 2**31 can be checked
    without allocating anything.
    """
    if chunk_size <= 0 or max_tensors <= 0 or max_blocks <= 0:
        raise ValueError("chunk_plan: chunk_size, max_tensors and max_blocks must be positive")
    plan = []
    tensors: list[int] = []
    blocks: list[tuple[int, int]] = []

    def flush():
        nonlocal tensors, blocks
        if blocks:
            plan.append((tensors, blocks))
        tensors, blocks = [], []

    for t, n in enumerate(numels):
        if n <= 0:
            continue
        nchunks = (n - 1) // chunk_size + 1
        for c in range(nchunks):
            if len(blocks) == max_blocks:
                flush()
            if not tensors or tensors[-1] != t:
                if len(tensors) == max_tensors:
                    flush()
                tensors.append(t)
            blocks.append((len(tensors) - 1, c * chunk_size))
    flush()
    return plan


# ------------------------------------------------------------------ loading

def source_dir() -> Path | None:
    """``csrc/cuda`` in the source tree (editable install) or in the wheel."""
    pkg = Path(__file__).resolve().parent.parent  # .../shardopt
    for cand in (pkg.parent / "csrc" / "cuda", pkg / "_csrc" / "cuda"):
        if all((cand / s).is_file() for s in SOURCES + HEADERS):
            return cand
    return None


def _no_cuda_reason() -> str | None:
    """Why CUDA kernels cannot run here at all (checked before any build)."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _jit_build():
    src = source_dir()
    if src is None:
        raise RuntimeError("CUDA sources csrc/cuda/ not found next to the shardopt package")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME to a CUDA toolkit")
    if is_stale(EXT_NAME, [src / f for f in SOURCES + HEADERS]):
        print("shardopt: building CUDA kernels (first use, ~1-2 min)...", file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=EXT_NAME,
        sources=[str(src / s) for s in SOURCES],
        extra_cflags=EXTRA_CFLAGS,
        extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
        extra_include_paths=[str(src)],
        verbose=os.environ.get("SHARDOPT_VERBOSE_BUILD", "0") == "1",
    )


EXT_NAME = build_name(EXT_NAME, [source_dir() / f for f in SOURCES + HEADERS] if source_dir() else [], EXTRA_CFLAGS + EXTRA_CUDA_CFLAGS)
_LOADER = ExtensionLoader("CUDA", "shardopt._C_cuda", "SHARDOPT_DISABLE_CUDA", _jit_build, _no_cuda_reason)
available = _LOADER.available
build_error = _LOADER.build_error
load = _LOADER.load


# ------------------------------------------------------------------ entry points

def _flags(params, grad_scale, found_inf):
    """(skip on the host, grad_scale, found_inf) as the kernels take them: fp32 device tensors.

    A CPU ``found_inf`` (a direct call; the dispatcher reads those itself) costs no sync: read here.
    """
    if found_inf is not None and found_inf.device.type == "cpu" and params and params[0].is_cuda:
        if bool(found_inf.item()):
            return True, None, None
        found_inf = None

    def f32(t):
        return t if t is None or t.dtype == torch.float32 else t.to(torch.float32)

    return False, f32(grad_scale), f32(found_inf)


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize=False, clip_value=None,
              grad_scale=None, found_inf=None):
    skip, grad_scale, found_inf = _flags(params, grad_scale, found_inf)
    if skip:
        return
    load().lion_step(
        list(params), list(grads), list(exp_avgs), float(lr), float(beta1), float(beta2), float(weight_decay),
        maximize=bool(maximize), clip_value=None if clip_value is None else float(clip_value),
        grad_scale=grad_scale, found_inf=found_inf,
    )


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, lr, beta1, beta2, eps,
               weight_decay, step, maximize=False, clip_value=None, grad_scale=None, found_inf=None):
    """One AdamW step; ``max_exp_avg_sqs`` given means amsgrad."""
    skip, grad_scale, found_inf = _flags(params, grad_scale, found_inf)
    if skip:
        return
    load().adamw_step(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), int(step),
        max_exp_avg_sqs=None if max_exp_avg_sqs is None else list(max_exp_avg_sqs),
        maximize=bool(maximize), clip_value=None if clip_value is None else float(clip_value),
        grad_scale=grad_scale, found_inf=found_inf,
    )


def grad_stats(grads, *, clip_value=None) -> torch.Tensor:
    """The fused gradient pass: float64 ``[sum of squares, bad]`` on the gradients' device, as
    :func:`shardopt.kernels.torch_ops.grad_stats` defines it (fp32 block sums, fp64 combine)."""
    dev = grads[0].device if grads else torch.device("cpu")
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return torch.zeros(2, dtype=torch.float64, device=dev)
    return load().grad_stats(grads, None if clip_value is None else float(clip_value))
