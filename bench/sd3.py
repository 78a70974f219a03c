"""The SD3 workload of `ditengine-bench --model SD3-medium` (or `SD3.5-medium`).

At the real width (D 1536, 24 heads of 64, 16 latent channels, patch 2) with the pipeline's 333 text tokens
(77 CLIP + 256 T5 of 4096 channels, pooled 2048), 24 layers on a GPU and 2 on a CPU by default (`--depth N`),
1024 px on a GPU and 256 px on a CPU unless `--image-size` says otherwise; the flow-match schedule with shift
3 and the CFG batch [prompt; negative]. SD3.5-medium adds the q/k RMSNorm and dual attention in its first 13
of 24 layers (the same share at a reduced depth: layer 0 of 2). The eager rows are diffusers' own
`SD3Transformer2DModel` (its weights those of the ditengine reference, so the same function) with the step
around it; where diffusers is not installed (the GPU machine) they are ditengine's reference spec, which
equals diffusers' in fp32 (tested), and the table says which. Every row adds the seconds per image of the
whole loop beside ms/step.
"""
from __future__ import annotations

import torch

import ditengine as de
from ditengine.models.sd3 import SD3, SD3Config

from .twin import diffusers_transformer, eager_rows
from .workload import Workload

MEDIUM = dict(num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536, in_channels=16,
              out_channels=16, patch_size=2, joint_attention_dim=4096, pooled_projection_dim=2048, sample_size=128)
VARIANTS = {"sd3-medium": dict(pos_embed_max_size=192),
            "sd3.5-medium": dict(pos_embed_max_size=384, qk_norm="rms_norm")}
TEXT_TOKENS = 77 + 256  # CLIP-L/G padded to 77, T5 to the pipeline's max_sequence_length
DUAL_SHARE = 13 / 24  # SD3.5-medium's dual-attention layers 0..12


def variant(name: str) -> str:
    key = name.lower().replace("_", "-")
    if key not in VARIANTS:
        raise SystemExit(f"--model {name!r}: expected SD3-medium or SD3.5-medium")
    return key


def sd3_flops(cfg: SD3Config, T: int, L: int, model_batch: int) -> float:
    """FLOPs of one step's forward (2 per multiply-add): the per-prompt text embedding and the precomputed
    modulation are not in a step. Each stream: qkv, out and the 4x MLP (12 D^2 a token); the last block's text
    stream has its qkv alone; a dual block adds an image-only attention (4 D^2 a token and its scores)."""
    D, S = cfg.hidden_size, T + L
    flops = 0.0
    for i in range(cfg.num_layers):
        text = 3 if i == cfg.num_layers - 1 else 12
        flops += 2 * D * D * (12 * T + text * L) + 4 * S * S * D
        if i in cfg.dual_attention_layers:
            flops += 2 * D * D * 4 * T + 4 * T * T * D
    patch = 2 * T * D * cfg.in_channels * cfg.patch_size**2
    return model_batch * (flops + patch + 2 * T * D * cfg.out_channels * cfg.patch_size**2)


def sd3_setup(args, device):
    """(config, fp32 reference model, FLOPs per model batch, workload per batch) for the SD3 ladder."""

    kind = variant(args.model)
    gpu = device.type == "cuda"
    depth = args.depth or (24 if gpu else 2)
    image = args.image_size or (8 * args.input_size if args.input_size else (1024 if gpu else 256))
    dual = tuple(range(round(DUAL_SHARE * depth))) if kind == "sd3.5-medium" else ()
    cfg = SD3Config(num_layers=depth, dual_attention_layers=dual, **MEDIUM, **VARIANTS[kind])
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it runs
        base = SD3(cfg).eval()
    grid = image // 8
    T = (grid // cfg.patch_size) ** 2
    sched = de.schedulers.FlowMatchEuler(args.steps, shift=3.0).to(device)
    diffusers_model = diffusers_transformer(base, "SD3Transformer2DModel")

    def workload(batch):
        g = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn(batch, cfg.in_channels, grid, grid, device=device, generator=g)
        named = dict(prompt_embeds=torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim, device=device, generator=g),
                     pooled_prompt_embeds=torch.randn(batch, cfg.pooled_projection_dim, device=device, generator=g))
        if args.cfg_scale != 1.0:
            named.update(negative_prompt_embeds=torch.randn_like(named["prompt_embeds"]),
                         negative_pooled_prompt_embeds=torch.randn_like(named["pooled_prompt_embeds"]))
        return Workload(base, sched, noise, named=named, per_image_seconds=True,
                        **eager_rows(base, diffusers_model, "SD3Transformer2DModel", noise, named))

    return cfg, base, lambda model_batch: sd3_flops(cfg, T, TEXT_TOKENS, model_batch), workload
