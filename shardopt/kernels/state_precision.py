"""Optimizer-state precision: the storage formats and the reference load/store.

An update always runs in fp32: the state is *loaded* (bf16 -> fp32, exact),
the unchanged fp32 math of :mod:`shardopt.kernels.torch_ops` runs, and the new
fp32 values are *stored* back. Only the store rounds, and this module defines
how, bit for bit; any kernel that takes low-precision state must match it.

**Formats** (``state_dtype`` of a param group, :data:`FORMATS`):

* ``"fp32"`` (default): the state as it always was (fp64 for fp64 parameters).
* ``"bf16"``: bf16 tensors under torch's key names, rounded stochastically.
* ``"int8"``: one byte per element in blocks of :data:`BLOCK` (256) elements
  with one fp32 scale per block (:class:`Q8`, see "int8 blocks" below), for the
  parameters :func:`int8_eligible` accepts; the others keep fp32 state.

fp64 and complex parameters keep full-precision state whatever the format
(bf16 has no complex dtype, and an fp64 run asks for fp64 state).

**Stochastic rounding, keyed by value.** A bf16 number has 8 significant bits:
an EMA increment ``(1 - beta2)*(g - m) = 0.01*(g - m)`` is below half a bf16
ulp of ``m`` for most elements, so round-to-nearest drops it and the EMA
stalls wherever it sits. Rounding up with probability equal to the dropped
fraction keeps the stored value unbiased (``E[store(x)] = x``), so the EMA
still tracks its input on average. The random bits come from a hash of the
element's *own new fp32 value* and the step, not of its position:

    u    = fp32 bits of the new value (uint32)
    h    = mix32(u ^ (step * 0x9E3779B9 mod 2^32))
    bf16 = (u + (h & 0xFFFF)) >> 16                  (finite values)

with the 32-bit finalizer ``mix32`` below (x ^= x >> 16; x *= 0x7feb352d;
x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16, all mod 2^32). An element
therefore rounds the same way in every layout, on every rank and with any
shard boundary, with no index bookkeeping: sharded runs stay bitwise equal to
the single process, and a checkpoint resharded N -> M resumes on the same bits.
Adding the 16 random bits to the magnitude bits rounds the magnitude up with
probability (dropped bits)/2^16, for either sign; a carry into the exponent is
the correct next bf16 value (up to inf past the largest finite bf16). inf and
NaN keep round-to-nearest (they stay inf/NaN). The ``step`` salt (the
parameter's own step count, >= 1) gives each step fresh bits for an element
whose value repeats.

The reference is written in torch with int64 arithmetic masked to 32 bits; the
second multiplier is split in 16-bit halves so no product leaves int64.

**int8 blocks.** A quantized state tensor is a :class:`Q8`: ``codes`` (one
byte per element, the state's shape) and ``scale`` (fp32, one per block). A
block is ``B`` consecutive elements of the local tensor in flat order (the last
one may be short), ``B = 256`` unless the parameter's rows ask for less. The
optimizers give int8 state to parameters with at least 2 dimensions and 4096
elements whose rows (``numel / shape[0]``) a block size ``B`` in [64, 256]
divides (:func:`int8_block`: 256 where it divides them, else the largest
divisor in range, e.g. 96 or 192), so an FSDP2 ``Shard(0)`` piece holds whole
blocks, and ZeRO-1 cuts such parameters at multiples of ``B``: every layout then
sees the same blocks as one process, and a sharded run is bitwise the single
process. DeepSpeed's flat partitions use ``B = 256`` from their own start.
The ``cpu`` and ``triton`` kernels take every block size.
Two mappings, both stochastically rounded with the value-keyed hash above
(``h = mix32(bits(x) ^ salt(step))`` of the fp32 value ``x`` being stored):

* ``"signed"`` (momenta: Lion, AdamW ``exp_avg``, Muon): linear.
  ``scale = absmax(block) / 127``; ``q = x / scale``;
  ``code = clamp(floor(q + r), -127, 127)`` with ``r = (h >> 8) * 2^-24``,
  and ``code = 0`` where ``q`` is not finite (an all-zero block).
  Load: ``code * scale``.
* ``"sqrt"`` (AdamW ``exp_avg_sq`` / ``max_exp_avg_sq``, non-negative with a
  range of many decades): the square root ``s = sqrt(v)`` is stored, relative
  to the block's largest, as an unsigned 8-bit float with 4 exponent and 4
  mantissa bits: ``scale = max(s)``, ``w = s / scale`` in [0, 1]. For
  ``w >= 2^-14`` the fp32 bits of ``w`` get ``h & (2^19 - 1)`` added and lose
  their 19 low bits, and ``code = (bits >> 19) - 1792`` (exponent ``e`` in
  1..15, value ``(1 + m/16) * 2^(e - 15)``, 1.0 is code 240); below,
  ``code = floor(w * 2^18 + r)`` (steps of 2^-18, code 16 is 2^-14 again).
  Not finite: 0. Load: ``v = (T[code] * scale)^2`` with ``T`` the exact
  table of those values. A linear int8 code of ``v`` (or of ``sqrt(v)``)
  would round the small second moments of a block to zero, and AdamW divides
  by them: ``m / (0 + eps)`` is a step of thousands of ``lr``. This format
  keeps 2^18 of range in ``sqrt(v)`` (2^36 in ``v``) with 1/16 relative steps.

Only IEEE-exact operations appear (division, product, floor, sqrt, bit
operations), so every backend can match this reference to the last bit. The
reference takes care to get them correctly rounded from torch itself: torch's
fp32 ``sqrt`` on the CPU is not (an ulp off on about 0.7% of inputs in some
builds), so the square root is taken in fp64 and rounded to fp32 (correctly
rounded, fp64 holding more than twice fp32's bits); and ``absmax / 127`` divides
by a tensor, since torch on a GPU turns a division by a Python number into a
product with its rounded reciprocal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GOLDEN = 0x9E3779B9
MIX_1 = 0x7FEB352D
MIX_2 = 0x846CA68B
MASK32 = 0xFFFFFFFF
# elements per pass of the int64 reference (bounds its temporaries, ~6x8 bytes per element)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StateFormat:
    """How a param group's optimizer state is stored."""

    name: str  # the state_dtype value
    dtype: torch.dtype  # storage dtype of each state tensor
    element_bytes: float  # bytes per state element, block scales included
    available: bool = True
    doc: str = ""


FORMATS = {
    "fp32": StateFormat("fp32", torch.float32, 4.0, doc="fp32, as torch.optim keeps it"),
    "bf16": StateFormat("bf16", torch.bfloat16, 2.0, doc="bf16 with value-keyed stochastic rounding"),
    # 1 byte + one fp32 scale per block of 256
    "int8": StateFormat("int8", torch.int8, 1.0 + 4.0 / 256,
                        doc="block-wise int8 with one fp32 scale per 256 elements"),
}
STATE_DTYPES = tuple(FORMATS)  # the valid values, in the order errors list them
DEFAULT = "fp32"
LOW = (torch.bfloat16,)  # storage dtypes the reference loads/stores through this module
LOW_SET = frozenset(LOW)
BLOCK = 256  # int8 elements per fp32 scale (fewer where a parameter's rows ask: int8_block)
MIN_BLOCK = 64  # the smallest block int8_block picks (4 bytes of scale per 64 elements: 1.06 bytes each)
INT8_MIN_NUMEL = 4096  # smaller parameters keep fp32 state under state_dtype="int8"
SQRT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq"})  # state keys stored with the "sqrt" int8 mapping
SCALE_SUFFIX = "_scale"  # optimizer.state key of a quantized state tensor's scales: f"{key}{SCALE_SUFFIX}"


def storage_dtype(fmt: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a state tensor of a ``param_dtype`` parameter in format ``fmt``.

    fp64 parameters keep fp64 state and complex ones their own dtype, whatever ``fmt``."""
    if param_dtype.is_complex:
        return param_dtype
    if param_dtype == torch.float64:
        return torch.float64
    f = FORMATS[fmt]
    if not f.available:
        raise NotImplementedError(f"state_dtype={fmt!r} is not available yet")
    if fmt == "int8":  # the plain state of a parameter int8 does not cover (see int8_eligible)
        return torch.float32
    return f.dtype


def is_low(t) -> bool:
    return isinstance(t, Q8) or t.dtype in LOW


def int8_block(shape) -> int:
    """The int8 block size of a parameter of global ``shape`` under ``state_dtype="int8"``, 0 when it keeps
    fp32 state. It needs at least 2 dimensions and :data:`INT8_MIN_NUMEL` elements; its blocks must divide
    its rows (``numel / shape[0]``), so that no layout's cut, by rows or at multiples of the block, splits
    one: :data:`BLOCK` (256) when it divides them, else the largest divisor of the row length between
    :data:`MIN_BLOCK` and 256 (a row of 96 is one block of 96, a row of 384 two of 192), else 0."""
    shape = tuple(shape)
    if len(shape) < 2 or shape[0] == 0:
        return 0
    n = 1
    for d in shape:
        n *= d
    if n < INT8_MIN_NUMEL:
        return 0
    row = n // shape[0]
    for b in range(BLOCK, MIN_BLOCK - 1, -1):
        if row % b == 0:
            return b
    return 0


def int8_eligible(shape) -> bool:
    """Whether a parameter of global ``shape`` gets int8 state (:func:`int8_block`); others keep fp32 state."""
    return int8_block(shape) > 0


def int8_kind(key: str) -> str:
    """The int8 mapping of state ``key``: ``"sqrt"`` for AdamW's second moments, ``"signed"`` otherwise."""
    return "sqrt" if key in SQRT_KEYS else "signed"


def code_dtype(kind: str) -> torch.dtype:
    return torch.uint8 if kind == "sqrt" else torch.int8


def n_blocks(numel: int, block: int = BLOCK) -> int:
    return -(-numel // block)


def scale_shape(shape, block: int = BLOCK) -> tuple:
    """Shape of the scales of a quantized state of ``shape`` in blocks of ``block``: ``(rows, row/block)``
    for an eligible parameter (so its scales shard by rows with it), ``(blocks,)`` for a 1-D piece."""
    shape = tuple(shape)
    if len(shape) >= 2:
        n = 1
        for d in shape[1:]:
            n *= d
        return (shape[0], n_blocks(n, block))
    return (n_blocks(shape[0] if shape else 1, block),)


class Q8:
    """A block-quantized state tensor as the kernels take it: ``codes`` (int8/uint8, the state's shape,
    contiguous) and ``scale`` (fp32, one per ``block`` elements in flat order, 256 unless the parameter's
    rows ask for fewer: :func:`int8_block`), mapping ``kind``."""

    __slots__ = ("codes", "scale", "kind", "block")

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, kind: str, block: int = BLOCK):
        if kind not in ("signed", "sqrt"):
            raise ValueError(f"unknown int8 mapping {kind!r}")
        if scale.numel() != n_blocks(codes.numel(), block):
            raise ValueError(f"int8 state of {codes.numel()} elements needs {n_blocks(codes.numel(), block)} "
                             f"scales, got {scale.numel()}")
        self.codes, self.scale, self.kind, self.block = codes, scale, kind, block

    # what the dispatcher asks of a state tensor
    shape = property(lambda self: self.codes.shape)
    dtype = property(lambda self: self.codes.dtype)
    device = property(lambda self: self.codes.device)

    def numel(self) -> int:
        return self.codes.numel()

    def is_complex(self) -> bool:
        return False

    def is_contiguous(self) -> bool:
        return self.codes.is_contiguous() and self.scale.is_contiguous()

    def contiguous(self):
        return self if self.is_contiguous() else Q8(self.codes.contiguous(), self.scale.contiguous(), self.kind,
                                                    self.block)

    def clone(self) -> "Q8":
        return Q8(self.codes.clone(), self.scale.clone(), self.kind, self.block)

    def copy_(self, other: "Q8"):
        self.codes.copy_(other.codes)
        self.scale.copy_(other.scale)
        return self

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.kind, self.block)

    def __repr__(self):
        return f"Q8({self.kind}, shape={tuple(self.codes.shape)}, blocks={self.scale.numel()} of {self.block})"


# ---------------------------------------------------------------- the hash and the rounding
def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer finalizer on int64 tensors holding uint32 values (returns the same)."""
    x = x ^ (x >> 16)
    x = (x * MIX_1) & MASK32  # < 2^32 * 2^31: no int64 overflow
    x = x ^ (x >> 15)
    # x * MIX_2 could pass 2^63: multiply by its 16-bit halves; only the low 32 bits matter
    lo, hi = MIX_2 & 0xFFFF, MIX_2 >> 16
    x = (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32
    return x ^ (x >> 16)


def salt(step: int) -> int:
    return (int(step) * GOLDEN) & MASK32


def _round_flat(x: torch.Tensor, s: int) -> torch.Tensor:
    """bf16 of the 1-D fp32 tensor ``x`` by value-keyed stochastic rounding with salt ``s``."""
    u = x.view(torch.int32).to(torch.int64) & MASK32
    h = mix32(u ^ s)
    bits = (u + (h & 0xFFFF)) >> 16  # in [0, 2^16): the sign bit cannot carry out of a finite value
    bits = bits - ((bits >> 15) << 16)  # as a signed 16-bit value
    sr = bits.to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isfinite(x), sr, x.to(torch.bfloat16))


def _fp32_flat(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise TypeError(f"{what} takes fp32 values, got {x.dtype}")
    return x.detach().contiguous().view(-1)


def round_bf16(x: torch.Tensor, step: int) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 stochastically, keyed by each element's value and ``step``."""
    flat, s = _fp32_flat(x, "round_bf16"), salt(step)
    n = flat.numel()
    if n <= _CHUNK:
        return _round_flat(flat, s).view(x.shape)
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    for a in range(0, n, _CHUNK):
        out[a:a + _CHUNK] = _round_flat(flat[a:a + _CHUNK], s)
    return out.view(x.shape)


def round_nearest_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even (what ``.to(bfloat16)`` does): the baseline the docs compare against."""
    return x.to(torch.bfloat16)


# ---------------------------------------------------------------- int8 blocks
_TWO_M24 = 2.0 ** -24
_SUB_LIMIT = 2.0 ** -14  # smallest normal value of the "sqrt" code
_SUB_STEP = 2.0 ** 18  # 1 / the subnormal step


def _sqrt_table() -> torch.Tensor:
    t = [c * 2.0 ** -18 for c in range(16)]
    t += [(1.0 + (c & 15) / 16.0) * 2.0 ** ((c >> 4) - 15) for c in range(16, 256)]
    return torch.tensor(t, dtype=torch.float32)


SQRT_TABLE = _sqrt_table()  # fp32 value of each "sqrt" code (exact); codes above 240 are never written
_tables: dict = {}


def _table(device) -> torch.Tensor:
    t = _tables.get(device)
    if t is None:
        t = _tables[device] = SQRT_TABLE.to(device)
    return t


def _blocked(x: torch.Tensor, block: int, fill=0.0) -> torch.Tensor:
    """A 1-D tensor as (blocks, block), the short last block padded with ``fill``."""
    n = x.numel()
    nb = n_blocks(n, block)
    if nb * block != n:
        x = torch.cat([x, x.new_full((nb * block - n,), fill)])
    return x.view(nb, block)


def _uniform(u: torch.Tensor, s: int) -> torch.Tensor:
    """r in [0, 1) from the hash of the values' bits ``u`` (int64 holding uint32)."""
    return (mix32(u ^ s) >> 8).to(torch.float32) * _TWO_M24


def _quantize_flat(x: torch.Tensor, s: int, kind: str, block: int):
    """(codes, scales) of the 1-D fp32 ``x`` (a multiple of ``block`` long, or the whole tensor)."""
    n = x.numel()
    if kind == "signed":
        xb = _blocked(x, block)
        amax = xb.abs().amax(dim=1)
        scale = amax / torch.full_like(amax, 127.0)  # a true division on every device (see above)
        q = (xb / scale[:, None]).view(-1)[:n]
        u = x.view(torch.int32).to(torch.int64) & MASK32
        code = torch.floor(q + _uniform(u, s)).clamp_(-127.0, 127.0)
        code = torch.where(torch.isfinite(q), code, torch.zeros_like(code))
        return code.to(torch.int8), scale
    v = torch.sqrt(x.double()).float()  # correctly rounded (see the module docstring)
    vb = _blocked(v, block)
    scale = vb.amax(dim=1)
    w = (vb / scale[:, None]).view(-1)[:n]
    u = v.view(torch.int32).to(torch.int64) & MASK32
    h = mix32(u ^ s)
    wb = w.view(torch.int32).to(torch.int64)
    normal = ((wb + (h & 0x7FFFF)) >> 19) - 1792
    sub = torch.floor(w * _SUB_STEP + (h >> 8).to(torch.float32) * _TWO_M24)
    code = torch.where(w >= _SUB_LIMIT, normal.to(torch.float32), sub)
    code = torch.where(torch.isfinite(w), code, torch.zeros_like(code))
    return code.to(torch.uint8), scale


def quantize(x: torch.Tensor, step: int, kind: str, block: int = BLOCK):
    """``(codes, scales)`` of the fp32 tensor ``x`` in int8 blocks of ``block`` (mapping ``kind``, salt
    ``step``): codes shaped like ``x``, scales 1-D, one per block in flat order."""
    flat, s = _fp32_flat(x, "quantize"), salt(step)
    n = flat.numel()
    chunk = max(1, _CHUNK // block) * block  # whole blocks per pass
    if n <= chunk:
        c, sc = _quantize_flat(flat, s, kind, block)
        return c.view(x.shape), sc
    codes = torch.empty(n, dtype=code_dtype(kind), device=x.device)
    scales = torch.empty(n_blocks(n, block), dtype=torch.float32, device=x.device)
    for a in range(0, n, chunk):
        c, sc = _quantize_flat(flat[a:a + chunk], s, kind, block)
        codes[a:a + c.numel()] = c
        scales[a // block:a // block + sc.numel()] = sc
    return codes.view(x.shape), scales


def dequantize(codes: torch.Tensor, scale: torch.Tensor, kind: str, block: int = BLOCK) -> torch.Tensor:
    """fp32 values of int8 blocks of ``block`` (the inverse of :func:`quantize` up to its rounding)."""
    n = codes.numel()
    sc = scale.reshape(-1).to(torch.float32)
    if kind == "signed":
        vals = _blocked(codes.reshape(-1).to(torch.float32), block) * sc[:, None]
        return vals.view(-1)[:n].view(codes.shape)
    t = _table(codes.device)[codes.reshape(-1).to(torch.int64)]
    s = _blocked(t, block) * sc[:, None]
    return (s * s).view(-1)[:n].view(codes.shape)


# ---------------------------------------------------------------- load / store for the kernels
def load(states, *, copy: bool):
    """Working fp32 (fp64) tensors for ``states``: low-precision ones widened (new tensors), the others
    themselves, or clones with ``copy`` (a device skip flag: compute aside, write back gated)."""
    return [t.dequantize() if isinstance(t, Q8) else t.float() if is_low(t) else (t.clone() if copy else t)
            for t in states]


def store(targets, works, *, step, found_inf=None) -> None:
    """Write the updated ``works`` into ``targets``: a bf16 target by :func:`round_bf16` at ``step`` (an int,
    or one per tensor), any other one by a plain copy where it was worked on aside. Nothing is written
    where the device flag ``found_inf`` is set."""
    steps = step if isinstance(step, (list, tuple)) else [step] * len(targets)
    keep = None if found_inf is None else found_inf != 0
    for t, w, s in zip(targets, works, steps):
        if is_low(t) and s is None:
            raise ValueError("storing low-precision optimizer state needs the step (the rounding's salt)")
        if isinstance(t, Q8):
            codes, scale = quantize(w, s, t.kind, t.block)
            if keep is not None:
                codes, scale = torch.where(keep, t.codes, codes), torch.where(keep, t.scale.view(-1), scale)
            t.codes.copy_(codes.view(t.codes.shape))
            t.scale.copy_(scale.view(t.scale.shape))
            continue
        if is_low(t):
            new = round_bf16(w, s)
        elif w is t:
            continue
        else:
            new = w.to(t.dtype)
        t.copy_(new if keep is None else torch.where(keep, t, new))


def needs_step(states) -> bool:
    """Whether any of ``states`` is stored in a format whose store needs the step salt."""
    return any(isinstance(t, Q8) for t in states) or not LOW_SET.isdisjoint({t.dtype for t in states})


def gate(found_inf, targets, news) -> None:
    """Copy each of ``news`` into the state in ``targets`` (same kinds: Q8 or tensor) unless the device
    flag ``found_inf`` is set."""
    keep = found_inf != 0
    for t, n in zip(targets, news):
        if isinstance(t, Q8):
            t.codes.copy_(torch.where(keep, t.codes, n.codes))
            t.scale.copy_(torch.where(keep, t.scale, n.scale))
        else:
            t.copy_(torch.where(keep, t, n.to(t.dtype)))


def has_int8(states) -> bool:
    return any(isinstance(t, Q8) for t in states)
