"""Generating samples for lists of labels and seeds, in chunks that can be spread over processes.

Sample j starts from noise drawn with its own seed (`seed + j`), so its initial noise does not depend on
how samples are batched; a chunk's step noise (stochastic schedulers) comes from a generator seeded by the
chunk's first seed. Chunks have a fixed size and are dealt out to processes round-robin, so N processes
produce exactly the samples one process does.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import schedulers as S
from ..cache import CachePolicy
from ..checkpoints import load_checkpoint
from ..fast import FastSampler
from ..models.dit import DiT
from ..sampling import sample

WEIGHTS = Path(__file__).resolve().parent / "weights"
SCHEDULERS = ("ddim", "ddpm", "euler", "dpm", "flow")


def load_pretrained(name: str = "digits") -> DiT:
    """A model shipped with the engine: "digits", a class-conditional DiT on 8x8 handwritten digits."""
    path = WEIGHTS / f"{name}.pt"
    if not path.exists():
        shipped = sorted(p.stem for p in WEIGHTS.glob("*.pt"))
        raise ValueError(f"no shipped model {name!r}; available: {shipped}")
    return load_checkpoint(path, dtype=torch.float32)  # stored in fp16 to keep the package small; run in fp32


def load_model(checkpoint: str) -> DiT:
    """A shipped model's name, or a checkpoint path."""
    return load_pretrained(checkpoint) if (WEIGHTS / f"{checkpoint}.pt").exists() else load_checkpoint(checkpoint)


DDIM_CLIPS = ("paper", "diffusers", "none")


def make_scheduler(name: str, steps: int, model: DiT, ddim_clip: str = "paper") -> S.Scheduler:
    """The engine's schedulers, set up for a DiT trained on the 1000-step linear schedule (or flow).

    `ddim_clip`: "paper" clips x0 and re-derives the noise from it (DDIM's and facebookresearch/DiT's form,
    the default), "diffusers" clips x0 but keeps the unclipped noise (diffusers' default, which breaks
    down under strong guidance: see `ditengine.schedulers.DDIM`), "none" does not clip.
    """
    if ddim_clip not in DDIM_CLIPS:
        raise ValueError(f"ddim_clip={ddim_clip!r}: expected one of {DDIM_CLIPS}")
    if name == "ddim":
        return S.DDIM(steps, timestep_spacing="trailing", clip_sample=ddim_clip != "none",
                      use_clipped_model_output=ddim_clip == "paper")
    if name == "ddpm":
        variance = "learned_range" if model.config.learn_sigma else "fixed_small"
        return S.DDPM(steps, variance_type=variance, timestep_spacing="trailing")
    if name == "euler":
        return S.Euler(steps, timestep_spacing="trailing")
    if name == "dpm":
        return S.DPMSolverPP(steps, timestep_spacing="trailing")
    if name == "flow":
        return S.FlowMatchEuler(steps)
    raise ValueError(f"scheduler {name!r}: expected one of {SCHEDULERS}")


def parse_interval(text: str) -> tuple[float, float]:
    """The CLIs' --cfg-interval LO,HI."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    return lo, hi


def generate(model: DiT, sched: S.Scheduler, labels: torch.Tensor, seed: int = 0, cfg_scale: float = 2.0,
             backend: str = "reference", dtype: torch.dtype = torch.float32, batch_size: int = 100,
             progress: bool = True, cache: CachePolicy | None = None, stats: list | None = None,
             quantize: str | None = None, cfg_interval: tuple | None = None) -> torch.Tensor:
    """Samples (N, C, H, W) in the model's data range for `labels` (N,); sample j uses seed `seed + j`.
    `dtype` is the fused backend's compute dtype; the reference runs in the model's own. `cache`: a
    `ditengine.cache` policy for either backend; `stats`, a list, receives each chunk's sampler stats.
    `quantize` (fused backend) and `cfg_interval` as in `FastSampler`.

    Under torch.distributed, each process generates its share of the chunks and every process returns
    the whole gathered result.
    """
    device = next(model.parameters()).device
    cfg = model.config
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
        raise ValueError(f"labels: values must lie in [0, {cfg.num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    fast = (FastSampler(model, sched, cfg_scale=cfg_scale, dtype=dtype, cuda_graph="loop", cache=cache,
                        quantize=quantize, cfg_interval=cfg_interval)
            if backend == "fused" else None)
    chunks = list(range(0, len(labels), batch_size))
    mine = {}
    for start in tqdm(chunks[rank::world], desc="sampling", disable=not progress or rank > 0, leave=False):
        ys = labels[start:start + batch_size].to(device)
        noise = torch.stack([torch.randn(cfg.in_channels, cfg.input_size, cfg.input_size,
                                         generator=torch.Generator().manual_seed(seed + start + j))
                             for j in range(len(ys))]).to(device)
        g = torch.Generator().manual_seed(seed + start)
        chunk_stats = {}
        if fast is not None:
            mine[start] = fast(noise, ys, generator=g).cpu()
            chunk_stats = fast.stats
        else:
            mine[start] = sample(model, sched, noise, ys, cfg_scale=cfg_scale, generator=g, progress=False,
                                 cache=cache, stats=chunk_stats, quantize=quantize, cfg_interval=cfg_interval).cpu()
        if stats is not None:
            stats.append(chunk_stats)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {k: v for part in gathered for k, v in part.items()}
    return torch.cat([mine[start] for start in chunks]) if chunks else torch.empty(0)
