"""The eager rows' model: diffusers' own transformer holding the ditengine reference's weights."""
from __future__ import annotations

import copy

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


def eager_rows(base: torch.nn.Module, diffusers_model, class_name: str, noise: torch.Tensor, named: dict) -> dict:
    """The `Workload` fields of the eager rows of a family whose pipeline call is its `Family.forward` (SD3, Wan):
    diffusers' transformer (the reference where diffusers is not installed) copied into each dtype, called as the
    pipeline calls it on the CFG batch, and the label saying which ran."""
    from ditengine import families

    def eager_model(dtype, sdpa):  # diffusers' attention is SDPA in every row
        return copy.deepcopy(diffusers_model if diffusers_model is not None else base).to(dtype)

    def eager_forward(model, use_cfg):
        return families.of_model(base).forward(model, base, noise, use_cfg, **named)

    label = f"diffusers {class_name}" if diffusers_model is not None else \
        f"ditengine's {type(base).__name__} reference (diffusers not installed)"
    return dict(eager_model=eager_model, eager_forward=eager_forward, eager_label=label)
