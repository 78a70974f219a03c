"""Microbenchmark of the attention kernel against every scaled_dot_product_attention backend.

TFLOP/s (4*B*H*T^2*Dh) at T = 256, 1024, 4096, Dh = 64 and 72 (H = 16), batch 2 and 16, bf16; the
Triton kernel with the 64+16 head split and with the padded 128-wide head for Dh = 72; flash-attn when
importable. A second table times what the engine replaces: "qkv projection output -> attention output
ready for the output projection", PyTorch's permutes and copies included.

On a CPU it times the native kernel (csrc/attention.cpp, when the extension is built) against SDPA in
bf16 and fp32 at DiT-S/2 (H=6, Dh=64) and DiT-XL/2 (H=16, Dh=72) shapes, T=256, batch 2 (CFG), in
GFLOP/s, plus the explicit-softmax bf16 reference and, for bf16, SDPA on fp32 copies of the same values.
Cross-attention rows (`cross_attention`, PixArt's attention to a caption padded to L = 300 with 20 valid
tokens, and a 1-token negative prompt) time ours against SDPA with the boolean key mask the op's Python
body uses; their FLOPs count the valid keys only (what the kernels compute), so SDPA's rate is lower by the
padding it computes. `python -m ditengine.bench.attention` (`--quick`: one small fp32 shape of each on a
CPU, for smoke tests).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditengine.kernels import _native
from ditengine.kernels.attention import attention, attention_ref
from ditengine.kernels.cross_attention import cross_attention, cross_attention_ref, key_padding_mask

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


# (B, Tq, H, Dh, L, lens): PixArt-alpha/sigma (H=16, Dh=72), caption padded to L with a prompt and the
# negative prompt (CFG); Tq = 256 (256 px), 1024 (512 px), 4096 (1024 px).
CROSS_CPU = [(2, 256, 16, 72, 300, (20, 1))]
CROSS_CPU_QUICK = [(2, 64, 2, 64, 40, (20, 1))]
CROSS_GPU = [(2, Tq, 16, 72, L, lens) for Tq in (1024, 4096) for L, lens in ((300, (20, 1)), (120, (120, 120)))]


def sdpa_masked(q, kv, kv_lens, backend=None):
    """What the op's Python body runs: SDPA on the (B, H, T, Dh) views with a boolean key mask."""
    k, v = kv.unbind(2)
    valid = key_padding_mask(kv_lens, kv.shape[1])[:, None, None]

    def run():
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if backend is None:
            return F.scaled_dot_product_attention(*args, attn_mask=valid).transpose(1, 2).contiguous()
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*args, attn_mask=valid).transpose(1, 2).contiguous()
    return run


def cross_attention_cases(device, quick: bool = False):
    cpu = device.type != "cuda"
    shapes_ = (CROSS_CPU_QUICK if quick else CROSS_CPU) if cpu else CROSS_GPU
    dtypes = ((torch.float32,) if quick else (torch.bfloat16, torch.float32)) if cpu else (torch.bfloat16,)
    for B, Tq, H, Dh, L, lens in shapes_:
        for dtype in dtypes:
            # q and kv as the projections give them: (B, Tq, H*Dh) and (B, L, 2*H*Dh) viewed per head.
            q = torch.randn(B, Tq, H * Dh, device=device, dtype=dtype).view(B, Tq, H, Dh)
            kv = torch.randn(B, L, 2 * H * Dh, device=device, dtype=dtype).view(B, L, 2, H, Dh)
            kv_lens = torch.tensor(lens, device=device)
            providers = {}
            if not cpu:
                providers["triton"] = lambda q=q, kv=kv, kv_lens=kv_lens: cross_attention(q, kv, kv_lens)
            elif _native.serves("cross_attention"):
                providers["native"] = lambda q=q, kv=kv, kv_lens=kv_lens: cross_attention(q, kv, kv_lens)
            sdpa = [("sdpa (boolean mask)", None)] if cpu else [
                (f"sdpa (boolean mask) {name.removeprefix('sdpa-')}", backend)
                for name, backend in SDPA_BACKENDS.items()]
            for name, backend in sdpa:
                providers[name] = sdpa_masked(q, kv, kv_lens, backend)
            providers["explicit masked softmax (reference)"] = (
                lambda q=q, kv=kv, kv_lens=kv_lens: cross_attention_ref(q, kv, kv_lens))
            yield (f"cross B={B} Tq={Tq} H={H} Dh={Dh} L={L} lens={list(lens)}", dtype, 4 * Tq * H * Dh * sum(lens),
                   providers)


def kernel_cases(device, quick: bool = False):
    if device.type != "cuda":
        yield from cpu_kernel_cases(quick)
        yield from cross_attention_cases(device, quick)
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
    yield from cross_attention_cases(device, quick)


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
        return ("attention: no GPU here; CPU rows time the native kernels (csrc/attention.cpp, "
                "csrc/cross_attention.cpp) against SDPA at DiT and PixArt shapes.")
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
