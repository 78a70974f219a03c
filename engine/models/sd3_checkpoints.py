"""The SD3 family's checkpoint conversion and loading, beside its spec (`sd3.py`): diffusers and original
checkpoints into `ditengine.models.sd3.SD3`; `sd3.py` re-exports these names."""
from __future__ import annotations

import math
import re
import torch
from .loading import diffusers_state, empty, load_strict, resolve_config
from .sd3 import SD3, SD3Config


# SAI's original names (sd3_medium.safetensors, sd3.5_*.safetensors: the MMDiT under `model.diffusion_model.`,
# beside the text encoders and the VAE) -> diffusers' (= ours), as diffusers' loaders/single_file_utils.py
# `convert_sd3_transformer_checkpoint_to_diffusers` maps them. A tuple is a fused projection split in equal row
# blocks (q; k; v). Each rule applies to .weight and .bias alike.
_ORIGINAL_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) rows -> (scale, shift)
}
_ORIGINAL_BLOCK = {  # joint_blocks.{i}.<original> -> transformer_blocks.{i}.<ours>
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
    "context_block.adaLN_modulation.1": "norm1_context.linear",  # last block: (shift, scale) -> (scale, shift)
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
}
_ORIGINAL_PREFIX = "model.diffusion_model."
_BLOCK_KEY = re.compile(r"joint_blocks\.(\d+)\.(.+)\.(weight|bias)$")
# diffusers keys with nothing of their own: fuse_qkv_projections()'s concatenated copies of the projections.
_DIFFUSERS_REDUNDANT = re.compile(r"\.attn2?\.to_(added_)?qkv\.")


def is_original_state_dict(state: dict) -> bool:
    return any(k.startswith(("joint_blocks.", _ORIGINAL_PREFIX + "joint_blocks.")) for k in state)


def is_sd3_state_dict(state: dict) -> bool:
    """A diffusers SD3Transformer2DModel or an SAI SD3 / SD3.5 state dict (Flux has no `pos_embed.proj`, the
    class-conditional DiT no `context_embedder`)."""
    # By key prefixes (see flux_checkpoints.is_flux_state_dict): the text embedder beside a patch embedding.
    return any(k.startswith("pos_embed.proj.") for k in state) and any(
        k.startswith("context_embedder.") for k in state) or is_original_state_dict(state)


def swap_halves(t):
    """(shift, scale) rows <-> (scale, shift): SAI's final norms chunk shift first, diffusers' scale first."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def convert_original_state_dict(state: dict) -> dict:
    """An SAI SD3 / SD3.5 checkpoint's MMDiT under diffusers' (= our) names. With the `model.diffusion_model.`
    prefix only the keys under it are the MMDiT's (the text encoders and the VAE are left out); keys no rule
    covers pass through unchanged, so that the loader lists them."""
    if any(k.startswith(_ORIGINAL_PREFIX) for k in state):
        state = {k[len(_ORIGINAL_PREFIX):]: v for k, v in state.items() if k.startswith(_ORIGINAL_PREFIX)}
    last = max((int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))), default=-1)
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m:
            prefix, stem, kind = f"transformer_blocks.{m.group(1)}.", m.group(2), m.group(3)
            target = _ORIGINAL_BLOCK.get(stem)
            swap = int(m.group(1)) == last and stem == "context_block.adaLN_modulation.1"
        else:
            prefix, (stem, _, kind) = "", key.rpartition(".")
            target = _ORIGINAL_TOP.get(stem)
            swap = stem == "final_layer.adaLN_modulation.1"
        if target is None:
            out[key] = value
        elif isinstance(target, tuple):
            out.update((f"{prefix}{t}.{kind}", part) for t, part in zip(target, value.chunk(3, dim=0)))
        else:
            out[f"{prefix}{target}.{kind}"] = swap_halves(value) if swap else value
    return out


def load_state(model: SD3, state: dict, source: str = "checkpoint") -> SD3:
    """Load our (= diffusers) keys strictly; one error lists missing, unexpected and mis-shaped keys."""
    return load_strict(model, state, source)


def infer_config(state: dict, **overrides) -> SD3Config:
    """A config from diffusers-named tensor shapes. Shapes fix everything but the head width without q/k norm
    (64, as in every released SD3 and SD3.5) and `sample_size` (128, as released; it only seeds the position
    table, which the checkpoint's copy replaces); `overrides` win."""
    try:
        D, C, p, _ = state["pos_embed.proj.weight"].shape
        norm_q = next((v for k, v in state.items() if k.endswith(("attn.norm_q.weight", "attn.norm_k.weight"))), None)
        head_dim = overrides.get("attention_head_dim", norm_q.shape[0] if norm_q is not None else 64)
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
        fields_ = dict(
            sample_size=128, patch_size=p, in_channels=C, num_layers=1 + max(blocks), attention_head_dim=head_dim,
            num_attention_heads=D // head_dim, joint_attention_dim=state["context_embedder.weight"].shape[1],
            caption_projection_dim=state["context_embedder.weight"].shape[0],
            pooled_projection_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
            out_channels=state["proj_out.weight"].shape[0] // (p * p),
            pos_embed_max_size=math.isqrt(state["pos_embed.pos_embed"].shape[1]),
            dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in state if ".attn2." in k})),
            qk_norm="rms_norm" if norm_q is not None else None)
    except (KeyError, ValueError) as err:
        raise ValueError(f"SD3 state dict: cannot infer the config ({type(err).__name__}: {err})") from err
    return SD3Config(**{**fields_, **overrides})


def load_state_dict(state: dict, config=None, source: str = "checkpoint") -> SD3:
    """An SD3 (eval) from a diffusers or an SAI state dict. `config`: an SD3Config, or a dict of diffusers
    config fields (a config.json) that win over what the shapes give; None infers it all."""
    if is_original_state_dict(state):
        state, source = convert_original_state_dict(state), "original SD3 state dict"
    state = {k: v for k, v in state.items() if not _DIFFUSERS_REDUNDANT.search(k)}
    return load_state(empty(SD3, resolve_config(SD3Config, config, infer_config, state)), state, source).eval()


def from_diffusers(transformer, peft_base: bool = False) -> SD3:
    """An SD3 with the weights of a live diffusers `SD3Transformer2DModel`
    (sharing its tensors: their dtype, device and storage)."""
    state = diffusers_state(transformer, "SD3Transformer2DModel", peft_base)
    return load_state_dict(state, dict(transformer.config), "diffusers state dict")
