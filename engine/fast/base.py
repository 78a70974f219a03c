"""What every family's fused denoiser shares: weights converted once, the token GEMMs (prepacked on a CPU),
one kernel backend for every op, and the checks that fail at construction rather than in the first step.

A fused denoiser is what `FastSampler`'s loop (`sampler.py`) drives; the contract it relies on is written
out in `Denoiser` below and in the README's layout section. The loop never names a family.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from ditengine.kernels import (choose, fp8_supported, gqa_attention, gqa_attention_ref, linear, linear_fp8,
                               linear_gelu, linear_int8, linear_swiglu, prepack_fp8, prepack_int8, prepack_linear,
                               prepack_swiglu, swiglu)
from ditengine.kernels.attention import head_dim_fits

from ..models.dit import timestep_embedding

log = logging.getLogger("ditengine")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MLP_EPILOGUES = ("auto", "cublaslt", "separate")
KERNEL_BACKENDS = (None, "auto", "native", "triton", "reference")
QUANTIZE = (None, "int8", "fp8")
# The ops of one fused step, each run on the backend a sampler asks for (kernels/_backend.py `choose`).
STEP_OPS = ("adaln_modulate", "gated_residual_adaln", "attention", "scheduler_step")


@functools.lru_cache(maxsize=None)
def cublaslt_gelu_is_tanh(device: str) -> bool:
    """Whether `torch._addmm_activation(..., use_gelu=True)` computes the tanh GELU on this device.

    On CUDA it maps to cuBLASLt's GELU epilogue (the tanh approximation DiTs use); on the CPU it is the
    exact erf GELU. A small fp32 probe decides, so a device where it differs never silently changes the
    model's math.
    """
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(device) for shape in ((64, 32), (48, 32), (48,)))
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    reference = F.gelu(F.linear(x, w, b), approximate="tanh")
    ok = torch.allclose(fused, reference, rtol=1e-4, atol=1e-5)
    if not ok:
        log.info("ditengine: the GELU GEMM epilogue on %s is not the tanh GELU; using a separate GELU", device)
    return ok


def shares_storage(tensor: torch.Tensor | None, others) -> bool:
    """Whether `tensor` lives in the memory of one of `others` (an alias of a model's own tensor). oneDNN's packed
    tensors have no storage of their own to share: always copies."""
    if tensor is None or tensor.is_mkldnn:
        return False
    ptr = tensor.untyped_storage().data_ptr()
    return any(o is not None and not o.is_mkldnn and o.untyped_storage().data_ptr() == ptr for o in others)


def stacked_weights(parts, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[(weight (N_i, K), bias (N_i) or None)] -> their rows stacked: (sum N_i, K) and the biases (or None); one part
    is returned as it is. With `dtype`, several are rounded to it as they are stacked (one pass, not two)."""
    weights, biases = zip(*parts)
    if len(weights) == 1:
        return weights[0], biases[0]
    dtype = dtype or weights[0].dtype
    weight = torch.empty(sum(w.shape[0] for w in weights), weights[0].shape[1], dtype=dtype, device=weights[0].device)
    start = 0
    for w in weights:
        weight[start:start + w.shape[0]].copy_(w.detach())
        start += w.shape[0]
    return weight, None if biases[0] is None else torch.cat(biases).to(dtype)


def copy_fields(dst, src) -> None:
    """Every tensor of a packed form (a dataclass of tensors) copied into `dst`'s own, in place."""
    for field in dataclasses.fields(dst):
        into = getattr(dst, field.name)
        if isinstance(into, torch.Tensor):
            into.copy_(getattr(src, field.name))


@functools.lru_cache(maxsize=None)
def _log_reference_attention(family: str, head_dim: int) -> None:
    log.info("ditengine: %s head dim %d is outside the attention kernels' (a multiple of 8 in 16..256): its "
             "attention runs the PyTorch reference", family, head_dim)


class TokenLinear:
    """One linear layer of the token stream in the fast path's form.

    On a CPU (native or default backend) the weight is prepacked once (`kernels.prepack_linear`: fp32
    copies where the CPU has no bf16 dot instructions, oneDNN's layout where it has them) and the GELU
    is fused into the GEMM; elsewhere it is `F.linear` on a copy in the compute dtype, with cuBLASLt's
    GELU epilogue where it computes the tanh GELU. `quantize` ("int8", "fp8") quantises the weight once
    per output channel and the activations per token in every call (`kernels.linear_int8`, `linear_fp8`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, owner: "FusedDenoiser", rows: int,
                 quantize: str | None = None, sources: list | None = None):
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.owner, self.rows, self.quantize = owner, rows, quantize
        self.sources = sources or []  # the model's Linear layers whose rows these are, in order (`refit`)
        source_tensors = (weight, bias)
        self.packed = self.weight = self.bias = None
        # Rounded to the compute dtype first: the fast path's weights are the model's in that dtype. The bias is
        # always a copy (tiny), so that a refit rewrites it in place.
        weight, bias = owner.cast(weight), None if bias is None else owner.cast(bias).clone()
        if quantize == "int8":  # the op (its native CPU kernel where built), or its torch body on one backend
            self.packed = prepack_int8(weight, bias, native=owner.backend in (None, "native"))
            self.run = linear_int8
        elif quantize == "fp8":
            self.packed, self.run = prepack_fp8(weight, bias, emulate=owner.backend == "reference"), linear_fp8
        elif owner.prepacked:
            self.packed = prepack_linear(weight, bias, dtype=owner.dtype, batch_size=rows)
            self.run = lambda x, packed, gelu: (linear_gelu if gelu else linear)(x, packed)
        else:
            self.weight, self.bias = weight, bias
        self.gelu_epilogue = owner.gelu_epilogue
        self.column_gelu = quantize is None and owner.prepacked  # the GELU of `gelu_from` in the GEMM epilogue
        # Whether a weight here is the model's own tensor (no copy was needed): a refit must not write into it.
        self.aliases = any(shares_storage(t, source_tensors) for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the GEMM reads (packed or plain)."""
        held = [getattr(self.packed, f.name) for f in dataclasses.fields(self.packed)] if self.packed is not None \
            else [self.weight, self.bias]
        return [t for t in held if isinstance(t, torch.Tensor)]

    def refit(self, effective: dict) -> bool:
        """Rebuild from the sources' weights, `effective[layer]()` -> (weight, bias) where given (a LoRA folded in),
        else the layer's own, into the same tensors so that captured graphs stay valid. Returns False where they
        were the model's own tensors (an alias, now a copy: new storage)."""
        parts = [effective[m]() if m in effective else (m.weight, m.bias) for m in self.sources]
        fresh = TokenLinear(*stacked_weights(parts, self.owner.dtype), self.owner, self.rows, self.quantize)
        if self.aliases:
            self.packed, self.weight, self.bias, self.aliases = fresh.packed, fresh.weight, fresh.bias, fresh.aliases
            return False
        if self.packed is not None:
            copy_fields(self.packed, fresh.packed)
        else:
            self.weight.copy_(fresh.weight)
            if self.bias is not None:
                self.bias.copy_(fresh.bias)
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        return self.run(x, self.packed, False) if self.packed is not None else F.linear(x, self.weight, self.bias)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM with its tanh GELU applied (fc1)."""
        if self.packed is not None:
            return self.run(x, self.packed, True)
        if self.gelu_epilogue and self.bias is not None:
            flat = torch._addmm_activation(self.bias, x.flatten(0, -2), self.weight.t(), use_gelu=True)
            return flat.view(*x.shape[:-1], -1)
        return F.gelu(F.linear(x, self.weight, self.bias), approximate="tanh")

    def gelu_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The GEMM with the tanh GELU on output columns [start, out) only (Flux's single block: q, k, v, then
        the MLP): in the epilogue on prepacked weights, else in place on the slice."""
        if self.column_gelu:
            return linear_gelu(x, self.packed, gelu_from=start)
        y = self(x)
        y[..., start:] = F.gelu(y[..., start:], approximate="tanh")
        return y


class SwiGLULinear:
    """A SwiGLU MLP's gate and up projections as one GEMM with the `silu(g) * u` epilogue (`kernels.linear_swiglu`:
    fused into the GEMM on a CPU, cuBLAS then a Triton epilogue on CUDA). Quantised, the stacked [gate; up]
    weight is one W8A8 `TokenLinear` and the epilogue runs on its output (`kernels.swiglu`)."""

    def __init__(self, gate: torch.nn.Linear, up: torch.nn.Linear, owner: "FusedDenoiser", rows: int,
                 quantize: str | None = None):
        self.in_features, self.out_features = gate.in_features, gate.out_features
        self.backend = owner.backend
        biases = None if gate.bias is None else torch.cat([gate.bias, up.bias])
        if quantize is not None:
            self.stacked = TokenLinear(torch.cat([gate.weight, up.weight]), biases, owner, rows, quantize)
            self.packed = None
        else:
            self.stacked = None
            self.packed = prepack_swiglu(owner.cast(gate.weight), owner.cast(up.weight),
                                         *((None, None) if gate.bias is None else (owner.cast(gate.bias),
                                                                                    owner.cast(up.bias))),
                                         dtype=owner.dtype, batch_size=rows, backend=owner.backend or "auto")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> silu(x W_g^T) * (x W_u^T) (..., F)."""
        if self.packed is not None:
            return linear_swiglu(x, self.packed)
        return swiglu(self.stacked(x).to(x.dtype), backend=self.backend)


class StackedLinear:
    """Several linear layers on one input, their outputs side by side (..., sum of out): every block's modulation
    (per step, before the loop) or every layer's cross-attention K/V (per call). The weights stay the model's own
    tensors (cast to the compute dtype: no copy where the model already is in it) instead of one concatenated copy,
    which would hold a third of a DiT's or Flux's bytes a second time. `fp32` runs the GEMMs in fp32 (modulation
    scales every activation), widening one layer's weight at a time."""

    def __init__(self, layers, owner: "FusedDenoiser", fp32: bool = False):
        self.sources, self.owner = list(layers), owner
        self.parts = [self._cast(m.weight, m.bias) for m in self.sources]
        self.fp32, self.dtype = fp32, owner.dtype
        owner.hold(self)

    def _cast(self, weight, bias) -> tuple:
        return self.owner.cast(weight), None if bias is None else self.owner.cast(bias)

    def refit(self, effective: dict) -> bool:
        """The parts of the layers in `effective` (layer -> a function giving its (weight, bias)) rewritten in place; a
        part that was the layer's own tensor is replaced by a copy instead (False: new storage)."""
        kept = True
        for i, layer in enumerate(self.sources):
            if layer in effective:
                fresh = self._cast(*effective[layer]())
                own = (layer.weight, layer.bias)
                if any(shares_storage(t, own) for t in self.parts[i]):
                    # A copy only where the new value is itself the layer's tensor (a fold made a new one already).
                    self.parts[i] = tuple(t.clone() if shares_storage(t, own) else t for t in fresh)
                    kept = False
                else:
                    for into, value in zip(self.parts[i], fresh):
                        if into is not None:
                            into.copy_(value)
        return kept

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., sum of the layers' out), fp32 when `fp32`, else in the compute dtype."""
        if self.fp32:
            x = x.float()
            return torch.cat([F.linear(x, w.float(), None if b is None else b.float()) for w, b in self.parts], -1)
        x = x.to(self.dtype)
        return torch.cat([F.linear(x, w, b) for w, b in self.parts], -1)


def cross_block_gemms(denoiser, rows: int, T: int, mlp_hidden: int) -> list[tuple]:
    """`step_gemms` of a family whose blocks are self-attention, cross-attention and an MLP (PixArt, Wan: the layers
    `qkv`, `proj`, `q`, `cross_proj`, `fc1`, `fc2`), between its patch embedding and final linear."""
    D = denoiser.hidden
    gemms = [(denoiser.patch, (rows, T, denoiser.patch.in_features))]
    for layers in denoiser.blocks:
        gemms += [(layers["qkv"], (rows, T, D)), (layers["proj"], (rows, T, D)), (layers["q"], (rows, T, D)),
                  (layers["cross_proj"], (rows, T, D)), (layers["fc1"].gelu, (rows, T, D)),
                  (layers["fc2"], (rows, T, mlp_hidden))]
    return gemms + [(denoiser.final, (rows, T, D))]


class FusedDenoiser(ABC):
    """Base of the families' fused denoisers: dtype, backend and device choices, and weight conversion.

    `residual_dtype` is the residual stream's dtype (default: fp32 when `dtype` is fp16, whose range a
    DiT's residual stream can overflow; else `dtype`).

    `backend` runs every op of the forward on one implementation: None or "auto" (the dispatcher's choice:
    Triton on CUDA, the native C++ kernels on CPU where built, with the token GEMMs on prepacked weights),
    "native", "triton" (on CPU, Triton's interpreter: `TRITON_INTERPRET=1` before import) or "reference"
    (the ops' PyTorch references). With "triton" or "reference" the GEMMs are plain `F.linear`, as on CUDA.
    A backend that cannot run here raises a ValueError at construction.

    `quantize` runs every block's token GEMMs (not the patch embedding or the final linear: small, and
    the first and last layers carry the most quantisation error per FLOP saved) as W8A8: None (the compute
    dtype), "int8" (`kernels.linear_int8`: oneDNN's VNNI int8 matmul on x86 CPUs) or "fp8" (e4m3 through
    `torch._scaled_mm`, on CUDA GPUs with fp8 tensor cores; with backend="reference" its numerics run
    emulated on any device). A form the device cannot run raises a ValueError naming it.

    The contract the sampling loop relies on (every family implements it):

    - geometry: `depth` (blocks a cache policy may stand in for), `branches` (outputs per block that the
      per-block cache reuse keeps), `latent_shape` (C, ...) of the sampler's state at the model's native
      size, `out_channels`, `token_shape(latent_shape, cond)` (T, D) of the residual stream (cond: the call's
      conditioning, for a joint text + image stream), `residual_dtype`,
      `dtype`, `device`, `backend`;
    - per call: `inputs(model, noise, use_cfg, *args, **kwargs)` checks and gathers the conditioning into
      a dict; `context_key(cond)` says what the context's shapes depend on beyond the batch (a prompt's
      length), so a plan (static buffers, graphs) is kept per (noise shape, context key);
      `context_buffers(rows, latent_shape, cond)` allocates the static per-call context (label
      embeddings, or every block's cross-attention K/V of a prompt with its valid lengths) and
      `write_context(ctx, cond, use_cfg)` fills it before the loop, conditional rows first;
      `context_rows(ctx, rows, start)` is the context of rows [start, start + rows) (the conditional half, for
      the steps outside a guidance interval; a rank's half with CFG parallel);
    - per step: `modulation(t, ctx)` gives every modulation vector for timesteps t (S,) as a tuple of
      tensors with leading dim S (all steps at once before the loop, or one per step when the table
      passes the memory budget; `modulation_shapes` sizes it);
    - the forward as embed -> blocks -> unembed, so a cache policy can stand in for the blocks:
      `embed(x_in, ctx)`, `first_norm(resid, mod, ctx)`, `block(i, resid, h, mod, ctx, keep)`,
      `reuse_block(i, resid, mod, ctx, kept)`, `final_norm(resid, mod, ctx)`, `unembed(h, ctx)`;
    - `step_gemms(rows, latent_shape, cond)`: the token GEMMs of one step with their activation shapes (the
      benchmark's GEMM floor).
    """

    branches = 2

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, mlp_epilogue: str = "auto",
                 residual_dtype: torch.dtype | None = None, backend: str | None = None,
                 quantize: str | None = None):
        if dtype not in DTYPES:
            raise TypeError(f"dtype: expected one of {[str(d) for d in DTYPES]}, got {dtype}")
        if mlp_epilogue not in MLP_EPILOGUES:
            raise ValueError(f"mlp_epilogue={mlp_epilogue!r}: expected one of {MLP_EPILOGUES}")
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {KERNEL_BACKENDS}")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE}")
        self.config = model.config
        self.dtype = dtype
        self.residual_dtype = residual_dtype or (torch.float32 if dtype == torch.float16 else dtype)
        self.device = next(model.parameters()).device
        self.backend = None if backend == "auto" else backend
        for op in STEP_OPS:  # fail here, naming the op, rather than inside the first step
            choose(op, self.device, self.backend)
        want_epilogue = mlp_epilogue == "cublaslt" or (mlp_epilogue == "auto" and self.device.type == "cuda")
        self.gelu_epilogue = want_epilogue and cublaslt_gelu_is_tanh(str(self.device))
        self.prepacked = self.device.type == "cpu" and self.backend in (None, "native")
        if quantize == "fp8" and self.backend != "reference" and not fp8_supported(self.device):
            raise ValueError(f"quantize='fp8' needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+), "
                             f"got {self.device}; use quantize='int8' on a CPU (backend='reference' emulates "
                             "fp8's numerics anywhere)")
        self.quantize = quantize
        self.holders: dict[torch.nn.Module, list] = {}  # model Linear -> the forms built from it (`refit`)

    def cast(self, t: torch.Tensor, to: torch.dtype | None = None) -> torch.Tensor:
        return t.detach().to(device=self.device, dtype=to or self.dtype).contiguous()

    def mlp_weights(self, first: torch.nn.Linear, second: torch.nn.Linear) -> tuple:
        """An embedder's Linear, SiLU, Linear (timestep, size, guidance, pooled text) as fp32 weights: tiny, and
        the modulation they feed scales every activation."""
        return tuple(self.cast(p, torch.float32) for p in (first.weight, first.bias, second.weight, second.bias))

    def sinusoidal_mlp(self, mlp: torch.nn.Sequential) -> tuple:
        """`mlp_weights` of a Sequential(Linear, SiLU, Linear) embedder."""
        return self.mlp_weights(mlp[0], mlp[2])

    @staticmethod
    def apply_mlp(mlp: tuple, x: torch.Tensor) -> torch.Tensor:
        """`mlp_weights` applied to x (N, in) -> (N, D)."""
        w0, b0, w2, b2 = mlp
        return F.linear(F.silu(F.linear(x, w0, b0)), w2, b2)

    @staticmethod
    def embed_sinusoidal(mlp: tuple, values: torch.Tensor, freq_shift: int = 0) -> torch.Tensor:
        """`mlp_weights` applied to the sinusoidal embedding of `values` (N,) -> (N, D) fp32."""
        return FusedDenoiser.apply_mlp(mlp, timestep_embedding(values, mlp[0].shape[1], freq_shift))

    def gqa_attention_fits(self, head_dim: int) -> bool:
        """Whether `gqa_attention`'s kernels take this head dim (a multiple of 8 in 16..256), its implementation
        chosen now; if not, the family's attention runs the PyTorch reference, logged."""
        if head_dim_fits(head_dim):
            choose("gqa_attention", self.device, self.backend)
            return True
        _log_reference_attention(type(self).__name__, head_dim)
        return False

    def token_linear(self, layer: torch.nn.Linear | list | tuple, rows: int, block: bool = False) -> TokenLinear:
        """A model's linear layer, several layers on one input (a list: their rows stacked, q|k|v), or a derived
        (weight, bias) pair as a token GEMM over `rows` rows; a `block`'s GEMMs take the sampler's quantisation.
        Layers (not pairs) are registered for `refit`."""
        if isinstance(layer, tuple):
            return TokenLinear(*layer, self, rows, self.quantize if block else None)
        layers = [layer] if isinstance(layer, torch.nn.Module) else list(layer)
        weight, bias = stacked_weights([(m.weight, m.bias) for m in layers])
        return self.hold(TokenLinear(weight, bias, self, rows, self.quantize if block else None, sources=layers))

    def hold(self, holder):
        """Register a form built from model layers (its `sources`) for `refit`; returns it."""
        for layer in holder.sources:
            self.holders.setdefault(layer, []).append(holder)
        return holder

    def refit(self, effective: dict) -> bool:
        """Rewrite, in place, every form built from the layers of `effective` (model Linear -> a function giving its
        (weight, bias) now, e.g. with a LoRA folded in, or its own weights to undo one: called when its form is
        rebuilt, so only one form's weights are ever made at once). Returns False where some form had to take new
        storage (it was the model's own tensor), which invalidates captured graphs. A layer no form holds raises a
        KeyError naming it."""
        missing = [layer for layer in effective if layer not in self.holders]
        if missing:
            raise KeyError(missing[0])
        holders = {id(h): h for layer in effective for h in self.holders[layer]}
        return all([h.refit(effective) for h in holders.values()])

    def swiglu_linear(self, gate: torch.nn.Linear, up: torch.nn.Linear, rows: int, block: bool = False) -> SwiGLULinear:
        """A SwiGLU MLP's gate and up layers as one GEMM with the epilogue fused; a `block`'s take the quantisation."""
        return SwiGLULinear(gate, up, self, rows, self.quantize if block else None)

    def context_rows(self, ctx: dict, rows: int, start: int = 0) -> dict:
        """Views of the context's rows [start, start + rows) (the conditional half, or with CFG parallel one rank's
        half): every tensor's leading dim is the row dim here."""
        return {k: v[start:start + rows] if isinstance(v, torch.Tensor) else v for k, v in ctx.items()}

    @property
    def depth(self) -> int:
        return self.config.depth

    def forward(self, x: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        """The model input x (N, C, ...) in `dtype` and one step's modulation (the `modulation` tuple, rows of
        one timestep) -> the model output (N, C_out, ...): embed, every block, unembed; on a token shard every block
        on this rank's tokens."""
        resid = self.embed_shard(x, ctx)
        h = self.first_norm(resid, mod, ctx)
        for i in range(self.depth):
            resid, h = self.block(i, resid, h, mod, ctx)
        return self.unembed(h, ctx)

    # -- the contract: every family implements these (a class missing one fails at construction, naming it) ---------
    @abstractmethod
    def inputs(self, model: torch.nn.Module, noise: torch.Tensor, use_cfg: bool, *args, **kwargs) -> dict:
        """Check and gather a call's conditioning into a dict (the family's names)."""

    @abstractmethod
    def context_key(self, cond: dict) -> tuple:
        """What the context's shapes depend on beyond the batch (a prompt's length): a plan is kept per key."""

    @abstractmethod
    def context_buffers(self, rows: int, latent_shape: tuple, cond: dict) -> dict:
        """The static per-call context for `rows` model rows."""

    @abstractmethod
    def write_context(self, ctx: dict, cond: dict, use_cfg: bool) -> None:
        """Fill the context before the loop, conditional rows first."""

    @abstractmethod
    def modulation(self, t: torch.Tensor, ctx: dict) -> tuple:
        """Every modulation vector for timesteps t (S,): a tuple of tensors with leading dim S."""

    @abstractmethod
    def modulation_shapes(self, steps: int, rows: int) -> list[tuple]:
        """The shapes of `modulation`'s tensors for `steps` timesteps and `rows` context rows (in `dtype`)."""

    @abstractmethod
    def token_shape(self, latent_shape: tuple, cond: dict | None = None) -> tuple[int, int]:
        """(T, D) of the residual stream for a latent of `latent_shape` (C, ...)."""

    @abstractmethod
    def embed(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The model input (N, C, ...) in `dtype` -> the residual stream (N, T, D)."""

    @abstractmethod
    def first_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        """The first block's normed, modulated input."""

    @abstractmethod
    def block(self, i: int, resid: torch.Tensor, h: torch.Tensor, mod: tuple, ctx: dict,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on the residual stream (in place) -> (resid, the next norm's output); `keep` receives the
        block's branch outputs for a step cache."""

    @abstractmethod
    def final_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        """The final norm's modulated output."""

    def embed_shard(self, x: torch.Tensor, ctx: dict | None) -> torch.Tensor:
        """`embed`, and on a token shard (`ctx["sequence"]`) this rank's rows of it (N, T_pad / P, D): the patch
        embedding runs whole, it is small."""
        full = self.embed(x, ctx)
        shards = ctx.get("sequence") if ctx else None
        return full if shards is None else shards.take(full)

    def unembed(self, h: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The final norm's output (N, T, D) -> the model output (N, C_out, ...): the output projection (`final`, a
        token GEMM), then `unpatchify`. On a token shard each rank projects its rows and the projected rows of
        every rank are gathered first (C_out x patch elements a token, not D)."""
        out = self.final(h)
        shards = ctx.get("sequence") if ctx else None
        return self.unpatchify(out if shards is None else shards.gather(out), ctx)

    @abstractmethod
    def unpatchify(self, out: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The output projection's rows (N, T, C_out x patch) -> the model output (N, C_out, ...)."""

    # -- optional capabilities: None where a family does not offer them -------------------------------------------
    reuse_block = None  # (i, resid, mod, ctx, kept) -> (resid, h): block i from its kept outputs (step caching)
    step_gemms = None  # (rows, latent_shape, cond) -> [(gemm, activation shape)]: the benchmark's GEMM floor
    # () -> the head counts (q, and k / v where they differ) a Ulysses degree must divide: a family whose blocks run
    # on a shard of the tokens, its self-attention through `self_attention` (ditengine.parallel)
    sequence_heads = None

    def self_attention(self, ctx: dict, attend, *tensors: torch.Tensor, **prologue) -> torch.Tensor:
        """`attend(*tensors, **prologue)`, the family's self-attention over (N, T, ..., H, Dh) tensors (a packed
        qkv, or q, k, v) -> (N, T, H, Dh); `prologue`: what of `gqa_attention`'s q/k norm, RoPE, window and scale
        keywords the family uses. On a token shard (`ctx["sequence"]`, a `parallel.TokenShards`) the tensors hold
        this rank's tokens, and the sequence group runs the attention across the ranks: the family's own kernel
        after Ulysses' all-to-all, or the ring, which applies the prologue itself and attends through
        `partial_attention`."""
        shards = ctx.get("sequence") if ctx else None
        if shards is None:
            return attend(*tensors, **prologue)
        return shards.attention(attend, tensors, prologue, self.partial_attention)

    def gqa(self, *tensors: torch.Tensor, **kw):
        """`gqa_attention` of q, k, v (or one packed qkv (N, S, 3, H, Dh)) with its keywords, on this denoiser's
        backend where the kernels take the head dim, else `gqa_attention_ref` (`gqa_attention_fits` logged the
        choice at construction)."""
        q, k, v = tensors[0].unbind(2) if len(tensors) == 1 else tensors
        if head_dim_fits(q.shape[-1]):
            return gqa_attention(q, k, v, backend=self.backend, **kw)
        return gqa_attention_ref(q, k, v, **kw)

    def partial_attention(self, q, k, v, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q (N, T, Hq, Dh) to one block of keys (N, S, Hkv, Dh) -> (out, its log-sum-exp (N, T, Hq)),
        for the ring's exact merge."""
        return self.gqa(q, k, v, return_lse=True, **kw)

    @staticmethod
    def local_rows(ctx: dict, rows: int) -> int:
        """How many of the sequence's first `rows` tokens this rank holds (all of them on one rank): where a joint
        family's streams meet within its shard."""
        shards = ctx.get("sequence")
        return rows if shards is None else shards.local(rows)

    def modulation_bytes(self, steps: int, rows: int) -> int:
        return sum(math.prod(shape) for shape in self.modulation_shapes(steps, rows)) * self.dtype.itemsize
