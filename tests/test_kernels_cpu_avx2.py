"""The C++ kernels' AVX2 code paths, on a host whose default build takes the AVX-512 ones.

``fused_optim.cpp`` has hand-written intrinsics for both instruction sets (the int8 blocks, fp16 loads),
chosen at compile time by ``-march=native``. The rest of the suite tests the one this host builds; here the
same source is built again with ``-mno-avx512f`` (about a minute, cached like the default build) and its
int8 quantization and steps are held to the torch reference bitwise, as in ``test_kernels_int8.py``. On a
host without AVX-512 the default build is the AVX2 one, which the rest of the suite tests: skipped.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import test_kernels_int8 as t8
from shardopt.kernels import cpu

ieee_sqrt = t8.ieee_sqrt  # the same fixture, for this module's tests


def _host_has_avx512() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and " avx512f" in cpuinfo.read_text()


@pytest.fixture(scope="module")
def avx2_ext():
    """The AVX2 build, installed as the loader's module for this file's tests."""
    if not _host_has_avx512():
        pytest.skip("the host has no AVX-512: its default build is the AVX2 one, which the suite tests")
    if not cpu.available():
        pytest.skip(f"C++ CPU extension unavailable: {cpu.build_error()}")
    if cpu.source_path() is None:
        pytest.skip("no C++ source to rebuild (a prebuilt wheel)")
    from torch.utils import cpp_extension

    flags = [*cpu.EXTRA_CFLAGS, "-mno-avx512f"]
    mod = cpp_extension.load(name=cpu.build_name(cpu.EXT_NAME + "_avx2", flags, cpu.EXTRA_LDFLAGS),
                             sources=[str(cpu.source_path())], extra_cflags=list(flags),
                             extra_ldflags=list(cpu.EXTRA_LDFLAGS))
    native = cpu.load()
    cpu._LOADER._module = mod
    try:
        yield mod
    finally:
        cpu._LOADER._module = native


def test_the_avx2_build_has_no_avx512(avx2_ext):
    """The steps below run it, and its code has no 512-bit registers (objdump, where installed)."""
    import shutil
    import subprocess

    assert cpu.load() is avx2_ext
    if shutil.which("objdump") is None:
        pytest.skip("objdump not installed")
    asm = subprocess.run(["objdump", "-d", avx2_ext.__file__], capture_output=True, text=True, check=True)
    assert "zmm" not in asm.stdout
    assert "ymm" in asm.stdout


@pytest.mark.parametrize("step", [1, 2**31 + 5])
@pytest.mark.parametrize("n", [255, 257, 4096 + 13, 100_000])
def test_avx2_quantize_is_state_precision(avx2_ext, ieee_sqrt, n, step):
    for kind in ("signed", "sqrt"):
        for x in t8._quant_inputs(n, step, kind):
            t8._check_quantize(avx2_ext, x, step, kind)


@pytest.mark.parametrize("opt", ["lion", "adamw"])
@pytest.mark.parametrize("case", ["plain", "combined"])
def test_avx2_int8_steps_match_torch(avx2_ext, ieee_sqrt, opt, case):
    """Params, codes and scales bitwise over several steps (fp32 params and grads: the full-block fast path;
    bf16 params and fp16 grads: the generic one), tensors large enough to run threaded."""
    for pdtype, gdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float16)):
        st, got, ref = t8.trajectories(opt, t8.SHAPES + t8.BIG_SHAPES[:2], pdtype, gdtype, False,
                                       t8.OPTION_CASES[case], seed=41)
        t8.assert_state_same(opt, got, ref)
        t8.assert_stepped(st, got)
