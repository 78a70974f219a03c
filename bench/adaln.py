"""Microbenchmark of adaln_modulate (K1) and gated_residual_adaln (K3) at DiT-XL shapes.

Providers: the Triton kernel, the eager PyTorch sequence it replaces, and torch.compile of that sequence
(GPU only). `python -m ditengine.bench.adaln`.
"""
from __future__ import annotations

import torch

from ditengine.kernels.adaln import (adaln_modulate, adaln_modulate_ref, gated_residual_adaln,
                                     gated_residual_adaln_ref)

from .timing import run_kernel_bench

GPU_SHAPES = [(2, 256, 1152), (16, 256, 1152), (2, 1024, 1152), (16, 1024, 1152)]  # (B, T, D); B includes CFG
CPU_SHAPES = [(2, 64, 1152)]


def cases(device):
    gpu = device.type == "cuda"
    for B, T, D in GPU_SHAPES if gpu else CPU_SHAPES:
        for dtype in (torch.bfloat16,) if gpu else (torch.float32,):
            x = torch.randn(B, T, D, device=device, dtype=dtype)
            o = torch.randn_like(x)
            shift, scale, gate, *_ = torch.randn(B, 6 * D, device=device, dtype=dtype).chunk(6, dim=1)
            size = x.numel() * x.element_size()
            eager_k1 = lambda: adaln_modulate_ref(x, shift, scale, upcast=False)  # noqa: E731
            eager_k3 = lambda: gated_residual_adaln_ref(x, gate, o, shift, scale, upcast=False)  # noqa: E731
            k1 = {"triton" if gpu else "reference": lambda: adaln_modulate(x, shift, scale), "eager": eager_k1}
            k3 = {"triton" if gpu else "reference": lambda: gated_residual_adaln(x, gate, o, shift, scale),
                  "eager": eager_k3}
            if gpu:
                k1["torch.compile"] = torch.compile(lambda: adaln_modulate_ref(x, shift, scale, upcast=False))
                k3["torch.compile"] = torch.compile(lambda: gated_residual_adaln_ref(x, gate, o, shift, scale,
                                                                                     upcast=False))
            yield f"adaln_modulate B={B} T={T} D={D}", dtype, 2 * size, k1
            yield f"gated_residual_adaln B={B} T={T} D={D}", dtype, 4 * size, k3


def main(argv=None) -> int:
    return run_kernel_bench("adaln", cases, argv)


if __name__ == "__main__":
    raise SystemExit(main())
