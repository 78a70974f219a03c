"""The Wan family's checkpoint conversion and loading, beside its spec (`wan.py`): diffusers' and the original Wan
repository's state dicts into `ditengine.models.wan.Wan`."""
from __future__ import annotations

import re

from .loading import diffusers_state, empty, load_strict, resolve_config
from .wan import Wan, WanConfig

# The Wan repository's names (wan/modules/model.py: `WanModel`) -> diffusers' (= ours), as diffusers'
# scripts/convert_wan_to_diffusers.py renames them. Each rule applies to .weight and .bias alike; the original
# block's `norm3` (the cross-attention's affine norm) is our `norm2`, its `norm2` (before the FFN, no parameters)
# our `norm3`.
_ORIGINAL_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
_ORIGINAL_TENSORS = {  # whole parameters (no .weight / .bias)
    "head.modulation": "scale_shift_table",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}
_ORIGINAL_BLOCK = {  # blocks.{i}.<original> -> blocks.{i}.<ours>
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
_ORIGINAL_PREFIX = "model."  # some exports keep the module one level down


def is_original_state_dict(state: dict) -> bool:
    return any(k.startswith(("time_projection.", "head.head.")) for k in state)


def is_wan_state_dict(state: dict) -> bool:
    """A diffusers WanTransformer3DModel or an original Wan state dict (its 3-D patch embedding is Wan's alone)."""
    return any(k.startswith("condition_embedder.time_proj.") for k in state) or is_original_state_dict(state)


def convert_original_state_dict(state: dict) -> dict:
    """The original repository's keys -> ours; an unknown key is kept as it is, for the strict load to report."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix(_ORIGINAL_PREFIX)
        if key in _ORIGINAL_TENSORS:
            out[_ORIGINAL_TENSORS[key]] = value
            continue
        block = _BLOCK_KEY.match(key)
        if key.endswith(".modulation") and key.startswith("blocks."):
            out[key.removesuffix("modulation") + "scale_shift_table"] = value
        elif block:
            i, name, kind = block.groups()
            out[f"blocks.{i}.{_ORIGINAL_BLOCK.get(name, name)}.{kind}"] = value
        else:
            stem, _, kind = key.rpartition(".")
            out[f"{_ORIGINAL_TOP.get(stem, stem)}.{kind}"] = value
    return out


def _block_count(state: dict) -> int:
    return len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})


def infer_config(state: dict, **overrides) -> WanConfig:
    """A config from tensor shapes (our keys). The head dim is 128 in every released Wan (the shapes cannot tell
    heads apart), so `num_attention_heads` is the width over 128 unless overridden."""
    patch = state["patch_embedding.weight"]  # (D, C_in, pt, ph, pw)
    D, in_channels, *patch_size = patch.shape
    head_dim = overrides.pop("attention_head_dim", 128)
    if D % head_dim:
        raise ValueError(f"checkpoint: a Wan of width {D} cannot have head dim {head_dim}: pass the config (a "
                         "config.json, or config_overrides={'attention_head_dim': ...})")
    # Each optional part from any of its tensors, so that one missing tensor is reported as missing, not as a
    # model without that part.
    image = next((state[k] for k in ("condition_embedder.image_embedder.norm1.weight",
                                     "condition_embedder.image_embedder.norm1.bias",
                                     "condition_embedder.image_embedder.ff.net.0.proj.weight") if k in state), None)
    pos = state.get("condition_embedder.image_embedder.pos_embed")
    fields_ = dict(
        patch_size=tuple(patch_size), in_channels=in_channels, attention_head_dim=head_dim,
        num_attention_heads=D // head_dim,
        out_channels=state["proj_out.weight"].shape[0] // (patch_size[0] * patch_size[1] * patch_size[2]),
        text_dim=state["condition_embedder.text_embedder.linear_1.weight"].shape[1],
        freq_dim=state["condition_embedder.time_embedder.linear_1.weight"].shape[1],
        ffn_dim=state["blocks.0.ffn.net.0.proj.weight"].shape[0], num_layers=_block_count(state),
        cross_attn_norm=any(re.match(r"blocks\.\d+\.norm2\.", k) for k in state),
        image_dim=None if image is None else image.shape[-1],
        added_kv_proj_dim=D if any(re.match(r"blocks\.\d+\.attn2\.(add_|norm_added)", k) for k in state) else None,
        pos_embed_seq_len=None if pos is None else pos.shape[1])
    return WanConfig(**{**fields_, **overrides})


def load_state_dict(state: dict, config=None, source: str = "checkpoint") -> Wan:
    """A Wan (eval) from a diffusers or an original Wan state dict. `config`: a WanConfig, or a dict of diffusers config
    fields (a config.json) that win over what the shapes give; None infers it all."""
    if is_original_state_dict(state):
        state, source = convert_original_state_dict(state), "original Wan state dict"
    return load_strict(empty(Wan, resolve_config(WanConfig, config, infer_config, state)), state, source).eval()


def from_diffusers(transformer, peft_base: bool = False) -> Wan:
    """A Wan with the weights of a live diffusers `WanTransformer3DModel` (sharing its tensors: their dtype, device
    and storage)."""
    state = diffusers_state(transformer, "WanTransformer3DModel", peft_base)
    return load_state_dict(state, dict(transformer.config), "diffusers state dict")
