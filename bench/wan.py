"""The Wan workload of `ditengine-bench --model Wan2.1-1.3B` (or `Wan2.1-14B`, `Wan2.2-5B`).

At the real width (1.3B: D 1536, 12 heads of 128, FFN 8960; 14B: D 5120, 40 heads, FFN 13824; 2.2-5B: D 3072, 24
heads, FFN 14336, 48 latent channels and a 16x VAE), the umT5 text padded to 512 tokens of 4096, the CFG batch
[prompt; negative], and the pipelines' flow-match schedule with shift 3 (480p) or 5 (720p). On a GPU 480p (1.3B) or
720p (14B, 5B) at 81 frames (121 for 5B) and every layer (`--depth N` cuts it when a model does not fit); on a CPU
2 layers, 17 frames at 256 x 448 (5 x 16 x 28 = 2240 tokens). `--image-size` (pixels) or `--input-size` (latent)
sets the height; the width keeps the pipelines' 832 / 480 aspect.
The eager rows are diffusers' own `WanTransformer3DModel` (the reference's weights, so the same function) with the
step around it; where diffusers is not installed (the GPU machine) the reference spec, which equals diffusers' in
fp32 (tested). Every row adds the seconds per video of the whole loop; the notes give the token count and the
attention's share of the step's FLOPs.
"""
from __future__ import annotations

import torch

import ditengine as de
from ditengine.models.wan import TEXT_LEN, Wan, WanConfig

from .twin import diffusers_transformer, eager_rows
from .workload import Workload

# name -> (config fields, layers, VAE spatial factor, GPU (frames, height, width), flow shift)
MODELS = {
    "wan2.1-1.3b": (dict(num_attention_heads=12, ffn_dim=8960), 30, 8, (81, 480, 832), 3.0),
    "wan2.1-14b": (dict(num_attention_heads=40, ffn_dim=13824), 40, 8, (81, 720, 1280), 5.0),
    "wan2.2-5b": (dict(num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48), 30, 16,
                  (121, 704, 1280), 5.0),
}
CPU_DEPTH, CPU_VIDEO = 2, (17, 256, 448)
PROMPT = dict(attention_head_dim=128, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2))


def variant(name: str) -> str:
    key = name.lower().replace("_", "-")
    if key not in MODELS:
        raise SystemExit(f"--model {name!r}: expected one of Wan2.1-1.3B, Wan2.1-14B, Wan2.2-5B")
    return key


def wan_flops(cfg: WanConfig, T: int, L: int, model_batch: int) -> tuple[float, float]:
    """(FLOPs of one step's forward, 2 per multiply-add, and the attention's part of them): self-attention's q, k, v,
    o and the cross-attention's q, o (6 D^2 a token), the FFN (2 D F), the scores and values (4 T^2 D and 4 T L D
    per layer). The text's K/V run once per call, not in a step."""
    D, F = cfg.hidden_size, cfg.ffn_dim
    attention = cfg.num_layers * (4 * T * T * D + 4 * T * L * D)
    gemms = cfg.num_layers * 2 * T * (6 * D * D + 2 * D * F)
    patch = 2 * T * D * cfg.in_channels * 4 + 2 * T * D * cfg.out_channels * 4
    return model_batch * (attention + gemms + patch), model_batch * attention


def wan_setup(args, device):
    """(config, fp32 reference model, FLOPs per model batch, workload per batch) for the Wan ladder."""
    kind = variant(args.model)
    fields, layers, vae, (frames, height, width), shift = MODELS[kind]
    gpu = device.type == "cuda"
    if not gpu:
        frames, height, width = CPU_VIDEO
    if args.image_size or args.input_size:
        height = args.image_size or args.input_size * vae
        width = (height * 832 // 480) // (2 * vae) * (2 * vae)
    cfg = WanConfig(num_layers=args.depth or (layers if gpu else CPU_DEPTH), **PROMPT, **fields)
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it runs
        base = Wan(cfg).eval()
    latent = ((frames - 1) // 4 + 1, height // vae, width // vae)
    T = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    sched = de.schedulers.FlowMatchEuler(args.steps, shift=shift).to(device)
    diffusers_model = diffusers_transformer(base, "WanTransformer3DModel")
    total, attention = wan_flops(cfg, T, TEXT_LEN, 1)

    def workload(batch):
        g = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn(batch, cfg.out_channels, *latent, device=device, generator=g)
        named = dict(prompt_embeds=torch.randn(batch, TEXT_LEN, cfg.text_dim, device=device, generator=g))
        if args.cfg_scale != 1.0:
            named["negative_prompt_embeds"] = torch.randn_like(named["prompt_embeds"])
        notes = [f"{frames} frames at {height} x {width}: latent {'x'.join(map(str, latent))}, {T} tokens per row, "
                 f"{cfg.num_layers} of {layers} layers; attention is {100 * attention / total:.0f}% of a step's "
                 "FLOPs"]
        return Workload(base, sched, noise, named=named, per_image_seconds=True, sample_name="video", notes=notes,
                        **eager_rows(base, diffusers_model, "WanTransformer3DModel", noise, named))

    return cfg, base, lambda model_batch: wan_flops(cfg, T, TEXT_LEN, model_batch)[0], workload
