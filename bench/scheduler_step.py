"""Microbenchmark of the fused scheduler step (K4) at DiT-XL latent shapes (4 x 32 x 32 and 4 x 64 x 64).

Providers: the Triton kernel and the eager PyTorch sequence it replaces (guidance, DPM-Solver++ 2M update,
next-input copy), plus torch.compile of that sequence on GPU. `python -m ditengine.bench.scheduler_step`.
"""
from __future__ import annotations

import torch

import ditengine as de
from ditengine.kernels.scheduler_step import scheduler_step, scheduler_step_ref

from .timing import run_kernel_bench


def cases(device):
    gpu = device.type == "cuda"
    sched = de.schedulers.DPMSolverPP(20).to(device)
    for B, latent in ([(1, 32), (8, 32), (1, 64), (8, 64)] if gpu else [(8, 32)]):
        x = torch.randn(B, 4, latent, latent, device=device)
        model_dtype = torch.bfloat16 if gpu else torch.float32
        out = torch.randn(2 * B, 8, latent, latent, device=device, dtype=model_dtype)
        history = torch.zeros_like(x)
        next_input = torch.empty(2 * B, 4, latent, latent, device=device, dtype=model_dtype)
        x_next = torch.empty_like(x)
        step = torch.tensor([5], device=device)
        kwargs = dict(cfg_scale=4.0, history=history, out=x_next, next_input=next_input)
        # read: x, cond + uncond prediction, history; write: x_next, history, both next-input halves
        nbytes = x.numel() * (4 + 2 * out.element_size() + 4 + 4 + 4 + 2 * next_input.element_size())
        providers = {
            "triton" if gpu else "reference": lambda: scheduler_step(x, out, sched.table, step, **kwargs),
            "eager": lambda: scheduler_step_ref(x, out, sched.table, step, **kwargs),
        }
        if gpu:
            providers["torch.compile"] = torch.compile(lambda: scheduler_step_ref(x, out, sched.table, step, **kwargs))
        yield f"B={B} 4x{latent}x{latent}", model_dtype, nbytes, providers


def main(argv=None) -> int:
    return run_kernel_bench("scheduler_step", cases, argv)


if __name__ == "__main__":
    raise SystemExit(main())
