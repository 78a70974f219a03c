"""What every family's checkpoint loader shares."""
from __future__ import annotations

import torch


def load_strict(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> torch.nn.Module:
    """Load a state dict in the model's own key names strictly; one ValueError lists every missing, unexpected
    and mis-shaped key (a wrong config or another model's checkpoint shows all its differences at once)."""
    own = model.state_dict()
    problems = [(title, sorted(keys)) for title, keys in (
        ("missing keys", set(own) - set(state)), ("unexpected keys", set(state) - set(own)),
        ("mis-shaped", {f"{k}: {source} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape}))
        if keys]
    if problems:
        raise ValueError("\n".join([f"{source} does not match {type(model).__name__}({model.config})"]
                                   + [f"  {t} ({len(k)}): {', '.join(k)}" for t, k in problems]))
    model.load_state_dict(state)
    return model
