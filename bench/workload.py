"""What one ladder runs, for any model family (each family's bench module builds it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import ditengine as de


@dataclass
class Workload:
    """What one ladder runs, for any model family: the ditengine reference model (fp32), the scheduler, one
    batch's noise and conditioning, and the eager peer (a model to copy into each dtype, and its forward on
    the CFG-doubled batch, the form `ditengine.sampling.denoise_step` drives)."""

    base: torch.nn.Module
    sched: object
    noise: torch.Tensor
    conditioning: tuple = ()
    named: dict = field(default_factory=dict)
    eager_model: Callable = None  # (dtype, sdpa) -> the eager peer in that dtype
    eager_forward: Callable = None  # (model, use_cfg) -> forward(x_in, t, step)
    eager_label: str = "ditengine reference"
    peer_graph: Callable = None  # (use_cfg) -> peers.PeerGraph, what the CPU runtime peers export (None: no peers)
    sampler_kwargs: dict = field(default_factory=dict)  # e.g. ACE-Step's guider=APG(), for both loops
    audio_seconds: float | None = None  # a music workload: the song length one sampling run makes
    per_image_seconds: bool = False  # report the seconds per image of a whole loop (Flux, SD3)
    sample_name: str = "image"  # what one sampling run makes, in that column's name ("video" for Wan)
    notes: list = field(default_factory=list)  # lines printed under the table (token counts, FLOP shares)

    def sample(self, **kwargs):
        return de.sample(self.base, self.sched, self.noise, *self.conditioning, progress=False, **kwargs,
                         **self.sampler_kwargs, **self.named)
