"""Loading checkpoints into ditengine's reference models: facebookresearch/DiT and diffusers DiT checkpoints
into `ditengine.DiT`, diffusers and original PixArt-alpha/sigma checkpoints into
`ditengine.models.pixart.PixArt`.

For the DiT:
The config is inferred from tensor shapes (the head count, which shapes do not fix, from the known DiT
sizes or a 64-wide head; pass `num_heads=` to override). The fixed position table is recomputed,
checked against the checkpoint's copy and dropped.
"""
from __future__ import annotations

import os
import re

import torch

from .configs import DiTConfig, heads_for
from .models.dit import DiT
from .models.loading import diffusers_state, empty, load_strict, read_state

SUPPORTED_CHECKPOINTS = ("facebookresearch/DiT .pt files, diffusers DiTTransformer2DModel, PixArtTransformer2DModel "
                         "AceStepTransformer1DModel, FluxTransformer2DModel and SD3Transformer2DModel checkpoints, "
                         "original PixArt-alpha/sigma .pth files (with pixart_config=), original ACE-Step 1.5 "
                         "checkpoints, BFL Flux.1 and SAI SD3 / SD3.5 .safetensors")
SUPPORTED_DIFFUSERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "AceStepTransformer1DModel",
                       "FluxTransformer2DModel", "SD3Transformer2DModel")
def _is_diffusers(state: dict) -> bool:
    return "pos_embed.proj.weight" in state or any(k.startswith("transformer_blocks.") for k in state)


def convert_diffusers(state: dict) -> dict:
    """diffusers `DiTTransformer2DModel` keys -> facebookresearch/DiT keys.

    diffusers copies the timestep and class embedders into every block; DiT has one, so block 0's is
    taken after checking that the others are equal.
    """
    state = dict(state)
    out = {}
    renames = {
        "pos_embed.proj.": "x_embedder.proj.",
        "proj_out_1.": "final_layer.adaLN_modulation.1.",
        "proj_out_2.": "final_layer.linear.",
        "pos_embed.pos_embed": "pos_embed",
    }
    block_renames = {
        "norm1.linear.": "adaLN_modulation.1.",
        "attn1.to_out.0.": "attn.proj.",
        "ff.net.0.proj.": "mlp.fc1.",
        "ff.net.2.": "mlp.fc2.",
    }
    embedders = {
        "norm1.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "norm1.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
        "norm1.emb.class_embedder.embedding_table.": "y_embedder.embedding_table.",
    }
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for n in blocks:
        prefix = f"transformer_blocks.{n}."
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{prefix}attn1.to_{c}.{kind}", None) for c in "qkv"]
            if all(p is not None for p in parts):
                out[f"blocks.{n}.attn.qkv.{kind}"] = torch.cat(parts)  # rows q; k; v
            else:
                state.update({f"{prefix}attn1.to_{c}.{kind}": p for c, p in zip("qkv", parts) if p is not None})
        for key in [k for k in state if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for old, new in embedders.items():
                if rest.startswith(old):
                    target = new + rest[len(old):]
                    value = state.pop(key)
                    if target not in out:
                        out[target] = value
                    elif not torch.equal(out[target], value):
                        raise ValueError(f"{key} differs from block {blocks[0]}'s copy: DiT shares one embedder "
                                         "across blocks, so this model cannot be converted")
                    break
            else:
                for old, new in block_renames.items():
                    if rest.startswith(old):
                        out[f"blocks.{n}.{new}{rest[len(old):]}"] = state.pop(key)
                        break
    for key in list(state):
        for old, new in renames.items():
            if key.startswith(old):
                out[new + key[len(old):]] = state.pop(key)
                break
    out.update(state)  # whatever is left is reported as unexpected by the loader
    return out


def infer_config(state: dict, **overrides) -> DiTConfig:
    """A DiTConfig from facebookresearch-style tensor shapes; `overrides` win."""
    try:
        D, C, p, _ = state["x_embedder.proj.weight"].shape
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        fields = dict(
            hidden_size=D, in_channels=C, patch_size=p, depth=depth,
            num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
            learn_sigma=state["final_layer.linear.weight"].shape[0] // (p * p) == 2 * C,
            mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / D,
            frequency_embedding_size=state["t_embedder.mlp.0.weight"].shape[1],
        )
    except KeyError as err:
        raise ValueError(f"checkpoint: cannot infer the DiT config, missing key {err.args[0]!r}; load_checkpoint "
                         f"reads {SUPPORTED_CHECKPOINTS}") from err
    if "pos_embed" in state:
        fields["input_size"] = round(state["pos_embed"].shape[-2] ** 0.5) * p
    fields["num_heads"] = heads_for(depth, D)
    fields.update(overrides)
    return DiTConfig(**fields)


def load_state(model: DiT, state: dict) -> DiT:
    """Load a facebookresearch-style state dict into `model` (built by `models.loading.empty`, or a live one),
    checking the stored pos_embed against the fixed table, with one error listing every problem."""
    state = dict(state)
    pos = state.pop("pos_embed", None)
    if pos is not None:
        expected = model.pos_embed
        if pos.shape[-2:] != expected.shape[-2:] or not torch.allclose(pos.float().cpu().reshape(expected.shape),
                                                                       expected.float().cpu(), atol=1e-3):
            raise ValueError(f"checkpoint: pos_embed {tuple(pos.shape)} differs from the fixed sin-cos table "
                             f"{tuple(expected.shape)} of this config")
    return load_strict(model, state)


def _is_diffusers_pixart(state: dict) -> bool:
    return "adaln_single.linear.weight" in state


def _is_original_pixart(state: dict) -> bool:
    return "t_block.1.weight" in state and any(k.startswith("blocks.0.cross_attn.") for k in state)


def _is_ace_step(state: dict) -> bool:
    return "condition_embedder.weight" in state and "proj_in_conv.weight" in state \
        or any(k.startswith("decoder.layers.") for k in state)


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
      checkpoint (with or without `model.diffusion_model.`); the config likewise.

    Tensors holding NaN or Inf are refused, naming them, unless `allow_nonfinite`; so is a LoRA's state dict."""
    state, dconfig, own_config = read_state(source, dtype, device, allow_nonfinite, variant)
    return _from_state(state, dconfig, own_config, pixart_config, config_overrides)


def _from_state(state: dict, dconfig: dict, own_config: dict, pixart_config, config_overrides: dict):
    """The family's model from a state dict already read (its tensors become the model's parameters)."""
    from .models import flux, sd3

    if flux.is_flux_state_dict(state):
        return flux.load_state_dict(state, {**dconfig, **config_overrides})
    if sd3.is_sd3_state_dict(state):  # diffusers (pos_embed.proj + context_embedder) or SAI (joint_blocks.)
        return sd3.load_state_dict(state, {**dconfig, **config_overrides})
    if _is_ace_step(state):
        from .models import ace_step

        return ace_step.load_state_dict(state, {**dconfig, **config_overrides})
    if _is_diffusers_pixart(state) or _is_original_pixart(state):
        return _load_pixart(state, pixart_config or dconfig, original=not _is_diffusers_pixart(state))
    config_overrides = {**own_config, **config_overrides}
    if _is_diffusers(state):
        state = convert_diffusers(state)
        config_overrides = {**_diffusers_fields(dconfig), **config_overrides}
    cfg = infer_config(state, **config_overrides)
    return load_state(empty(DiT, cfg), state).eval()


def _diffusers_fields(config: dict) -> dict:
    fields = dict(timestep_freq_shift=1, mlp_norm_eps=config.get("norm_eps", 1e-5))
    if "num_attention_heads" in config:
        fields["num_heads"] = config["num_attention_heads"]
    if "sample_size" in config:
        fields["input_size"] = config["sample_size"]
    return fields


def _load_pixart(state: dict, config, original: bool):
    from .models import pixart

    kind = "an original PixArt" if original else "a diffusers PixArtTransformer2DModel"
    if not config:
        raise ValueError(f"checkpoint: {kind} state dict needs its config: pass pixart_config= (the diffusers "
                         "config dict; shapes do not give the head count or the position-embedding scale)")
    cfg = config if isinstance(config, pixart.PixArtConfig) else pixart.PixArtConfig.from_diffusers(config)
    if original:
        return pixart.load_original_state_dict(state, cfg)
    return pixart.load_diffusers_state_dict(state, cfg)


def from_diffusers(transformer):
    """ditengine's reference model sharing the weights of a live diffusers transformer (its tensors, in its dtype
    and on its device: nothing is copied but what the spec's layout concatenates, the DiT's and PixArt's q|k|v):
    `DiTTransformer2DModel` -> `ditengine.DiT`, `PixArtTransformer2DModel` -> `ditengine.models.pixart.PixArt`,
    `AceStepTransformer1DModel` -> `ditengine.models.ace_step.AceStep`, `FluxTransformer2DModel` ->
    `ditengine.models.flux.Flux`, `SD3Transformer2DModel` -> `ditengine.models.sd3.SD3`.
    The returned model's `forward` takes the keyword arguments the diffusers pipeline passes."""
    name = type(transformer).__name__
    if name not in SUPPORTED_DIFFUSERS:
        raise TypeError(f"from_diffusers: expected a diffusers {' or '.join(SUPPORTED_DIFFUSERS)} instance, got "
                        f"{name}")
    if name == "PixArtTransformer2DModel":
        from .models import pixart

        return pixart.from_diffusers(transformer)
    if name == "SD3Transformer2DModel":
        from .models import sd3

        return sd3.from_diffusers(transformer)
    if name == "FluxTransformer2DModel":
        from .models import flux

        return flux.from_diffusers(transformer)
    if name == "AceStepTransformer1DModel":
        from .models import ace_step

        return ace_step.from_diffusers(transformer)
    state = convert_diffusers(diffusers_state(transformer, name))
    return load_state(empty(DiT, infer_config(state, **_diffusers_fields(dict(transformer.config)))), state).eval()
