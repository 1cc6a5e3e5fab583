"""The ``triton`` backend: one fused elementwise kernel per optimizer.

Each kernel reads ``param``/``grad``/state once, does the whole update in fp32
registers and writes ``param``/state back once, following exactly the order of
operations of :mod:`shardopt.kernels.torch_ops` (see that module for the
formulas).  Host scalars are rounded to fp32 the same way (``float(beta1)``,
``float(1.0 - beta1)`` with the difference taken in double, AdamW's step
scalars from :func:`torch_ops.adamw_scalars` in double, then cast).

Bit-exactness notes
-------------------
* Kernels are launched with ``enable_fp_fusion=False`` so the GPU compiler does
  not contract ``a*b + c`` into an FMA (torch evaluates them as separate ops).
* Division and square root use ``tl.div_rn`` / ``tl.sqrt_rn`` (IEEE, correctly
  rounded) instead of Triton's default approximate fp32 ``/`` and ``tl.sqrt``.
* Narrow (bf16) stores round to nearest-even *explicitly* with integer ops
  (:func:`_rne_bf16_bits`): Triton's interpreter truncates on a plain
  ``.to(tl.bfloat16)``, whereas torch (and the GPU ``cvt.rn``) round to nearest
  even.  Doing it by hand gives identical bits in both modes.

Under ``TRITON_INTERPRET=1`` (CPU tensors) fp32 results therefore match the
``torch`` backend bit for bit.  On a GPU torch itself turns division by a
scalar into multiplication by its reciprocal, so AdamW may differ there by an
ulp; Lion stays bitwise.

Triton is imported lazily: importing this module never fails, ``available()``
tells whether Triton can be imported, and the step functions raise a clear
``ImportError`` when it cannot.  The ``@triton.jit`` kernels are built at first
use, so ``TRITON_INTERPRET`` only needs to be set before the first call.
"""
from __future__ import annotations

import math
import struct

import torch

from .torch_ops import adamw_scalars

try:  # pragma: no branch - depends on the environment
    import triton
    import triton.language as tl

    _IMPORT_ERROR: BaseException | None = None
except ImportError as _exc:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    _IMPORT_ERROR = _exc

# Elements per program on a GPU.  Under the interpreter every program is a
# Python-level loop iteration, so larger blocks are much faster there.
_GPU_BLOCK_SIZE = 1024
_GPU_NUM_WARPS = 4
_INTERPRET_MAX_BLOCK_SIZE = 4096

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# what the kernels take themselves; anything else is served by the torch backend
FEATURES: frozenset = frozenset()
PARAM_DTYPES = _PARAM_DTYPES
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """True when Triton can be imported (kernels still need a GPU or the interpreter)."""
    return triton is not None


def _require_triton() -> None:
    if triton is None:
        raise ImportError(
            "shardopt backend='triton' needs the 'triton' package, which could not be "
            f"imported ({_IMPORT_ERROR!r}). Install triton (pip install triton) or use "
            "backend='torch' / backend='cpu'."
        ) from _IMPORT_ERROR


# ---------------------------------------------------------------------------
# Kernels.  Defined only when triton imported; decorated with triton.jit at
# first use (see _kernels) so the interpreter switch is read at call time.
# ---------------------------------------------------------------------------
if triton is not None:

    def _rne_bf16_bits(x):
        """fp32 -> bf16 bit pattern (as uint16) with round-to-nearest-even.

        NaN maps to the canonical quiet NaN 0x7FC0, like torch's conversion.
        """
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, 0x7FC00000, bits)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16)

    def _store_f32(ptrs, x, mask, IS_BF16: tl.constexpr):
        """Store fp32 ``x`` into ``ptrs``' dtype, rounding to nearest even."""
        if IS_BF16:
            tl.store(ptrs, _rne_bf16_bits(x).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            # fp32: no conversion; fp16: the implicit cast is RNE in both the
            # compiler and the interpreter (numpy astype).
            tl.store(ptrs, x, mask=mask)

    def _lion_kernel_src(
        p_ptr,
        g_ptr,
        m_ptr,
        n_elements,
        lr,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        weight_decay,
        HAS_WD: tl.constexpr,
        P_BF16: tl.constexpr,
        M_BF16: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elements
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # c = beta1*m + (1-beta1)*g
        c = m * beta1 + g * one_minus_beta1
        # sign with torch's conventions: sign(+-0) = +0, sign(nan) = 0
        u = (c > 0).to(tl.float32) - (c < 0).to(tl.float32)
        if HAS_WD:
            u = u + p * weight_decay
        p = p - u * lr
        # m = beta2*m + (1-beta2)*g
        m = m * beta2 + g * one_minus_beta2
        _store_f32(p_ptr + offs, p, mask, P_BF16)
        _store_f32(m_ptr + offs, m, mask, M_BF16)

    def _adamw_kernel_src(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        n_elements,
        decay,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        bc2_sqrt,
        eps,
        step_size,
        HAS_WD: tl.constexpr,
        P_BF16: tl.constexpr,
        M_BF16: tl.constexpr,
        V_BF16: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elements
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_WD:
            p = p * decay
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        # masked-off lanes hold v = 0 -> denom = eps; eps may be 0, giving
        # 0/0 there, but those lanes are never stored.
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(m, denom) * step_size
        _store_f32(p_ptr + offs, p, mask, P_BF16)
        _store_f32(m_ptr + offs, m, mask, M_BF16)
        _store_f32(v_ptr + offs, v, mask, V_BF16)


_built: dict = {}


def _kernels():
    """Decorate the kernels with ``triton.jit`` once, at first use.

    ``triton.jit`` decides between compiled and interpreted execution when it
    decorates, from ``TRITON_INTERPRET``; deferring it to the first call means
    the variable only has to be set before then, not before this import.
    """
    _require_triton()
    if not _built:
        g = globals()
        # helpers are looked up by name from the kernels' globals
        g["_rne_bf16_bits"] = triton.jit(_rne_bf16_bits)
        g["_store_f32"] = triton.jit(_store_f32)
        _built["lion"] = triton.jit(_lion_kernel_src)
        _built["adamw"] = triton.jit(_adamw_kernel_src)
        _built["interpret"] = bool(triton.knobs.runtime.interpret)
    return _built


def _f32(x) -> float:
    """Round a Python number to the nearest fp32 (like ``torch`` does for scalars)."""
    x = float(x)
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _validate(names, lists, allowed_dtypes, interpret: bool):
    n = len(lists[0])
    for name, lst in zip(names[1:], lists[1:]):
        if len(lst) != n:
            raise ValueError(
                f"triton backend: '{name}' has {len(lst)} tensors but '{names[0]}' has {n}"
            )
    for i in range(n):
        p = lists[0][i]
        for name, lst, dtypes in zip(names, lists, allowed_dtypes):
            t = lst[i]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"triton backend: {name}[{i}] (list index {i}) is not a tensor")
            if t.dtype not in dtypes:
                raise ValueError(
                    f"triton backend: {name}[{i}] (list index {i}) has dtype {t.dtype}; "
                    f"supported: {', '.join(str(d) for d in dtypes)}"
                )
            if not t.is_contiguous():
                raise ValueError(f"triton backend: {name}[{i}] (list index {i}) is not contiguous")
            if t.numel() != p.numel():
                raise ValueError(
                    f"triton backend: {name}[{i}] (list index {i}) has {t.numel()} elements "
                    f"but {names[0]}[{i}] has {p.numel()}"
                )
            if t.device != p.device:
                raise ValueError(
                    f"triton backend: {name}[{i}] (list index {i}) is on {t.device} "
                    f"but {names[0]}[{i}] is on {p.device}"
                )
        if p.device.type == "cpu" and not interpret:
            raise ValueError(
                f"triton backend: {names[0]}[{i}] (list index {i}) is a CPU tensor; Triton "
                "kernels run on GPUs, or on CPU only under TRITON_INTERPRET=1 set before the "
                "first call. Use backend='cpu' or 'torch' for CPU tensors."
            )


def _launch_config(numel: int, interpret: bool):
    if interpret:
        block = min(triton.next_power_of_2(numel), _INTERPRET_MAX_BLOCK_SIZE)
    else:
        block = _GPU_BLOCK_SIZE
    return (triton.cdiv(numel, block),), block


# NOTE: the wrappers launch one kernel per tensor.  That is simple and correct;
# with many small tensors on a GPU the launch overhead dominates, and a later
# optimisation can group tensors into one multi-tensor launch (pointer/size
# tables) without changing the per-element math above.


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay):
    k = _kernels()
    interpret = k["interpret"]
    _validate(
        ("params", "grads", "exp_avgs"),
        (params, grads, exp_avgs),
        (_PARAM_DTYPES, _GRAD_DTYPES, _STATE_DTYPES),
        interpret,
    )
    s_lr = _f32(lr)
    s_b1, s_omb1 = _f32(beta1), _f32(1.0 - beta1)
    s_b2, s_omb2 = _f32(beta2), _f32(1.0 - beta2)
    s_wd = _f32(weight_decay)
    has_wd = weight_decay != 0
    for p, g, m in zip(params, grads, exp_avgs):
        numel = p.numel()
        if numel == 0:
            continue
        grid, block = _launch_config(numel, interpret)
        k["lion"][grid](
            p, g, m, numel,
            s_lr, s_b1, s_omb1, s_b2, s_omb2, s_wd,
            HAS_WD=has_wd,
            P_BF16=p.dtype == torch.bfloat16,
            M_BF16=m.dtype == torch.bfloat16,
            BLOCK_SIZE=block,
            num_warps=_GPU_NUM_WARPS,
            enable_fp_fusion=False,
        )


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step):
    k = _kernels()
    interpret = k["interpret"]
    _validate(
        ("params", "grads", "exp_avgs", "exp_avg_sqs"),
        (params, grads, exp_avgs, exp_avg_sqs),
        (_PARAM_DTYPES, _GRAD_DTYPES, _STATE_DTYPES, _STATE_DTYPES),
        interpret,
    )
    sc = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, step=step)
    s_decay = _f32(sc["decay"])
    s_step_size = _f32(sc["step_size"])
    s_bc2_sqrt = _f32(sc["bc2_sqrt"])
    s_b1, s_omb1 = _f32(beta1), _f32(1.0 - beta1)
    s_b2, s_omb2 = _f32(beta2), _f32(1.0 - beta2)
    s_eps = _f32(eps)
    has_wd = weight_decay != 0
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        numel = p.numel()
        if numel == 0:
            continue
        grid, block = _launch_config(numel, interpret)
        k["adamw"][grid](
            p, g, m, v, numel,
            s_decay, s_b1, s_omb1, s_b2, s_omb2, s_bc2_sqrt, s_eps, s_step_size,
            HAS_WD=has_wd,
            P_BF16=p.dtype == torch.bfloat16,
            M_BF16=m.dtype == torch.bfloat16,
            V_BF16=v.dtype == torch.bfloat16,
            BLOCK_SIZE=block,
            num_warps=_GPU_NUM_WARPS,
            enable_fp_fusion=False,
        )
