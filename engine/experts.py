"""A second expert for the low-noise steps: Wan 2.2 A14B runs `transformer` at high noise and `transformer_2` below a
boundary timestep, each with its own guidance scale. The switch is a static schedule (the timesteps are known before
the loop), so both loops unroll it: the captured loop stays one graph, holding both denoisers' steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .inputs import check_cfg_scale


@dataclass(frozen=True)
class Expert:
    """The model of the steps whose timestep t < `boundary` (the pipelines' `boundary_ratio * num_train_timesteps`:
    875 for Wan 2.2 T2V, 900 for I2V), guided with `cfg_scale` (their `guidance_scale_2`; None: the sampler's). It
    takes the same conditioning as the first model and has its geometry (the same config)."""

    model: torch.nn.Module
    boundary: float
    cfg_scale: float | None = None

    def check(self, model: torch.nn.Module) -> None:
        if not isinstance(self.model, torch.nn.Module) or getattr(self.model, "config", None) != model.config:
            raise ValueError("expert: expected a model of the same config as the sampler's (its second expert, e.g. "
                             f"Wan 2.2's transformer_2), got {type(self.model).__name__}")
        check_cfg_scale(self.boundary, "expert.boundary")
        if self.cfg_scale is not None:
            check_cfg_scale(self.cfg_scale, "expert.cfg_scale")

    def steps(self, timesteps: torch.Tensor) -> list[bool]:
        """Per step: whether the expert runs it (t below the boundary), as the pipelines decide (`t >= boundary`
        keeps the first model)."""
        return [float(t) < self.boundary for t in timesteps.tolist()]

    def scale(self, cfg_scale: float) -> float:
        return cfg_scale if self.cfg_scale is None else float(self.cfg_scale)
