"""Fused Triton kernels for DiT sampling, one op per module.

Each op dispatches on the device of its inputs: CUDA tensors launch the Triton kernel; CPU tensors run
the PyTorch reference, or the Triton interpreter when `TRITON_INTERPRET=1` is set before import.
"""
from ._backend import interpreting, triton_available, triton_mode

__all__ = ["interpreting", "triton_available", "triton_mode"]
