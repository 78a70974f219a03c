"""What the reference loop and the fast loop share: input checks, guidance labels and noise drawing.

Both sampling front doors (`ditengine.sampling` and `ditengine.fast`) import from here, so the route of a
call stays one-way: sampling -> fast -> inputs, never back up.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch

from .models.dit import DiT
from .schedulers import Scheduler


def check_scheduler(sched) -> None:
    if not isinstance(sched, Scheduler):
        raise TypeError(f"sched: expected a ditengine scheduler, got {type(sched).__name__} "
                        "(convert a diffusers scheduler with ditengine.schedulers.from_diffusers)")


def check_cfg_scale(cfg_scale, name: str = "cfg_scale") -> None:
    """A guidance scale: a finite real number (a NaN would fail every `> 1` test and run unguided)."""
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not math.isfinite(cfg_scale):
        raise ValueError(f"{name}: expected a finite number, got {cfg_scale!r}")


def guided_steps(timesteps, cfg_interval) -> list[bool]:
    """Which steps guidance applies to: those whose model timestep t lies in `cfg_interval` = (lo, hi),
    both ends included (None: every step). Outside it a step runs the conditional half alone.

    The interval is over the timestep the model sees (0..1000 for the DiT and PixArt schedules; for a VP
    schedule the EDM noise level is sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t), monotone in t, so an
    interval in sigma (Kynkaanniemi et al. 2024) maps to one in t).
    """
    if cfg_interval is None:
        return [True] * len(timesteps)
    ok = (isinstance(cfg_interval, (tuple, list)) and len(cfg_interval) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v) for v in cfg_interval))
    if not ok or cfg_interval[0] > cfg_interval[1]:
        raise ValueError(f"cfg_interval: expected (lo, hi) with lo <= hi, over the model's timestep, got "
                         f"{cfg_interval!r}")
    lo, hi = cfg_interval
    return [lo <= float(t) <= hi for t in timesteps]


def check_guided_channels(guided_channels: int | None, channels: int) -> int:
    """The number of guided prediction channels (default: all `channels` of the model's input)."""
    if guided_channels is None:
        return channels
    if (isinstance(guided_channels, bool) or not isinstance(guided_channels, int)
            or not 1 <= guided_channels <= channels):
        raise ValueError(f"guided_channels: expected an int in [1, {channels}] (the model's {channels} input "
                         f"channels; the variance channels are never guided), got {guided_channels!r}")
    return guided_channels


def check_noise_values(noise: torch.Tensor, device: torch.device) -> None:
    """The checks every family's noise gets once its shape is right: a floating dtype, the model's device,
    and finite values (one host sync before the loop: a NaN or Inf would silently become a NaN sample)."""
    if not noise.dtype.is_floating_point:
        raise TypeError(f"noise: expected a floating-point tensor, got {noise.dtype}")
    device = torch.device(device)
    if noise.device.type != device.type or device.index is not None and noise.device.index != device.index:
        raise ValueError(f"noise: on {noise.device}, expected the model's device {device}")
    if noise.numel() and not bool(torch.isfinite(noise).all()):
        raise ValueError(f"noise: contains {int((~torch.isfinite(noise)).sum())} NaN or Inf values; expected "
                         "finite samples of N(0, I)")


def check_conditioning(fast: type, noise, device, conditioning: tuple, named: dict) -> None:
    """What every sampling call checks first, once, before any family code: the noise's dtype, device and values
    (`check_noise_values`), the arguments fit the family's conditioning (`fast.inputs`, the contract both loops
    share), and every tensor and number among them has values: no meta tensor, no NaN or Inf (which would silently
    become a NaN sample)."""
    if isinstance(noise, torch.Tensor):
        check_noise_values(noise, device)
    signature = inspect.signature(fast.inputs)
    try:
        bound = signature.bind(None, None, None, False, *conditioning, **named)
    except TypeError as err:
        params = list(signature.parameters.values())[4:]
        takes = ", ".join(p.name + ("=" if p.kind == p.KEYWORD_ONLY or p.default is not p.empty else "")
                          for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        takes = takes or "its conditioning by name"
        raise TypeError(f"conditioning: {err.args[0].split('() ', 1)[-1]} (given {len(conditioning)} positional "
                        f"after noise); {fast.__name__} takes noise, then {takes}") from None
    for name, value in list(bound.arguments.items())[4:]:
        kind = signature.parameters[name].kind
        for key, item in value.items() if kind == inspect.Parameter.VAR_KEYWORD else [(name, value)]:
            check_values(key, item)


def check_values(name: str, value) -> None:
    """A conditioning value (a tensor, a number, or a dict of them) with no meta tensor and no NaN / Inf."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_values(f"{name}[{key!r}]", item)
    elif isinstance(value, torch.Tensor):
        if value.is_meta:
            raise ValueError(f"{name}: a meta tensor (shape only, no data); expected a tensor with values on the "
                             "model's device")
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: contains {int((~torch.isfinite(value)).sum())} NaN or Inf values; expected "
                             "finite values")
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def check_inputs(model: DiT, noise: torch.Tensor, class_labels: torch.Tensor, device=None) -> None:
    """Clear errors for the inputs of a DiT sampling run (one host sync for the label range, before the loop);
    `device`: where the weights run (default: the model's)."""
    cfg = model.config
    expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if not isinstance(noise, torch.Tensor) or noise.dim() != 4 or tuple(noise.shape[1:]) != expected:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise: expected shape (B, {', '.join(map(str, expected))}) for this model, got {shape}")
    check_noise_values(noise, device or next(model.parameters()).device)
    if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (noise.shape[0],):
        shape = tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__
        raise ValueError(f"class_labels: expected shape ({noise.shape[0]},) to match the noise batch, got {shape}")
    if class_labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"class_labels: expected an int64 or int32 tensor, got {class_labels.dtype}")
    if class_labels.device != noise.device:
        raise ValueError(f"class_labels: on {class_labels.device}, expected the noise's device {noise.device}")
    if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= cfg.num_classes):
        raise ValueError(f"class_labels: values must lie in [0, {cfg.num_classes}), got "
                         f"[{int(class_labels.min())}, {int(class_labels.max())}]")


def check_patch_grid_noise(noise: torch.Tensor, channels: int, patch: int, device: torch.device) -> None:
    """Noise of a multi-aspect model (PixArt): (B, channels, H, W), any grid of whole patches."""
    if not isinstance(noise, torch.Tensor) or noise.dim() != 4 or noise.shape[1] != channels \
            or noise.shape[2] % patch or noise.shape[3] % patch:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise: expected shape (B, {channels}, H, W) with H and W multiples of the patch size "
                         f"{patch}, got {shape}")
    check_noise_values(noise, device)


def check_prompt_embeds(batch: int, tokens: str, text_dim: int, pooled_dim: int, use_cfg: bool, prompt_embeds,
                        pooled_prompt_embeds, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None) -> dict:
    """An MMDiT's text conditioning (SD3, Flux), checked: the prompt's `tokens` ("T5", "CLIP + T5") (B, L,
    text_dim) and pooled CLIP embedding (B, pooled_dim), one per noise row; with CFG the negative prompt's, of the
    same length. Returns them by the pipelines' names."""
    named = [("prompt_embeds", prompt_embeds, "pooled_prompt_embeds", pooled_prompt_embeds)]
    if use_cfg:
        if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds, negative_pooled_prompt_embeds: required with guidance "
                             f"(cfg_scale != 1): the negative prompt's {tokens} tokens and pooled CLIP embedding")
        named.append(("negative_prompt_embeds", negative_prompt_embeds, "negative_pooled_prompt_embeds",
                      negative_pooled_prompt_embeds))
    cond = {}
    for name, text, pooled_name, pooled in named:
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[0] != batch or text.shape[2] != text_dim:
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"{name}: expected ({batch}, L, {text_dim}) ({tokens} tokens, one per noise row), "
                             f"got {shape}")
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (batch, pooled_dim):
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise ValueError(f"{pooled_name}: expected ({batch}, {pooled_dim}), got {shape}")
        cond[name], cond[pooled_name] = text, pooled
    L = prompt_embeds.shape[1]
    if use_cfg and negative_prompt_embeds.shape[1] != L:
        raise ValueError(f"negative_prompt_embeds: {negative_prompt_embeds.shape[1]} tokens, expected {L} like "
                         "prompt_embeds (pad both to one length)")
    return cond


def draw_noise(sched: Scheduler, i: int, like: torch.Tensor, generator: torch.Generator | None):
    """The step's noise, drawn in float32 from the user's generator: both backends consume it identically."""
    if not sched.needs_noise[i]:
        return None
    device = generator.device if generator is not None else like.device  # e.g. a CPU generator for CUDA
    return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def guided_labels(class_labels: torch.Tensor, num_classes: int, use_cfg: bool) -> torch.Tensor:
    if not use_cfg:
        return class_labels.long()
    return torch.cat([class_labels.long(), torch.full_like(class_labels.long(), num_classes)])  # (2B,)


def check_callback_state(new, x: torch.Tensor) -> torch.Tensor:
    """What a step callback returned as the new state: a tensor of the state's shape on its device."""
    if not isinstance(new, torch.Tensor) or new.shape != x.shape or new.device != x.device:
        got = f"{tuple(new.shape)} on {new.device}" if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(f"callback: expected the state back as a tensor {tuple(x.shape)} on {x.device} (or None), "
                         f"got {got}")
    return new
