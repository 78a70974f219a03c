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


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising at import
        log.warning("ditengine: Triton is not importable (%s); kernels fall back to the PyTorch reference", err)
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
