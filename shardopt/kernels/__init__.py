"""Kernels: how fast one elementwise optimizer step runs on one rank.

Every backend implements the same entry points over *lists* of tensors (one
call updates many tensors, the multi-tensor-apply shape):

``lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize, clip_value, grad_scale, found_inf)``
``adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step, ...)``
``grad_stats(grads, *, clip_value)``: the fused gradient pass, float64 ``[sum of squares, bad]``

* ``params``: fp32, bf16 or fp16 tensors (fp64 ones always go to the
  ``torch`` backend, which computes them in fp64), updated in place.
* ``grads``: same shapes, any float dtype; never written.
* state: fp32 tensors of the same shapes (fp64 for fp64 params), updated in place;
  or bf16 ones (``state_dtype="bf16"``), which need ``state_step`` (the
  parameters' step count, the salt of the stochastic rounding defined in
  :mod:`.state_precision`; AdamW's is its ``step``). A backend that lists
  ``"state_bf16"`` in its ``FEATURES`` takes them (``cpu`` and ``triton`` do,
  bit for bit); the ``cuda`` backend's such calls go to ``triton`` where it can
  be had, else to the ``torch`` backend.
  int8 state (``state_dtype="int8"``) comes as :class:`~.state_precision.Q8`
  pairs (codes + one fp32 scale per 256 elements), in the same lists as plain
  fp32 state of the parameters too small to quantize; a backend listing
  ``"state_int8"`` takes them in blocks of 256, and one listing
  ``"state_int8_block"`` the smaller blocks of narrow rows too (``cpu`` and
  ``triton`` take both); the others send the call to the ``torch`` backend.
* ``step`` is the (already incremented, >= 1) step count shared by the call;
  the optimizer groups parameters by their own counts.
* ``grad_scale`` / ``found_inf``: fp32 0-d tensors (the clip coefficient, and a
  nonzero flag that makes the call a no-op), read by the kernels, never by the
  host, so a CUDA step does not synchronize. A CPU ``found_inf`` is read here.

The per-element formulas are written out in :mod:`shardopt.kernels.torch_ops`
(the ``torch`` backend); every backend follows the same order of operations so
results agree to the last bit for Lion and to ~1 ulp for AdamW.

Backends: ``torch`` (foreach reference), ``cpu`` (C++/OpenMP extension built at
first use), ``triton`` (runs on CPU under ``TRITON_INTERPRET=1``), ``cuda``.
``auto`` picks the fastest one available for the tensors' device. A backend
module lists what it implements in ``FEATURES`` and ``PARAM_DTYPES``; a call
that needs more is served by the ``torch`` backend (same results), which is how
fp64 parameters work everywhere. A backend with ``"grad_stats"`` in its
``FEATURES`` also lists ``GRAD_DTYPES``: the gradients it cannot take (fp64,
not dense) are summed by the ``torch`` backend and added. Complex tensors are updated through their real
views (as torch.optim does), and tensors that are dense but not contiguous
(``channels_last``) through their storage order.
"""
from __future__ import annotations

import warnings

import torch

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
# what a step call may need beyond plain fp32/bf16 contiguous tensors
FEATURES = ("maximize", "clip_value", "grad_scale", "found_inf", "amsgrad", "strided", "state_bf16", "state_int8",
            "state_int8_block")

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


def serves(backend: str, dtype: torch.dtype, needs=()) -> bool:
    """Whether concrete ``backend`` runs parameters of ``dtype`` with the features ``needs`` itself."""
    if backend == "torch":
        return True
    m = _module(backend)
    return dtype in m.PARAM_DTYPES and set(needs) <= set(m.FEATURES)


# ---------------------------------------------------------------- argument preparation
def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill one gap-free block of memory in some order of its dimensions
    (contiguous, ``channels_last``, a transposed matrix): its storage order is then a flat view."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides where it matters (a dimension of size 1 has no meaningful stride)."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _prepare(lists):
    """Drop empty tensors, view complex ones as real, and give every gradient its parameter's strides.

    Returns the new lists (the first is the params) and whether any tensor is dense but not contiguous.
    """
    params = lists[0]
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    out = [[_real(lst[i]) if lst is not None else None for i in keep] for lst in lists]
    strided = False
    ps, gs = out[0], out[1]
    for k, p in enumerate(ps):
        g = gs[k]
        if not p.is_contiguous():
            strided = True
        if not _same_layout(g, p):
            # the kernels pair elements by storage position: give the gradient the parameter's layout
            g2 = torch.empty_like(p, dtype=g.dtype) if is_dense(p) else torch.empty(p.shape, dtype=g.dtype, device=g.device)
            gs[k] = g2.copy_(g)
    return out, strided


def _with_contiguous(fn, lists):
    """Run ``fn`` on contiguous copies of non-contiguous tensors, then write the results back."""
    fixed, back = [], []
    for li, lst in enumerate(lists):
        if lst is None:
            fixed.append(None)
            continue
        new = []
        for t in lst:
            if t.is_contiguous():
                new.append(t)
            else:
                c = t.contiguous()
                new.append(c)
                if li != 1:  # gradients are read only
                    back.append((t, c))
        fixed.append(new)
    fn(fixed)
    for t, c in back:
        t.copy_(c)


def _host_flag(found_inf):
    """(skip now, flag for the kernels): a CPU flag is read here; a device flag goes to the kernels."""
    if found_inf is None:
        return False, None
    if found_inf.device.type == "cpu":
        return bool(found_inf.item()), None
    return False, found_inf


def _plain_dtypes(params, grads):
    """The parameters' dtypes when :func:`_prepare` would leave the lists as they are for a compiled backend
    (every parameter non-empty and contiguous, every gradient contiguous and of its parameter's shape), else None.
    Complex dtypes are returned as such: no compiled backend serves them, so they still go through ``_prepare``."""
    dtypes = set()
    for p, g in zip(params, grads):
        if not (p.is_contiguous() and g.is_contiguous() and p.shape == g.shape and p.numel()):
            return None
        dtypes.add(p.dtype)
    return dtypes


def _run(name, lists, needs, backend, kwargs):
    if backend != "torch" and len(lists[1]) == len(lists[0]):
        # the usual case: one call, decided once per dtype instead of once per tensor
        dtypes = _plain_dtypes(lists[0], lists[1])
        if dtypes is not None:
            b = resolve_backend(backend, lists[0][0].device)
            if b != "torch" and all(serves(b, dt, needs) for dt in dtypes):
                getattr(_module(b), name)(*lists, **kwargs)
                return
    lists, strided = _prepare(lists)
    params = lists[0]
    if not params:
        return
    b = resolve_backend(backend, params[0].device)
    if strided:
        needs = needs | {"strided"}
    by_backend: dict[str, list[int]] = {}
    for k, p in enumerate(params):
        by_backend.setdefault(b if serves(b, p.dtype, needs) else _fallback(b, p.dtype, needs), []).append(k)
    for bk, idx in by_backend.items():
        sub = [[lst[k] for k in idx] if lst is not None else None for lst in lists]
        fn = getattr(_module(bk), name)

        def call(ls, fn=fn):
            fn(*ls, **kwargs)

        if strided and bk != "torch" and "strided" not in _module(bk).FEATURES:
            _with_contiguous(call, sub)
        else:
            call(sub)


def _fallback(backend: str, dtype: torch.dtype, needs) -> str:
    """Who serves what ``backend`` cannot: on a CUDA device the Triton kernels when they can (bf16 and int8
    state, which the CUDA kernels do not take), else the ``torch`` reference."""
    if backend == "cuda":
        from . import triton_ops

        if triton_ops.available() and serves("triton", dtype, needs):
            return "triton"
    return "torch"


def _state_needs(states, state_step):
    """``{"state_bf16"}`` when any state tensor is bf16, ``{"state_int8"}`` when any is a
    :class:`~.state_precision.Q8` (both then need ``state_step``), else empty."""
    from . import state_precision

    if not state_precision.needs_step(states):
        return set()
    if state_step is None:
        raise ValueError("a step with low-precision optimizer state needs state_step (the parameters' step count)")
    out = {"state_int8"} if state_precision.has_int8(states) else set()
    if any(isinstance(t, state_precision.Q8) and t.block != state_precision.BLOCK for t in states):
        out.add("state_int8_block")  # blocks of fewer than 256 (narrow rows)
    if any(not isinstance(t, state_precision.Q8) and t.dtype in state_precision.LOW_SET for t in states):
        out.add("state_bf16")
    return out


def _needs(maximize, clip_value, grad_scale, found_inf, amsgrad=False):
    out = set()
    if maximize:
        out.add("maximize")
    if clip_value is not None:
        out.add("clip_value")
    if grad_scale is not None:
        out.add("grad_scale")
    if found_inf is not None:
        out.add("found_inf")
    if amsgrad:
        out.add("amsgrad")
    return out


# ---------------------------------------------------------------- entry points
def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize=False, clip_value=None,
              grad_scale=None, found_inf=None, state_step=None, backend="auto"):
    skip, found_inf = _host_flag(found_inf)
    if skip or not params:
        return
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    needs = _needs(maximize, clip_value, grad_scale, found_inf) | _state_needs(exp_avgs, state_step)
    if needs & {"state_bf16", "state_int8"}:
        kw["state_step"] = state_step
    for key, val in (("maximize", maximize), ("clip_value", clip_value), ("grad_scale", grad_scale),
                     ("found_inf", found_inf)):
        if key in needs:
            kw[key] = val
    _run("lion_step", [params, grads, exp_avgs], needs, backend, kw)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, lr, beta1, beta2, eps,
               weight_decay, step, maximize=False, clip_value=None, grad_scale=None, found_inf=None,
               backend="auto"):
    skip, found_inf = _host_flag(found_inf)
    if skip or not params:
        return
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    needs = _needs(maximize, clip_value, grad_scale, found_inf, max_exp_avg_sqs is not None)
    # bf16 state rounds with the (per-call) step as its salt
    needs |= _state_needs(list(exp_avgs) + list(exp_avg_sqs) + list(max_exp_avg_sqs or []), step)
    for key, val in (("maximize", maximize), ("clip_value", clip_value), ("grad_scale", grad_scale),
                     ("found_inf", found_inf)):
        if key in needs:
            kw[key] = val
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if max_exp_avg_sqs is not None else [])
    _run("adamw_step", lists, needs, backend, kw)


def grad_stats(grads, *, clip_value=None, backend="auto") -> torch.Tensor:
    """The fused gradient pass over this rank's pieces: float64 ``[sum of squares, bad]`` on their device.

    ``sum of squares`` is of the value-clipped gradients (the ``torch`` backend
    squares exactly in fp64; ``cpu`` squares in fp32 and sums small blocks in
    fp32, the blocks in fp64: within 1e-6 relative); ``bad`` is 0 when every raw
    gradient is finite and NaN otherwise.
    """
    first = next((g for g in grads if g.numel() > 0), None)
    if first is None:
        dev = grads[0].device if grads else torch.device("cpu")
        return torch.zeros(2, dtype=torch.float64, device=dev)
    from . import torch_ops

    b = resolve_backend(backend, first.device)
    m = _module(b)
    if b == "torch" or "grad_stats" not in getattr(m, "FEATURES", ()):
        return torch_ops.grad_stats([_real(g) for g in grads if g.numel() > 0], clip_value=clip_value)
    if all(g.is_contiguous() and g.dtype in m.GRAD_DTYPES for g in grads):
        # the usual case: the extension skips empty tensors itself and reads contiguous ones as they are
        return m.grad_stats(grads, clip_value=clip_value)
    gs = [_real(g) for g in grads if g.numel() > 0]
    # the order of the elements does not matter to a sum: a dense tensor goes as its storage block
    fast = [_storage_flat(g) for g in gs if g.dtype in m.GRAD_DTYPES and is_dense(g)]
    rest = [g for g in gs if not (g.dtype in m.GRAD_DTYPES and is_dense(g))]  # fp64, gaps: the reference
    out = m.grad_stats(fast, clip_value=clip_value) if fast else None
    if rest:
        ref = torch_ops.grad_stats(rest, clip_value=clip_value)
        out = ref if out is None else out + ref
    return out


def _storage_flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as one contiguous 1-D view, in storage order."""
    if t.is_contiguous():
        return t.view(-1)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())
