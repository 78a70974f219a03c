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


def triton_mode() -> str:
    if not triton_available():
        return "unavailable"
    if torch.cuda.is_available():
        return "native (CUDA)"
    return "interpreter (TRITON_INTERPRET=1)" if interpreting() else "CPU: kernels run the PyTorch reference"


def has_native_kernel(op: str) -> bool:
    """Whether the native extension (csrc/) registered a CPU kernel of its own for `ditengine::<op>`."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ditengine::{op}", "CPU")
