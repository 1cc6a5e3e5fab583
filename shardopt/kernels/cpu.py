"""The ``cpu`` backend: fused multi-tensor C++/OpenMP kernels.

The extension comes from, in order:

1. ``shardopt._C_cpu``, prebuilt by ``SHARDOPT_BUILD_OPS=1 pip install .``;
2. a JIT build of ``csrc/cpu/fused_optim.cpp`` with
   :func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja),
   cached by torch under ``TORCH_EXTENSIONS_DIR`` so only the first use pays.

Nothing here raises when the extension cannot be had: :func:`available`
returns ``False`` and :func:`build_error` says why, and
:func:`shardopt.kernels.resolve_backend` warns once and uses the ``torch``
backend.  ``SHARDOPT_DISABLE_CPP=1`` forces that fallback.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

__all__ = ["available", "build_error", "load", "source_path", "lion_step", "adamw_step"]

EXT_NAME = "shardopt_cpu_ops"
# -ffp-contract=off: no FMA contraction (bitwise partition invariance).
# -fno-math-errno: lets std::sqrt vectorize (changes no result; not fast-math).
EXTRA_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-march=native"]
EXTRA_LDFLAGS = ["-fopenmp"]
# Second try when the first build fails (e.g. a compiler without OpenMP or
# -march=native, like Apple clang): same kernels, serial, baseline ISA.
PORTABLE_NAME = EXT_NAME + "_portable"
PORTABLE_CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def _disabled() -> bool:
    return os.environ.get("SHARDOPT_DISABLE_CPP", "0").strip().lower() not in ("", "0", "false", "no", "off")


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


def _try_prebuilt():
    try:
        from shardopt import _C_cpu  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C_cpu


def _needs_build(name: str, src: Path) -> bool:
    """Best guess whether cpp_extension.load will compile (for the notice only)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        so = Path(_get_build_directory(name, False)) / f"{name}.so"
        return not so.is_file() or so.stat().st_mtime < src.stat().st_mtime
    except Exception:
        return True


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
    for name, cflags, ldflags in attempts:
        if _needs_build(name, src):
            print("shardopt: building C++ CPU kernels (first use, ~30 s)...", file=sys.stderr, flush=True)
        try:
            return cpp_extension.load(
                name=name,
                sources=[str(src)],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                verbose=verbose,
            )
        except Exception as exc:
            if first_error is None:
                first_error = exc
    raise first_error


def _summarize(exc: BaseException) -> str:
    """One line: the exception type and the most telling line of its message
    (a compiler ``error:``, a missing program, ...; else the last line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    best = lines[-1] if lines else repr(exc)
    for needle in ("error:", "not found", "No such file", "Permission denied"):
        hit = next((ln for ln in lines if needle in ln), None)
        if hit is not None:
            best = hit
            break
    return f"{type(exc).__name__}: {best[:500]}"


def _load():
    """Load (building if needed) once; remember the module or the error."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if _disabled():
            _error = "disabled by SHARDOPT_DISABLE_CPP=1"
        else:
            try:
                mod = _try_prebuilt()
                if mod is None:
                    mod = _jit_build()
                _module = mod
            except Exception as exc:  # no compiler, no ninja, compile error, ...
                _error = _summarize(exc)
                _module = None
        _tried = True
        return _module


def available() -> bool:
    """True when the C++ extension is (or could now be) loaded."""
    return _load() is not None


def build_error() -> str | None:
    """Why the extension is unavailable (``None`` when it loaded)."""
    _load()
    return _error


def load():
    """The extension module; raises ``RuntimeError`` with the reason if unavailable."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"shardopt C++ CPU kernels are unavailable: {_error}")
    return mod


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay):
    load().lion_step(
        list(params), list(grads), list(exp_avgs),
        float(lr), float(beta1), float(beta2), float(weight_decay),
    )


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step):
    load().adamw_step(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
    )
