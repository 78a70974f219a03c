"""Where Triton kernels can run, decided in one place and logged once.

CUDA tensors run Triton natively. CPU tensors run the reference, or Triton's interpreter when
`TRITON_INTERPRET=1` was set before Triton was imported. Without an importable Triton every call
routes to the reference.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

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


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """True when `op` should launch its Triton kernel for these tensors; the choice is logged once."""
    device_type = tensors[0].device.type
    if device_type == "cuda":
        choice = "triton" if triton_available() else "reference (no Triton)"
    elif device_type == "cpu" and interpreting():
        choice = "triton-interpreter" if triton_available() else "reference (no Triton)"
    else:
        choice = "reference"
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


def triton_mode() -> str:
    if not triton_available():
        return "unavailable"
    if torch.cuda.is_available():
        return "native (CUDA)"
    return "interpreter (TRITON_INTERPRET=1)" if interpreting() else "CPU: kernels run the PyTorch reference"
