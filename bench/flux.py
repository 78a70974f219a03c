"""The Flux.1 workload of `ditengine-bench --model Flux.1-dev` (or `Flux.1-schnell`).

At the real width (D 3072, 24 heads of 128, T5 tokens of 4096 channels padded to 512 for dev and 256 for
schnell, as the pipeline pads them), 19 double and 38 single blocks on a GPU and 1 + 1 on a CPU by default
(`--depth N`: N double and 2N single blocks), 1024 px on a GPU and 256 px on a CPU unless `--image-size` says
otherwise; the flow-match schedule with the pipeline's resolution-dependent shift mu; dev embeds the guidance
scale 3.5 (no CFG batch). The eager rows are diffusers' own `FluxTransformer2DModel` (its weights those of the
ditengine reference, so the same function) with the step around it; where diffusers is not installed (the
GPU machine) they are ditengine's reference spec, which equals diffusers' in fp32 (tested), and the table says
which. Every row adds the seconds per image of the whole loop beside ms/step.
"""
from __future__ import annotations

import copy

import torch

import ditengine as de
from ditengine.models.flux import Flux, FluxConfig

from .memory import fill_random
from .twin import diffusers_transformer
from .workload import Workload

VARIANTS = {"dev": (512, True), "schnell": (256, False)}  # text tokens the pipeline pads to, guidance_embeds
GUIDANCE = 3.5


def variant(name: str) -> str:
    key = name.lower().replace("_", "-").removeprefix("flux").removeprefix(".1").strip("-. ")
    if key not in VARIANTS:
        raise SystemExit(f"--model {name!r}: expected Flux.1-dev or Flux.1-schnell")
    return key


def calculate_shift(tokens: int, base_len=256, max_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """FluxPipeline's mu for an image of `tokens` packed tokens (its scheduler config's defaults)."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return tokens * slope + base_shift - slope * base_len


def flux_flops(cfg: FluxConfig, T: int, L: int, model_batch: int) -> float:
    """FLOPs of one step's forward (2 per multiply-add): the per-prompt text embedding is not in a step."""
    D, M, S = cfg.hidden_size, cfg.mlp_hidden, T + L
    double = 2 * S * (4 * D * D + 2 * D * M) + 4 * S * S * D  # each stream: qkv, out, MLP; joint attention
    single = 2 * S * (3 * D * D + D * M + (D + M) * D) + 4 * S * S * D
    return model_batch * (cfg.num_layers * double + cfg.num_single_layers * single
                          + 2 * T * D * cfg.in_channels * 2)


def flux_setup(args, device):
    """(config, reference model (fp32 on a CPU, the ladder's dtype on a GPU), FLOPs per model batch, workload per
    batch) for the Flux ladder."""
    from .cli import DTYPES

    kind = variant(args.model)
    tokens, dev = VARIANTS[kind]
    gpu = device.type == "cuda"
    depth = args.depth or (19 if gpu else 1)
    image = args.image_size or (8 * args.input_size if args.input_size else (1024 if gpu else 256))
    cfg = FluxConfig(num_layers=depth, num_single_layers=2 * depth if args.depth or not gpu else 38,
                     guidance_embeds=dev)
    # On a GPU the reference is built in the ladder's dtype, where it runs, never in fp32 (Flux.1-dev's 12 B
    # parameters: 48 GB in fp32) and never initialised on the host; on a CPU in fp32, for the fp32 rows.
    with torch.device("meta"):
        base = Flux(cfg)
    base_dtype = DTYPES[args.dtype] if gpu else torch.float32
    base = fill_random(base.to(base_dtype).to_empty(device=device).eval(), args.seed)
    grid = image // 8
    T = (grid // 2) ** 2
    sigmas = torch.linspace(1.0, 1 / args.steps, args.steps, dtype=torch.float64).tolist()
    sched = de.schedulers.FlowMatchEuler(sigmas=sigmas, use_dynamic_shifting=True, mu=calculate_shift(T)).to(device)
    diffusers_model = diffusers_transformer(base, "FluxTransformer2DModel")

    def workload(batch):
        g = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn(batch, cfg.in_channels // 4, grid, grid, device=device, generator=g)
        named = dict(prompt_embeds=torch.randn(batch, tokens, cfg.joint_attention_dim, device=device, generator=g),
                     pooled_prompt_embeds=torch.randn(batch, cfg.pooled_projection_dim, device=device, generator=g))
        if dev:
            named["guidance"] = GUIDANCE
        if args.cfg_scale != 1.0:  # true CFG: a negative prompt
            named.update(negative_prompt_embeds=torch.randn_like(named["prompt_embeds"]),
                         negative_pooled_prompt_embeds=torch.randn_like(named["pooled_prompt_embeds"]))

        def eager_model(dtype, sdpa):  # diffusers' attention is SDPA in every row
            if diffusers_model is None and dtype == base_dtype:
                return base  # the reference itself, not a second copy of 24 GB
            return copy.deepcopy(diffusers_model if diffusers_model is not None else base).to(dtype)

        def eager_forward(model, use_cfg):
            return de.families.of_model(base).forward(model, base, noise, use_cfg,
                                                      **named)  # the pipeline's call, packed

        label = "diffusers FluxTransformer2DModel" if diffusers_model is not None else \
            "ditengine's Flux reference (diffusers not installed)"
        return Workload(base, sched, noise, named=named, eager_model=eager_model, eager_forward=eager_forward,
                        eager_label=label, per_image_seconds=True)

    return cfg, base, lambda model_batch: flux_flops(cfg, T, tokens, model_batch), workload
