"""Fused Triton kernels for DiT sampling, one op per module.

Each op dispatches on the device of its inputs: CUDA tensors launch the Triton kernel; CPU tensors run
the PyTorch reference, or the Triton interpreter when `TRITON_INTERPRET=1` is set before import.
"""
from ._backend import interpreting, triton_available, triton_mode
from .attention import attention, attention_ref
from .adaln import adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref
from .scheduler_step import scheduler_step, scheduler_step_ref
from .linear_gelu import PackedLinear, linear, linear_gelu, linear_gelu_ref, prepack_linear

__all__ = [
    "attention", "attention_ref", "adaln_modulate", "adaln_modulate_ref", "gated_residual_adaln", "gated_residual_adaln_ref",
    "scheduler_step", "scheduler_step_ref", "linear_gelu", "linear_gelu_ref", "linear", "prepack_linear", "PackedLinear",
    "interpreting", "triton_available", "triton_mode",
]
