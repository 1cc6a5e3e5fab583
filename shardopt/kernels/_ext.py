"""What the C++ (``cpu``) and CUDA (``cuda``) kernel modules share.

Each wraps one compiled extension that is loaded once: a prebuilt module
(``SHARDOPT_BUILD_OPS=1`` installs) if importable, else a JIT build with
:func:`torch.utils.cpp_extension.load`. Nothing raises while loading: the
loader remembers the module or a one-line reason, so ``available()`` and
``build_error()`` are cheap and :func:`shardopt.kernels.resolve_backend` can
fall back with one warning.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import threading
from pathlib import Path


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def build_name(base: str, sources, flags=()) -> str:
    """``base`` keyed by the build's inputs: ``<base>_<10 hex digits>``.

    The digits hash the sources' names and contents, the compiler flags and
    torch's version, so two checkouts or venvs with different kernels never
    share (and rebuild each other's) folder under ``TORCH_EXTENSIONS_DIR``
    (torch's JIT cache is keyed by the name alone), while one checkout keeps
    its build across processes. ``sources`` that do not exist (an install
    without the C++ sources, which then cannot build anyway) hash as their
    names only.
    """
    import torch

    h = hashlib.sha256()
    h.update(f"torch={torch.__version__}\0".encode())
    for s in sources:
        s = Path(s)
        h.update(f"{s.name}\0".encode())
        if s.is_file():
            h.update(s.read_bytes())
        h.update(b"\0")
    for f in flags:
        h.update(f"{f}\0".encode())
    return f"{base}_{h.hexdigest()[:10]}"


def is_stale(ext_name: str, sources) -> bool:
    """Best guess whether cpp_extension.load will compile (for the build notice only).

    ``ext_name`` is the name given to ``load`` (:func:`build_name`'s): its folder
    holds a build of exactly these sources, unless one was edited since (ninja
    then recompiles by modification time).
    """
    try:
        from torch.utils.cpp_extension import _get_build_directory

        so = Path(_get_build_directory(ext_name, False)) / f"{ext_name}.so"
        return not so.is_file() or so.stat().st_mtime < max(Path(s).stat().st_mtime for s in sources)
    except Exception:
        return True


def summarize(exc: BaseException) -> str:
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


class ExtensionLoader:
    """Load one kernel extension once and expose its ``lion_step``/``adamw_step``.

    ``precheck()`` returns a reason the kernels cannot run here at all (checked
    before any build), or None; ``build()`` returns the JIT-built module.
    """

    def __init__(self, what: str, prebuilt: str, disable_env: str, build, precheck=None):
        self.what, self.prebuilt, self.disable_env = what, prebuilt, disable_env
        self.build, self.precheck = build, precheck
        self._lock = threading.Lock()
        self._module = None
        self._error: str | None = None
        self._tried = False

    def _load(self):
        if self._tried:
            return self._module
        with self._lock:
            if self._tried:
                return self._module
            reason = f"disabled by {self.disable_env}=1" if env_flag(self.disable_env) else (
                self.precheck() if self.precheck else None)
            if reason is not None:
                self._error = reason
            else:
                try:
                    try:
                        self._module = importlib.import_module(self.prebuilt)
                    except ImportError:
                        self._module = self.build()
                except Exception as exc:  # no compiler, no ninja/nvcc, compile error, ...
                    self._error = summarize(exc)
                    self._module = None
            self._tried = True
            return self._module

    def available(self) -> bool:
        """True when the extension is (or could now be) loaded."""
        return self._load() is not None

    def build_error(self) -> str | None:
        """Why the extension is unavailable (``None`` when it loaded)."""
        self._load()
        return self._error

    def load(self):
        """The extension module; raises ``RuntimeError`` with the reason if unavailable."""
        mod = self._load()
        if mod is None:
            raise RuntimeError(f"shardopt {self.what} kernels are unavailable: {self._error}")
        return mod

    def lion_step(self, params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay):
        self.load().lion_step(
            list(params), list(grads), list(exp_avgs),
            float(lr), float(beta1), float(beta2), float(weight_decay),
        )

    def adamw_step(self, params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step):
        self.load().adamw_step(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
        )
