import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton decides between its interpreter and compiling once, when it is first imported, and a test file may
# import it during collection (transformers does).  Without a GPU every Triton test runs under the
# interpreter, so set TRITON_INTERPRET=1 here, before any test file is imported; with one it stays unset.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def triton_interpreting():
    """Whether Triton kernels run under the interpreter in this process (TRITON_INTERPRET, set above without a
    GPU). A GPU session leaves it unset: the Triton tests on CPU tensors then skip, and the ``gpu`` ones run
    compiled."""
    try:
        import triton
    except ImportError:
        return os.environ.get("TRITON_INTERPRET") == "1"
    return bool(triton.knobs.runtime.interpret)


@pytest.fixture
def triton_on_cpu(triton_interpreting):
    """Skips a test of the Triton kernels on CPU tensors unless they run under the interpreter."""
    if not triton_interpreting:
        pytest.skip("the Triton kernels run on CPU tensors here, under TRITON_INTERPRET=1, which tests/conftest.py "
                    "sets only without a GPU")


@pytest.fixture
def triton_mode(request, triton_interpreting):
    """The mode of the Triton kernel tests (the files name it in ``pytestmark``): a ``gpu`` test needs the
    kernels compiled (TRITON_INTERPRET unset); any other runs them on CPU tensors under the interpreter
    (triton_on_cpu), and skips once shardopt's Triton kernels were built for a GPU in this process."""
    if request.node.get_closest_marker("gpu") is not None:
        if triton_interpreting:
            pytest.skip("the gpu tests need compiled Triton kernels: run them without TRITON_INTERPRET")
        return
    request.getfixturevalue("triton_on_cpu")
    from shardopt.kernels import triton_ns, triton_ops

    if any(built and not built["interpret"] for built in (triton_ops._built, triton_ns._built)):
        pytest.skip("triton kernels were already built for GPU in this process")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "slow: multi-rank or subprocess test")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
