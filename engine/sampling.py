"""The sampling loop: classifier-free guidance around a DiT, one scheduler step per denoising step."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .cache import CachePolicy, ReferenceCachedForward, stats_dict
from .fast import FastSampler
from .inputs import check_cfg_scale, check_guided_channels, check_inputs, check_scheduler, draw_noise, guided_labels
from .model import DiT, guide
from .schedulers import COL, Scheduler

BACKENDS = ("reference", "fused")
CUDA_GRAPH_MODES = (None, "step", "loop")


def denoise_step(model: DiT, sched: Scheduler, i: int, x: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                 guided_channels: int, noise: torch.Tensor | None = None,
                 cached: ReferenceCachedForward | None = None) -> torch.Tensor:
    """One reference step: the model on the (CFG-doubled when `y` is twice the batch) scaled input, guidance,
    then `sched.step`. x (B, C, H, W) fp32 -> x_next. `cached`: the model's forward under a cache policy."""
    x_in = x * sched.table[i, COL["c_in"]]
    use_cfg = len(y) == 2 * len(x)
    if use_cfg:
        x_in = torch.cat([x_in, x_in])
    x_in, t = x_in.to(next(model.parameters()).dtype), sched.timesteps[i].expand(len(x_in))
    out = (model(x_in, t, y) if cached is None else cached(x_in, t, y, i)).float()
    if use_cfg:
        out = guide(out, cfg_scale, guided_channels)[: len(x)]
    return sched.step(i, x, out, noise=noise)


@torch.no_grad()
def sample(model: DiT, sched: Scheduler, noise: torch.Tensor, class_labels: torch.Tensor, cfg_scale: float = 4.0,
           backend: str = "reference", cuda_graph: str | None = None, generator: torch.Generator | None = None,
           progress: bool = True, guided_channels: int | None = None, cache: CachePolicy | None = None,
           stats: dict | None = None) -> torch.Tensor:
    """Generate latents from `noise` (B, C, H, W) ~ N(0, I) for `class_labels` (B,).

    Guidance is on when `cfg_scale != 1`: the batch is doubled with the null label and the first
    `guided_channels` prediction channels are guided (default: all). Noise for stochastic samplers comes
    from `generator`. `backend="fused"` runs the fast path (`FastSampler`); `cuda_graph` applies to it.
    `cache` (a `ditengine.cache` policy) skips transformer work on either backend; `stats`, a dict, is
    filled with what the run computed (`FastSampler.stats`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if cuda_graph not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graph={cuda_graph!r}: expected one of {CUDA_GRAPH_MODES}")
    check_scheduler(sched)
    if backend == "fused":
        sampler = FastSampler(model, sched, cfg_scale=cfg_scale, dtype=next(model.parameters()).dtype,
                              cuda_graph=cuda_graph, guided_channels=guided_channels, cache=cache)
        latents = sampler(noise, class_labels, generator=generator, progress=progress)
        if stats is not None:
            stats.update(sampler.stats)
        return latents
    if cuda_graph is not None:
        raise ValueError("cuda_graph needs backend='fused'")
    check_cfg_scale(cfg_scale)
    k = check_guided_channels(guided_channels, model.config.in_channels)
    check_inputs(model, noise, class_labels)
    cached = ReferenceCachedForward(model, cache, len(sched)) if cache is not None else None
    cfg = model.config
    use_cfg = cfg_scale != 1.0
    sched.to(noise.device).reset()
    y = guided_labels(class_labels, cfg.num_classes, use_cfg)
    x = noise.float() * sched.init_noise_sigma  # (B, C, H, W), the sampler's state stays fp32
    for i in tqdm(range(len(sched)), desc="sampling", disable=not progress, leave=False):
        x = denoise_step(model, sched, i, x, y, cfg_scale, k, draw_noise(sched, i, x, generator), cached)
    if stats is not None:
        S = len(sched)
        stats.update(cached.stats if cached is not None else stats_dict(S, cfg.depth, [True] * S, S * cfg.depth))
    return x

