"""The reference sampling loop: classifier-free guidance around a model of any served family, one scheduler
step per denoising step, in plain PyTorch. `backend="fused"` hands the same call to `FastSampler`."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import families
from .cache import CachePolicy, ReferenceCachedForward, stats_dict
from .cache import resolve as resolve_cache
from .experts import Expert
from .fast import FastSampler
from .guidance import APG, check_guider
from .inputs import (check_callback_state, check_cfg_scale, check_conditioning, check_guided_channels,
                     check_scheduler, draw_noise, guided_steps)
from .models.dit import guide
from .schedulers import COL, Scheduler

BACKENDS = ("reference", "fused")
CUDA_GRAPH_MODES = (None, "step", "loop")

# forward(x_in, t, step) -> model output on the CFG-doubled rows ([conditional; unconditional]), or on the
# conditional rows alone (a step outside the guidance interval): the conditioning's first len(x_in) rows
Forward = families.Forward


def doubled(cond: torch.Tensor | None, uncond: torch.Tensor | None, use_cfg: bool) -> torch.Tensor | None:
    """[cond; uncond] when guiding, else cond: the conditioning of the CFG-doubled rows."""
    return torch.cat([cond, uncond]) if use_cfg and cond is not None else cond


def reference_forward(model: torch.nn.Module, noise: torch.Tensor, use_cfg: bool, *conditioning,
                      cache=None, **named) -> Forward:
    """The model's own forward on the CFG-doubled conditioning (conditional rows first), checked once: its
    family's call of it, as the family's pipeline calls its transformer (`Family.forward`)."""
    spec = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: check the model it wraps, call the wrapper
    return families.of_model(model).forward(model, spec, noise, use_cfg, *conditioning, cache=cache, **named)


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


def run_loop(forward: Forward, sched: Scheduler, noise: torch.Tensor, cfg_scale: float | list, guided_channels: int,
             dtype: torch.dtype, generator: torch.Generator | None = None, progress: bool = False,
             cfg_interval: tuple | None = None, guider: APG | None = None, callback=None) -> torch.Tensor:
    """The reference loop around any forward on the CFG-doubled rows: every step of `sched` from `noise`,
    guided (by CFG, or the `guider`) at the steps `cfg_interval` admits (`inputs.guided_steps`). `callback(i, t, x)`
    runs after each step on its state; a tensor it returns becomes the state (`check_callback_state`). `cfg_scale` may
    be a list, one per step (a second expert's own scale)."""
    sched.to(noise.device).reset()
    guided = guided_steps(sched.timesteps.tolist(), cfg_interval)
    x = noise.float() * sched.init_noise_sigma  # (B, C, ...), the sampler's state stays fp32
    momentum = torch.zeros(x.shape, device=x.device) if guider is not None else None  # contiguous, fp32
    for i in tqdm(range(len(sched)), desc="sampling", disable=not progress, leave=False):
        scale = cfg_scale[i] if isinstance(cfg_scale, list) else cfg_scale
        x = denoise_step(forward, sched, i, x, scale, guided_channels, dtype, draw_noise(sched, i, x, generator),
                         guided[i], guider, momentum)
        if callback is not None:
            new = callback(i, sched.timesteps[i], x)
            x = x if new is None else check_callback_state(new, x).float()
    return x



@torch.no_grad()
def sample(model: torch.nn.Module, sched: Scheduler, noise: torch.Tensor, *conditioning, cfg_scale: float = 4.0,
           backend: str = "reference", cuda_graph: str | None = None, generator: torch.Generator | None = None,
           progress: bool = True, guided_channels: int | None = None, cache: CachePolicy | None = None,
           stats: dict | None = None, cfg_interval: tuple | None = None, quantize: str | None = None,
           guider: APG | None = None, callback=None, expert: Expert | None = None, parallel=None,
           **named_conditioning) -> torch.Tensor:
    """Generate latents from `noise` (B, C, ...) ~ N(0, I) and the family's conditioning: `class_labels`
    (B,) for a DiT; for PixArt `prompt_embeds=`, `prompt_attention_mask=`, `negative_prompt_embeds=`,
    `negative_prompt_attention_mask=` (and `added_cond_kwargs=` for PixArt-alpha 1024); for ACE-Step below.

    Guidance is on when `cfg_scale != 1`: the batch is doubled with the unconditional input (the null
    label, the negative prompt) and the first `guided_channels` prediction channels are guided (default:
    all), at the steps whose timestep lies in `cfg_interval` = (lo, hi) (default: every step; the others
    run the conditional half alone, see `inputs.guided_steps`). Noise for stochastic samplers comes from `generator`.
    `backend="fused"` runs the fast path
    (`FastSampler`); `cuda_graph` applies to it. `cache` (a `ditengine.cache` policy) skips transformer work
    (the reference backend runs `cache.ReferenceCachedForward`); `stats`, a dict, is filled with what the run computed.
    `quantize` ("int8", "fp8"; fused backend only) runs the blocks' GEMMs as W8A8 (see `FastSampler`).
    `guider`: None (plain CFG) or `ditengine.guidance.APG()` (ACE-Step's base and SFT models).
    `callback(i, t, x)`: called after step i with its timestep and the state x (B, C, ...) fp32; a tensor it returns
    becomes the state (the fused backend needs `cuda_graph` "step" or None for it).
    `expert`: a `ditengine.experts.Expert`, the second model of the low-noise steps (Wan 2.2 A14B's transformer_2).
    `parallel`: a `ditengine.ParallelConfig` (fused backend): the run over the ranks of a torch.distributed group.

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
                              quantize=quantize, guider=guider, expert=expert, parallel=parallel)
        latents = sampler(noise, *conditioning, generator=generator, progress=progress, callback=callback,
                          **named_conditioning)
        if stats is not None:
            stats.update(sampler.stats)
        return latents
    if cuda_graph is not None:
        raise ValueError("cuda_graph needs backend='fused'")
    if quantize is not None:
        raise ValueError(f"quantize={quantize!r} needs backend='fused' (the reference is the model's own precision)")
    if parallel is not None:
        raise ValueError("parallel needs backend='fused' (the reference loop runs on one device)")
    check_cfg_scale(cfg_scale)
    family = families.of_model(model)
    check_conditioning(family.fast, noise, next(model.parameters()).device, conditioning, named_conditioning)
    k = check_guided_channels(guided_channels, family.channels(model.config))
    check_guider(guider, tuple(noise.shape[1:]))
    use_cfg = cfg_scale != 1.0
    if cache is not None and not family.reference_cache:
        raise ValueError(f"cache: the {family.name} family offers no reference form of step caching; "
                         f"{type(model).__name__} has none: use backend='fused'")
    if cache is not None and cfg_interval is not None:
        raise ValueError("cfg_interval: not supported with a step cache (its residuals are kept per CFG-doubled row)")
    cache = resolve_cache(cache, model, sched.timesteps)
    cached = ReferenceCachedForward(cache, len(sched), family.depth(model)) if cache is not None else None
    forward = reference_forward(model, noise, use_cfg, *conditioning, cache=cached, **named_conditioning)
    scale = cfg_scale
    if expert is not None:
        if cache is not None:
            raise ValueError("expert: not combined with a step cache (each expert's blocks would need their own)")
        expert.check(model)
        low = expert.steps(sched.timesteps)
        first, second = forward, reference_forward(expert.model, noise, use_cfg, *conditioning, **named_conditioning)
        forward = lambda x_in, t, i: (second if low[i] else first)(x_in, t, i)  # noqa: E731
        scale = [expert.scale(cfg_scale) if low[i] else cfg_scale for i in range(len(sched))]
    x = run_loop(forward, sched, noise, scale, k, dtype, generator, progress, cfg_interval, guider, callback)
    if stats is not None:
        S, depth = len(sched), family.depth(model)
        stats.update(cached.stats if cached is not None else stats_dict(S, depth, [True] * S, S * depth))
    return x
