"""ACE-Step 1.5's music DiT, as a readable spec in plain PyTorch.

Computes what diffusers' `AceStepTransformer1DModel` computes (0.42.1: models/transformers/ace_step_transformer.py,
which is the original `AceStepDiTModel` of ace-step/ACE-Step-1.5), checked in fp32 by tests/test_ace_step_model.py.
Parameter names are diffusers'; the original checkpoint's (`decoder.layers.N.self_attn.q_proj`, ...) go through
the key map at the end of this file.

One forward (D = hidden size, T = latent frames, L = condition tokens, T' = ceil(T / 2) tokens):

    temb = t_emb(t) + t_emb_r(t - r)                           (B, D)     the pipelines pass r = t: t_emb_r(0)
    t6   = time_proj(SiLU(t_emb(t))) + time_proj_r(...)       (B, 6, D)  shared by every block (adaLN-single)
    c    = condition_embedder(encoder_hidden_states)           (B, L, D)
    x    = conv1d_k2s2(pad(cat(context_latents, latents)))     (B, T', D)
    block i: sh1, sc1, g1, sh2, sc2, g2 = table_i + t6
        x += g1 * self_attn(RMS(x) w1 (1 + sc1) + sh1)   GQA, q/k RMSNorm, rotate-half RoPE; layers 0, 2, ...
                                                         see only keys |i - j| <= sliding_window
        x += cross_attn(RMS(x) w2, c)                    q/k RMSNorm, no RoPE, no mask: the padded tail is attended
        x += g2 * swiglu_mlp(RMS(x) w3 (1 + sc2) + sh2)
    out = conv_transpose1d_k2s2(RMS(x) w (1 + sc) + sh)[:, :T], sh, sc = table_out + temb (shift first)

Latents are (B, T, C) as the pipeline holds them. `timestep_conditioning` depends on t only, `condition` and
every block's cross-attention K/V on the prompt only, the context latents' share of the patch embedding on the
call only: a fast path precomputes all three, and a step cache can stand in for `block(i, ...)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .dit import timestep_embedding


@dataclass
class AceStepConfig:
    """Names and defaults are `AceStepTransformer1DModel`'s (the turbo and base DiTs). As in diffusers,
    `layer_types=None` alternates sliding and full attention starting with sliding, and
    `encoder_hidden_size=None` means `hidden_size`."""

    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    in_channels: int = 192  # context latents (src latents + chunk mask) and the noisy latents, concatenated
    audio_acoustic_hidden_dim: int = 64  # the latent's channels
    patch_size: int = 2
    rope_theta: float = 1e6
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    sliding_window: int = 128
    layer_types: list | None = None
    encoder_hidden_size: int | None = None
    is_turbo: bool = False
    model_version: str | None = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.hidden_size
        for bad, why in (
            (len(self.layer_types) != self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"),
            (not set(self.layer_types) <= {"sliding_attention", "full_attention"},
             f"layer_types: expected 'sliding_attention' or 'full_attention', got {sorted(set(self.layer_types))}"),
            (self.num_attention_heads % self.num_key_value_heads,
             f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
             f"{self.num_key_value_heads}"),
            (self.head_dim % 2, f"RoPE needs an even head_dim, got {self.head_dim}"),
            (self.in_channels <= self.audio_acoustic_hidden_dim,
             f"in_channels={self.in_channels} must exceed audio_acoustic_hidden_dim={self.audio_acoustic_hidden_dim} "
             "(the context latents come first)"),
        ):
            if bad:
                raise ValueError(f"AceStepConfig: {why}")

    @property
    def context_channels(self) -> int:
        return self.in_channels - self.audio_acoustic_hidden_dim

    def window(self, i: int) -> int | None:
        """Layer i's self-attention window (keys |i - j| <= window), or None for full attention."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    @classmethod
    def from_diffusers(cls, config) -> "AceStepConfig":
        """From an `AceStepTransformer1DModel` config; unknown keys (`_class_name`, dropout: eval) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(config).items() if k in names})

    def to_diffusers(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """diffusers' RMSNorm with a learned weight: the statistic in fp32, the product cast back to x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for a float64 reference
        y = x * torch.rsqrt(x.to(acc).pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return (y * self.weight).to(x.dtype)


def rope_tables(T: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, head_dim) fp32, in the rotate-half layout: cat(freqs, freqs) over the head dim."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv)  # (T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x (B, T, H, Dh) in fp32 (or float64), cast back."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def band_mask(T: int, window: int, device=None) -> torch.Tensor:
    """(T, T) bool: query i sees key j iff |i - j| <= window."""
    idx = torch.arange(T, device=device)
    return (idx[:, None] - idx[None]).abs() <= window


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm; self-attention (RoPE, optional window) or cross-attention."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__()
        D, H, Hkv, Dh, bias = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                               cfg.attention_bias)
        self.heads, self.kv_heads, self.head_dim = H, Hkv, Dh
        self.to_q = nn.Linear(D, H * Dh, bias=bias)
        self.to_k = nn.Linear(D, Hkv * Dh, bias=bias)
        self.to_v = nn.Linear(D, Hkv * Dh, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(H * Dh, D, bias=bias)])  # diffusers' key: to_out.0
        self.norm_q = RMSNorm(Dh, cfg.rms_norm_eps)
        self.norm_k = RMSNorm(Dh, cfg.rms_norm_eps)

    def kv(self, source):
        """K (q/k-normed) and V of `source` (B, S, D) -> two (B, S, Hkv, Dh): the cross-attention's per prompt."""
        B, S, _ = source.shape
        k = self.norm_k(self.to_k(source).view(B, S, self.kv_heads, self.head_dim))
        return k, self.to_v(source).view(B, S, self.kv_heads, self.head_dim)

    def forward(self, x, kv=None, rope=None, window: int | None = None):
        """x (B, T, D) -> (B, T, D); `kv` from `kv(condition)` for cross-attention, None for self-attention."""
        B, T, _ = x.shape
        k, v = self.kv(x) if kv is None else kv
        q = self.norm_q(self.to_q(x).view(B, T, self.heads, self.head_dim))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None if window is None else band_mask(T, window, x.device)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=self.heads != self.kv_heads)  # (B, H, T, Dh)
        return self.to_out[0](o.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, D: int, F_: int):
        super().__init__()
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AceStepBlock(nn.Module):
    def __init__(self, cfg: AceStepConfig, window: int | None):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.window = window
        self.self_attn_norm, self.self_attn = RMSNorm(D, eps), Attention(cfg)
        self.cross_attn_norm, self.cross_attn = RMSNorm(D, eps), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(D, eps), SwiGLU(D, cfg.intermediate_size)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, D) / D**0.5)

    def forward(self, x, t6, rope, cross_kv):
        """x (B, T', D); t6 (B, 6, D); rope (cos, sin) (T', Dh); cross_kv from `cross_attn.kv` of the condition."""
        sh1, sc1, g1, sh2, sc2, g2 = (self.scale_shift_table + t6).chunk(6, dim=1)  # (B, 1, D) each
        h = (self.self_attn_norm(x) * (1 + sc1) + sh1).type_as(x)
        x = (x + self.self_attn(h, rope=rope, window=self.window) * g1).type_as(x)
        x = x + self.cross_attn(self.cross_attn_norm(x).type_as(x), cross_kv)
        h = (self.mlp_norm(x) * (1 + sc2) + sh2).type_as(x)
        return (x + self.mlp(h) * g2).type_as(x)


class TimestepEmbedding(nn.Module):
    """sin-cos(1000 t) -> Linear, SiLU, Linear = temb (B, D); time_proj(SiLU(temb)) = t6 (B, 6, D)."""

    def __init__(self, D: int, freq_dim: int = 256):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(freq_dim, D), nn.Linear(D, D)
        self.time_proj = nn.Linear(D, 6 * D)

    def forward(self, t):
        freq = timestep_embedding(t * 1000.0, self.linear_1.in_features).to(t.dtype)
        temb = self.linear_2(F.silu(self.linear_1(freq)))
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


class AceStep(nn.Module):
    """ACE-Step 1.5 DiT. `forward` is a drop-in for `AceStepTransformer1DModel.forward` in `AceStepPipeline`
    (same keyword arguments); `config` and `dtype` are there because the pipeline reads them."""

    def __init__(self, cfg: AceStepConfig):
        super().__init__()
        self.config = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.layers = nn.ModuleList(AceStepBlock(cfg, cfg.window(i)) for i in range(cfg.num_hidden_layers))
        self.proj_in_conv = nn.Conv1d(cfg.in_channels, D, p, stride=p)
        self.time_embed, self.time_embed_r = TimestepEmbedding(D), TimestepEmbedding(D)
        self.condition_embedder = nn.Linear(cfg.encoder_hidden_size, D)
        self.norm_out = RMSNorm(D, cfg.rms_norm_eps)
        self.proj_out_conv = nn.ConvTranspose1d(D, cfg.audio_acoustic_hidden_dim, p, stride=p)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, D) / D**0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.condition_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.condition_embedder.weight.device

    def timestep_conditioning(self, timestep, timestep_r):
        """(temb (B, D) for the output norm, t6 (B, 6, D) shared by the blocks): both timestep paths summed."""
        temb_t, t6_t = self.time_embed(timestep)
        temb_r, t6_r = self.time_embed_r(timestep - timestep_r)
        return temb_t + temb_r, t6_t + t6_r

    def condition(self, encoder_hidden_states):
        """The packed condition (text, lyrics, timbre) (B, L, C_enc) -> the tokens cross-attention reads (B, L, D)."""
        return self.condition_embedder(encoder_hidden_states)

    def embed(self, hidden_states, context_latents):
        """Latents (B, T, C) and context latents (B, T, C_ctx) -> tokens (B, ceil(T / p), D): zero-padded to a
        whole patch, then the stride-p Conv1d."""
        x = torch.cat([context_latents, hidden_states], dim=-1)
        pad = -x.shape[1] % self.config.patch_size
        x = F.pad(x, (0, 0, 0, pad))
        return self.proj_in_conv(x.transpose(1, 2)).transpose(1, 2)

    def block(self, i: int, x, t6, rope, condition):
        blk = self.layers[i]
        return blk(x, t6, rope, blk.cross_attn.kv(condition))

    def unembed(self, x, temb, T: int):
        """The output norm and the stride-p ConvTranspose1d, cropped to T: (B, T', D) -> (B, T, C)."""
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)
        h = (self.norm_out(x) * (1 + scale) + shift).type_as(x)
        return self.proj_out_conv(h.transpose(1, 2)).transpose(1, 2)[:, :T]

    def forward(self, hidden_states, timestep, timestep_r=None, encoder_hidden_states=None, context_latents=None,
                attention_kwargs=None, return_dict=True):
        """latents (B, T, C), timesteps t and r (B,) in [0, 1], the packed condition (B, L, C_enc) and the context
        latents (B, T, C_ctx) -> the predicted velocity (B, T, C).

        `return_dict=False` gives the 1-tuple `(out,)` the pipeline indexes; True gives the tensor itself.
        `timestep_r=None` means r = t, as the pipeline passes it. `attention_kwargs` (a LoRA scale) is refused.
        """
        if attention_kwargs:
            raise ValueError(f"AceStep: attention_kwargs {sorted(attention_kwargs)} are not supported")
        if encoder_hidden_states is None or context_latents is None:
            raise ValueError("AceStep: encoder_hidden_states and context_latents are required")
        B, T, _ = hidden_states.shape
        t = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(B)
        r = t if timestep_r is None else torch.as_tensor(timestep_r, device=t.device).reshape(-1).expand(B)
        temb, t6 = self.timestep_conditioning(t.to(hidden_states.dtype), r.to(hidden_states.dtype))
        x = self.embed(hidden_states, context_latents)  # (B, T', D)
        cos, sin = rope_tables(x.shape[1], self.config.head_dim, self.config.rope_theta, x.device)
        rope = (cos.to(x.dtype), sin.to(x.dtype))  # diffusers rounds the tables to the activations' dtype
        condition = self.condition(encoder_hidden_states)
        for i in range(len(self.layers)):
            x = self.block(i, x, t6, rope, condition)
        out = self.unembed(x, temb, T)
        return out if return_dict else (out,)


def __getattr__(name: str):
    """The checkpoint conversion's names (`ace_step_checkpoints.py`, beside this spec), importable from here too."""
    from . import ace_step_checkpoints

    try:
        return getattr(ace_step_checkpoints, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
