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
* Narrow (bf16) parameter stores round to nearest-even *explicitly* with
  integer ops (:func:`_rne_bf16_bits`): Triton's interpreter truncates on a
  plain ``.to(tl.bfloat16)``, whereas torch (and the GPU ``cvt.rn``) round to
  nearest even.  Doing it by hand gives identical bits in both modes.

Under ``TRITON_INTERPRET=1`` (CPU tensors) fp32 results therefore match the
``torch`` backend bit for bit, but for AdamW's parameters (an ulp: torch's CPU
fp32 ``sqrt`` is not always correctly rounded).  On a GPU torch itself turns
division by a scalar into multiplication by its reciprocal, so AdamW may differ
there by an ulp; Lion stays bitwise.

Optimizer state formats
-----------------------
Each state list may mix, tensor by tensor, the formats of
:mod:`.state_precision` (``FEATURES`` lists ``state_bf16`` and ``state_int8``):

* fp32 (and fp16) tensors: loaded, stored as they are (fp16 rounded to nearest
  even);
* bf16 tensors: loaded exactly, stored by the value-keyed stochastic rounding
  (``(u + (mix32(u ^ salt) & 0xFFFF)) >> 16``, inf/NaN to nearest);
* :class:`~.state_precision.Q8` blocks (int8 codes, one fp32 scale per block
  of ``B`` elements: 256, or 1 to 255 for the narrow rows of
  :func:`~.state_precision.int8_block`), mappings ``"signed"`` and ``"sqrt"``:
  a program holds whole blocks, one per row of its ``[ROWS, COLS]`` tile
  (``COLS`` the power of two from ``B`` up; the lanes past ``B`` are masked
  off), dequantizes them, updates them and quantizes each row again from its
  ``tl.max`` (NaN-propagating, as ``torch.amax``), codes and scale.

The hash is ``mix32`` on ``tl.uint32`` (products wrap mod 2^32), the salt
``state_precision.salt(step)`` passed as an int32 with the same bits; Lion's
``state_step`` is an int or one per tensor, AdamW's defaults to its ``step``.
bf16 and int8 state without a salt are refused. The stores are bit for bit
those of the reference (:func:`quantize`, :func:`dequantize` and
:func:`round_bf16` run them alone): given the same fp32 values the state bits
agree (tested under the interpreter; the kernels have not run on a GPU yet). A
set ``found_inf`` writes no code and no scale either.

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

from . import state_precision
from .state_precision import Q8
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
FEATURES: frozenset = frozenset({"maximize", "clip_value", "grad_scale", "found_inf", "amsgrad", "grad_stats",
                                  "state_bf16", "state_int8", "state_int8_block"})
PARAM_DTYPES = _PARAM_DTYPES
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_DTYPES = _GRAD_DTYPES  # what grad_stats takes (the dispatcher sends others to torch)
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # and Q8 blocks
# the kernels' KIND of a state tensor (see _load_state / _store_state)
_PLAIN, _BF16, _SIGNED, _SQRT = 0, 1, 2, 3
_Q8_KINDS = {"signed": _SIGNED, "sqrt": _SQRT}


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

    # ------------------------------------------------------------ optimizer state
    # A state tensor's format is the constexpr KIND of its kernel argument:
    # _PLAIN (fp32, fp16: loaded, stored by a plain cast), _BF16 (value-keyed
    # stochastic rounding), _SIGNED / _SQRT (int8 blocks: codes + one fp32
    # scale per row of the tile, a block of BLK elements).  See state_precision
    # for the definitions.

    def _mix32(x):
        """state_precision.mix32 on uint32 (the products wrap mod 2^32)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    def _uniform(h):
        """r = (h >> 8) * 2^-24 in [0, 1), exact in fp32."""
        return (h >> 8).to(tl.float32) * 5.9604644775390625e-08

    def _finite(x):
        return (x == x) & (tl.abs(x) != float("inf"))

    def _row_max(a, valid):
        """The largest of each row of the non-negative ``a`` ([ROWS, 1]), NaN when the row holds a NaN (as
        ``torch.amax``; ``tl.max`` skips NaNs in the interpreter, and may on a GPU); lanes outside ``valid``
        count as 0."""
        a = tl.where(valid, a, 0.0)
        mx = tl.max(a, axis=1, keep_dims=True)
        nan = tl.max((a != a).to(tl.int32), axis=1, keep_dims=True)
        return tl.where(nan > 0, float("nan"), mx)

    def _sr_bf16_bits(x, salt):
        """state_precision.round_bf16: (u + (mix32(u ^ salt) & 0xFFFF)) >> 16 for finite values,
        round to nearest even for inf/NaN; bf16 bits as uint16."""
        u = x.to(tl.uint32, bitcast=True)
        sr = ((u + (_mix32(u ^ salt) & 0xFFFF)) >> 16).to(tl.uint16)
        return tl.where(_finite(x), sr, _rne_bf16_bits(x))

    def _load_state(ptr, sc_ptr, offs, row, mask, rmask, KIND: tl.constexpr):
        """fp32 values of a state block ([ROWS, COLS]); 0 outside ``mask``."""
        if KIND == 2:  # signed: code * scale
            c = tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)
            x = tl.where(mask, c * tl.load(sc_ptr + row, mask=rmask, other=0.0), 0.0)
        elif KIND == 3:  # sqrt: (T[code] * scale)^2, T[c] = c * 2^-18 below 16, else fp32 bits (c + 1792) << 19
            c = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
            t = tl.where(c >= 16, ((c + 1792) << 19).to(tl.float32, bitcast=True),
                         c.to(tl.float32) * 3.814697265625e-06)
            s = t * tl.load(sc_ptr + row, mask=rmask, other=0.0)
            x = tl.where(mask, s * s, 0.0)
        else:
            x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return x

    def _store_state(ptr, sc_ptr, offs, row, x, valid, mask, rmask, salt, KIND: tl.constexpr):
        """Store the fp32 block ``x`` in format KIND: elements where ``mask``, block scales where ``rmask``
        (``valid``: the lanes inside the tensor, those a block's largest value is taken over)."""
        if KIND == 0:
            tl.store(ptr + offs, x, mask=mask)  # fp32, or fp16 rounded to nearest even by the cast
        elif KIND == 1:
            tl.store(ptr + offs, _sr_bf16_bits(x, salt).to(tl.bfloat16, bitcast=True), mask=mask)
        elif KIND == 2:
            # scale = absmax / 127; code = clamp(floor(x / scale + r), -127, 127), 0 where x / scale is not finite
            x = tl.where(valid, x, 0.0)
            scale = tl.div_rn(_row_max(tl.abs(x), valid), 127.0)
            q = tl.div_rn(x, scale)
            code = tl.floor(q + _uniform(_mix32(x.to(tl.uint32, bitcast=True) ^ salt)))
            code = tl.where(code < -127.0, -127.0, code)
            code = tl.where(code > 127.0, 127.0, code)
            code = tl.where(_finite(q), code, 0.0)
            tl.store(ptr + offs, code.to(tl.int8), mask=mask)
            tl.store(sc_ptr + row, scale, mask=rmask)
        else:
            # s = sqrt(v); scale = max s; w = s / scale; an unsigned e4m4 float of w, hash of bits(s)
            x = tl.where(valid, x, 0.0)
            s = tl.sqrt_rn(x)
            scale = _row_max(s, valid)
            w = tl.div_rn(s, scale)
            h = _mix32(s.to(tl.uint32, bitcast=True) ^ salt)
            normal = (((w.to(tl.uint32, bitcast=True) + (h & 0x7FFFF)) >> 19).to(tl.int32) - 1792).to(tl.float32)
            sub = tl.floor(w * 262144.0 + _uniform(h))
            code = tl.where(w >= 6.103515625e-05, normal, sub)
            code = tl.where(_finite(w), code, 0.0)
            tl.store(ptr + offs, code.to(tl.uint8), mask=mask)
            tl.store(sc_ptr + row, scale, mask=rmask)

    def _block_offsets(n_elements, ROWS: tl.constexpr, COLS: tl.constexpr, BLK: tl.constexpr):
        """This program's [ROWS, COLS] lanes: row ``r`` is block ``row[r]``, the BLK (<= COLS) elements from
        ``row[r] * BLK`` (an int8 block when int8 state is stored, else BLK == COLS); the masks of its
        elements and of its rows."""
        pid = tl.program_id(0).to(tl.int64)
        row = pid * ROWS + tl.arange(0, ROWS)[:, None]
        col = tl.arange(0, COLS)[None, :]
        offs = row * BLK + col
        if BLK == COLS:
            mask = offs < n_elements
        else:
            mask = (col < BLK) & (offs < n_elements)
        return row, offs, mask, row * BLK < n_elements

    def _lion_kernel_src(
        p_ptr,
        g_ptr,
        m_ptr,
        ms_ptr,
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
        salt,
        HAS_WD: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        HAS_CLIP: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_FLAG: tl.constexpr,
        P_BF16: tl.constexpr,
        M_KIND: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        BLK: tl.constexpr,
    ):
        row, offs, mask, rmask = _block_offsets(n_elements, ROWS, COLS, BLK)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = _load_state(m_ptr, ms_ptr, offs, row, mask, rmask, M_KIND)
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
        smask = _store_mask(mask, flag_ptr, HAS_FLAG)
        srmask = _store_mask(rmask, flag_ptr, HAS_FLAG)
        s = salt.to(tl.uint32, bitcast=True)
        _store_f32(p_ptr + offs, p, smask, P_BF16)
        _store_state(m_ptr, ms_ptr, offs, row, m, mask, smask, srmask, s, M_KIND)

    def _adamw_kernel_src(
        p_ptr,
        g_ptr,
        m_ptr,
        ms_ptr,
        v_ptr,
        vs_ptr,
        vmax_ptr,
        vmaxs_ptr,
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
        salt,
        HAS_WD: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        HAS_CLIP: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_FLAG: tl.constexpr,
        AMSGRAD: tl.constexpr,
        P_BF16: tl.constexpr,
        M_KIND: tl.constexpr,
        V_KIND: tl.constexpr,
        VMAX_KIND: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        BLK: tl.constexpr,
    ):
        row, offs, mask, rmask = _block_offsets(n_elements, ROWS, COLS, BLK)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = _load_state(m_ptr, ms_ptr, offs, row, mask, rmask, M_KIND)
        v = _load_state(v_ptr, vs_ptr, offs, row, mask, rmask, V_KIND)
        g = _effective_grad(g, clip_value, scale_ptr, MAXIMIZE, HAS_CLIP, HAS_SCALE)
        if HAS_WD:
            p = p * decay
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        # masked-off lanes hold v = 0 -> denom = eps; eps may be 0, giving
        # 0/0 there, but those lanes are never stored.
        if AMSGRAD:
            vmax = _load_state(vmax_ptr, vmaxs_ptr, offs, row, mask, rmask, VMAX_KIND)
            # torch.maximum: a NaN in either operand wins
            vmax = tl.where((v > vmax) | (v != v), v, vmax)
            denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
        else:
            denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(m, denom) * step_size
        smask = _store_mask(mask, flag_ptr, HAS_FLAG)
        srmask = _store_mask(rmask, flag_ptr, HAS_FLAG)
        s = salt.to(tl.uint32, bitcast=True)
        _store_f32(p_ptr + offs, p, smask, P_BF16)
        _store_state(m_ptr, ms_ptr, offs, row, m, mask, smask, srmask, s, M_KIND)
        _store_state(v_ptr, vs_ptr, offs, row, v, mask, smask, srmask, s, V_KIND)
        if AMSGRAD:
            _store_state(vmax_ptr, vmaxs_ptr, offs, row, vmax, mask, smask, srmask, s, VMAX_KIND)

    def _state_kernel_src(
        src_ptr,
        src_s_ptr,
        dst_ptr,
        dst_s_ptr,
        n_elements,
        salt,
        SRC_KIND: tl.constexpr,
        DST_KIND: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        BLK: tl.constexpr,
    ):
        """Load a state in SRC_KIND and store it in DST_KIND: the steps' load and store alone
        (:func:`quantize`, :func:`dequantize`, :func:`round_bf16`)."""
        row, offs, mask, rmask = _block_offsets(n_elements, ROWS, COLS, BLK)
        x = _load_state(src_ptr, src_s_ptr, offs, row, mask, rmask, SRC_KIND)
        _store_state(dst_ptr, dst_s_ptr, offs, row, x, mask, mask, rmask, salt.to(tl.uint32, bitcast=True),
                     DST_KIND)

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


def _library_interpreted():
    """Whether triton's own ``@jit`` library (``tl.max``, ``tl.sum``...) was decorated for the interpreter,
    which triton decides once, when it is first imported; None where this triton does not tell."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        probe = tl.standard.max
    except (ImportError, AttributeError):  # pragma: no cover - another triton layout
        return None
    if isinstance(probe, InterpretedFunction):
        return True
    return False if isinstance(probe, JITFunction) else None


def _kernels():
    """Decorate the kernels with ``triton.jit`` once, at first use.

    ``triton.jit`` decides between compiled and interpreted execution when it
    decorates, from ``TRITON_INTERPRET``; deferring it to the first call means
    the variable only has to be set before then, not before this import. Triton's own library is
    decorated when triton is first imported, though, so the variable must not change after that: the two
    would disagree (a kernel under the interpreter calling a compiled ``tl.max``), which is refused here.
    """
    _require_triton()
    if not _built:
        interpret = bool(triton.knobs.runtime.interpret)
        library = _library_interpreted()
        if library is not None and library != interpret:
            raise RuntimeError(
                f"triton backend: TRITON_INTERPRET is {'set' if interpret else 'unset'} now but was "
                f"{'set' if library else 'unset'} when triton was first imported, so triton's own functions "
                f"are {'interpreted' if library else 'compiled'} and these kernels would not be; set (or unset) "
                "TRITON_INTERPRET before anything imports triton (torch.compile, transformers and deepspeed "
                "may), e.g. in the environment of the process")
        g = globals()
        # helpers are looked up by name from the kernels' globals
        g["_rne_bf16_bits"] = triton.jit(_rne_bf16_bits)
        g["_store_f32"] = triton.jit(_store_f32)
        g["_effective_grad"] = triton.jit(_effective_grad)
        g["_store_mask"] = triton.jit(_store_mask)
        for name in ("_mix32", "_uniform", "_finite", "_row_max", "_sr_bf16_bits", "_load_state",
                     "_store_state", "_block_offsets"):
            g[name] = triton.jit(g[name])
        # the salt changes every step: one compiled kernel for all its values
        _built["lion"] = triton.jit(_lion_kernel_src, do_not_specialize=["salt"])
        _built["adamw"] = triton.jit(_adamw_kernel_src, do_not_specialize=["salt"])
        _built["state"] = triton.jit(_state_kernel_src, do_not_specialize=["salt"])
        _built["grad_stats"] = triton.jit(_grad_stats_kernel_src)
        _built["interpret"] = interpret
    return _built


def _f32(x) -> float:
    """Round a Python number to the nearest fp32 (like ``torch`` does for scalars)."""
    x = float(x)
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _where(name, i):
    return f"triton backend: {name}[{i}] (list index {i})"


def _check_q8(name, i, q):
    """A Q8 state entry: codes of the parameter's size in the dtype of its mapping, fp32 scales, both
    contiguous and on the parameter's device."""
    want = state_precision.code_dtype(q.kind)
    if q.codes.dtype != want:
        raise ValueError(f"{_where(name, i)} is int8 state of mapping {q.kind!r} with {q.codes.dtype} codes; "
                         f"that mapping stores {want}")
    if q.scale.dtype != torch.float32:
        raise ValueError(f"{_where(name, i)} has {q.scale.dtype} block scales; int8 state keeps them in fp32")
    if not (q.codes.is_contiguous() and q.scale.is_contiguous()):
        raise ValueError(f"{_where(name, i)} is not contiguous")
    if not 1 <= q.block <= state_precision.BLOCK:
        raise ValueError(f"{_where(name, i)} is int8 state in blocks of {q.block}; a block holds 1 to "
                         f"{state_precision.BLOCK} elements")
    if q.scale.device != q.codes.device:
        raise ValueError(f"{_where(name, i)} has its scales on {q.scale.device} and its codes on "
                         f"{q.codes.device}")


def _validate(names, lists, allowed_dtypes, interpret: bool):
    """Every list as long as the first, every entry a contiguous tensor of an allowed dtype (or, in the
    state lists, from the third on, a :class:`~.state_precision.Q8`) of its parameter's size and device."""
    n = len(lists[0])
    for name, lst in zip(names[1:], lists[1:]):
        if len(lst) != n:
            raise ValueError(
                f"triton backend: '{name}' has {len(lst)} tensors but '{names[0]}' has {n}"
            )
    for i in range(n):
        p = lists[0][i]
        for li, (name, lst, dtypes) in enumerate(zip(names, lists, allowed_dtypes)):
            t = lst[i]
            if li >= 2 and isinstance(t, Q8):
                _check_q8(name, i, t)
            elif not isinstance(t, torch.Tensor):
                raise ValueError(f"{_where(name, i)} is not a tensor")
            elif t.dtype not in dtypes:
                raise ValueError(
                    f"{_where(name, i)} has dtype {t.dtype}; "
                    f"supported: {', '.join(str(d) for d in dtypes)}"
                )
            elif not t.is_contiguous():
                raise ValueError(f"{_where(name, i)} is not contiguous")
            if t.numel() != p.numel():
                raise ValueError(
                    f"{_where(name, i)} has {t.numel()} elements "
                    f"but {names[0]}[{i}] has {p.numel()}"
                )
            if t.device != p.device:
                raise ValueError(
                    f"{_where(name, i)} is on {t.device} "
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


def _step_config(numel: int, interpret: bool, blk: int | None):
    """(grid, ROWS, COLS, BLK) of a step: programs of ``ROWS x COLS`` lanes, each row one int8 block of
    ``blk`` elements (``COLS`` the next power of two) when ``blk`` is given, else one row of ``COLS``. A
    tensor shorter than its block is one row."""
    grid, block = _launch_config(numel, interpret)
    if blk is None:
        return grid, 1, block, block
    cols = min(triton.next_power_of_2(blk), block)
    rows = block // cols
    return (triton.cdiv(state_precision.n_blocks(numel, blk), rows),), rows, cols, blk


def _q8_block(name, i, states):
    """The int8 block size shared by a parameter's :class:`~.state_precision.Q8` states, None without one."""
    blocks = {t.block for t in states if isinstance(t, Q8)}
    if len(blocks) > 1:
        raise ValueError(f"triton backend: {name}[{i}] (list index {i}) has int8 states in blocks of "
                         f"{sorted(blocks)}; one parameter's states share one block size")
    return blocks.pop() if blocks else None


def _state_arg(t):
    """(kind, element pointer, scale pointer) of a state entry; the scale pointer of a tensor is itself
    (never read)."""
    if isinstance(t, Q8):
        return _Q8_KINDS[t.kind], t.codes, t.scale
    return (_BF16 if t.dtype == torch.bfloat16 else _PLAIN), t, t


def _salts(state_step, n, states_lists, what):
    """One salt per tensor (``state_precision.salt`` of its step, as the int32 of the same bits), from
    ``state_step`` (an int, or one per tensor); 0 for a call whose state needs none."""
    if state_step is None:
        if any(state_precision.needs_step(lst) for lst in states_lists):
            raise ValueError(f"triton backend: {what} with low-precision optimizer state (bf16 or int8) needs "
                             "state_step (the parameters' step count, the salt of its stochastic rounding)")
        return [0] * n
    steps = state_step if isinstance(state_step, (list, tuple)) else [state_step] * n
    if len(steps) != n:
        raise ValueError(f"triton backend: state_step has {len(steps)} entries for {n} tensors")
    out = []
    for s in steps:
        u = state_precision.salt(int(s))
        out.append(u - (1 << 32) if u >= 1 << 31 else u)
    return out


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
              grad_scale=None, found_inf=None, state_step=None):
    """One Lion step. ``exp_avgs`` may mix fp32/fp16 tensors, bf16 ones and :class:`~.state_precision.Q8`
    blocks; bf16 and int8 state need ``state_step`` (an int, or one per tensor: the salt of its rounding)."""
    k = _kernels()
    interpret = k["interpret"]
    _validate(
        ("params", "grads", "exp_avgs"),
        (params, grads, exp_avgs),
        (_PARAM_DTYPES, _GRAD_DTYPES, _STATE_DTYPES),
        interpret,
    )
    salts = _salts(state_step, len(params), (exp_avgs,), "lion_step")
    skip, gargs = _grad_args(params, maximize, clip_value, grad_scale, found_inf)
    if skip:
        return
    s_lr = _f32(lr)
    s_b1, s_omb1 = _f32(beta1), _f32(1.0 - beta1)
    s_b2, s_omb2 = _f32(beta2), _f32(1.0 - beta2)
    s_wd = _f32(weight_decay)
    has_wd = weight_decay != 0
    for i, (p, g, m, salt) in enumerate(zip(params, grads, exp_avgs, salts)):
        numel = p.numel()
        if numel == 0:
            continue
        mk, m_t, m_s = _state_arg(m)
        grid, rows, cols, blk = _step_config(numel, interpret, _q8_block("exp_avgs", i, (m,)))
        k["lion"][grid](
            p, g, m_t, m_s, gargs["scale_ptr"], gargs["flag_ptr"], numel, gargs["clip_value"],
            s_lr, s_b1, s_omb1, s_b2, s_omb2, s_wd, salt,
            HAS_WD=has_wd,
            MAXIMIZE=gargs["MAXIMIZE"],
            HAS_CLIP=gargs["HAS_CLIP"],
            HAS_SCALE=gargs["HAS_SCALE"],
            HAS_FLAG=gargs["HAS_FLAG"],
            P_BF16=p.dtype == torch.bfloat16,
            M_KIND=mk,
            ROWS=rows,
            COLS=cols,
            BLK=blk,
            num_warps=_GPU_NUM_WARPS,
            enable_fp_fusion=False,
        )


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, lr, beta1, beta2, eps,
               weight_decay, step, maximize=False, clip_value=None, grad_scale=None, found_inf=None,
               state_step=None):
    """One AdamW step; ``max_exp_avg_sqs`` given means amsgrad. The state lists may mix fp32/fp16 tensors,
    bf16 ones and :class:`~.state_precision.Q8` blocks, which round with ``state_step`` as their salt
    (default: ``step``)."""
    k = _kernels()
    interpret = k["interpret"]
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs")
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    dtypes = (_PARAM_DTYPES, _GRAD_DTYPES, _STATE_DTYPES, _STATE_DTYPES)
    amsgrad = max_exp_avg_sqs is not None
    if amsgrad:
        names, lists, dtypes = names + ("max_exp_avg_sqs",), lists + (max_exp_avg_sqs,), dtypes + (_STATE_DTYPES,)
    _validate(names, lists, dtypes, interpret)
    salts = _salts(step if state_step is None else state_step, len(params), lists[2:], "adamw_step")
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
    for i, (p, g, m, v, vmax, salt) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, vmaxs, salts)):
        numel = p.numel()
        if numel == 0:
            continue
        (mk, m_t, m_s), (vk, v_t, v_s), (xk, x_t, x_s) = _state_arg(m), _state_arg(v), _state_arg(vmax)
        blk = _q8_block("exp_avgs", i, (m, v, vmax) if amsgrad else (m, v))
        grid, rows, cols, blk = _step_config(numel, interpret, blk)
        k["adamw"][grid](
            p, g, m_t, m_s, v_t, v_s, x_t, x_s, gargs["scale_ptr"], gargs["flag_ptr"], numel,
            gargs["clip_value"], s_decay, s_b1, s_omb1, s_b2, s_omb2, s_bc2_sqrt, s_eps, s_step_size, salt,
            HAS_WD=has_wd,
            MAXIMIZE=gargs["MAXIMIZE"],
            HAS_CLIP=gargs["HAS_CLIP"],
            HAS_SCALE=gargs["HAS_SCALE"],
            HAS_FLAG=gargs["HAS_FLAG"],
            AMSGRAD=amsgrad,
            P_BF16=p.dtype == torch.bfloat16,
            M_KIND=mk,
            V_KIND=vk,
            VMAX_KIND=xk,
            ROWS=rows,
            COLS=cols,
            BLK=blk,
            num_warps=_GPU_NUM_WARPS,
            enable_fp_fusion=False,
        )


# ---------------------------------------------------------------- the state load / store alone
def _state_copy(src, dst, step):
    """Run the steps' load of ``src`` and store into ``dst`` (tensors or Q8 of one size and device)."""
    k = _kernels()
    interpret = k["interpret"]
    sk, s_t, s_s = _state_arg(src)
    dk, d_t, d_s = _state_arg(dst)
    numel = s_t.numel()
    if numel == 0:
        return
    if s_t.device.type == "cpu" and not interpret:
        raise ValueError("triton backend: CPU tensors need TRITON_INTERPRET=1 set before the first call")
    grid, rows, cols, blk = _step_config(numel, interpret, _q8_block("state", 0, (src, dst)))
    k["state"][grid](s_t, s_s, d_t, d_s, numel, _salts(step, 1, (), "")[0],
                     SRC_KIND=sk, DST_KIND=dk, ROWS=rows, COLS=cols, BLK=blk, num_warps=_GPU_NUM_WARPS,
                     enable_fp_fusion=False)


def _fp32_contiguous(x, what):
    if x.dtype != torch.float32:
        raise TypeError(f"{what} takes fp32 values, got {x.dtype}")
    return x.detach().contiguous()


def quantize(x: torch.Tensor, step: int, kind: str, block: int = state_precision.BLOCK):
    """``(codes, scales)`` of fp32 ``x`` in int8 blocks of ``block``, by the store of the step kernels: bit
    for bit :func:`state_precision.quantize <shardopt.kernels.state_precision.quantize>`."""
    x = _fp32_contiguous(x, "quantize")
    q = Q8(torch.empty(x.shape, dtype=state_precision.code_dtype(kind), device=x.device),
           torch.empty(state_precision.n_blocks(x.numel(), block), dtype=torch.float32, device=x.device), kind,
           block)
    _check_q8("quantize", 0, q)
    _state_copy(x, q, step)
    return q.codes, q.scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, kind: str,
               block: int = state_precision.BLOCK) -> torch.Tensor:
    """fp32 values of int8 blocks of ``block``, by the load of the step kernels (as
    ``state_precision.dequantize``)."""
    q = Q8(codes.contiguous(), scale.contiguous().to(torch.float32), kind, block)
    _check_q8("dequantize", 0, q)
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    _state_copy(q, out, 1)
    return out


def round_bf16(x: torch.Tensor, step: int) -> torch.Tensor:
    """bf16 of fp32 ``x`` by the store of the step kernels (as ``state_precision.round_bf16``)."""
    x = _fp32_contiguous(x, "round_bf16")
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    _state_copy(x, out, step)
    return out


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
