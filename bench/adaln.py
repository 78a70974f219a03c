"""Microbenchmark of adaln_modulate and gated_residual_adaln.

GPU: the Triton kernel, the eager PyTorch sequence it replaces and torch.compile of that sequence, at
DiT-XL shapes in bf16. CPU: the native C++ kernel (csrc/adaln.cpp), the eager sequence and torch.compile of
it, at DiT-S (D = 384) and DiT-XL (D = 1152) widths, T = 256, B = 2 (one image with CFG), bf16 and fp32.

The RMSNorm forms (`rms=True` with a learned weight, ACE-Step 1.5's blocks) run at D = 2048 with T = 375
(30 s of audio) on both, and T = 3000 (4 min) on a GPU; their eager sequence is the RMSNorm module the model
uses (diffusers' `RMSNorm` where diffusers is importable, else `torch.nn.RMSNorm`), then the modulation.

    python -m ditengine.bench.adaln [--norm all|layer|rms] [the shared options: --help]
"""
from __future__ import annotations

import argparse

import torch

from ditengine.kernels.adaln import (adaln_modulate, adaln_modulate_ref, gated_residual_adaln,
                                     gated_residual_adaln_ref)

from .timing import run_kernel_bench

GPU_SHAPES = [(2, 256, 1152), (16, 256, 1152), (2, 1024, 1152), (16, 1024, 1152)]  # (B, T, D); B includes CFG
CPU_SHAPES = [(2, 256, 384), (2, 256, 1152)]  # DiT-S, DiT-XL
RMS_GPU_SHAPES = [(2, 375, 2048), (2, 3000, 2048)]  # ACE-Step 1.5 turbo, 30 s and 240 s
RMS_CPU_SHAPES = [(2, 375, 2048)]
RMS_EPS = 1e-6  # ACE-Step 1.5's rms_norm_eps


def rms_norm_module(weight: torch.Tensor) -> torch.nn.Module:
    """The model's RMSNorm with `weight` (D,): diffusers' where importable (the GPU machine has no diffusers),
    else torch's, which computes the same (statistic in fp32)."""
    try:
        from diffusers.models.normalization import RMSNorm
        norm = RMSNorm(weight.numel(), eps=RMS_EPS)
    except ImportError:
        norm = torch.nn.RMSNorm(weight.numel(), eps=RMS_EPS)
    norm = norm.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
    norm.weight.copy_(weight)
    return norm


def layer_cases(device, fast):
    gpu = device.type == "cuda"
    for B, T, D in GPU_SHAPES if gpu else CPU_SHAPES:
        for dtype in (torch.bfloat16,) if gpu else (torch.bfloat16, torch.float32):
            x = torch.randn(B, T, D, device=device, dtype=dtype)
            o = torch.randn_like(x)
            shift, scale, gate, *_ = torch.randn(B, 6 * D, device=device, dtype=dtype).chunk(6, dim=1)
            size = x.numel() * x.element_size()

            def eager_k1(x=x, shift=shift, scale=scale):
                return adaln_modulate_ref(x, shift, scale, upcast=False)

            def eager_k3(x=x, gate=gate, o=o, shift=shift, scale=scale):
                return gated_residual_adaln_ref(x, gate, o, shift, scale, upcast=False)

            k1 = {fast: lambda x=x, shift=shift, scale=scale: adaln_modulate(x, shift, scale, backend=fast),
                  "eager": eager_k1, "torch.compile": torch.compile(eager_k1)}
            k3 = {fast: lambda x=x, gate=gate, o=o, shift=shift, scale=scale: gated_residual_adaln(
                      x, gate, o, shift, scale, backend=fast),
                  "eager": eager_k3, "torch.compile": torch.compile(eager_k3)}
            yield f"adaln_modulate B={B} T={T} D={D}", dtype, 2 * size, k1  # read x, write y
            yield f"gated_residual_adaln B={B} T={T} D={D}", dtype, 4 * size, k3  # read x, o; write x_new, y


def rms_cases(device, fast):
    gpu = device.type == "cuda"
    for B, T, D in RMS_GPU_SHAPES if gpu else RMS_CPU_SHAPES:
        for dtype in (torch.bfloat16,) if gpu else (torch.float32, torch.bfloat16):
            x = torch.randn(B, T, D, device=device, dtype=dtype)
            o = torch.randn_like(x)
            shift, scale, gate, *_ = torch.randn(B, 6 * D, device=device, dtype=dtype).chunk(6, dim=1)
            weight = (1 + 0.5 * torch.randn(D, device=device)).to(dtype)
            norm = rms_norm_module(weight)
            size = x.numel() * x.element_size()

            def eager_k1(x=x, shift=shift, scale=scale, norm=norm):
                return norm(x) * (1 + scale[:, None]) + shift[:, None]

            def eager_k3(x=x, gate=gate, o=o, shift=shift, scale=scale, norm=norm):
                x_new = x + gate[:, None] * o
                return x_new, norm(x_new) * (1 + scale[:, None]) + shift[:, None]

            k1 = {fast: lambda x=x, shift=shift, scale=scale, w=weight: adaln_modulate(
                      x, shift, scale, RMS_EPS, backend=fast, rms=True, weight=w),
                  "eager": eager_k1, "torch.compile": torch.compile(eager_k1)}
            k3 = {fast: lambda x=x, gate=gate, o=o, shift=shift, scale=scale, w=weight: gated_residual_adaln(
                      x, gate, o, shift, scale, RMS_EPS, backend=fast, rms=True, weight=w),
                  "eager": eager_k3, "torch.compile": torch.compile(eager_k3)}
            yield f"adaln_modulate rms+weight B={B} T={T} D={D}", dtype, 2 * size, k1
            yield f"gated_residual_adaln rms+weight B={B} T={T} D={D}", dtype, 4 * size, k3


def cases(device, norm: str = "all"):
    """The LayerNorm cases first (the shared driver's --quick runs the first two), then the RMSNorm ones."""
    fast = "triton" if device.type == "cuda" else "native"
    if norm in ("all", "layer"):
        yield from layer_cases(device, fast)
    if norm in ("all", "rms"):
        yield from rms_cases(device, fast)


def main(argv=None) -> int:
    # --norm is this benchmark's own option; every other argument goes to the shared driver.
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--norm", choices=("all", "layer", "rms"), default="all",
                        help="which cases: LayerNorm (DiT), RMSNorm with a weight (ACE-Step 1.5), or both")
    known, rest = parser.parse_known_args(argv)
    return run_kernel_bench("adaln", lambda device: cases(device, known.norm), rest)


if __name__ == "__main__":
    raise SystemExit(main())
