"""Fused kernels for DiT sampling, one op per module.

Each op dispatches on the device of its inputs: CUDA tensors launch the Triton kernel; CPU tensors run the
native extension's C++ kernel where it is built, else the Triton interpreter when `TRITON_INTERPRET=1` is
set before import, else the PyTorch reference. `backend=` picks one explicitly (see `_backend.choose`).
"""
from ._backend import choose, interpreter_numpy_bug, interpreting, triton_available, triton_mode
from .attention import attention, attention_ref
from .cross_attention import cross_attention, cross_attention_ref
from .gqa_attention import gqa_attention, gqa_attention_ref, merge_attention
from .adaln import adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref
from .scheduler_step import scheduler_step, scheduler_step_ref
from .apg_guidance import apg_guidance, apg_guidance_ref
from .linear_gelu import PackedLinear, linear, linear_gelu, linear_gelu_ref, prepack_linear
from .linear_int8 import Int8Linear, linear_int8, prepack_int8
from .linear_fp8 import Fp8Linear, fp8_supported, linear_fp8, prepack_fp8
from .linear_swiglu import PackedSwiGLU, linear_swiglu, linear_swiglu_ref, prepack_swiglu, swiglu, swiglu_ref
from . import _native
from ._native import native_available

# After the modules above have defined the ops: the extension adds C++ CPU kernels to them.
_native.load()

__all__ = [
    "attention", "attention_ref", "cross_attention", "cross_attention_ref", "gqa_attention", "gqa_attention_ref",
    "merge_attention", "adaln_modulate", "adaln_modulate_ref", "gated_residual_adaln", "gated_residual_adaln_ref",
    "scheduler_step", "scheduler_step_ref", "apg_guidance", "apg_guidance_ref", "linear_gelu", "linear_gelu_ref",
    "linear", "prepack_linear", "PackedLinear", "Int8Linear", "linear_int8", "prepack_int8", "Fp8Linear",
    "fp8_supported", "linear_fp8", "prepack_fp8", "choose", "interpreter_numpy_bug", "interpreting",
    "native_available", "triton_available", "triton_mode", "PackedSwiGLU", "linear_swiglu", "linear_swiglu_ref",
    "prepack_swiglu", "swiglu", "swiglu_ref",
]
