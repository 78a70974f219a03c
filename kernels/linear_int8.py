"""W8A8 int8 linear (+ tanh GELU) for the token GEMMs: int8 weights per output channel, int8 activations per
token, quantised on the fly (dynamic), int32 accumulation, dequantisation + bias + GELU in the epilogue.

    s_m  = max_k |x_mk| / 127,   q_mk = round_half_even(x_mk * (127 / max_k |x_mk|))     per row of x
    ws_n = max_k |w_nk| / 127,   wq_nk likewise                                         per row of w, once
    out_mn = act(float(sum_k q_mk wq_nk) * (s_m * ws_n) + b_n)

Symmetric scales (no zero points): the GEMM is a plain s8 x s8 -> s32 product. Per-token activation scales
follow each row's own range (the adaLN-modulated rows change scale from step to step with the
modulation), per-channel weight scales each output channel's.

Error bound (what the tests check): with |x - s q| <= s/2 and |w - ws wq| <= ws/2 per element, and the int32
sum exact (|sum| <= K 127^2 < 2^31 for K < 133,000),

    |out_mn - x_m . w_n| <= s_m/2 sum_k |w_nk| + ws_n/2 sum_k |x_mk| + K s_m ws_n / 4        (`error_bound`)

before the fp32 epilogue's roundings (and the GELU, whose slope is at most 1.13).

The op `ditengine::linear_int8` is this file's torch body (any device: `torch._int_mm` is oneDNN's int8 matmul
on x86, cuBLASLt's on CUDA) with a native CPU kernel in csrc/linear_int8.cpp (the same quantisation bit for
bit, one vectorised pass per row, the epilogue in place on the int32 result).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import cpp_dtype, cpp_sizes
from .linear_gelu import check_linear_weights

QMAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x (..., K): (q (..., K) int8, scale (..., 1) fp32), x ~ scale * q.

    An all-zero row gets scale 0; a row with a NaN or Inf gets scale NaN (its products are NaN)."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) + (xf * 0).sum(-1, keepdim=True)  # NaN for a non-finite row
    # A true division, as the native kernel does: `127 / tensor` is torch's reciprocal times 127, rounded twice.
    inv = torch.where(amax > 0, torch.full_like(amax, QMAX) / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv).clamp_(-QMAX, QMAX).nan_to_num_(0).to(torch.int8)
    return q, amax / QMAX


def _linear_int8_torch(x, weight, weight_scale, bias, apply_gelu: bool) -> torch.Tensor:
    K, N = x.shape[-1], weight.shape[0]
    lead = x.shape[:-1]
    if x.numel() == 0 or K == 0:
        y = (bias if bias is not None else x.new_zeros(N, dtype=torch.float32)).expand(*lead, N)
    else:
        q, s = quantize_rows(x.reshape(-1, K))
        y = torch._int_mm(q, weight.t()).float() * (s * weight_scale)  # (M, N)
        if bias is not None:
            y = y + bias
        y = y.view(*lead, N)
    return (F.gelu(y, approximate="tanh") if apply_gelu else y).to(x.dtype)


OP = "ditengine::linear_int8"


def check_linear_int8(x, weight, weight_scale, bias) -> None:
    """The op's arguments, checked as its C++ kernel (csrc/linear_int8.cpp) checks them: the same order, exception
    types (ValueError for a shape, TypeError for a dtype) and messages, except that the tensors must share x's
    device rather than be on the CPU. The public `linear_int8` (on every backend), the op's Python body and its
    fake call this. Shapes, dtypes and devices only: no host sync."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP}: x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension (..., K)")
    weight_is = f"{OP}: weight must be (N, K) int8, got {cpp_sizes(weight)} {cpp_dtype(weight.dtype)}"
    if weight.dim() != 2:
        raise ValueError(weight_is)
    if weight.dtype != torch.int8:
        raise TypeError(weight_is)
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"{OP}: weight {cpp_sizes(weight)} does not take x's last dimension {K}")
    scale_is = (f"{OP}: weight_scale must be ({N}) float32, got {cpp_sizes(weight_scale)} "
                f"{cpp_dtype(weight_scale.dtype)}")
    if weight_scale.dim() != 1 or weight_scale.shape[0] != N:
        raise ValueError(scale_is)
    if weight_scale.dtype != torch.float32:
        raise TypeError(scale_is)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{OP}: x must be float32, bfloat16 or float16, got {cpp_dtype(x.dtype)}")
    if not x.device == weight.device == weight_scale.device:
        raise ValueError(f"{OP}: x, weight and weight_scale must be on one device, got {x.device}, {weight.device} "
                         f"and {weight_scale.device}")
    if bias is not None:
        bias_is = f"{OP}: bias must be a ({N}) float32 {'CPU' if x.device.type == 'cpu' else x.device} tensor, got "
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"{bias_is}{cpp_sizes(bias)} {cpp_dtype(bias.dtype)}")
        if bias.dtype != torch.float32:
            raise TypeError(f"{bias_is}{cpp_sizes(bias)} {cpp_dtype(bias.dtype)}")
        if bias.device != x.device:
            raise ValueError(f"{bias_is}one on {bias.device}")


@torch.library.custom_op("ditengine::linear_int8", mutates_args=())
def _linear_int8_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    apply_gelu: bool) -> torch.Tensor:
    """x (..., K) fp32/bf16/fp16; weight (N, K) int8; weight_scale (N) fp32; bias (N) fp32 -> (..., N) in x's dtype."""
    check_linear_int8(x, weight, weight_scale, bias)
    return _linear_int8_torch(x, weight, weight_scale, bias, apply_gelu)


@_linear_int8_op.register_fake
def _(x, weight, weight_scale, bias, apply_gelu):
    check_linear_int8(x, weight, weight_scale, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@dataclass(frozen=True)
class Int8Linear:
    """A linear layer's weights quantised once (`prepack_int8`): int8 (N, K), scales (N) and bias (N) fp32."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    native: bool  # run the op (native kernel on CPU) rather than the torch body


def prepack_int8(w: torch.Tensor, b: torch.Tensor | None = None, native: bool = True) -> Int8Linear:
    """Quantise w (N, K) per output channel; `native=False` runs the torch body (the "reference" and "triton"
    backends, which have no int8 kernel of their own)."""
    check_linear_weights(w, b)
    q, s = quantize_rows(w.detach())
    return Int8Linear(q.contiguous(), s.view(-1).contiguous(), None if b is None else b.detach().float().contiguous(),
                      w.shape[0], native)


def linear_int8(x: torch.Tensor, packed: Int8Linear, gelu: bool = False) -> torch.Tensor:
    """act(x @ w^T + b) through int8 for x (..., K) -> (..., N) in x's dtype (act: tanh GELU when `gelu`).
    x is checked as the op checks it (`check_linear_int8`), on every backend."""
    check_linear_int8(x, packed.weight, packed.scale, packed.bias)
    if not packed.native:
        return _linear_int8_torch(x, packed.weight, packed.scale, packed.bias, gelu)
    return torch.ops.ditengine.linear_int8(x, packed.weight, packed.scale, packed.bias, gelu)


def error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The bound above on |linear_int8(x, w) - x @ w^T| per output element (before fp32 epilogue roundings),
    for x (M, K) and w (N, K), in float64."""
    x, w = x.double(), w.double()
    s = x.abs().amax(-1, keepdim=True) / QMAX  # (M, 1)
    ws = w.abs().amax(-1) / QMAX  # (N,)
    K = x.shape[-1]
    return s / 2 * w.abs().sum(-1) + x.abs().sum(-1, keepdim=True) * ws / 2 + K * s * ws / 4
