"""The native extension `ditengine._C`, loaded in one place and logged once.

Importing it registers C++ CPU kernels for ops that the kernel modules define (`TORCH_LIBRARY_IMPL(ditengine,
CPU, m)` in csrc/*.cpp); from then on `torch.ops.ditengine.<op>` on CPU tensors runs the C++ code, and the
Python implementation stays the definition, the fake (meta) implementation and the fallback. `load()` runs
at the end of `ditengine.kernels`' import, after the ops are defined. `DITENGINE_NATIVE=0` skips it, which
is how the tests check the package without the extension.

`DITENGINE_ISA` caps the kernels' vector ISA: one of `ISAS` ("avx512", "avx2", "baseline"); unset or empty,
the best this CPU runs. Any other value makes `load()`, hence `import ditengine`, raise a ValueError naming
the variable and the accepted values: csrc/cpu.cpp would ignore it silently, and someone who sets it is
measuring or checking one variant, so running another one (or the reference) would mislead them. A known
ISA this CPU lacks (avx512 on an AVX2-only CPU) is capped by the extension; `load()` logs once which ISA
runs instead.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("ditengine")

ISAS = ("avx512", "avx2", "baseline")  # the kernel variants of csrc/cpu.cpp, best first

_module = None
_reason = "not loaded yet"


def requested_isa() -> str | None:
    """The ISA DITENGINE_ISA asks for, or None when it is unset or empty; a ValueError for any other value."""
    want = os.environ.get("DITENGINE_ISA", "")
    if want and want not in ISAS:
        raise ValueError(f"DITENGINE_ISA={want!r}: expected one of {', '.join(ISAS)} (or unset for the best this "
                         "CPU runs)")
    return want or None


def load():
    """Import ditengine._C once; returns the module, or None (logged once) when it is absent or broken.
    Raises a ValueError, before importing it, when DITENGINE_ISA is not one of `ISAS`."""
    global _module, _reason
    if _module is not None or _reason != "not loaded yet":
        return _module
    if os.environ.get("DITENGINE_NATIVE", "1") == "0":
        _reason = "disabled by DITENGINE_NATIVE=0"
        log.info("ditengine: native extension %s; CPU ops run the Triton interpreter or the PyTorch reference",
                 _reason)
        return None
    requested = requested_isa()  # before the import: C++ reads the variable when its kernels first run
    try:
        from .. import _C
    except (ImportError, OSError) as err:
        if not built():  # a pure-Python install (DITENGINE_SKIP_EXT=1, no compiler): said once, quietly
            _reason = "not built"
            log.info("ditengine: native extension not built; CPU ops run the Triton interpreter or the PyTorch "
                     "reference")
            return None
        _reason = f"failed to load ({err}); rebuild with pip install --no-build-isolation -e ."  # e.g. another torch
        log.warning("ditengine: native extension %s; CPU ops fall back to the PyTorch reference", _reason)
        return None
    _module, _reason = _C, ""
    chosen = _C.isa()
    if requested is not None and chosen != requested:  # the extension caps the request at what the CPU runs
        log.warning("ditengine: DITENGINE_ISA=%s asks for kernels this CPU cannot run; the native kernels use %s",
                    requested, chosen)
    return _module


def built() -> bool:
    """Whether a compiled `ditengine._C` is installed (whatever happens when it is imported)."""
    import importlib.util

    return importlib.util.find_spec("ditengine._C") is not None


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


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
    except RuntimeError:  # a kernel registered by the extension ahead of its Python definition
        return False
    return True


def defined_ops() -> tuple[str, ...]:
    """The ops the kernel modules define under torch.ops.ditengine, sorted; asked of the dispatcher, so no list
    of names can fall behind a new op."""
    names = (name for name in torch._C._dispatch_get_all_op_names() if name.startswith("ditengine::"))
    return tuple(sorted(name.removeprefix("ditengine::") for name in names if _has_schema(name)))


def native_ops() -> tuple[str, ...]:
    """The defined ops that the extension serves with a C++ CPU kernel; () without the extension."""
    return tuple(op for op in defined_ops() if serves(op))
