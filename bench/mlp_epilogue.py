"""Microbenchmark of the MLP's first GEMM with its GELU-tanh: the fused epilogue (`torch._addmm_activation`,
cuBLASLt's GELU epilogue on CUDA, what `FastDiT` uses there) against a GEMM then a separate GELU, and
torch.compile of the pair, at DiT-XL shapes (tokens x 1152 -> 4608). `python -m ditengine.bench.mlp_epilogue`.
On a CPU `_addmm_activation` computes the exact GELU instead: the timing there is only a smoke run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .timing import run_kernel_bench


def cases(device):
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    D, H = 1152, 4608
    for tokens in ((2 * 256, 16 * 256, 2 * 1024) if gpu else (2 * 64,)):
        x = torch.randn(tokens, D, device=device, dtype=dtype)
        w = torch.randn(H, D, device=device, dtype=dtype) * D**-0.5
        b = torch.randn(H, device=device, dtype=dtype)
        providers = {
            "fused epilogue": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
            "linear + gelu": lambda: F.gelu(F.linear(x, w, b), approximate="tanh"),
        }
        if gpu:
            providers["torch.compile"] = torch.compile(lambda: F.gelu(F.linear(x, w, b), approximate="tanh"))
        yield f"fc1 {tokens} tokens {D}->{H}", dtype, 2 * tokens * D * H, providers


def main(argv=None) -> int:
    return run_kernel_bench("mlp_epilogue", cases, argv, metric="flops", baseline="linear")


if __name__ == "__main__":
    raise SystemExit(main())
