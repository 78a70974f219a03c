"""What every family's checkpoint loader shares."""
from __future__ import annotations

from dataclasses import fields

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


def resolve_config(cls, config, infer, state: dict):
    """`config` when it is already a `cls`; else `infer(state, **fields)` with the fields of a diffusers config
    dict (a config.json) that `cls` has winning over what the shapes give (None: all inferred)."""
    if isinstance(config, cls):
        return config
    names = {f.name for f in fields(cls)}
    return infer(state, **{k: v for k, v in (config or {}).items() if k in names})


def diffusers_state(transformer, expected: str) -> dict:
    """A live diffusers transformer's state dict as float32 CPU tensors, after checking its class name."""
    if type(transformer).__name__ != expected:
        raise TypeError(f"from_diffusers: expected a diffusers {expected}, got {type(transformer).__name__}")
    return {k: v.detach().float().cpu() for k, v in transformer.state_dict().items()}
