"""shardopt: sharded, fused Lion / AdamW / Muon for PyTorch data parallelism.

A plain ``pip install -e .`` is pure Python: the C++ kernels in ``csrc/`` are
compiled on first use (``torch.utils.cpp_extension.load`` + ninja) and cached.
``SHARDOPT_BUILD_OPS=1 pip install --no-build-isolation .`` compiles them ahead
of time against the torch already installed.
"""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


class BuildPyWithSources(build_py):
    """Ship ``csrc/`` inside the package so JIT builds work from a wheel too."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "shardopt" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("SHARDOPT_BUILD_OPS", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "shardopt._C_cpu",
            ["csrc/cpu/fused_optim.cpp"],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-march=native"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    name="shardopt",
    version="0.1.0",
    description="Sharded, fused Lion/AdamW/Muon optimizers for PyTorch DDP, FSDP2, DeepSpeed and accelerate",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["shardopt", "shardopt.*"]),
    package_data={"shardopt": ["data/*.txt"]},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "demo": ["matplotlib", "tqdm"],
        "test": ["pytest>=7", "ninja", "matplotlib", "tqdm", "accelerate>=1.0", "triton", "transformers>=5"],
        "deepspeed": ["deepspeed>=0.16", "transformers"],
        "all": [
            "pytest>=7",
            "ninja",
            "matplotlib",
            "tqdm",
            "accelerate>=1.0",
            "triton",
            "deepspeed>=0.16",
            "transformers>=5",
        ],
    },
    entry_points={"console_scripts": ["shardopt=shardopt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
