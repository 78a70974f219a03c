"""Microbenchmark of the MLP's first GEMM with its GELU-tanh: the fused epilogue (`torch._addmm_activation`,
cuBLASLt's GELU epilogue on CUDA, what `FastDiT` uses there) against a GEMM then a separate GELU, and
torch.compile of the pair, at DiT-XL shapes (tokens x 1152 -> 4608). `python -m ditengine.bench.mlp_epilogue`.
On a CPU `_addmm_activation` computes the exact GELU instead, so the CPU cases time the CPU forms of
`ditengine.kernels.linear_gelu` instead, in bf16 and fp32 at DiT-S/2 (512 tokens x 384 -> 1536) and DiT-XL/2
(512 x 1152 -> 4608) shapes: the native kernel on fp32 weights (when the extension is built), oneDNN's
prepacked linear with its GELU-tanh post-op (where its probe passes) and the reference on fp32 weights,
against `F.gelu(F.linear(...), approximate="tanh")`. A second table times the block's other GEMMs (qkv, proj,
fc2) on the same prepacked weights against `F.linear`. `--quick`: DiT-S/2 fp32 at 128 tokens only, for smoke tests.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ditengine.kernels.linear_gelu import (linear, linear_gelu, mkldnn_gelu_is_tanh, native_available,
                                           prepack_linear)

from .timing import run_kernel_bench

CPU_MODELS = {"DiT-S/2": 384, "DiT-XL/2": 1152}  # hidden size; 512 tokens = 256 px, batch 1 + CFG
CPU_TOKENS = 512


def cpu_providers(x, w, b, apply_gelu: bool):
    """{name: fn}: F.linear (+ GELU) first (the baseline), then every CPU form usable here."""
    fn = linear_gelu if apply_gelu else linear
    providers = {"linear + gelu" if apply_gelu else "linear": (
        (lambda: F.gelu(F.linear(x, w, b), approximate="tanh")) if apply_gelu else (lambda: F.linear(x, w, b)))}
    backends = (["native"] if native_available() else []) + (["mkldnn"] if mkldnn_gelu_is_tanh(x.dtype) else [])
    for backend in backends + ["reference"]:
        packed = prepack_linear(w, b, dtype=x.dtype, batch_size=x.shape[0], backend=backend)
        label = {"native": "native (fp32 weights)", "mkldnn": "mkldnn prepacked",
                 "reference": "torch on fp32 weights"}[backend]
        providers[label] = lambda packed=packed: fn(x, packed)
    return providers


def cpu_cases(device, quick: bool = False):
    tokens = 128 if quick else CPU_TOKENS
    for name, D in list(CPU_MODELS.items())[:1 if quick else None]:
        for dtype in (torch.float32,) if quick else (torch.bfloat16, torch.float32):
            x = torch.randn(tokens, D, dtype=dtype)
            w = (torch.randn(4 * D, D) * D**-0.5).to(dtype)
            b = torch.randn(4 * D).to(dtype)
            yield (f"{name} fc1+gelu {tokens}x{D}->{4 * D}", dtype, 2 * tokens * D * 4 * D,
                   cpu_providers(x, w, b, True))


def cpu_gemm_cases(device, quick: bool = False):
    """The block's GEMMs without a GELU, bf16 (fp32 when quick): (K, N) of qkv, proj and fc2."""
    tokens, dtype = (128, torch.float32) if quick else (CPU_TOKENS, torch.bfloat16)
    for name, D in list(CPU_MODELS.items())[:1 if quick else None]:
        for gemm, (K, N) in {"qkv": (D, 3 * D), "proj": (D, D), "fc2": (4 * D, D)}.items():
            x = torch.randn(tokens, K, dtype=dtype)
            w = (torch.randn(N, K) * K**-0.5).to(dtype)
            b = torch.randn(N).to(dtype)
            yield (f"{name} {gemm} {tokens}x{K}->{N}", dtype, 2 * tokens * K * N, cpu_providers(x, w, b, False))


def cases(device, quick: bool = False):
    if device.type != "cuda":
        yield from cpu_cases(device, quick)
        return
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
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pre.add_argument("--quick", action="store_true")
    opts, argv = pre.parse_known_args(argv)
    if torch.device(opts.device).type == "cuda":
        return run_kernel_bench("mlp_epilogue", cases, argv + ["--device", opts.device], metric="flops",
                                baseline="linear")
    note = ("mlp_epilogue: no GPU here; CPU rows time the CPU forms of linear_gelu"
            + ("" if native_available() else " (native extension not built: native rows left out)") + ".")
    kw = dict(metric="flops", baseline="linear", cpu_note=note, cpu_repeats=3)  # bf16 F.linear is slow here
    argv = argv + ["--device", opts.device]
    run_kernel_bench("mlp_epilogue", lambda device: cases(device, opts.quick), argv, **kw)
    return run_kernel_bench("cpu_prepacked_linear", lambda device: cpu_gemm_cases(device, opts.quick), argv, **kw)


if __name__ == "__main__":
    raise SystemExit(main())
