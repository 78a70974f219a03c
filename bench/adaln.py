"""Microbenchmark of adaln_modulate (K1) and gated_residual_adaln (K3).

GPU: the Triton kernel, the eager PyTorch sequence it replaces and torch.compile of that sequence, at
DiT-XL shapes in bf16. CPU: the native C++ kernel (csrc/adaln.cpp), the eager sequence and torch.compile of
it, at DiT-S (D = 384) and DiT-XL (D = 1152) widths, T = 256, B = 2 (one image with CFG), bf16 and fp32.
`python -m ditengine.bench.adaln`.
"""
from __future__ import annotations

import torch

from ditengine.kernels.adaln import (adaln_modulate, adaln_modulate_ref, gated_residual_adaln,
                                     gated_residual_adaln_ref)

from .timing import run_kernel_bench

GPU_SHAPES = [(2, 256, 1152), (16, 256, 1152), (2, 1024, 1152), (16, 1024, 1152)]  # (B, T, D); B includes CFG
CPU_SHAPES = [(2, 256, 384), (2, 256, 1152)]  # DiT-S, DiT-XL


def cases(device):
    gpu = device.type == "cuda"
    fast = "triton" if gpu else "native"
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


def main(argv=None) -> int:
    return run_kernel_bench("adaln", cases, argv)


if __name__ == "__main__":
    raise SystemExit(main())
