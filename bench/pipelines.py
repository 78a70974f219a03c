"""The accelerated pipelines side by side: `python -m ditengine.bench.pipelines`.

Flux.1 at its real width (1 double and 2 single blocks by default, `--depth N`: N and 2N), random weights, a small
random VAE of Flux's 16 latent channels and 8x downsampling, no text encoders (dev's padded T5 prompt passed as
embeddings), at `--image-size` (256 px). Each pipeline diffusers offers and `accelerate` serves is called as a
user calls it (latents out), at two step counts, medians over `--repeats` rounds of round-robin calls after a
warm-up; the slope of call
time over the steps it ran is the step, the intercept what a call costs besides its steps (prompt side, image
encode, plan lookup):

    FluxPipeline          text to image, `--steps` and three times as many steps, at the size and at twice it
    FluxImg2ImgPipeline   image to image at strength 0.6: the last 60% of those schedules
    FluxInpaintPipeline   inpainting at strength 0.6 (the step-end mix between steps)
    FluxKontextPipeline   editing with a reference image of the output's size: twice the image tokens

The target: every pipeline's ms/step equals text-to-image's at the same token count (the same loop and plan), and
Kontext's text-to-image's at twice the image.
"""
from __future__ import annotations

import argparse
import functools
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


def step_and_call_ms(calls: dict, steps_run: dict, repeats: int) -> dict:
    """{name: (ms per step, ms per call besides its steps)} from medians of `calls[name](steps)` at the two step counts
    of `steps_run[name]` (count -> steps the loop runs at it), the calls interleaved round-robin so that the shared
    machine's load falls on all of them alike."""
    cases = [(name, steps) for name in calls for steps in steps_run[name]]
    for name, steps in cases:
        calls[name](steps)  # warm-up: the sampler and its plan for this count
    times = {case: [] for case in cases}
    for _ in range(repeats):
        for name, steps in cases:
            start = time.perf_counter()
            calls[name](steps)
            times[(name, steps)].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name in calls:
        (n1, t1), (n2, t2) = sorted((steps_run[name][steps], statistics.median(times[(name, steps)]))
                                    for steps in steps_run[name])
        per_step = (t2 - t1) / (n2 - n1)
        out[name] = (per_step, t1 - per_step * n1)
    return out


def measure_pipelines(pipes: dict, size: int, steps: int, repeats: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """{row of `cases`: (steps run at each count, ms per step, ms per call besides its steps)} through `accelerate`."""
    import ditengine as de

    g = torch.Generator().manual_seed(seed)
    cfg = pipes["FluxPipeline"].transformer.config
    text = dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, cfg.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g))
    fast = {}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        fast[name] = de.accelerate(pipe, dtype=dtype)
    runs, steps_run = {}, {}
    for row, (name, kwargs, strength) in cases(size, seed).items():
        # image to image and inpainting run the last `strength` of the schedule, as diffusers counts it
        steps_run[row] = {n: n - int(max(n - n * strength, 0)) for n in (steps, 3 * steps)}
        runs[row] = functools.partial(
            lambda accelerated, kwargs, n: accelerated(output_type="latent", guidance_scale=3.5, num_inference_steps=n,
                                                       generator=torch.Generator().manual_seed(0), **text, **kwargs),
            fast[name], kwargs)
    return {row: (tuple(steps_run[row].values()), *timing)
            for row, timing in step_and_call_ms(runs, steps_run, repeats).items()}


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
    print("| call | steps run | ms/step | ms per call besides its steps |\n|---|---|---:|---:|")
    for name, (ran, step_ms, call_ms) in rows.items():
        print(f"| {name} | {' and '.join(map(str, ran))} | {step_ms:.1f} | {call_ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
