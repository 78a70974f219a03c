"""Microbenchmark of the fused APG guidance step at ACE-Step 1.5's latent shape (64 channels x 7500 frames).

Providers: the op (Triton on GPU; on CPU its PyTorch body, there being no native kernel), the diffusers
composition it replaces (`normalized_guidance` with a `MomentumBuffer`, on the pipeline's (B, T, C) layout,
chunked from the [cond; uncond] model output as ACE-Step's pipeline does) as "eager", and torch.compile of
the op's reference in functional form (returning the new momentum: inductor in torch 2.13 fails with a
KeyError on the reference's in-place writes of two inputs). Where diffusers is not installed (the GPU
machine), "eager" is the op's own eager reference. CPU: B = 1 (2 rows with CFG), fp32 and bf16 model
output; GPU adds B = 2.
`python -m ditengine.bench.apg_guidance`.
"""
from __future__ import annotations

import torch

from ditengine.kernels.apg_guidance import apg_guidance, apg_guidance_ref

from .timing import run_kernel_bench

C, L = 64, 7500


def cases(device):
    try:
        from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
    except ImportError:
        MomentumBuffer = normalized_guidance = None

    gpu = device.type == "cuda"
    fast = "triton" if gpu else "op (reference)"

    def functional_step(model_out, momentum):
        new_momentum = momentum.clone()
        return apg_guidance_ref(model_out, new_momentum, 6.0), new_momentum

    compiled_step = torch.compile(functional_step)
    for B in (1, 2) if gpu else (1,):
        for dtype in (torch.bfloat16, torch.float32):
            gen = torch.Generator().manual_seed(0)
            model_out = torch.randn(2 * B, C, L, generator=gen).to(device=device, dtype=dtype)  # (2B, C, L)
            model_out_btc = model_out.transpose(1, 2).contiguous()  # (2B, T, C), diffusers' layout
            momentum, out = torch.zeros(B, C, L, device=device), torch.empty(B, C, L, device=device)
            momentum_eager = torch.zeros(B, C, L, device=device)
            buffer = MomentumBuffer(momentum=-0.75) if MomentumBuffer is not None else None
            # read: cond + uncond rows, momentum; write: out, momentum
            nbytes = B * C * L * (2 * model_out.element_size() + 4 + 4 + 4)

            def diffusers_step(model_out_btc=model_out_btc, buffer=buffer):
                cond, uncond = model_out_btc.chunk(2, dim=0)
                return normalized_guidance(cond, uncond, guidance_scale=6.0, momentum_buffer=buffer, eta=0.0,
                                           norm_threshold=2.5, use_original_formulation=True, norm_dim=(1,))

            def reference_step(model_out=model_out, momentum=momentum_eager, out=out):
                return apg_guidance_ref(model_out, momentum, 6.0, out=out)

            providers = {
                fast: lambda model_out=model_out, momentum=momentum, out=out: apg_guidance(
                    model_out, momentum, 6.0, out=out),
                "eager": diffusers_step if buffer is not None else reference_step,
                "torch.compile": lambda model_out=model_out, momentum=momentum: compiled_step(model_out, momentum),
            }
            yield f"B={B} {C}x{L}", dtype, nbytes, providers


def main(argv=None) -> int:
    return run_kernel_bench("apg_guidance", cases, argv,
                            cpu_note="CPU: the op runs its PyTorch body (float64 reductions); no native kernel.")


if __name__ == "__main__":
    raise SystemExit(main())
