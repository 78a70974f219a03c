"""Microbenchmark of the SwiGLU MLP's gate and up GEMMs with the `silu(g) * u` epilogue (ACE-Step 1.5's MLP
before its down projection): `ditengine.kernels.linear_swiglu` against eager PyTorch and against one
F.linear over the stacked weight followed by the eager epilogue. `python -m ditengine.bench.linear_swiglu`.

Shapes: ACE-Step 1.5 turbo's D = 2048 -> F = 6144 at 2 x 375 rows (30 s of audio, batch 1 doubled for CFG),
and 2 x 125 rows (10 s). CPU: fp32 (the native kernel's weights are fp32 and the fast form there), plus one
bf16 case at the full shape, where eager PyTorch runs bf16 GEMMs through oneDNN (`prepack_swiglu` then picks
the "stacked" form on such CPUs; the native kernel is timed beside it). GPU: bf16, the fused form being
cuBLAS over the stacked weight then the Triton epilogue. Every provider of a case is timed in the same
process, round-robin on a CPU.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ditengine.kernels.linear_swiglu import (choose_backend, linear_swiglu, native_available, prepack_swiglu,
                                             swiglu)

from .timing import run_kernel_bench

D, FFN = 2048, 6144
ROWS = (2 * 125, 2 * 375)


def providers(x, wg, wu, backends) -> dict:
    """{name: fn}: the eager baseline first, then the stacked GEMM with the eager and the op's epilogue, then
    `linear_swiglu` prepacked for each of `backends`."""
    Fo = wg.shape[0]
    stacked = torch.cat([wg, wu]).contiguous()  # (2F, D): gate rows, then up rows

    def stacked_eager():
        gu = F.linear(x, stacked)  # (N, 2F)
        return F.silu(gu[:, :Fo]) * gu[:, Fo:]

    fns = {"eager": lambda: F.silu(F.linear(x, wg)) * F.linear(x, wu),
           "stacked linear + eager epilogue": stacked_eager,
           "stacked linear + swiglu op": lambda: swiglu(F.linear(x, stacked))}
    for backend in backends:
        packed = prepack_swiglu(wg, wu, dtype=x.dtype, batch_size=x.shape[0], backend=backend)
        fns[f"linear_swiglu ({backend})"] = lambda packed=packed: linear_swiglu(x, packed)
    return fns


def cases(device):
    gpu = device.type == "cuda"
    shapes = [(rows, torch.bfloat16) for rows in ROWS] if gpu else \
        [(rows, torch.float32) for rows in ROWS] + [(ROWS[-1], torch.bfloat16)]
    g = torch.Generator().manual_seed(0)
    wg32, wu32 = (torch.randn(FFN, D, generator=g) * D**-0.5 for _ in range(2))
    for rows, dtype in shapes:
        x = torch.randn(rows, D, generator=g).to(device=device, dtype=dtype)
        wg, wu = wg32.to(device=device, dtype=dtype), wu32.to(device=device, dtype=dtype)
        # The form prepack_swiglu picks here, and on a CPU the native kernel wherever it is not that form.
        extra = ["native"] if native_available() and not gpu else []
        backends = dict.fromkeys([choose_backend(device, dtype), *extra])
        yield f"{rows}x{D}->2x{FFN}", dtype, 2 * rows * D * 2 * FFN, providers(x, wg, wu, backends)


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts, argv = pre.parse_known_args(argv)
    device = torch.device(opts.device)
    argv = argv + ["--device", opts.device]
    if device.type == "cuda":
        return run_kernel_bench("linear_swiglu", cases, argv, metric="flops", baseline="eager")
    note = ("linear_swiglu: CPU rows time the native fused kernel (csrc/linear_swiglu.cpp) against eager torch"
            + ("" if native_available() else " (native extension not built: the reference form instead)") + ".")
    # Each call is 0.1-1 s of GEMM on a CPU: a few rounds of 5 calls give stable medians.
    return run_kernel_bench("linear_swiglu", cases, argv, metric="flops", baseline="eager",
                            cpu_note=note, cpu_repeats=3)


if __name__ == "__main__":
    raise SystemExit(main())
