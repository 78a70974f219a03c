"""Argument validation shared by the kernel launchers: one clear error naming the argument.

The checks of an op run in three places: its public function, its registered op's Python body (what runs on
CUDA, and on CPU without the native extension) and its C++ CPU kernel (csrc/checks.h). For one bad input all
three raise the same exception type (ValueError for a value or shape, TypeError for a dtype or a non-tensor)
with a message naming the argument: the public function and the op body call one check function per op, and
the C++ kernel spells its messages the same way. `op` prefixes a message with the op's name, as the C++
messages are; `cpp_dtype` / `cpp_sizes` spell a dtype and a shape as the C++ kernels print them.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# at::ScalarType's names (what a C++ message prints for a dtype), for the dtypes a kernel meets.
_CPP_DTYPE = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
              torch.complex32: "ComplexHalf"}


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the Python checks spell it: float32, bfloat16, int64."""
    return str(dtype).removeprefix("torch.")


def cpp_dtype(dtype: torch.dtype) -> str:
    """A dtype as a C++ message prints it (at::ScalarType): Float, BFloat16, Long."""
    return _CPP_DTYPE.get(dtype, dtype_name(dtype))


def cpp_sizes(t: torch.Tensor) -> str:
    """A tensor's shape as a C++ message prints it: [2, 4, 4]."""
    return str(list(t.shape))


def check_tensor(name: str, t, *, shape: tuple | None = None, ndim: int | None = None,
                 dtypes: tuple = FLOAT_DTYPES, device: torch.device | None = None, last_dim_contiguous: bool = True,
                 contiguous: bool = False, layout: str = "", op: str = "") -> torch.Tensor:
    """Validate `t`; `shape` entries may be None for "any". Returns `t` for chaining. `op`: a prefix naming the
    op, as its C++ kernel's messages have."""
    at = f"{op}: " if op else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{at}{name}: expected a torch.Tensor, got {type(t).__name__}")
    where = f" {layout}" if layout else ""
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{at}{name}: expected {ndim} dimensions{where}, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
            raise ValueError(f"{at}{name}: expected shape {want}{where}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{at}{name}: expected dtype in {[dtype_name(d) for d in dtypes]}, got {dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{at}{name}: on {t.device}, expected {device} like the other inputs")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{at}{name}: expected a contiguous tensor, got strides {t.stride()}")
    if last_dim_contiguous and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{at}{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}")
    return t


def check_packed_input(x, dtype: torch.dtype, in_features: int, device: torch.device) -> torch.Tensor:
    """The activations x (..., in_features) of a GEMM on prepacked weights: a tensor of the dtype the weights were
    packed for, on their device (the prepacked linear, SwiGLU and int8 calls)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"x: expected dtype {dtype} (what the weights were packed for), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected (..., {in_features}), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x: on {x.device}, expected {device} like the packed weights")
    return x
