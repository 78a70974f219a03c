"""The native extension `ditengine._C`, loaded in one place and logged once.

Importing it registers C++ CPU kernels for ops that the kernel modules define (`TORCH_LIBRARY_IMPL(ditengine,
CPU, m)` in csrc/*.cpp); from then on `torch.ops.ditengine.<op>` on CPU tensors runs the C++ code, and the
Python implementation stays the definition, the fake (meta) implementation and the fallback. `load()` runs
at the end of `ditengine.kernels`' import, after the ops are defined. `DITENGINE_NATIVE=0` skips it, which
is how the tests check the package without the extension.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("ditengine")

_module = None
_reason = "not loaded yet"


def load():
    """Import ditengine._C once; returns the module, or None (logged once) when it is absent or broken."""
    global _module, _reason
    if _module is not None or _reason != "not loaded yet":
        return _module
    if os.environ.get("DITENGINE_NATIVE", "1") == "0":
        _reason = "disabled by DITENGINE_NATIVE=0"
        log.info("ditengine: native extension %s; CPU ops run the Triton interpreter or the PyTorch reference",
                 _reason)
        return None
    try:
        from .. import _C
    except ModuleNotFoundError as err:  # a pure-Python install (DITENGINE_SKIP_EXT=1, no compiler, no torch)
        _reason = f"not built ({err})"
        log.info("ditengine: native extension %s; CPU ops run the Triton interpreter or the PyTorch reference",
                 _reason)
        return None
    except (ImportError, OSError) as err:  # e.g. built against another torch: undefined symbols
        _reason = f"failed to load ({err}); rebuild with pip install --no-build-isolation -e ."
        log.warning("ditengine: native extension %s; CPU ops fall back to the PyTorch reference", _reason)
        return None
    _module, _reason = _C, ""
    return _module


def native_available() -> bool:
    return load() is not None


def unavailable_reason() -> str:
    """Why the extension is not in use; empty when it is."""
    load()
    return _reason


def build_info() -> dict:
    """Compiler, flags, the ISA chosen on this CPU, OpenMP, threads, torch version; {} without the extension."""
    module = load()
    return dict(module.build_info()) if module is not None else {}


def serves(op: str) -> bool:
    """True when the dispatcher holds a C++ CPU kernel for ditengine::<op> (asked of the dispatcher itself)."""
    return native_available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"ditengine::{op}", "CPU")
