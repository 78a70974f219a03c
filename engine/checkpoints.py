"""The front doors to the reference models: `load_checkpoint` (any family's checkpoint, recognised by the family
registry) and `from_diffusers` (a live diffusers transformer, by its class). Each family's own conversion sits
beside its spec (`models/dit_checkpoints.py`, `models/flux.py`, ...); reading files is `models/loading.py`."""
from __future__ import annotations

import os

import torch

from . import families
from .models.loading import read_state


def load_checkpoint(source: str | os.PathLike | dict, dtype: torch.dtype | None = None, device="cpu",
                    allow_nonfinite: bool = False, pixart_config: dict | None = None, variant: str | None = None,
                    **config_overrides):
    """A reference model from a checkpoint, read as diffusers reads one: tensor by tensor (memory-mapped), each
    converted to `dtype` (default: the checkpoint's own) and placed on `device` as it is read, into a model built
    on the meta device (no random initialisation, no second copy of the weights).

    `source`: a diffusers model folder (sharded: `diffusion_pytorch_model.safetensors.index.json` and its shards,
    or one `diffusion_pytorch_model.safetensors` / `.bin`; `variant="fp16"` picks diffusers' variant files), a
    pipeline folder (its `transformer/`), an index file, a `.safetensors` / `.bin` / `.pt` / `.pth` file, or a
    state dict (its tensors taken as they are when `dtype` and `device` already match). It gives

    - a `ditengine.DiT` from a facebookresearch `.pt` (plain, or under "ema"/"model"; a "config" dict beside
      them, as `ditengine.train` writes, is used), a diffusers `DiTTransformer2DModel` checkpoint (config
      inferred from shapes; `config_overrides` win);
    - a `ditengine.models.pixart.PixArt` from a diffusers `PixArtTransformer2DModel` folder (its config.json) or
      state dict with `pixart_config=` (the diffusers config dict), or from an original PixArt-alpha/sigma `.pth`
      with `pixart_config=` (a diffusers config dict or a `PixArtConfig`: shapes do not give the head count or
      the position-embedding scale);
    - a `ditengine.models.ace_step.AceStep` from a diffusers `AceStepTransformer1DModel` checkpoint, or an original
      ACE-Step 1.5 checkpoint (its `decoder.` part, with the Qwen3 attention names); the config is the folder's
      config.json, else inferred from shapes (`config_overrides` win);
    - a `ditengine.models.flux.Flux` from a diffusers `FluxTransformer2DModel` checkpoint, or a BFL Flux.1
      checkpoint (with or without the `model.diffusion_model.` prefix); the config likewise (`axes_dims_rope`
      defaults to (16, 56, 56), `patch_size` to 1);
    - a `ditengine.models.sd3.SD3` from a diffusers `SD3Transformer2DModel` checkpoint, or an SAI SD3 / SD3.5
      checkpoint (with or without `model.diffusion_model.`); the config likewise;
    - a `ditengine.models.wan.Wan` from a diffusers `WanTransformer3DModel` checkpoint (Wan 2.1 / 2.2, text or image
      to video), or an original Wan repository checkpoint; the config likewise (the head dim 128 unless
      `config_overrides` says otherwise).

    Tensors holding NaN or Inf are refused, naming them, unless `allow_nonfinite`; so is a LoRA's state dict."""
    state, dconfig, own_config = read_state(source, dtype, device, allow_nonfinite, variant)
    family = families.of_state(state)
    if family is None:
        raise ValueError(f"checkpoint: not a checkpoint of any registered family; load_checkpoint reads "
                         f"{supported_checkpoints()}")
    options = {"own_config": own_config, "overrides": config_overrides, "pixart_config": pixart_config}
    try:
        return family.load(state, dconfig, options)
    except KeyError as err:  # a tensor the config is inferred from; the loaders name the others themselves
        raise ValueError(f"checkpoint: a {family.spec.__name__} checkpoint (recognised by its keys) is missing key "
                         f"{err.args[0]!r}, from which its config is inferred") from None


def supported_checkpoints() -> str:
    return ", ".join(f.spec.__name__ for f in families.families() if f.load is not None) + " checkpoints"


def from_diffusers(transformer, peft_base: bool = False):
    """ditengine's reference model sharing the weights of a live diffusers transformer (its tensors, in its dtype
    and on its device: nothing is copied but what the spec's layout concatenates, the DiT's and PixArt's q|k|v),
    for every registered family's diffusers class: `DiTTransformer2DModel` -> `ditengine.DiT`,
    `PixArtTransformer2DModel` -> `ditengine.PixArt`, `AceStepTransformer1DModel` -> `ditengine.AceStep`,
    `FluxTransformer2DModel` -> `ditengine.Flux`, `SD3Transformer2DModel` -> `ditengine.SD3`.
    The returned model's `forward` takes the keyword arguments the diffusers pipeline passes. A transformer carrying
    peft LoRA layers is refused unless `peft_base` asks for its base weights (`accelerate` folds the adapters itself).
    """
    name = type(transformer).__name__
    family = families.of_diffusers(name)
    if family is None:
        supported = [f.diffusers_class for f in families.families() if f.diffusers_class]
        raise TypeError(f"from_diffusers: expected a diffusers {' or '.join(supported)} instance, got {name}")
    return family.from_diffusers(transformer, peft_base=peft_base)
