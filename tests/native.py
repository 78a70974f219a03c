"""The native extension (csrc/, `ditengine._C`) in tests.

The C++ kernels register as the CPU kernels of the `torch.ops.ditengine.*` ops. Tests use the extension
when `ditengine._C` is importable (CI builds it); for development before a full build, a library built
from csrc/*.cpp with `torch.utils.cpp_extension.load(..., is_python_module=False)` can be named by
`DITENGINE_NATIVE_LIB=/path/to/lib.so`. Without either, only the native tests skip.
"""
import os

import pytest
import torch

import ditengine.kernels  # noqa: F401  (defines the ops the library registers kernels for)


def _load() -> None:
    try:
        import ditengine._C  # noqa: F401
    except ImportError:
        path = os.environ.get("DITENGINE_NATIVE_LIB")
        if path:
            torch.ops.load_library(path)


_load()


def has_native(op: str) -> bool:
    """Whether `ditengine::<op>` has a CPU kernel of its own (not only the Python definition)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ditengine::{op}", "CPU")


def needs_native(op: str):
    return pytest.mark.skipif(not has_native(op), reason="native extension not built")
