"""The AceStep family's checkpoint conversion and loading, beside its spec (`ace_step.py`): diffusers and original
checkpoints into `ditengine.models.ace_step.AceStep`; `ace_step.py` re-exports these names."""
from __future__ import annotations

import re
from .loading import diffusers_state, empty, load_strict, resolve_config
from .ace_step import AceStep, AceStepConfig


# The original ACE-Step 1.5 checkpoint holds the whole model; its DiT is under `decoder.`, with the attention
# projections and norms under the Qwen3 names and the patch convolutions inside Sequentials.
_ORIGINAL_RENAMES = [(re.compile(p), r) for p, r in (
    (r"\.q_proj\.", ".to_q."), (r"\.k_proj\.", ".to_k."), (r"\.v_proj\.", ".to_v."), (r"\.o_proj\.", ".to_out.0."),
    (r"\.q_norm\.", ".norm_q."), (r"\.k_norm\.", ".norm_k."),
    (r"^proj_in\.1\.", "proj_in_conv."), (r"^proj_out\.1\.", "proj_out_conv."))]


def is_original_state_dict(state: dict) -> bool:
    return any(k.startswith("decoder.layers.") for k in state)


def convert_original_state_dict(state: dict) -> dict:
    """The `decoder.` part of an original ACE-Step 1.5 checkpoint under diffusers' (= our) names; the rest of
    the model (condition encoder, audio tokenizer) is not the DiT's and is left out."""
    out = {}
    for key, value in state.items():
        if not key.startswith("decoder."):
            continue
        key = key[len("decoder."):]
        for pattern, repl in _ORIGINAL_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def load_state(model: AceStep, state: dict, source: str = "checkpoint") -> AceStep:
    """Load our (= diffusers) keys strictly; one error lists missing, unexpected and mis-shaped keys."""
    return load_strict(model, state, source)


def infer_config(state: dict, **overrides) -> AceStepConfig:
    """A config from tensor shapes: every size is fixed by them except the window and RoPE theta (the
    published defaults, unless overridden) and the layer types (alternating, as every released model)."""
    q = state["layers.0.self_attn.to_q.weight"]
    head_dim = state["layers.0.self_attn.norm_q.weight"].shape[0]
    fields_ = dict(
        hidden_size=q.shape[1], intermediate_size=state["layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers.")),
        num_attention_heads=q.shape[0] // head_dim,
        num_key_value_heads=state["layers.0.self_attn.to_k.weight"].shape[0] // head_dim, head_dim=head_dim,
        in_channels=state["proj_in_conv.weight"].shape[1],
        audio_acoustic_hidden_dim=state["proj_out_conv.weight"].shape[1],
        patch_size=state["proj_in_conv.weight"].shape[2], attention_bias="layers.0.self_attn.to_q.bias" in state,
        encoder_hidden_size=state["condition_embedder.weight"].shape[1])
    return AceStepConfig(**{**fields_, **overrides})


def load_state_dict(state: dict, config=None, source: str = "checkpoint") -> AceStep:
    """An AceStep (eval) from a diffusers or original state dict. `config`: an AceStepConfig, or a dict of
    diffusers config fields (a config.json) that win over what the shapes give; None infers it all."""
    if is_original_state_dict(state):
        state, source = convert_original_state_dict(state), "original ACE-Step state dict"
    return load_state(empty(AceStep, resolve_config(AceStepConfig, config, infer_config, state)), state, source).eval()


def from_diffusers(transformer, peft_base: bool = False) -> AceStep:
    """An AceStep with the weights of a live diffusers `AceStepTransformer1DModel`
    (sharing its tensors: their dtype, device and storage)."""
    state = diffusers_state(transformer, "AceStepTransformer1DModel", peft_base)
    return load_state_dict(state, dict(transformer.config), "diffusers state dict")
