"""The eager rows' model: diffusers' own transformer holding the ditengine reference's weights."""
from __future__ import annotations

import torch


def diffusers_transformer(model: torch.nn.Module, class_name: str, state: dict | None = None):
    """diffusers' `class_name` built from `model.config.to_diffusers()` with the reference model's weights (its
    `state_dict()`, which keeps diffusers' parameter names, or `state` where they differ), on the model's
    device: the same function, so the eager rows time diffusers' code on ditengine's workload. None where
    diffusers is not installed (the GPU machine)."""
    try:
        import diffusers
    except ImportError:
        return None
    theirs = getattr(diffusers, class_name)(**model.config.to_diffusers()).eval()
    theirs.load_state_dict(model.state_dict() if state is None else state)
    return theirs.to(next(model.parameters()).device)
