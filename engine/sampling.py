"""The reference sampling loop: classifier-free guidance around a model of any served family, one scheduler
step per denoising step, in plain PyTorch. `backend="fused"` hands the same call to `FastSampler`."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .cache import CachePolicy, ReferenceCachedForward, stats_dict
from .fast import FastSampler
from .fast.ace_step import check_inputs as check_ace_step_inputs
from .fast.flux import check_inputs as check_flux_inputs
from .fast.sd3 import check_inputs as check_sd3_inputs
from .guidance import APG, check_guider
from .inputs import (check_cfg_scale, check_guided_channels, check_inputs, check_patch_grid_noise, check_scheduler,
                     draw_noise, guided_labels, guided_steps)
from .models.ace_step import AceStep
from .models.dit import DiT, guide
from .models.flux import Flux
from .models.pixart import PixArt
from .models.sd3 import SD3
from .schedulers import COL, Scheduler

BACKENDS = ("reference", "fused")
CUDA_GRAPH_MODES = (None, "step", "loop")

# forward(x_in, t, step) -> model output on the CFG-doubled rows ([conditional; unconditional]), or on the
# conditional rows alone (a step outside the guidance interval): the conditioning's first len(x_in) rows
Forward = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _doubled(cond: torch.Tensor | None, uncond: torch.Tensor | None, use_cfg: bool) -> torch.Tensor | None:
    return torch.cat([cond, uncond]) if use_cfg and cond is not None else cond


def reference_forward(model: torch.nn.Module, noise: torch.Tensor, use_cfg: bool, *conditioning,
                      cache: ReferenceCachedForward | None = None, **named) -> Forward:
    """The model's own forward on the CFG-doubled conditioning (conditional rows first), checked once.

    DiT: `class_labels` (B,), doubled with the null label. PixArt: `prompt_embeds`, `prompt_attention_mask`,
    `negative_prompt_embeds`, `negative_prompt_attention_mask`, `added_cond_kwargs` (the diffusers
    pipelines' names), the negative prompt as the unconditional half.
    """
    spec = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: check the model it wraps, call the wrapper
    if isinstance(spec, DiT):
        (class_labels,) = conditioning or (named.pop("class_labels"),)
        check_inputs(model, noise, class_labels)
        y = guided_labels(class_labels, model.config.num_classes, use_cfg)
        if cache is not None:
            return lambda x_in, t, step: cache(x_in, t, y, step)
        return lambda x_in, t, step: model(x_in, t, y[:len(x_in)])
    if isinstance(spec, PixArt):
        check_patch_grid_noise(noise, spec.config.in_channels, spec.config.patch_size,
                               next(model.parameters()).device)
        if use_cfg and named.get("negative_prompt_embeds") is None:
            raise ValueError("negative_prompt_embeds: required with guidance (cfg_scale != 1)")
        text = _doubled(named.get("prompt_embeds"), named.get("negative_prompt_embeds"), use_cfg)
        mask = named.get("prompt_attention_mask")
        if mask is not None and use_cfg:
            neg = named.get("negative_prompt_attention_mask")
            mask = torch.cat([mask, torch.ones_like(mask) if neg is None else neg])
        added = named.get("added_cond_kwargs")
        if added is not None:
            added = {k: None if v is None else _doubled(v, v, use_cfg) for k, v in added.items()}
        dtype = next(model.parameters()).dtype
        text = None if text is None else text.to(dtype)

        def forward(x_in, t, step):
            n = len(x_in)
            return model(x_in, encoder_hidden_states=None if text is None else text[:n], timestep=t,
                         encoder_attention_mask=None if mask is None else mask[:n],
                         added_cond_kwargs=None if added is None else
                         {k: None if v is None else v[:n] for k, v in added.items()})

        return forward
    if isinstance(spec, AceStep):
        # The fused denoiser's checks; the loop is channels-first (B, C, T), the model takes diffusers' (B, T, C).
        check_ace_step_inputs(spec.config, next(model.parameters()).device, noise, use_cfg, **named)
        enc = _doubled(named["encoder_hidden_states"], named.get("null_encoder_hidden_states"), use_cfg)
        context = named["context_latents"].transpose(1, 2)
        context = torch.cat([context, context]) if use_cfg else context
        dtype = next(model.parameters()).dtype
        enc, context = enc.to(dtype), context.to(dtype)

        def forward(x_in, t, step):
            n = len(x_in)
            return model(x_in.transpose(1, 2), timestep=t, timestep_r=t, encoder_hidden_states=enc[:n],
                         context_latents=context[:n]).transpose(1, 2).contiguous()

        return forward
    if isinstance(spec, Flux):
        return flux_forward(model, spec, noise, use_cfg, named)
    if isinstance(spec, SD3):
        return sd3_forward(model, spec, noise, use_cfg, named)
    raise TypeError(f"model: expected a ditengine reference model (DiT, PixArt, AceStep, Flux, SD3), got {type(model).__name__} "
                    "(convert a diffusers transformer with ditengine.from_diffusers)")


def flux_forward(model, spec: Flux, noise: torch.Tensor, use_cfg: bool, named: dict) -> Forward:
    """`model` (the reference spec `spec`, or diffusers' transformer with its weights) called as FluxPipeline calls it: the loop's (B, 16, H, W) latents packed into 2x2 patches, t / 1000
    in the latents' dtype, the guidance for dev, the negative prompt as the unconditional half (true CFG)."""
    cond = check_flux_inputs(spec.config, next(model.parameters()).device, noise, use_cfg, **named)
    dtype = next(model.parameters()).dtype
    text = _doubled(cond["prompt_embeds"], cond.get("negative_prompt_embeds"), use_cfg).to(dtype)
    pooled = _doubled(cond["pooled_prompt_embeds"], cond.get("negative_pooled_prompt_embeds"), use_cfg).to(dtype)
    guidance = cond["guidance"]
    guidance = None if guidance is None else _doubled(guidance, guidance, use_cfg)

    def forward(x_in, t, step):
        n, C, H, W = x_in.shape
        packed = x_in.view(n, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, 4 * C)
        out = model(packed, encoder_hidden_states=text[:n], pooled_projections=pooled[:n],
                    timestep=t.to(dtype) / 1000, img_ids=cond["img_ids"], txt_ids=cond["txt_ids"],
                    guidance=None if guidance is None else guidance[:n], return_dict=False)[0]
        C_out = out.shape[-1] // 4
        return out.view(n, H // 2, W // 2, C_out, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, C_out, H, W)

    return forward


def sd3_forward(model, spec: SD3, noise: torch.Tensor, use_cfg: bool, named: dict) -> Forward:
    """`model` (the reference spec `spec`, or diffusers' transformer with its weights) called as
    StableDiffusion3Pipeline calls it: t = 1000 sigma in fp32, the negative prompt as the unconditional half."""
    cond = check_sd3_inputs(spec.config, next(model.parameters()).device, noise, use_cfg, **named)
    dtype = next(model.parameters()).dtype
    text = _doubled(cond["prompt_embeds"], cond.get("negative_prompt_embeds"), use_cfg).to(dtype)
    pooled = _doubled(cond["pooled_prompt_embeds"], cond.get("negative_pooled_prompt_embeds"), use_cfg).to(dtype)

    def forward(x_in, t, step):
        n = len(x_in)
        return model(x_in, encoder_hidden_states=text[:n], pooled_projections=pooled[:n], timestep=t,
                     return_dict=False)[0]

    return forward


def denoise_step(forward: Forward, sched: Scheduler, i: int, x: torch.Tensor, cfg_scale: float, guided_channels: int,
                 dtype: torch.dtype, noise: torch.Tensor | None = None, guided: bool = True,
                 guider: APG | None = None, momentum: torch.Tensor | None = None) -> torch.Tensor:
    """One reference step: the model on the (CFG-doubled when guiding) scaled input, guidance, then
    `sched.step`. x (B, C, ...) fp32 -> x_next. `guided=False` (outside the guidance interval) runs the
    conditional half alone. With a `guider` (APG) the halves are combined by it, `momentum` its state."""
    x_in = x * sched.table[i, COL["c_in"]]
    use_cfg = cfg_scale != 1.0 and guided
    if use_cfg:
        x_in = torch.cat([x_in, x_in])
    x_in, t = x_in.to(dtype), sched.timesteps[i].expand(len(x_in))
    out = forward(x_in, t, i).float()
    if use_cfg and guider is not None:
        out = guider(out, momentum, cfg_scale, backend="reference")
    elif use_cfg:
        out = guide(out, cfg_scale, guided_channels)[: len(x)]
    return sched.step(i, x, out, noise=noise)


def run_loop(forward: Forward, sched: Scheduler, noise: torch.Tensor, cfg_scale: float, guided_channels: int,
             dtype: torch.dtype, generator: torch.Generator | None = None, progress: bool = False,
             cfg_interval: tuple | None = None, guider: APG | None = None) -> torch.Tensor:
    """The reference loop around any forward on the CFG-doubled rows: every step of `sched` from `noise`,
    guided (by CFG, or the `guider`) at the steps `cfg_interval` admits (`inputs.guided_steps`)."""
    sched.to(noise.device).reset()
    guided = guided_steps(sched.timesteps.tolist(), cfg_interval)
    x = noise.float() * sched.init_noise_sigma  # (B, C, ...), the sampler's state stays fp32
    momentum = torch.zeros(x.shape, device=x.device) if guider is not None else None  # contiguous, fp32
    for i in tqdm(range(len(sched)), desc="sampling", disable=not progress, leave=False):
        x = denoise_step(forward, sched, i, x, cfg_scale, guided_channels, dtype, draw_noise(sched, i, x, generator),
                         guided[i], guider, momentum)
    return x


@torch.no_grad()
def sample(model: torch.nn.Module, sched: Scheduler, noise: torch.Tensor, *conditioning, cfg_scale: float = 4.0,
           backend: str = "reference", cuda_graph: str | None = None, generator: torch.Generator | None = None,
           progress: bool = True, guided_channels: int | None = None, cache: CachePolicy | None = None,
           stats: dict | None = None, cfg_interval: tuple | None = None, quantize: str | None = None,
           guider: APG | None = None, **named_conditioning) -> torch.Tensor:
    """Generate latents from `noise` (B, C, ...) ~ N(0, I) and the family's conditioning: `class_labels`
    (B,) for a DiT; for PixArt `prompt_embeds=`, `prompt_attention_mask=`, `negative_prompt_embeds=`,
    `negative_prompt_attention_mask=` (and `added_cond_kwargs=` for PixArt-alpha 1024); for ACE-Step below.

    Guidance is on when `cfg_scale != 1`: the batch is doubled with the unconditional input (the null
    label, the negative prompt) and the first `guided_channels` prediction channels are guided (default:
    all), at the steps whose timestep lies in `cfg_interval` = (lo, hi) (default: every step; the others
    run the conditional half alone, see `inputs.guided_steps`). Noise for stochastic samplers comes from `generator`. `backend="fused"` runs the fast path
    (`FastSampler`); `cuda_graph` applies to it. `cache` (a `ditengine.cache` policy) skips transformer work
    (on the reference backend for the DiT); `stats`, a dict, is filled with what the run computed.
    `quantize` ("int8", "fp8"; fused backend only) runs the blocks' GEMMs as W8A8 (see `FastSampler`).
    `guider`: None (plain CFG) or `ditengine.guidance.APG()` (ACE-Step's base and SFT models).

    ACE-Step (`ditengine.models.ace_step.AceStep`): noise (B, C, T) channels-first, `encoder_hidden_states=` the
    packed condition (B, L, C_enc), `context_latents=` (B, C_ctx, T) channels-first, and with guidance
    `null_encoder_hidden_states=` (the condition encoder's null embedding, broadcast).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if cuda_graph not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graph={cuda_graph!r}: expected one of {CUDA_GRAPH_MODES}")
    check_scheduler(sched)
    dtype = next(model.parameters()).dtype
    if backend == "fused":
        sampler = FastSampler(model, sched, cfg_scale=cfg_scale, dtype=dtype, cuda_graph=cuda_graph,
                              guided_channels=guided_channels, cache=cache, cfg_interval=cfg_interval,
                              quantize=quantize, guider=guider)
        latents = sampler(noise, *conditioning, generator=generator, progress=progress, **named_conditioning)
        if stats is not None:
            stats.update(sampler.stats)
        return latents
    if cuda_graph is not None:
        raise ValueError("cuda_graph needs backend='fused'")
    if quantize is not None:
        raise ValueError(f"quantize={quantize!r} needs backend='fused' (the reference is the model's own precision)")
    check_cfg_scale(cfg_scale)
    channels = model.config.audio_acoustic_hidden_dim if isinstance(model, AceStep) else model.config.in_channels
    k = check_guided_channels(guided_channels, channels)
    check_guider(guider, tuple(noise.shape[1:]))
    use_cfg = cfg_scale != 1.0
    if cache is not None and not isinstance(model, DiT):
        raise ValueError("cache: the reference form of step caching is the DiT's (ReferenceCachedForward); for "
                         f"{type(model).__name__} use backend='fused'")
    if cache is not None and cfg_interval is not None:
        raise ValueError("cfg_interval: not supported with a step cache (its residuals are kept per CFG-doubled row)")
    cached = ReferenceCachedForward(model, cache, len(sched)) if cache is not None else None
    forward = reference_forward(model, noise, use_cfg, *conditioning, cache=cached, **named_conditioning)
    x = run_loop(forward, sched, noise, cfg_scale, k, dtype, generator, progress, cfg_interval, guider)
    if stats is not None:
        S, depth = len(sched), len(model.layers if isinstance(model, AceStep) else model.blocks)  # caching: DiT
        stats.update(cached.stats if cached is not None else stats_dict(S, depth, [True] * S, S * depth))
    return x
