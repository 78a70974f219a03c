"""LoRA adapters on an accelerated pipeline: the transformer's live peft state, folded into the fast path's weights.

`pipe.load_lora_weights` (whatever format it converts: peft, kohya, XLabs, BFL) wraps the transformer's linear
layers in peft's LoRA layers. peft's forward of such a layer is

    y = x W^T + b + s * sum_a scaling_a * (x A_a^T) B_a^T        (a: the active adapters; none when disabled)

with `scaling_a` = weight_a * alpha_a / r_a (`set_adapters` weights), s the call's `joint_attention_kwargs`
scale, and once merged (`fuse_lora`) the deltas are in W itself. `LoraSync` keeps the fast path equal to it:
at every call it reads that state (a cheap fingerprint: adapter names, merged / disabled, scalings, the call's
scale, the LoRA tensors' storage and version counters), and when it changed it folds the effective weight
W + s * sum_a scaling_a * B_a A_a (in fp32, rounded once) of each changed layer into every form the fast path
built from it, in place (`FusedDenoiser.refit`): a concatenation (q|k|v, Flux's single-block [qkv | mlp]) gets
the layer's rows at their own place, a quantised form is re-quantised from the folded weight (never a
fuse-and-unfuse in low precision), and the tensors keep their storage, so captured graphs stay valid. The
transformer's own weights are never written.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("ditengine")


def peft_layers(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The transformer's peft LoRA layers by module path (a layer wrapping `base_layer` with `lora_A` / `lora_B`)."""
    return {name: m for name, m in transformer.named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "lora_A") and hasattr(m, "lora_B")}


def _active(layer) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _tensor_key(t: torch.Tensor | None) -> tuple:
    return (None,) if t is None else (t.data_ptr(), t._version, tuple(t.shape))


def layer_state(layer, scale: float) -> tuple:
    """What the layer's effective weight depends on, cheap to compare: a call whose state is unchanged costs nothing."""
    adapters = tuple((a, float(layer.scaling[a]), *_tensor_key(layer.lora_A[a].weight),
                      *_tensor_key(layer.lora_B[a].weight), *_tensor_key(layer.lora_B[a].bias))
                     for a in _active(layer))
    base = layer.base_layer
    return (bool(layer.disable_adapters), tuple(layer.merged_adapters), float(scale), adapters,
            _tensor_key(base.weight), _tensor_key(base.bias))


def _low_rank(layer, adapters, factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The adapters' sum as one low-rank product, fp32: (out, R) B's with their scalings times `factor` folded in,
    (R, in) A's, and the summed scaled B biases (or None). Small: R is the sum of the ranks."""
    scales = [factor * float(layer.scaling[a]) for a in adapters]
    B = torch.cat([s * layer.lora_B[a].weight.float() for a, s in zip(adapters, scales)], dim=1)
    A = torch.cat([layer.lora_A[a].weight.float() for a in adapters])
    biases = [s * layer.lora_B[a].bias.float() for a, s in zip(adapters, scales) if layer.lora_B[a].bias is not None]
    return B, A, sum(biases) if biases else None


def effective_weight(layer, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) peft's forward of `layer` computes with: W + B A in one fp32 pass where a delta is added
    (rounded once to W's dtype), the base layer's own tensors where none is."""
    variants = sorted(a for a in _active(layer) if a in getattr(layer, "lora_variant", {}) or
                      getattr(layer, "use_dora", {}).get(a, False))
    if variants:
        raise ValueError(f"LoRA adapter {variants[0]!r}: a variant (DoRA or another) that is not W + B A; ditengine "
                         "folds plain LoRA only (pipe.fuse_lora() then pipe.unload_lora_weights() bakes it in)")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError("LoRA on a Conv1D-style layer (fan_in_fan_out): not a transformer Linear ditengine serves")
    base = layer.base_layer
    if layer.disable_adapters:  # peft unmerges, then runs the base layer alone
        adapters, factor = [a for a in layer.merged_adapters if a in layer.lora_A], -1.0
    elif layer.merged:  # the merged deltas are in the base weight; peft adds nothing more
        adapters, factor = [], 1.0
    else:
        adapters, factor = _active(layer), scale
    if not adapters:
        return base.weight, base.bias
    B, A, bias_delta = _low_rank(layer, adapters, factor)
    weight = torch.addmm(base.weight.float(), B, A).to(base.weight.dtype)  # (out, in)
    bias = base.bias
    if bias_delta is not None:
        bias = bias_delta.to(base.weight.dtype) if bias is None else (bias.float() + bias_delta).to(bias.dtype)
    return weight, bias


def _own_weights(layer: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return layer.weight, layer.bias


def base_state_dict(transformer: torch.nn.Module) -> dict:
    """The transformer's state dict with peft's wrapping folded away (`x.base_layer.weight` -> `x.weight`, the
    adapters' own tensors left out): the base model's keys and tensors."""
    out = {}
    for key, value in transformer.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


class LoraSync:
    """Keeps an accelerated pipeline's model equal to its transformer's live LoRA state (see the module docstring).

    `model` is ditengine's reference model (its layers named as the transformer's); `fast` its fused denoiser, or
    None on the reference backend, whose model's layers then take the folded weights themselves (as copies: the
    transformer's tensors are never written). `sync(scale)` returns False when a form had to take new storage
    (captured graphs must be made again)."""

    def __init__(self, transformer: torch.nn.Module, model: torch.nn.Module, fast=None):
        self.transformer, self.model, self.fast = transformer, model, fast
        self.states: dict[str, tuple] = {}
        self.own: set = set()  # reference backend: layers whose weights are copies now

    def sync(self, scale: float = 1.0) -> bool:
        layers = peft_layers(self.transformer)
        states = {name: layer_state(layer, scale) for name, layer in layers.items()}
        if states == self.states:
            return True
        changed = sorted(n for n in states.keys() | self.states.keys() if states.get(n) != self.states.get(n))
        # Folded when its form is rebuilt: one form's weights at a time, never the whole model's.
        effective = {self._target(name): functools.partial(effective_weight, layers[name], scale) if name in layers
                     else functools.partial(_own_weights, self._base(name)) for name in changed}
        kept = self.fast.refit(effective) if self.fast is not None else self._refit_model(effective)
        if set(states) != set(self.states) and states:
            log.info("ditengine: LoRA on %d layers of the transformer (%s), folded into the fused weights",
                     len(states), ", ".join(sorted(states)[:4]) + (", ..." if len(states) > 4 else ""))
        elif set(states) != set(self.states):
            log.info("ditengine: no LoRA on the transformer any more: the fused weights are the base model's again")
        self.states = states
        return kept

    def _base(self, name: str) -> torch.nn.Module:
        """The transformer's plain Linear at `name` (peft unloaded it, or its base layer)."""
        module = self.transformer.get_submodule(name)
        return getattr(module, "base_layer", module)

    def _target(self, name: str) -> torch.nn.Module:
        """The model's Linear at the transformer's path `name`, which the fast path must hold."""
        try:
            layer = self.model.get_submodule(name)
        except AttributeError:
            layer = None
        held = layer is not None and (self.fast is None or layer in self.fast.holders)
        if not isinstance(layer, torch.nn.Linear) or not held:
            raise ValueError(f"LoRA on layer {name!r} of the transformer: ditengine's {type(self.model).__name__} has "
                             "no fused form of that layer; LoRA is served on the transformer blocks' linear layers "
                             "(attention, MLP, modulation) and the input and output projections (see docs/lora.md)")
        if layer.weight.is_meta:
            raise ValueError("a LoRA changed after ditengine.accelerate(..., release_transformer=True): the base "
                             "weights were released; accelerate again without release_transformer")
        return layer

    def _refit_model(self, effective: dict) -> bool:
        """Reference backend: each layer's weights become its own copies once, then take the folded values in place."""
        for layer, fold in effective.items():
            weight, bias = fold()
            if layer not in self.own:
                layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
                if layer.bias is not None:
                    layer.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
                self.own.add(layer)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if layer.bias is not None:
                    layer.bias.copy_(bias)
        return True
