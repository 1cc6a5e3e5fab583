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
from pathlib import Path

import torch

from ._ext import ExtensionLoader, is_stale

__all__ = ["available", "build_error", "load", "needs_build", "source_path", "lion_step", "adamw_step"]

# what the compiled kernels take themselves; anything else is served by the torch backend
FEATURES: frozenset = frozenset()
PARAM_DTYPES = (torch.float32, torch.bfloat16)

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
        if is_stale(name, [src]):
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
    return src is not None and is_stale(EXT_NAME, [src])


_LOADER = ExtensionLoader("C++ CPU", "shardopt._C_cpu", "SHARDOPT_DISABLE_CPP", _jit_build)
available = _LOADER.available
build_error = _LOADER.build_error
load = _LOADER.load
lion_step = _LOADER.lion_step
adamw_step = _LOADER.adamw_step
