"""The accelerated pipelines side by side: `python -m ditengine.bench.pipelines`.

Flux.1 at its real width (1 double and 2 single blocks by default, `--depth N`: N and 2N), random weights, a small
random VAE of Flux's 16 latent channels and 8x downsampling, no text encoders (dev's padded T5 prompt passed as
embeddings), at `--image-size` (256 px). Each pipeline diffusers offers and `accelerate` serves is called as a
user calls it (latents out, `--steps` steps) and the call timed; then the step of the plan that call ran (the fused
forward, the guidance and the scheduler step, with what the pipeline adds inside the step: Kontext's reference
tokens) is timed, round-robin across the rows, medians over `--repeats` rounds. Inpainting's step-end mix runs
between steps, outside the step timed:

    FluxPipeline          text to image, at the size and at twice it
    FluxImg2ImgPipeline   image to image at strength 0.6: the last 60% of the schedule
    FluxInpaintPipeline   inpainting at strength 0.6 (the step-end mix between steps)
    FluxKontextPipeline   editing with a reference image of the output's size: twice the image tokens

The target: every pipeline's ms/step equals text-to-image's at the same token count (the same loop and plan), and
Kontext's text-to-image's at twice the image.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .timing import environment

TEXT_TOKENS = 512


CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline")


def flux_pipelines(depth: int, seed: int = 0, **config) -> dict:
    """{name: diffusers pipeline} of `CLASSES`, sharing one random Flux transformer (real width unless `config`
    overrides) and VAE."""
    import diffusers

    from ditengine.models.flux import Flux, FluxConfig

    from .memory import fill_random
    from .twin import diffusers_transformer

    cfg = FluxConfig(num_layers=depth, num_single_layers=2 * depth, guidance_embeds=True, **config)
    with torch.device("meta"):
        model = Flux(cfg)
    transformer = diffusers_transformer(fill_random(model.to_empty(device="cpu").eval(), seed),
                                        "FluxTransformer2DModel")
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.in_channels // 4,
                                  block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4,
                                  shift_factor=0.1, scaling_factor=0.4).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, transformer=transformer)
    return {name: getattr(diffusers, name)(**parts) for name in CLASSES}


def cases(size: int, seed: int = 0) -> dict:
    """{row: (pipeline name, call arguments, strength)}: each pipeline at `size` px, and text to image at Kontext's
    token count (its output's tokens and the reference's: twice the image)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, size, size, generator=g)
    mask = (torch.rand(1, 1, size, size, generator=g) > 0.5).float()
    square = dict(height=size, width=size)
    return {"text to image": ("FluxPipeline", square, 1.0),
            "image to image (strength 0.6)": ("FluxImg2ImgPipeline", {**square, "image": image, "strength": 0.6}, 0.6),
            "inpaint (strength 0.6)": ("FluxInpaintPipeline", {**square, "image": image, "mask_image": mask,
                                                               "strength": 0.6}, 0.6),
            "Kontext, a reference of the same size": ("FluxKontextPipeline", {**square, "image": image,
                                                                              "max_area": size * size,
                                                                              "_auto_resize": False}, 1.0),
            "text to image at Kontext's token count": ("FluxPipeline", dict(height=size, width=2 * size), 1.0)}


def measure_pipelines(pipes: dict, size: int, steps: int, repeats: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """{row of `cases`: (steps the call ran, ms per call, ms per step)} through `accelerate`: a call's median over
    `repeats` after a warm-up; its plan's step (`Plan.step_body`) timed round-robin with the other rows'."""
    import ditengine as de

    g = torch.Generator().manual_seed(seed)
    cfg = pipes["FluxPipeline"].transformer.config
    text = dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, cfg.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g))
    fast = {}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        fast[name] = de.accelerate(pipe, dtype=dtype)
    calls, plans, ran = {}, {}, {}
    for row, (name, kwargs, _) in cases(size, seed).items():
        accelerated = fast[name]
        accelerated._pool.clear()
        accelerated._samplers.clear()  # every row its own sampler and plan, not a neighbour's
        for _ in range(1 + repeats):  # a warm-up, then the timed calls
            start = time.perf_counter()
            accelerated(output_type="latent", guidance_scale=3.5, num_inference_steps=steps,
                        generator=torch.Generator().manual_seed(0), **text, **kwargs)
            calls.setdefault(row, []).append((time.perf_counter() - start) * 1e3)
        sampler = next(iter(accelerated._samplers.values()))
        plans[row], ran[row] = sampler._plans[sampler.last_plan], len(sampler.sched)
    step_times = {row: [] for row in plans}
    with torch.inference_mode():
        for _ in range(repeats):
            for row, plan in plans.items():
                start = time.perf_counter()
                plan.step_body(0)
                step_times[row].append((time.perf_counter() - start) * 1e3)
    return {row: (ran[row], statistics.median(calls[row][1:]), statistics.median(step_times[row])) for row in plans}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditengine.bench.pipelines", description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = measure_pipelines(flux_pipelines(args.depth), args.image_size, args.steps, args.repeats, dtype)
    print(f"Flux width, {args.depth} double + {2 * args.depth} single blocks, {args.image_size} px, {args.dtype} | "
          f"{environment(torch.device('cpu'))['device']}\n")
    print("| call | steps run | ms per call | ms/step |\n|---|---:|---:|---:|")
    for row, (ran, call_ms, step_ms) in rows.items():
        print(f"| {row} | {ran} | {call_ms:.0f} | {step_ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
