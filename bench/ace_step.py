"""The ACE-Step 1.5 workload of `ditengine-bench --model ACE-Step-1.5` (the turbo DiT; `--cfg-scale` > 1 runs
the base model's APG-guided batch).

At the DiT's real width (D 2048, 16 q / 8 kv heads of 128, SwiGLU 6144, every other layer windowed to +-128
tokens), 24 layers on a GPU and 2 on a CPU by default (`--depth` sets it), 30 s of music by default on a CPU
and 240 s on a GPU (`--duration`; 25 latent frames a second, 12.5 tokens after the patch: 375 and 3000
tokens). The condition is a packed sequence of `CONDITION_TOKENS` (text, lyrics and timbre, as the condition
encoder packs them). The eager rows are diffusers' own `AceStepTransformer1DModel` (its weights those of the
ditengine reference, so the same function) with the step around it; where diffusers is not installed (the GPU
machine) they are ditengine's reference spec, which equals diffusers' in fp32 (tested), and the table says
which. Beside ms/step the report gives the seconds of DiT loop per song and its real-time factor.
"""
from __future__ import annotations

import copy

import torch

import ditengine as de
from ditengine.models.ace_step import AceStep, AceStepConfig

from .twin import diffusers_transformer
from .workload import Workload

CPU_DEPTH = 2  # the CPU default: 2 of the 24 layers at the real width, a ladder of about a minute
CONDITION_TOKENS = 320  # a prompt, a verse of lyrics and the timbre token, packed
LATENTS_PER_SECOND = 25
TURBO_STEPS, TURBO_SHIFT = 8, 3.0


def ace_step_flops(cfg: AceStepConfig, T: int, L: int, model_batch: int) -> float:
    """FLOPs of one step's forward (2 per multiply-add), the windowed layers' attention over their band only;
    the per-call condition projection and cross K/V are not in a step."""
    D, H, Hkv, Dh, M = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        cfg.intermediate_size)
    gemms = 2 * T * (D * (H + 2 * Hkv) * Dh + 2 * H * Dh * D + D * H * Dh + 3 * D * M)
    total = 0
    for i in range(cfg.num_hidden_layers):
        keys = T if cfg.window(i) is None else min(T, 2 * cfg.window(i) + 1)
        total += gemms + 4 * T * keys * H * Dh + 4 * T * L * H * Dh
    C, p = cfg.audio_acoustic_hidden_dim, cfg.patch_size
    return model_batch * (total + 2 * T * D * cfg.in_channels * p + 2 * T * D * C * p)


def turbo_sigmas(steps: int, shift: float = TURBO_SHIFT) -> list[float]:
    """ACE-Step's shifted grid (`AceStepPipeline._get_timestep_schedule`)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t))[:-1].tolist()


def ace_step_setup(args, device):
    """(config, fp32 reference model, FLOPs per model batch, workload per batch) for the ACE-Step ladder."""

    depth = args.depth or (24 if device.type == "cuda" else CPU_DEPTH)
    duration = args.duration or (240.0 if device.type == "cuda" else 30.0)
    frames = round(duration * LATENTS_PER_SECOND)
    cfg = AceStepConfig(num_hidden_layers=depth, is_turbo=args.cfg_scale == 1.0)
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it runs
        base = AceStep(cfg).eval()
    sched = de.schedulers.FlowMatchEuler(sigmas=turbo_sigmas(args.steps), num_train_timesteps=1).to(device)
    diffusers_model = diffusers_transformer(base, "AceStepTransformer1DModel")
    guider = de.APG() if args.cfg_scale != 1.0 else None
    tokens = -(-frames // cfg.patch_size)

    def workload(batch):
        g = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn(batch, cfg.audio_acoustic_hidden_dim, frames, device=device, generator=g)  # (B, C, T)
        condition = torch.randn(batch, CONDITION_TOKENS, cfg.encoder_hidden_size, device=device, generator=g)
        context = torch.randn(batch, cfg.context_channels, frames, device=device, generator=g)
        named = dict(encoder_hidden_states=condition, context_latents=context)
        if guider is not None:
            named["null_encoder_hidden_states"] = torch.randn(1, 1, cfg.encoder_hidden_size, device=device,
                                                              generator=g).expand_as(condition)

        def eager_model(dtype, sdpa):  # diffusers' attention is SDPA in every row
            return copy.deepcopy(diffusers_model if diffusers_model is not None else base).to(dtype)

        def eager_forward(model, use_cfg):
            dtype = next(model.parameters()).dtype
            rows = [condition, named["null_encoder_hidden_states"]] if use_cfg else [condition]
            enc = torch.cat(rows).to(dtype)
            ctx = torch.cat([context] * len(rows)).transpose(1, 2).to(dtype)

            def forward(x_in, t, step):  # the pipeline's call of its transformer: (B, T, C), t in the model dtype
                t = t.to(dtype)
                out = model(hidden_states=x_in.transpose(1, 2), timestep=t, timestep_r=t, encoder_hidden_states=enc,
                            context_latents=ctx, return_dict=False)[0]
                return out.transpose(1, 2).contiguous()

            return forward

        label = "diffusers AceStepTransformer1DModel" if diffusers_model is not None else \
            "ditengine's ACE-Step reference (diffusers not installed)"
        return Workload(base, sched, noise, named=named, eager_model=eager_model, eager_forward=eager_forward,
                        eager_label=label, sampler_kwargs={"guider": guider}, audio_seconds=duration)

    return cfg, base, lambda model_batch: ace_step_flops(cfg, tokens, CONDITION_TOKENS, model_batch), workload
