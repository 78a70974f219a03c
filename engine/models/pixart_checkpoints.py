"""The PixArt family's checkpoint conversion and loading, beside its spec (`pixart.py`): diffusers and original
checkpoints into `ditengine.models.pixart.PixArt`; `pixart.py` re-exports these names."""
from __future__ import annotations

import re
import torch
from .loading import diffusers_state, empty, load_strict
from .pixart import PixArt, PixArtConfig


# Our key (= the original PixArt key) <- the diffusers keys whose rows it concatenates, in order, for .weight and
# .bias alike; q, k, v have no bias without attention_bias. csize_/ar_embedder exist with micro-conditions only,
# y_embedder with caption_channels only.
_TOP = {
    "x_embedder.proj": ("pos_embed.proj",),
    "t_embedder.mlp.0": ("adaln_single.emb.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("adaln_single.emb.timestep_embedder.linear_2",),
    "csize_embedder.mlp.0": ("adaln_single.emb.resolution_embedder.linear_1",),
    "csize_embedder.mlp.2": ("adaln_single.emb.resolution_embedder.linear_2",),
    "ar_embedder.mlp.0": ("adaln_single.emb.aspect_ratio_embedder.linear_1",),
    "ar_embedder.mlp.2": ("adaln_single.emb.aspect_ratio_embedder.linear_2",),
    "t_block.1": ("adaln_single.linear",),
    "y_embedder.y_proj.fc1": ("caption_projection.linear_1",),
    "y_embedder.y_proj.fc2": ("caption_projection.linear_2",),
    "final_layer.linear": ("proj_out",),
}
_BLOCK = {  # blocks.{i}.<ours> <- transformer_blocks.{i}.<theirs>
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}
# diffusers keys with nothing of their own: fuse_qkv_projections()'s copies, a persistent position table, an old
# conversion's null caption. Original-checkpoint entries that are no parameters here: the fixed position table
# (checked, then dropped) and the learned null caption of training-time caption dropout (pipelines encode "").
_DIFFUSERS_REDUNDANT = re.compile(r"attn(1\.to_qkv|2\.to_kv)\.|^pos_embed\.pos_embed$|"
                                  r"^caption_projection\.y_embedding$")
_ORIGINAL_EXTRA = ("pos_embed", "y_embedder.y_embedding")


def diffusers_key_map(cfg: PixArtConfig) -> dict[str, tuple[str, ...]]:
    """Every parameter of `PixArt(cfg)` -> the diffusers keys whose rows (dim 0) it concatenates."""
    absent = () if cfg.use_additional_conditions else ("csize_embedder", "ar_embedder")
    absent += () if cfg.caption_channels is not None else ("y_embedder",)
    pairs = [(ours, theirs) for ours, theirs in _TOP.items() if not ours.startswith(absent)]
    pairs += [(f"blocks.{i}.{ours}", tuple(f"transformer_blocks.{i}.{t}" for t in theirs))
              for i in range(cfg.num_layers) for ours, theirs in _BLOCK.items()]
    out = {}
    for ours, theirs in pairs:
        no_bias = not cfg.attention_bias and ours.endswith(("qkv", "q_linear", "kv_linear"))
        for kind in ("weight",) if no_bias else ("weight", "bias"):
            out[f"{ours}.{kind}"] = tuple(f"{t}.{kind}" for t in theirs)
    out["final_layer.scale_shift_table"] = ("scale_shift_table",)
    out.update({f"blocks.{i}.scale_shift_table": (f"transformer_blocks.{i}.scale_shift_table",)
                for i in range(cfg.num_layers)})
    return out


def _check_keys(title: str, missing, unexpected, mis_shaped=()) -> None:
    problems = [(name, keys) for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                 ("mis-shaped", mis_shaped)) if keys]
    if problems:
        raise ValueError("\n".join([title] + [f"  {n} ({len(k)}): {', '.join(sorted(k))}" for n, k in problems]))


def convert_diffusers_state_dict(state: dict, cfg: PixArtConfig) -> dict:
    """diffusers `PixArtTransformer2DModel` keys -> ours; one error lists every missing and unexpected key."""
    key_map = diffusers_key_map(cfg)
    needed = {k for theirs in key_map.values() for k in theirs}
    unexpected = [k for k in state if k not in needed and not _DIFFUSERS_REDUNDANT.search(k)]
    _check_keys(f"diffusers state dict does not match {cfg}", needed - set(state), unexpected)
    return {ours: torch.cat([state[k] for k in theirs]) if len(theirs) > 1 else state[theirs[0]]
            for ours, theirs in key_map.items()}


def to_diffusers_state_dict(model: PixArt) -> dict:
    """Our parameters under diffusers' names (the inverse of `convert_diffusers_state_dict`)."""
    own = model.state_dict()
    out = {}
    for ours, theirs in diffusers_key_map(model.config).items():
        out.update(zip(theirs, own[ours].chunk(len(theirs), dim=0)))  # q; k; v and k; v: equal row blocks
    return out


def load_state(model: PixArt, state: dict, source: str = "checkpoint") -> PixArt:
    """Load our (= original PixArt) keys strictly; one error lists missing, unexpected and mis-shaped keys."""
    return load_strict(model, state, source)


def load_diffusers_state_dict(state: dict, config) -> PixArt:
    """A PixArt (eval) from a diffusers state dict and its config (a diffusers config dict, or a PixArtConfig)."""
    cfg = config if isinstance(config, PixArtConfig) else PixArtConfig.from_diffusers(config)
    return load_state(empty(PixArt, cfg), convert_diffusers_state_dict(state, cfg), "diffusers state dict").eval()


def from_diffusers(transformer, peft_base: bool = False) -> PixArt:
    """A PixArt with the weights of a live diffusers `PixArtTransformer2DModel` (its tensors, dtype and device;
    the q|k|v and k|v rows our layout fuses are concatenated copies)."""
    state = diffusers_state(transformer, "PixArtTransformer2DModel", peft_base)
    return load_diffusers_state_dict(state, dict(transformer.config))


def load_original_state_dict(state: dict, cfg: PixArtConfig) -> PixArt:
    """A PixArt (eval) from an original PixArt-alpha / PixArt-sigma checkpoint (PixArt or PixArtMS, such as
    PixArt-XL-2-1024-MS.pth: the state dict, or a dict holding it under "state_dict"). Its keys are ours. Shapes
    do not give the head count, interpolation scale or micro-conditions, so the config is required; the stored
    `pos_embed` is checked against it, which catches a wrong `sample_size` or `interpolation_scale`."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = empty(PixArt, cfg)
    pos = state.get("pos_embed")
    if pos is not None and (pos.numel() != model.pos_embed.numel() or not torch.allclose(
            pos.float().cpu().reshape(model.pos_embed.shape), model.pos_embed, atol=1e-3)):
        raise ValueError(f"original PixArt state dict: pos_embed {tuple(pos.shape)} differs from the sin-cos table "
                         f"{tuple(model.pos_embed.shape)} of sample_size={cfg.sample_size}, interpolation_scale="
                         f"{cfg.interpolation_scale}: is the config right?")
    state = {k: v for k, v in state.items() if k not in _ORIGINAL_EXTRA}
    return load_state(model, state, "original PixArt state dict").eval()
