"""Microbenchmark of the attention kernel against every scaled_dot_product_attention backend.

TFLOP/s (4*B*H*T^2*Dh) at T = 256, 1024, 4096, Dh = 64 and 72 (H = 16), batch 2 and 16, bf16; the
Triton kernel with the 64+16 head split and with the padded 128-wide head for Dh = 72; flash-attn when
importable. A second table times what the engine replaces: "qkv projection output -> attention output
ready for the output projection", PyTorch's permutes and copies included.

On a CPU it times the native kernel (csrc/attention.cpp, when the extension is built) against SDPA in
bf16 and fp32 at DiT-S/2 (H=6, Dh=64) and DiT-XL/2 (H=16, Dh=72) shapes, T=256, batch 2 (CFG), in
GFLOP/s, plus the explicit-softmax bf16 reference and, for bf16, SDPA on fp32 copies of the same values.
`python -m ditengine.bench.attention` (`--quick`: one small fp32 shape on a CPU, for smoke tests).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditengine.kernels import _native
from ditengine.kernels.attention import attention, attention_ref

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


CPU_SHAPES = [(2, 6, 256, 64), (2, 16, 256, 72)]  # DiT-S/2 and DiT-XL/2, 256 px, batch 1 + CFG
CPU_QUICK = [(1, 2, 64, 64)]


def shapes(device):
    if device.type != "cuda":
        return [(1, 2, 64, 64)], torch.float32
    return [(B, 16, T, Dh) for Dh in (64, 72) for T in (256, 1024, 4096) for B in (2, 16)], torch.bfloat16


def cpu_kernel_cases(quick: bool = False):
    native = _native.serves("attention")
    for B, H, T, Dh in CPU_QUICK if quick else CPU_SHAPES:
        for dtype in (torch.float32,) if quick else (torch.bfloat16, torch.float32):
            qkv = torch.randn(B, T, 3, H, Dh, dtype=dtype)
            q, k, v = (t.contiguous() for t in qkv.permute(2, 0, 3, 1, 4))
            providers = {}
            if native:  # the op's CPU kernel, from the packed layout, writing (B, T, H, Dh)
                providers["native"] = lambda qkv=qkv: attention(qkv)
            providers["sdpa"] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
            if dtype != torch.float32:
                q32, k32, v32 = q.float(), k.float(), v.float()
                providers["fp32 sdpa (same values)"] = lambda: F.scaled_dot_product_attention(q32, k32, v32)
            providers["explicit softmax (reference, no upcast)"] = lambda q=q, k=k, v=v: attention_ref(
                q, k, v, upcast=False)
            yield f"B={B} H={H} T={T} Dh={Dh}", dtype, 4 * B * H * T * T * Dh, providers


def kernel_cases(device, quick: bool = False):
    if device.type != "cuda":
        yield from cpu_kernel_cases(quick)
        return
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


def end_to_end_cases(device, quick: bool = False):
    """From the qkv GEMM output (B, T, 3*D) to the projection input (B, T, D)."""
    configs, dtype = shapes(device)
    if device.type != "cuda" and not quick:
        configs, dtype = CPU_SHAPES, torch.bfloat16
    for B, H, T, Dh in configs:
        if Dh != 72 and device.type == "cuda":
            continue
        qkv_flat = torch.randn(B, T, 3 * H * Dh, device=device, dtype=dtype)

        def eager(qkv_flat=qkv_flat, B=B, T=T, H=H, Dh=Dh):
            q, k, v = qkv_flat.reshape(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, H * Dh)

        def fused(qkv_flat=qkv_flat, B=B, T=T, H=H, Dh=Dh):
            return attention(qkv_flat.view(B, T, 3, H, Dh)).view(B, T, H * Dh)

        ours = "triton" if device.type == "cuda" else "native" if _native.serves("attention") else "reference (sdpa)"
        yield (f"qkv->proj B={B} H={H} T={T} Dh={Dh}", dtype, 4 * B * H * T * T * Dh,
               {ours: fused, "sdpa (permute + best backend + transpose)": eager})


def cpu_note() -> str:
    if _native.serves("attention"):
        return ("attention: no GPU here; CPU rows time the native kernel (csrc/attention.cpp) against SDPA "
                "at DiT shapes.")
    return ("attention: no GPU here, and the native extension is not built (native rows left out); CPU rows "
            "time SDPA and the reference only.")


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--quick", action="store_true")
    opts, rest = pre.parse_known_args(argv)
    kw = dict(metric="flops", baseline="sdpa", cpu_note=cpu_note(), cpu_repeats=5 if opts.quick else 15)
    run_kernel_bench("attention", lambda device: kernel_cases(device, opts.quick), rest, **kw)
    return run_kernel_bench("attention_end_to_end", lambda device: end_to_end_cases(device, opts.quick), rest, **kw)


if __name__ == "__main__":
    raise SystemExit(main())
