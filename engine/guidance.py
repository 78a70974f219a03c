"""Guidance rules beyond plain classifier-free guidance, shared by the reference and the fused loops.

Plain CFG (`u + s (c - u)`) is the default everywhere and runs inside the fused scheduler step. ACE-Step 1.5's
base and SFT models guide with APG instead: pass `guider=APG()` to `FastSampler` or `ditengine.sample`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ditengine.kernels import apg_guidance


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat et al. 2024) as ACE-Step 1.5 runs it (diffusers' `normalized_guidance`
    with `use_original_formulation=True`, ACE-Step's defaults): with guidance scale g the prediction is
    `c + (g - 1) * P(m)`, m the momentum average of c - u, clamped to norm `norm_threshold` and projected
    orthogonally to c (`eta` keeps that much of the parallel part); every norm per (batch row, channel) over
    time. The momentum runs over the guided steps only and starts at zero in every call."""

    momentum: float = -0.75
    norm_threshold: float = 2.5
    eta: float = 0.0

    def __post_init__(self):
        for name in ("momentum", "norm_threshold", "eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"APG {name}: expected a finite number, got {value!r}")

    def __call__(self, model_out: torch.Tensor, momentum: torch.Tensor, cfg_scale: float,
                 out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
        """model_out (2B, C, T) [cond; uncond] -> the guided prediction (B, C, T) fp32; `momentum` (B, C, T) fp32
        is the state, updated in place."""
        return apg_guidance(model_out, momentum, cfg_scale - 1.0, momentum_coef=self.momentum,
                            norm_threshold=self.norm_threshold, eta=self.eta, out=out, backend=backend)


def check_guider(guider, latent_shape: tuple) -> None:
    """None (plain CFG) or an `APG` on 1-D sequence latents (C, T)."""
    if guider is None:
        return
    if not isinstance(guider, APG):
        raise TypeError(f"guider: expected None (plain CFG) or ditengine.guidance.APG, got {type(guider).__name__}")
    if len(latent_shape) != 2:
        raise ValueError(f"guider: APG reduces over time per channel and needs (B, C, T) sequence latents; this "
                         f"model's latents are {len(latent_shape) + 1}-D")
