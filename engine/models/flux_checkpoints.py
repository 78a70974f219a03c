"""The Flux family's checkpoint conversion and loading, beside its spec (`flux.py`): diffusers and original
checkpoints into `ditengine.models.flux.Flux`; `flux.py` re-exports these names."""
from __future__ import annotations

import torch
from .loading import diffusers_state, empty, load_strict, resolve_config
from .flux import Flux, FluxConfig


# BFL's flux1-dev / flux1-schnell .safetensors (black-forest-labs/flux src/flux/model.py names; ComfyUI files add a
# `model.diffusion_model.` prefix). Each BFL key <- the diffusers keys whose rows it concatenates, in order, for
# .weight and .bias alike (diffusers' loaders/single_file_utils.py `convert_flux_transformer_checkpoint_to_diffusers`).
_ORIGINAL_TOP = {
    "img_in": ("x_embedder",), "txt_in": ("context_embedder",), "final_layer.linear": ("proj_out",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),  # dev only
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),  # rows (shift; scale): swapped, see _SWAPPED
}
_ORIGINAL_DOUBLE = {  # double_blocks.{i}.<BFL> <- transformer_blocks.{i}.<diffusers>
    "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
    "img_attn.norm.query_norm": ("attn.norm_q",), "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",), "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
_ORIGINAL_SINGLE = {  # single_blocks.{i}.<BFL> <- single_transformer_blocks.{i}.<diffusers>
    "modulation.lin": ("norm.linear",), "linear2": ("proj_out",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # rows D, D, D, 4D
    "norm.query_norm": ("attn.norm_q",), "norm.key_norm": ("attn.norm_k",),
}
# BFL's final modulation is (shift, scale), diffusers' AdaLayerNormContinuous reads (scale, shift)
_SWAPPED = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")
_ORIGINAL_PREFIX = "model.diffusion_model."


def _block_indices(state: dict, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})


def original_key_map(state: dict) -> dict[str, tuple[str, ...]]:
    """Every key of a BFL state dict shaped like `state` (its block counts, guidance embedder or not) -> the
    diffusers keys whose rows (dim 0) it concatenates. BFL's q/k norms (`QKNorm`) hold one `.scale` each, the
    RMSNorm's `.weight`; everything else has `.weight` and `.bias` on both sides."""
    pairs = [(bfl, ours) for bfl, ours in _ORIGINAL_TOP.items()
             if not bfl.startswith("guidance_in") or any(k.startswith("guidance_in.") for k in state)]
    for blocks, ours_prefix, table in (("double_blocks.", "transformer_blocks.", _ORIGINAL_DOUBLE),
                                       ("single_blocks.", "single_transformer_blocks.", _ORIGINAL_SINGLE)):
        for i in _block_indices(state, blocks):
            pairs += [(f"{blocks}{i}.{bfl}", tuple(f"{ours_prefix}{i}.{o}" for o in ours))
                      for bfl, ours in table.items()]
    out = {}
    for bfl, ours in pairs:
        kinds = {"scale": "weight"} if bfl.endswith("_norm") else {"weight": "weight", "bias": "bias"}
        out.update({f"{bfl}.{b}": tuple(f"{o}.{d}" for o in ours) for b, d in kinds.items()})
    return out


def is_original_state_dict(state: dict) -> bool:
    """BFL's layout (HunyuanVideo's original checkpoints share the block names, not these embedders)."""
    keys = [k.removeprefix(_ORIGINAL_PREFIX) for k in state]
    return all(any(k.startswith(prefix) for k in keys) for prefix in ("img_in.", "txt_in.", "vector_in."))


def is_flux_state_dict(state: dict) -> bool:
    """A diffusers `FluxTransformer2DModel` or a BFL Flux.1 state dict: what `load_state_dict` reads."""
    # By key prefixes, not single keys, so that a checkpoint missing any one tensor is still recognised as Flux and
    # its loader names what is missing. The single-stream blocks are Flux's own; a model without them still has the
    # pooled-text embedder and no SD3 patch embedding.
    return is_original_state_dict(state) or any(k.startswith("single_transformer_blocks.") for k in state) or (
        any(k.startswith("time_text_embed.text_embedder.") for k in state)
        and any(k.startswith("x_embedder.") for k in state) and not any(k.startswith("pos_embed.") for k in state))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def convert_original_state_dict(state: dict) -> dict:
    """A BFL Flux.1 state dict (optionally `model.diffusion_model.`-prefixed) under diffusers' (= our) names: the
    fused qkv and linear1 split by rows (D each, the MLP 4D; D from img_in), the final modulation's halves
    swapped. One error lists the missing and unexpected BFL keys."""
    state = {k[len(_ORIGINAL_PREFIX):] if k.startswith(_ORIGINAL_PREFIX) else k: v for k, v in state.items()}
    key_map = original_key_map(state)
    missing, unexpected = sorted(set(key_map) - set(state)), sorted(set(state) - set(key_map))
    if missing or unexpected:
        raise ValueError("\n".join(["original Flux state dict does not match the BFL layout"]
                                   + [f"  {t} ({len(k)}): {', '.join(k)}" for t, k in
                                      (("missing keys", missing), ("unexpected keys", unexpected)) if k]))
    D = state["img_in.weight"].shape[0]
    out = {}
    for bfl, ours in key_map.items():
        value = _swap_halves(state[bfl]) if bfl in _SWAPPED else state[bfl]
        if len(ours) == 1:
            out[ours[0]] = value
        else:
            out.update(zip(ours, value.split([4 * D if "proj_mlp" in o else D for o in ours], dim=0)))
    return out


def load_state(model: Flux, state: dict, source: str = "checkpoint") -> Flux:
    """Load our (= diffusers) keys strictly; one error lists missing, unexpected and mis-shaped keys."""
    return load_strict(model, state, source)


def infer_config(state: dict, **overrides) -> FluxConfig:
    """A config from tensor shapes (diffusers keys): every size is fixed by them except `axes_dims_rope` (Flux.1's
    (16, 56, 56) unless overridden) and `patch_size` (1, as every released model; it only sizes proj_out)."""
    D, in_channels = state["x_embedder.weight"].shape
    norm_q = next(v for k, v in state.items() if k.endswith(("attn.norm_q.weight", "attn.norm_k.weight")))
    patch_size = overrides.get("patch_size", 1)
    fields_ = dict(
        patch_size=patch_size, in_channels=in_channels,
        out_channels=state["proj_out.weight"].shape[0] // patch_size**2,
        num_layers=len(_block_indices(state, "transformer_blocks.")),
        num_single_layers=len(_block_indices(state, "single_transformer_blocks.")),
        attention_head_dim=norm_q.shape[0], num_attention_heads=D // norm_q.shape[0],
        joint_attention_dim=state["context_embedder.weight"].shape[1],
        pooled_projection_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in state))
    return FluxConfig(**{**fields_, **overrides})


def load_state_dict(state: dict, config=None, source: str = "checkpoint") -> Flux:
    """A Flux (eval) from a diffusers or BFL state dict. `config`: a FluxConfig, or a dict of diffusers config
    fields (a config.json) that win over what the shapes give; None infers it all."""
    if is_original_state_dict(state):
        state, source = convert_original_state_dict(state), "original Flux state dict"
    return load_state(empty(Flux, resolve_config(FluxConfig, config, infer_config, state)), state, source).eval()


def from_diffusers(transformer, peft_base: bool = False) -> Flux:
    """A Flux with the weights of a live diffusers `FluxTransformer2DModel`
    (sharing its tensors: their dtype, device and storage)."""
    state = diffusers_state(transformer, "FluxTransformer2DModel", peft_base)
    return load_state_dict(state, dict(transformer.config), "diffusers state dict")
