"""Build script for qoq_torch.

Without a CUDA-enabled torch (or with ``QOQ_FORCE_CPU=1``) this installs the pure-Python package: the
CPU reference path, no compiler needed. Where torch has CUDA it also builds the extension
``qoq_torch._C`` from ``csrc/`` (sm_90a by default; set ``TORCH_CUDA_ARCH_LIST``, e.g. "8.0;8.9;9.0a").
"""
from __future__ import annotations

import glob
import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def csrc_sources() -> list[str]:
    """Every .cu/.cpp under csrc/; ``QOQ_CSRC_ONLY=gemm,quant`` limits the build to those kernel families
    (plus csrc/module.cpp), so a kernel developer's build is not broken by another family's work in progress."""
    files = glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
    files += glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    families = [f for f in os.environ.get("QOQ_CSRC_ONLY", "").split(",") if f]
    if families:
        files = [f for f in files if os.path.dirname(f) == "csrc"
                 or any(f.startswith(os.path.join("csrc", fam) + os.sep) for fam in families)]
    return sorted(files)


def source_hash() -> str:
    """Hash of every csrc file (the same function the loader uses to detect a stale build)."""
    spec = importlib.util.spec_from_file_location(
        "_qoq_source_hash", os.path.join(ROOT, "qoq_torch", "ops", "_source_hash.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.csrc_hash(ROOT) or "unknown"


def cutlass_include() -> list[str]:
    try:
        import cutlass_library  # from the PyPI package nvidia-cutlass
    except ImportError:
        return []
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return [inc] if os.path.isdir(inc) else []


def cuda_extensions():
    if os.environ.get("QOQ_FORCE_CPU", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    define = [f"-DQOQ_SOURCE_HASH=\"{source_hash()}\""]
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DNDEBUG"]
    if os.environ.get("QOQ_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    ext = CUDAExtension(
        name="qoq_torch._C",
        sources=csrc_sources(),
        include_dirs=[os.path.join(ROOT, "csrc")] + cutlass_include(),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"] + define,
            # No --use_fast_math: the kernels reproduce the reference's IEEE divisions bit for bit.
            "nvcc": nvcc_flags + define,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="qoq_torch",
    version="0.1.0",
    description="W4A8KV4 (QoQ) quantization for Hugging Face LLMs as torch.library custom ops",
    packages=find_packages(include=["qoq_torch", "qoq_torch.*"]),
    package_data={"qoq_torch": ["data/*", "data/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "cuda": ["nvidia-cutlass>=4.2", "pybind11>=2.12", "ninja"],
    },
    entry_points={"console_scripts": ["qoq=qoq_torch.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
