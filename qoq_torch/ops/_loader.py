"""Loads the CUDA extension `qoq_torch._C` (which registers the CUDA impls of the `qoq` ops).

A missing, stale or broken extension never crashes the import: it leaves the CPU reference path and an
explanation in `extension_status()`. Ops with no CUDA kernel run their reference impl on CUDA tensors
(correct, slow), with a one-time warning.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from ._source_hash import csrc_hash
from .library import LIB, REFERENCES

_STATUS = {"loaded": False, "message": "not loaded yet", "cuda_ops": []}
_REBUILD = "rebuild it with: pip install --no-build-isolation --no-deps -e . (on a machine with CUDA torch and nvcc)"


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_cuda_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"qoq::{name}", "CUDA")


def _fallback(name, impl):
    warned = []

    def run(*args):
        if not warned:
            warnings.warn(f"qoq::{name} has no CUDA kernel in this build; running the (slow) reference on the GPU",
                          stacklevel=3)
            warned.append(True)
        return impl(*args)

    return run


def load_extension() -> dict:
    """Import `_C` once; record which ops have CUDA kernels; fill the gaps with the reference."""
    if _STATUS["message"] != "not loaded yet":
        return _STATUS
    if os.environ.get("QOQ_DISABLE_CUDA_EXT") == "1":
        _STATUS["message"] = "disabled by QOQ_DISABLE_CUDA_EXT=1"
    else:
        try:
            _C = importlib.import_module("qoq_torch._C")  # registers the CUDA kernels
        except ImportError as exc:
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == "qoq_torch._C"
            _STATUS["message"] = ("the CUDA extension qoq_torch._C is not built (CPU reference path)" if missing
                                  else f"the CUDA extension qoq_torch._C failed to load ({exc}); {_REBUILD}")
            if not missing:
                warnings.warn(_STATUS["message"], stacklevel=2)
        else:
            _STATUS["loaded"] = True
            built, current = _C.source_hash(), csrc_hash(_package_root())
            if current is not None and built != current:
                _STATUS["message"] = f"the CUDA extension is stale (built from csrc {built}, sources are {current}); {_REBUILD}"
                warnings.warn(_STATUS["message"], stacklevel=2)
            elif _C.torch_version() != torch.__version__.split("+")[0]:
                _STATUS["message"] = (f"the CUDA extension was built for torch {_C.torch_version()}, "
                                      f"running torch {torch.__version__}; {_REBUILD}")
                warnings.warn(_STATUS["message"], stacklevel=2)
            else:
                _STATUS["message"] = "CUDA extension loaded"
    _STATUS["cuda_ops"] = sorted(n for n in REFERENCES if _has_cuda_kernel(n))
    if torch.cuda.is_available():
        for name, impl in REFERENCES.items():
            if not _has_cuda_kernel(name):
                LIB.impl(name, _fallback(name, impl), "CUDA")
    return _STATUS


def extension_status() -> dict:
    """{'loaded': bool, 'message': str, 'cuda_ops': [ops with a CUDA kernel]}."""
    return dict(load_extension())


def cuda_available() -> bool:
    """True when a GPU is visible and the CUDA extension is loaded (the fast path)."""
    return torch.cuda.is_available() and load_extension()["loaded"]
