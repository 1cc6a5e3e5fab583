"""Optimizer-state precision: the storage formats and the reference load/store.

An update always runs in fp32: the state is *loaded* (bf16 -> fp32, exact),
the unchanged fp32 math of :mod:`shardopt.kernels.torch_ops` runs, and the new
fp32 values are *stored* back. Only the store rounds, and this module defines
how, bit for bit; any kernel that takes low-precision state must match it.

**Formats** (``state_dtype`` of a param group, :data:`FORMATS`):

* ``"fp32"`` (default): the state as it always was (fp64 for fp64 parameters).
* ``"bf16"``: bf16 tensors under torch's key names, rounded stochastically.
* ``"int8"``: block-wise int8 with one fp32 scale per block, *not available
  yet*: a :class:`StateFormat` whose ``available`` is False, refused at
  construction. Its store/load will be two more functions here.

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
    "int8": StateFormat("int8", torch.int8, 1.0 + 4.0 / 256, available=False,
                        doc="block-wise int8 with one fp32 scale per block, planned"),
}
STATE_DTYPES = tuple(FORMATS)  # the valid values, in the order errors list them
DEFAULT = "fp32"
LOW = (torch.bfloat16,)  # storage dtypes the reference loads/stores through this module
LOW_SET = frozenset(LOW)


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
    return f.dtype


def is_low(t: torch.Tensor) -> bool:
    return t.dtype in LOW


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


def round_bf16(x: torch.Tensor, step: int) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 stochastically, keyed by each element's value and ``step``."""
    if x.dtype != torch.float32:
        raise TypeError(f"round_bf16 takes fp32 values, got {x.dtype}")
    s = salt(step)
    flat = x.detach().contiguous().view(-1)
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


# ---------------------------------------------------------------- load / store for the kernels
def load(states, *, copy: bool):
    """Working fp32 (fp64) tensors for ``states``: low-precision ones widened (new tensors), the others
    themselves, or clones with ``copy`` (a device skip flag: compute aside, write back gated)."""
    return [t.float() if is_low(t) else (t.clone() if copy else t) for t in states]


def store(targets, works, *, step, found_inf=None) -> None:
    """Write the updated ``works`` into ``targets``: a bf16 target by :func:`round_bf16` at ``step`` (an int,
    or one per tensor), any other one by a plain copy where it was worked on aside. Nothing is written
    where the device flag ``found_inf`` is set."""
    steps = step if isinstance(step, (list, tuple)) else [step] * len(targets)
    keep = None if found_inf is None else found_inf != 0
    for t, w, s in zip(targets, works, steps):
        if is_low(t):
            if s is None:
                raise ValueError("storing low-precision optimizer state needs the step (the rounding's salt)")
            new = round_bf16(w, s)
        elif w is t:
            continue
        else:
            new = w.to(t.dtype)
        t.copy_(new if keep is None else torch.where(keep, t, new))


def needs_step(states) -> bool:
    """Whether any of ``states`` is stored in a format whose store needs the step salt."""
    return not LOW_SET.isdisjoint({t.dtype for t in states})
