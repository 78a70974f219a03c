"""Which implementation runs an op, decided in one place and logged once per op, device and choice.

CUDA tensors run Triton natively. CPU tensors run the native extension's C++ kernel where it serves the op
(`kernels/_native.py`), else Triton's interpreter when `TRITON_INTERPRET=1` was set before Triton was
imported, else the PyTorch reference. Without an importable Triton, Triton calls route to the reference.

The default choice is made by the dispatcher: a C++ CPU kernel registered for `ditengine::<op>` wins over
the Python implementation on CPU tensors, so the Python implementation (`use_triton`) only decides between
Triton and the reference. The public functions also take an explicit `backend=` ("native", "triton",
"reference"), resolved by `choose`; that is how the interpreter stays reachable on a CPU that has the
native kernels (the Triton tests use it).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from . import _native

log = logging.getLogger("ditengine")

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as err:  # ImportError, or a broken install raising at import
    _IMPORT_ERROR = err

    class _Stub:
        """Stands in for `triton` and `triton.language` so kernel modules still define (never launch)."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    if _IMPORT_ERROR is not None:
        log.warning("ditengine: Triton is not importable (%s); kernels fall back to the PyTorch reference",
                    _IMPORT_ERROR)
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _log_choice(op: str, device_type: str, choice: str) -> None:
    log.info("ditengine: %s on %s runs %s", op, device_type, choice)


def _python_choice(device_type: str) -> str:
    if device_type == "cuda":
        return "triton" if triton_available() else "reference (no Triton)"
    if device_type == "cpu" and interpreting():
        return "triton-interpreter" if triton_available() else "reference (no Triton)"
    return "reference"


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """In an op's Python implementation: True when it should launch its Triton kernel for these tensors.

    On CPU this runs only where no native kernel serves the op. The choice is logged once."""
    device_type = tensors[0].device.type
    choice = _python_choice(device_type)
    _log_choice(op, device_type, choice)
    return choice.startswith("triton")


def interpreter_numpy_bug(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's interpreter fails here, when it is the known Triton < 3.7 bug under numpy >= 2.4 (its
    error: "only 0-dimensional arrays can be converted to Python scalars"); None when that pair is absent."""
    import numpy

    if triton_version is None:
        if not triton_available():
            return None
        triton_version = triton.__version__
    numpy_version = numpy_version or numpy.__version__

    def major_minor(version: str) -> tuple[int, int]:
        major, minor = version.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter fails under numpy {numpy_version} (fixed in Triton 3.7): "
                "only 0-dimensional arrays can be converted to Python scalars")
    return None


BACKENDS = ("auto", "native", "triton", "reference")


def choose(op: str, device: torch.device, backend: str | None = None) -> str:
    """What runs `op` on `device`: "native", "triton", "triton-interpreter", "reference" or "reference (no
    Triton)"; logged once. `backend` None or "auto" is the dispatcher's default; an explicit backend that
    cannot run here raises a ValueError saying why."""
    return _choose(op, device.type, backend or "auto", interpreting())


# Cached: what can run is fixed once the extension is loaded and Triton imported, and this runs on every
# call of an op, where Python time is a real share on CPU.
@functools.lru_cache(maxsize=None)
def _choose(op: str, device_type: str, backend: str, interpret: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        choice = "reference"
    elif backend == "native":
        if device_type != "cpu":
            raise ValueError(f"backend='native': the native kernels run on CPU tensors, got {device_type}")
        if not _native.serves(op):
            reason = _native.unavailable_reason() or f"no C++ CPU kernel is registered for ditengine::{op}"
            raise ValueError(f"backend='native': {op} has no native kernel here: {reason}")
        choice = "native"
    elif backend == "triton":
        if device_type == "cpu" and not interpret:
            raise ValueError("backend='triton' on CPU needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                             "importing ditengine")
        if not triton_available():
            raise ValueError(f"backend='triton': Triton is not importable ({_IMPORT_ERROR})")
        choice = "triton" if device_type == "cuda" else "triton-interpreter"
    elif device_type == "cpu" and _native.serves(op):
        choice = "native"
    else:
        choice = _python_choice(device_type)  # what the op's Python implementation will run
    _log_choice(op, device_type, choice)
    return choice


def route(op: str, device: torch.device, backend: str | None) -> str:
    """For the public functions: "op" (call the registered op and let the dispatcher choose) when `backend`
    is None or "auto", else `choose(op, device, backend)`. Explicit backends are for eager calls (tests,
    benchmarks); under torch.compile the default path is the op alone, so the graph has no break."""
    if backend in (None, "auto"):
        if not torch.compiler.is_compiling():
            choose(op, device)  # logs once what serves this op on this device
        return "op"
    return choose(op, device, backend)


# A prepacked op (linear_gelu, linear_swiglu) picks its form once per weight, when it is packed, not per call.
# The forms are the backends above plus two library GEMMs: "mkldnn" (oneDNN's GEMM on its own packed weight
# layout, with its fused GELU) and "stacked" (one GEMM over the stacked weights, then the epilogue kernel).
# Each op registers which forms it has and its rule for "auto" (how fast each form measured on which CPUs).
_PREPACKED: dict[str, tuple[tuple[str, ...], object]] = {}


def autotune_enabled() -> bool:
    """Tune by timing (Triton configs on a GPU, oneDNN weight layouts on a CPU) unless DITENGINE_AUTOTUNE=0 (the
    test suite pins one choice)."""
    return os.environ.get("DITENGINE_AUTOTUNE", "1") != "0"


def register_prepacked(op: str, forms: tuple[str, ...], rule) -> None:
    """`rule(device, dtype) -> form` is the op's choice for backend="auto"."""
    _PREPACKED[op] = (("auto", *forms), rule)


def choose_prepacked(op: str, device: torch.device, dtype: torch.dtype, backend: str = "auto") -> str:
    """The form a prepacked `op` runs in on `device` for activations of `dtype`: the op's rule for "auto", else
    `backend` itself, checked as `choose` checks it (an explicit "native" or "triton" that cannot run here
    raises a ValueError saying why); logged once."""
    forms, rule = _PREPACKED[op]
    if backend not in forms:
        raise ValueError(f"backend={backend!r}: expected one of {forms}")
    if backend == "auto":
        backend = rule(device, dtype)
    elif backend in ("native", "triton"):
        choose(op, device, backend)
    _log_choice(f"{op} ({str(dtype).removeprefix('torch.')}, prepacked)", device.type, backend)
    return backend


def triton_mode() -> str:
    if not triton_available():
        return "unavailable"
    if torch.cuda.is_available():
        return "native (CUDA)"
    if interpreting():
        return "interpreter (TRITON_INTERPRET=1)"
    return "CPU: Triton unused (native kernels or the PyTorch reference)"
