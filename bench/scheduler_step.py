"""Microbenchmark of the fused scheduler step at DiT-XL latent shapes (4 x 32 x 32 and 4 x 64 x 64).

Providers: the fast kernel (Triton on GPU, the native C++ kernel of csrc/scheduler_step.cpp on CPU), the
eager PyTorch sequence it replaces (guidance, DPM-Solver++ 2M update, next-input copy) and torch.compile of
that sequence. On CPU: 256 px latents (4 x 32 x 32), B = 1 and 8 (with CFG), bf16 and fp32 model output.
`python -m ditengine.bench.scheduler_step`.
"""
from __future__ import annotations

import torch

import ditengine as de
from ditengine.kernels.scheduler_step import scheduler_step, scheduler_step_ref

from .timing import run_kernel_bench


def cases(device):
    gpu = device.type == "cuda"
    fast = "triton" if gpu else "native"
    sched = de.schedulers.DPMSolverPP(20).to(device)
    shapes = [(1, 32), (8, 32), (1, 64), (8, 64)] if gpu else [(1, 32), (8, 32)]
    for B, latent in shapes:
        for model_dtype in (torch.bfloat16,) if gpu else (torch.bfloat16, torch.float32):
            x = torch.randn(B, 4, latent, latent, device=device)
            out = torch.randn(2 * B, 8, latent, latent, device=device, dtype=model_dtype)
            history = torch.zeros_like(x)
            next_input = torch.empty(2 * B, 4, latent, latent, device=device, dtype=model_dtype)
            x_next = torch.empty_like(x)
            step = torch.tensor([5], device=device)
            kwargs = dict(cfg_scale=4.0, history=history, out=x_next, next_input=next_input)
            # read: x, cond + uncond prediction, history; write: x_next, history, both next-input halves
            nbytes = x.numel() * (4 + 2 * out.element_size() + 4 + 4 + 4 + 2 * next_input.element_size())

            def eager(x=x, out=out, step=step, kwargs=kwargs):
                return scheduler_step_ref(x, out, sched.table, step, **kwargs)

            providers = {
                fast: lambda x=x, out=out, step=step, kwargs=kwargs: scheduler_step(x, out, sched.table, step,
                                                                                    backend=fast, **kwargs),
                "eager": eager,
                "torch.compile": torch.compile(eager),
            }
            yield f"B={B} 4x{latent}x{latent}", model_dtype, nbytes, providers


def main(argv=None) -> int:
    return run_kernel_bench("scheduler_step", cases, argv)


if __name__ == "__main__":
    raise SystemExit(main())
