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

Gradient transform and skip flag
--------------------------------
Both kernels read the gradient as :func:`torch_ops.effective_grads` does:
``g = float(g)``, negated with ``maximize``, clamped to ``[-clip_value,
clip_value]`` (``clip_value`` rounded to fp32), multiplied by ``grad_scale``
(an fp32 0-d device tensor, loaded by the kernel).  ``found_inf`` (an fp32 0-d
device tensor) is loaded by the kernel too: nonzero (NaN included) masks every
store, so the call writes nothing.  Neither is read on the host, so a CUDA step
does not synchronize.  AdamW's ``amsgrad`` keeps ``max(max_exp_avg_sq, v)``
(NaN-propagating, as ``torch.maximum``) and divides by its square root.

:func:`grad_stats` is the fused gradient pass: each program squares its block
of (value-clipped) gradients in fp32 and sums them in fp32, flags a non-finite
*raw* value in the block, and writes both to a per-program buffer that torch
then sums in fp64 on the device.  Squares of ``|g| > ~1.8e19`` overflow fp32
to inf (as ``torch._foreach_norm`` in fp32 would); the fp64 reference does not.

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
FEATURES: frozenset = frozenset(
    {"maximize", "clip_value", "grad_scale", "found_inf", "amsgrad", "grad_stats"})
PARAM_DTYPES = _PARAM_DTYPES
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_DTYPES = _GRAD_DTYPES  # what grad_stats takes (the dispatcher sends others to torch)
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

    def _effective_grad(g, clip_value, scale_ptr, MAXIMIZE: tl.constexpr, HAS_CLIP: tl.constexpr,
                        HAS_SCALE: tl.constexpr):
        """torch_ops.effective_grads on fp32 ``g``: negate, clamp, scale (in that order)."""
        if MAXIMIZE:
            g = -g
        if HAS_CLIP:
            # comparisons, not min/max: NaN falls through both, as torch.clamp propagates it
            g = tl.where(g < -clip_value, -clip_value, g)
            g = tl.where(g > clip_value, clip_value, g)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr).to(tl.float32)
        return g

    def _store_mask(mask, flag_ptr, HAS_FLAG: tl.constexpr):
        """``mask``, cleared everywhere when the device skip flag is nonzero (or NaN)."""
        if HAS_FLAG:
            # broadcast before comparing (the interpreter cannot AND a block with a scalar bool)
            flag = tl.zeros(mask.shape, tl.float32) + tl.load(flag_ptr).to(tl.float32)
            mask = mask & (flag == 0.0)
        return mask

    def _lion_kernel_src(
        p_ptr,
        g_ptr,
        m_ptr,
        scale_ptr,
        flag_ptr,
        n_elements,
        clip_value,
        lr,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        weight_decay,
        HAS_WD: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        HAS_CLIP: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_FLAG: tl.constexpr,
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
        g = _effective_grad(g, clip_value, scale_ptr, MAXIMIZE, HAS_CLIP, HAS_SCALE)
        # c = beta1*m + (1-beta1)*g
        c = m * beta1 + g * one_minus_beta1
        # sign with torch's conventions: sign(+-0) = +0, sign(nan) = 0
        u = (c > 0).to(tl.float32) - (c < 0).to(tl.float32)
        if HAS_WD:
            u = u + p * weight_decay
        p = p - u * lr
        # m = beta2*m + (1-beta2)*g
        m = m * beta2 + g * one_minus_beta2
        mask = _store_mask(mask, flag_ptr, HAS_FLAG)
        _store_f32(p_ptr + offs, p, mask, P_BF16)
        _store_f32(m_ptr + offs, m, mask, M_BF16)

    def _adamw_kernel_src(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        vmax_ptr,
        scale_ptr,
        flag_ptr,
        n_elements,
        clip_value,
        decay,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        bc2_sqrt,
        eps,
        step_size,
        HAS_WD: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        HAS_CLIP: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_FLAG: tl.constexpr,
        AMSGRAD: tl.constexpr,
        P_BF16: tl.constexpr,
        M_BF16: tl.constexpr,
        V_BF16: tl.constexpr,
        VMAX_BF16: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elements
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _effective_grad(g, clip_value, scale_ptr, MAXIMIZE, HAS_CLIP, HAS_SCALE)
        if HAS_WD:
            p = p * decay
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        # masked-off lanes hold v = 0 -> denom = eps; eps may be 0, giving
        # 0/0 there, but those lanes are never stored.
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # torch.maximum: a NaN in either operand wins
            vmax = tl.where((v > vmax) | (v != v), v, vmax)
            denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
        else:
            denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(m, denom) * step_size
        mask = _store_mask(mask, flag_ptr, HAS_FLAG)
        _store_f32(p_ptr + offs, p, mask, P_BF16)
        _store_f32(m_ptr + offs, m, mask, M_BF16)
        _store_f32(v_ptr + offs, v, mask, V_BF16)
        if AMSGRAD:
            _store_f32(vmax_ptr + offs, vmax, mask, VMAX_BF16)

    def _grad_stats_kernel_src(
        g_ptr,
        out_ptr,
        n_elements,
        first,
        n_programs,
        clip_value,
        HAS_CLIP: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        """Program ``pid`` writes the fp32 sum of squares of its block to
        ``out[first + pid]`` and NaN/0 (a non-finite raw value or not) to
        ``out[n_programs + first + pid]``."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elements
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # tested on the raw values: a clamp would turn an inf into clip_value
        nonfinite = tl.sum(((g != g) | (tl.abs(g) == float("inf"))).to(tl.float32), axis=0)
        if HAS_CLIP:
            g = tl.where(g < -clip_value, -clip_value, g)
            g = tl.where(g > clip_value, clip_value, g)
        sumsq = tl.sum(g * g, axis=0)
        tl.store(out_ptr + first + pid, sumsq)
        tl.store(out_ptr + n_programs + first + pid, tl.where(nonfinite > 0, float("nan"), 0.0))


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
        g["_effective_grad"] = triton.jit(_effective_grad)
        g["_store_mask"] = triton.jit(_store_mask)
        _built["lion"] = triton.jit(_lion_kernel_src)
        _built["adamw"] = triton.jit(_adamw_kernel_src)
        _built["grad_stats"] = triton.jit(_grad_stats_kernel_src)
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


def _device_scalar(name, t, device):
    """A 0-d device tensor the kernels load (grad_scale / found_inf), as fp32 on ``device``."""
    if t.numel() != 1:
        raise ValueError(f"triton backend: {name} must be a one-element tensor, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"triton backend: {name} is on {t.device} but the tensors are on {device}")
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _grad_args(params, maximize, clip_value, grad_scale, found_inf):
    """(skip on the host, kernel arguments and flags for the gradient transform and the skip flag)."""
    if not params:
        return True, None
    dev = params[0].device
    if found_inf is not None and found_inf.device.type == "cpu" and dev.type != "cpu":
        if bool(found_inf.item()):  # a host flag costs no sync: read it here
            return True, None
        found_inf = None
    dummy = params[0]  # stands in for the pointers a kernel does not read
    scale = _device_scalar("grad_scale", grad_scale, dev) if grad_scale is not None else None
    flag = _device_scalar("found_inf", found_inf, dev) if found_inf is not None else None
    return False, dict(
        scale_ptr=scale if scale is not None else dummy,
        flag_ptr=flag if flag is not None else dummy,
        clip_value=_f32(clip_value) if clip_value is not None else 0.0,
        MAXIMIZE=bool(maximize),
        HAS_CLIP=clip_value is not None,
        HAS_SCALE=scale is not None,
        HAS_FLAG=flag is not None,
    )


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize=False, clip_value=None,
              grad_scale=None, found_inf=None):
    k = _kernels()
    interpret = k["interpret"]
    _validate(
        ("params", "grads", "exp_avgs"),
        (params, grads, exp_avgs),
        (_PARAM_DTYPES, _GRAD_DTYPES, _STATE_DTYPES),
        interpret,
    )
    skip, gargs = _grad_args(params, maximize, clip_value, grad_scale, found_inf)
    if skip:
        return
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
            p, g, m, gargs["scale_ptr"], gargs["flag_ptr"], numel, gargs["clip_value"],
            s_lr, s_b1, s_omb1, s_b2, s_omb2, s_wd,
            HAS_WD=has_wd,
            MAXIMIZE=gargs["MAXIMIZE"],
            HAS_CLIP=gargs["HAS_CLIP"],
            HAS_SCALE=gargs["HAS_SCALE"],
            HAS_FLAG=gargs["HAS_FLAG"],
            P_BF16=p.dtype == torch.bfloat16,
            M_BF16=m.dtype == torch.bfloat16,
            BLOCK_SIZE=block,
            num_warps=_GPU_NUM_WARPS,
            enable_fp_fusion=False,
        )


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, lr, beta1, beta2, eps,
               weight_decay, step, maximize=False, clip_value=None, grad_scale=None, found_inf=None):
    """One AdamW step; ``max_exp_avg_sqs`` given means amsgrad."""
    k = _kernels()
    interpret = k["interpret"]
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs")
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    dtypes = (_PARAM_DTYPES, _GRAD_DTYPES, _STATE_DTYPES, _STATE_DTYPES)
    amsgrad = max_exp_avg_sqs is not None
    if amsgrad:
        names, lists, dtypes = names + ("max_exp_avg_sqs",), lists + (max_exp_avg_sqs,), dtypes + (_STATE_DTYPES,)
    _validate(names, lists, dtypes, interpret)
    skip, gargs = _grad_args(params, maximize, clip_value, grad_scale, found_inf)
    if skip:
        return
    sc = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, step=step)
    s_decay = _f32(sc["decay"])
    s_step_size = _f32(sc["step_size"])
    s_bc2_sqrt = _f32(sc["bc2_sqrt"])
    s_b1, s_omb1 = _f32(beta1), _f32(1.0 - beta1)
    s_b2, s_omb2 = _f32(beta2), _f32(1.0 - beta2)
    s_eps = _f32(eps)
    has_wd = weight_decay != 0
    vmaxs = max_exp_avg_sqs if amsgrad else exp_avg_sqs  # not read without amsgrad
    for p, g, m, v, vmax in zip(params, grads, exp_avgs, exp_avg_sqs, vmaxs):
        numel = p.numel()
        if numel == 0:
            continue
        grid, block = _launch_config(numel, interpret)
        k["adamw"][grid](
            p, g, m, v, vmax, gargs["scale_ptr"], gargs["flag_ptr"], numel, gargs["clip_value"],
            s_decay, s_b1, s_omb1, s_b2, s_omb2, s_bc2_sqrt, s_eps, s_step_size,
            HAS_WD=has_wd,
            MAXIMIZE=gargs["MAXIMIZE"],
            HAS_CLIP=gargs["HAS_CLIP"],
            HAS_SCALE=gargs["HAS_SCALE"],
            HAS_FLAG=gargs["HAS_FLAG"],
            AMSGRAD=amsgrad,
            P_BF16=p.dtype == torch.bfloat16,
            M_BF16=m.dtype == torch.bfloat16,
            V_BF16=v.dtype == torch.bfloat16,
            VMAX_BF16=vmax.dtype == torch.bfloat16,
            BLOCK_SIZE=block,
            num_warps=_GPU_NUM_WARPS,
            enable_fp_fusion=False,
        )


def grad_stats(grads, *, clip_value=None) -> torch.Tensor:
    """The fused gradient pass: float64 ``[sum of squares, bad]`` on the gradients' device.

    As :func:`torch_ops.grad_stats`: the squares are of the value-clipped
    gradients, ``bad`` is 0 when every raw gradient is finite and NaN otherwise.
    Per-program fp32 block sums, summed in fp64 by torch on the device (nothing
    is read back).
    """
    k = _kernels()
    interpret = k["interpret"]
    dev = grads[0].device if grads else torch.device("cpu")
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return torch.zeros(2, dtype=torch.float64, device=dev)
    _validate(("grads",), (grads,), (_GRAD_DTYPES,), interpret)
    plans = [(g, *_launch_config(g.numel(), interpret)) for g in grads]
    total = sum(grid[0] for _, grid, _ in plans)
    out = torch.empty((2, total), dtype=torch.float32, device=grads[0].device)
    s_clip = _f32(clip_value) if clip_value is not None else 0.0
    first = 0
    for g, grid, block in plans:
        k["grad_stats"][grid](
            g, out, g.numel(), first, total, s_clip,
            HAS_CLIP=clip_value is not None,
            BLOCK_SIZE=block,
            num_warps=_GPU_NUM_WARPS,
            enable_fp_fusion=False,
        )
        first += grid[0]
    return out.to(torch.float64).sum(dim=1)
