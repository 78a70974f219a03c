"""fp8 (e4m3) linear (+ tanh GELU) for the token GEMMs on Hopper: e4m3 weights per output channel,
activations per token quantised on the fly, `torch._scaled_mm` with row-wise scales (fp32 accumulation on
the tensor cores, twice the bf16 rate on an H100), bias and GELU after it.

    s_m  = max_k |x_mk| / 448,   q_mk = e4m3(x_mk / s_m)        per row of x (448: e4m3's largest finite)
    ws_n = max_k |w_nk| / 448,   wq_nk likewise                 per row of w, once
    out_mn = act(bf16(s_m ws_n sum_k q_mk wq_nk) + b_n)

e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself after rounding; below 2^-6
(times the scale), where e4m3 is subnormal, by at most 2^-10 of the scale (`element_error`).

`emulate=True` is the reference numerics on any device: the same quantised operands, dequantised to fp32 and
multiplied by an fp32 GEMM. On a CPU torch's `_scaled_mm` also runs (oneDNN), slower than the fp32 GEMM, so
the fast path offers fp8 on CUDA GPUs with fp8 tensor cores (compute capability 8.9+) only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .linear_gelu import check_linear_weights

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 per row of x (..., K): (q (..., K) float8_e4m3fn, scale (..., 1) fp32), x ~ scale * q."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    scale = amax / FP8_MAX
    inv = torch.where(amax > 0, torch.full_like(amax, FP8_MAX) / amax, torch.zeros_like(amax))
    return (xf * inv).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def element_error(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bound on |x - scale * e4m3(x / scale)| per element (float64)."""
    return torch.maximum(x.double().abs() * 2.0**-4, scale.double() * 2.0**-10)


@dataclass(frozen=True)
class Fp8Linear:
    """A linear layer's weights in e4m3 (`prepack_fp8`): (N, K), scales (N) fp32 and bias (N) fp32."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    emulated_weight: torch.Tensor | None  # the reference numerics: the dequantised weight (fp32) for an fp32 GEMM


def prepack_fp8(w: torch.Tensor, b: torch.Tensor | None = None, emulate: bool = False) -> Fp8Linear:
    check_linear_weights(w, b)
    q, s = quantize_rows_fp8(w.detach())
    return Fp8Linear(q.contiguous(), s.view(-1).contiguous(), None if b is None else b.detach().float().contiguous(),
                     w.shape[0], q.float() * s if emulate else None)


def linear_fp8(x: torch.Tensor, packed: Fp8Linear, gelu: bool = False) -> torch.Tensor:
    """act(x @ w^T + b) through e4m3 for x (..., K) -> (..., N) in x's dtype."""
    K, N = x.shape[-1], packed.out_features
    q, s = quantize_rows_fp8(x.reshape(-1, K))
    if packed.emulated_weight is not None:
        y = (q.float() * s) @ packed.emulated_weight.t()
    else:  # row-wise scaled fp8 GEMMs give bf16 (the tensor-core epilogue's output type)
        y = torch._scaled_mm(q, packed.weight.t(), scale_a=s, scale_b=packed.scale.view(1, N),
                             out_dtype=torch.bfloat16).float()
    if packed.bias is not None:
        y = y + packed.bias
    y = y.view(*x.shape[:-1], N)
    return (F.gelu(y, approximate="tanh") if gelu else y).to(x.dtype)


def fp8_supported(device: torch.device) -> bool:
    """Whether the fast path's fp8 GEMMs run on `device`: a CUDA GPU with fp8 tensor cores (sm_89+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
