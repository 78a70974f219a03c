"""The class-conditional DiT's checkpoints: facebookresearch/DiT `.pt` files and diffusers `DiTTransformer2DModel`
folders and state dicts, into `ditengine.DiT`.

The config is inferred from tensor shapes (the head count, which shapes do not fix, from the known DiT sizes or a
64-wide head; pass `num_heads=` to override). The fixed position table is recomputed, checked against the
checkpoint's copy and dropped.
"""
from __future__ import annotations

import re

import torch

from ..configs import DiTConfig, heads_for
from .dit import DiT
from .loading import diffusers_state, empty, load_strict

SUPPORTED = "facebookresearch/DiT .pt files and diffusers DiTTransformer2DModel checkpoints"


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
                         f"reads {SUPPORTED}") from err
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


def _diffusers_fields(config: dict) -> dict:
    fields = dict(timestep_freq_shift=1, mlp_norm_eps=config.get("norm_eps", 1e-5))
    if "num_attention_heads" in config:
        fields["num_heads"] = config["num_attention_heads"]
    if "sample_size" in config:
        fields["input_size"] = config["sample_size"]
    return fields


def load(state: dict, dconfig: dict, options: dict) -> DiT:
    """A DiT (eval) from a facebookresearch or diffusers state dict; `options`: "own_config" (a config dict saved
    beside the weights, as `ditengine.train` writes) and "overrides" (config fields that win)."""
    overrides = {**options.get("own_config", {}), **options.get("overrides", {})}
    if _is_diffusers(state):
        state = convert_diffusers(state)
        overrides = {**_diffusers_fields(dconfig), **overrides}
    return load_state(empty(DiT, infer_config(state, **overrides)), state).eval()


def from_diffusers(transformer, peft_base: bool = False) -> DiT:
    """A DiT sharing a live diffusers `DiTTransformer2DModel`'s tensors (its fused q|k|v rows concatenated)."""
    state = convert_diffusers(diffusers_state(transformer, "DiTTransformer2DModel", peft_base))
    return load_state(empty(DiT, infer_config(state, **_diffusers_fields(dict(transformer.config)))), state).eval()
