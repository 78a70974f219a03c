"""Microbenchmark of the attention kernel against every scaled_dot_product_attention backend.

TFLOP/s (4*B*H*T^2*Dh) at T = 256, 1024, 4096, Dh = 64 and 72 (H = 16), batch 2 and 16, bf16; the
Triton kernel with the 64+16 head split and with the padded 128-wide head for Dh = 72; flash-attn when
importable. A second table times what the engine replaces: "qkv projection output -> attention output
ready for the output projection", PyTorch's permutes and copies included.
`python -m ditengine.bench.attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditengine.kernels.attention import attention

from .timing import run_kernel_bench

SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}


def sdpa_with(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def flash_attn_provider():
    try:
        from flash_attn import flash_attn_qkvpacked_func
    except ImportError:
        return None
    return flash_attn_qkvpacked_func


def shapes(device):
    if device.type != "cuda":
        return [(1, 2, 64, 64)], torch.float32
    return [(B, 16, T, Dh) for Dh in (64, 72) for T in (256, 1024, 4096) for B in (2, 16)], torch.bfloat16


def kernel_cases(device):
    gpu = device.type == "cuda"
    flash_attn = flash_attn_provider()
    configs, dtype = shapes(device)
    for B, H, T, Dh in configs:
        qkv = torch.randn(B, T, 3, H, Dh, device=device, dtype=dtype)
        q, k, v = (t.contiguous() for t in qkv.permute(2, 0, 3, 1, 4))  # SDPA gets its preferred layout
        providers = {"triton": lambda: attention(qkv)} if gpu else {"reference (sdpa)": lambda: attention(qkv)}
        if gpu and Dh % 16:
            providers["triton (padded head)"] = lambda: attention(qkv, head_split=False)
        for name, backend in SDPA_BACKENDS.items() if gpu else [("sdpa-math", SDPBackend.MATH)]:
            run = sdpa_with(backend)
            providers[name] = lambda run=run: run(q, k, v)
        if flash_attn is not None:
            providers["flash-attn"] = lambda: flash_attn(qkv)
        yield f"B={B} H={H} T={T} Dh={Dh}", dtype, 4 * B * H * T * T * Dh, providers


def end_to_end_cases(device):
    """From the qkv GEMM output (B, T, 3*D) to the projection input (B, T, D)."""
    configs, dtype = shapes(device)
    for B, H, T, Dh in configs:
        if Dh != 72 and device.type == "cuda":
            continue
        qkv_flat = torch.randn(B, T, 3 * H * Dh, device=device, dtype=dtype)

        def eager(qkv_flat=qkv_flat, B=B, T=T, H=H, Dh=Dh):
            q, k, v = qkv_flat.reshape(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, H * Dh)

        def fused(qkv_flat=qkv_flat, B=B, T=T, H=H, Dh=Dh):
            return attention(qkv_flat.view(B, T, 3, H, Dh)).view(B, T, H * Dh)

        ours = "triton" if device.type == "cuda" else "reference (sdpa)"
        yield (f"qkv->proj B={B} H={H} T={T} Dh={Dh}", dtype, 4 * B * H * T * T * Dh,
               {ours: fused, "sdpa (permute + best backend + transpose)": eager})


def main(argv=None) -> int:
    run_kernel_bench("attention", kernel_cases, argv, metric="flops", baseline="sdpa")
    return run_kernel_bench("attention_end_to_end", end_to_end_cases, argv, metric="flops", baseline="sdpa")


if __name__ == "__main__":
    raise SystemExit(main())
