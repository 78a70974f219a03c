"""Flux.1 (dev and schnell), as a readable spec in plain PyTorch.

Computes what diffusers' `FluxTransformer2DModel` computes (0.42.1: models/transformers/transformer_flux.py with
`FluxAttnProcessor`, `FluxPosEmbed`; embeddings.py `CombinedTimestep[Guidance]TextProjEmbeddings`), checked in fp32
by tests/test_flux_model.py. Parameter names are diffusers'; BFL's original checkpoint (`double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, ...) goes through the key map at the end of this file.

One forward (D = hidden size, N = packed image tokens, L = text tokens, Dh = head dim):

    temb = t_emb(1000 t) [+ g_emb(1000 g)] + pooled_proj(pooled)   (B, D)   t, g rounded to the latent dtype first
    rope = interleaved-pair cos/sin of ids = cat(txt_ids, img_ids)  (L+N, Dh) three axes, (16, 56, 56) channels
    x = x_embedder(latents) (B, N, D);  c = context_embedder(T5 tokens) (B, L, D)
    double block i (each stream its own adaLN-Zero, projections, q/k RMSNorm and MLP):
        y, yc = LN(x)(1 + sc1) + sh1, LN(c)(1 + cs1) + ch1
        o_c, o = SDPA(rope(cat(qc, q)), rope(cat(kc, k)), cat(vc, v))      text first
        x += g1 * to_out(o);     x += g2 * ff(LN(x)(1 + sc2) + sh2)
        c += cg1 * to_add_out(o_c);  c += cg2 * ff_context(LN(c)(1 + cs2) + ch2)
    s = cat(c, x) (B, L+N, D); single block i: sh, sc, g = norm.linear(SiLU(temb))
        y = LN(s)(1 + sc) + sh;  s += g * proj_out(cat(SDPA(rope(q), rope(k), v), gelu_tanh(proj_mlp(y))))
    out = proj_out(LN(s[:, L:])(1 + sc) + sh), sc, sh = norm_out.linear(SiLU(temb))   (B, N, p*p*C)  SCALE first

Every modulation vector depends on (t, g, pooled) only, the RoPE tables on the ids only, `c`'s embedding on the
prompt only: a fast path precomputes all three, and a step cache can stand in for `double_block(i, ...)` and
`single_block(i, ...)`. A single block's to_q, to_k, to_v and proj_mlp read the same y: they are one GEMM of 3D + 4D
outputs (BFL's `linear1`), GELU on the last 4D columns only, which the fast path fuses; `proj_out` (BFL's `linear2`)
reads [attention | MLP] as one 5D-wide input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .dit import timestep_embedding

_FP64_MISSING = ("mps", "npu", "neuron")  # devices without float64, where diffusers computes the RoPE angles in fp32


@dataclass
class FluxConfig:
    """Names and defaults are `FluxTransformer2DModel`'s (Flux.1; the dev config sets `guidance_embeds=True`). As
    in diffusers, `out_channels=None` means `in_channels`, resolved on construction."""

    patch_size: int = 1  # only sizes proj_out (p*p*out_channels rows): the pipeline packs 2x2 patches itself
    in_channels: int = 64  # 16 VAE channels x a 2x2 patch, ordered (c, dy, dx)
    out_channels: int | None = None
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5-XXL width
    pooled_projection_dim: int = 768  # CLIP-L pooled width
    guidance_embeds: bool = False  # dev: True (guidance distilled), schnell: False
    axes_dims_rope: tuple = (16, 56, 56)  # RoPE channels per id axis; they add up to the head dim

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.axes_dims_rope = tuple(int(d) for d in self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"FluxConfig: axes_dims_rope {self.axes_dims_rope} must be even and add up to the head "
                             f"dim {self.attention_head_dim}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim  # diffusers' inner_dim

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return 4 * self.hidden_size  # mlp_ratio 4 in both block kinds, fixed in diffusers

    @classmethod
    def from_diffusers(cls, config) -> "FluxConfig":
        """From a `FluxTransformer2DModel` config (`dict(module.config)` or a config.json); keys it does not know
        (`_class_name`, `_diffusers_version`) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(config).items() if k in names})

    def to_diffusers(self) -> dict:
        """Keyword arguments for `FluxTransformer2DModel(**...)` building the same model."""
        return {**asdict(self), "axes_dims_rope": list(self.axes_dims_rope)}


def rope_tables(ids: torch.Tensor, axes_dims, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (S, sum(axes_dims)) fp32, from position ids (S, n_axes): diffusers' `FluxPosEmbed`.

    Axis a gets its own channel range of width d_a with frequencies theta^(-2k/d_a), k < d_a/2; the angles are
    taken in float64 from the ids rounded to fp32, and each cos/sin is repeated twice in place (interleaved
    pairs: channels 2k and 2k+1 share a frequency)."""
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
        raise ValueError(f"Flux: position ids must be (S, {len(axes_dims)}), got {tuple(ids.shape)}")
    wide = torch.float32 if ids.device.type in _FP64_MISSING else torch.float64
    pos = ids.float()
    cos, sin = [], []
    for a, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=wide, device=ids.device) / d))  # (d/2,)
        angles = torch.outer(pos[:, a].to(wide), freqs)  # (S, d/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on interleaved pairs (GPT-J style) of x (B, S, H, Dh), in fp32, cast back:
    out[2k] = x[2k] cos - x[2k+1] sin, out[2k+1] = x[2k+1] cos + x[2k] sin."""
    cos, sin = rope[0][None, :, None], rope[1][None, :, None]  # (1, S, 1, Dh)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, S, H, Dh/2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention(q, k, v):
    """SDPA over (B, S, H, Dh) tensors, scale 1/sqrt(Dh), no mask (Flux pads T5 and attends to the padding)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, Dh)
    return o.transpose(1, 2).flatten(2).to(q.dtype)  # (B, S, H*Dh)


def _ln(D: int) -> nn.LayerNorm:
    return nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)  # every LayerNorm in Flux


def _rms(Dh: int) -> nn.RMSNorm:
    # torch's RMSNorm, as diffusers uses here: one rounding (the statistic and product in fp32), unlike the
    # diffusers RMSNorm of SD3.5 and Sana
    return nn.RMSNorm(Dh, eps=1e-6)


class Embedder(nn.Module):
    """Linear, SiLU, Linear: the timestep and guidance embedders (from 256 frequencies) and the pooled projection."""

    def __init__(self, d_in: int, D: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, D), nn.Linear(D, D)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class FeedForward(nn.Module):
    """Linear(D, 4D), GELU-tanh, Linear(4D, D) under diffusers' keys `net.0.proj` and `net.2` (net.1 is its
    dropout, the identity in eval)."""

    def __init__(self, D: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(4 * D, D)])
        self.net[0].proj = nn.Linear(D, 4 * D)

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: linear(SiLU(temb)) -> n chunks (B, D), shift and scale first. Returns LN(x)(1 + scale) + shift
    and the rest: (gate, shift_mlp, scale_mlp, gate_mlp) for n = 6 (double blocks, diffusers' AdaLayerNormZero),
    (gate,) for n = 3 (single blocks, AdaLayerNormZeroSingle)."""

    def __init__(self, D: int, n: int = 6):
        super().__init__()
        self.n, self.linear, self.norm = n, nn.Linear(D, n * D), _ln(D)

    def forward(self, x, temb):
        shift, scale, *rest = self.linear(F.silu(temb)).chunk(self.n, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], *rest


class AdaLayerNormContinuous(nn.Module):
    """The final norm: linear(SiLU(temb)) -> SCALE, then shift (BFL's checkpoint stores shift first)."""

    def __init__(self, D: int):
        super().__init__()
        self.linear, self.norm = nn.Linear(D, 2 * D), _ln(D)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None] + shift[:, None]


class FluxAttention(nn.Module):
    """q, k, v with per-head q/k RMSNorm. Joint (double blocks): the text stream has its own projections, norms
    and output projection, and attends together with the image stream, text rows first. Single blocks: one stream,
    no output projection here (the block's proj_out takes it)."""

    def __init__(self, cfg: FluxConfig, joint: bool):
        super().__init__()
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.head_dim = Dh
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.norm_q, self.norm_k = _rms(Dh), _rms(Dh)
        if joint:
            self.to_out = nn.ModuleList([nn.Linear(D, D)])  # diffusers' key: to_out.0 (to_out.1 is a dropout)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
            self.norm_added_q, self.norm_added_k = _rms(Dh), _rms(Dh)
            self.to_add_out = nn.Linear(D, D)

    def qkv(self, x, proj_q, proj_k, proj_v, norm_q, norm_k):
        """(B, S, D) -> q, k (normed), v, each (B, S, H, Dh)."""
        q, k, v = (p(x).unflatten(-1, (-1, self.head_dim)) for p in (proj_q, proj_k, proj_v))
        return norm_q(q), norm_k(k), v

    def forward(self, x, rope, context=None):
        """Single: x (B, S, D) -> (B, S, D) before any projection. Joint: image x (B, N, D) and text context
        (B, L, D) -> (image out, text out), each through its own output projection."""
        q, k, v = self.qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is None:
            return attention(apply_rope(q, rope), apply_rope(k, rope), v)
        qc, kc, vc = self.qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                              self.norm_added_k)
        L = context.shape[1]
        o = attention(apply_rope(torch.cat([qc, q], 1), rope), apply_rope(torch.cat([kc, k], 1), rope),
                      torch.cat([vc, v], 1))  # (B, L+N, D)
        return self.to_out[0](o[:, L:]), self.to_add_out(o[:, :L])


def _clip_fp16(x):
    # diffusers clips fp16 activations after every block so that an overflow stays finite
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleBlock(nn.Module):
    """Double-stream block: image (norm1, ff) and text (norm1_context, ff_context) streams, joint attention."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1, self.norm1_context = AdaLayerNormZero(D), AdaLayerNormZero(D)
        self.attn = FluxAttention(cfg, joint=True)
        self.norm2, self.ff = _ln(D), FeedForward(D)
        self.norm2_context, self.ff_context = _ln(D), FeedForward(D)

    def forward(self, x, context, temb, rope):
        """x (B, N, D), context (B, L, D) -> (context, x), diffusers' order."""
        y, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        yc, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)
        o, oc = self.attn(y, rope, yc)
        x = x + gate[:, None] * o
        x = x + gate_mlp[:, None] * self.ff(self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        context = context + c_gate[:, None] * oc
        h = self.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context = context + c_gate_mlp[:, None] * self.ff_context(h)
        return _clip_fp16(context), x


class SingleBlock(nn.Module):
    """Single-stream block over the joint [text, image] sequence: attention and MLP in parallel from one
    modulated LN, one output projection over both."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm = AdaLayerNormZero(D, 3)
        self.proj_mlp = nn.Linear(D, cfg.mlp_hidden)
        self.attn = FluxAttention(cfg, joint=False)
        self.proj_out = nn.Linear(D + cfg.mlp_hidden, D)

    def forward(self, s, temb, rope):
        """s (B, L+N, D) -> (B, L+N, D)."""
        y, gate = self.norm(s, temb)
        mlp = F.gelu(self.proj_mlp(y), approximate="tanh")  # (B, L+N, 4D)
        h = torch.cat([self.attn(y, rope), mlp], dim=2)  # (B, L+N, 5D)
        return _clip_fp16(s + gate[:, None] * self.proj_out(h))


class Flux(nn.Module):
    """Flux.1 transformer. `forward` is a drop-in for `FluxTransformer2DModel.forward` in `FluxPipeline` (same
    keyword arguments); `config` (in_channels, guidance_embeds), `dtype` and `device` are there because the
    pipeline reads them."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = Embedder(256, D)
        if cfg.guidance_embeds:
            self.time_text_embed.guidance_embedder = Embedder(256, D)
        self.time_text_embed.text_embedder = Embedder(cfg.pooled_projection_dim, D)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.x_embedder = nn.Linear(cfg.in_channels, D)
        self.transformer_blocks = nn.ModuleList(DoubleBlock(cfg) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleBlock(cfg) for _ in range(cfg.num_single_layers))
        self.norm_out = AdaLayerNormContinuous(D)
        self.proj_out = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def timestep_conditioning(self, timestep, guidance, pooled_projections, dtype: torch.dtype | None = None):
        """temb (B, D) from the timestep t = sigma in [0, 1] and the guidance scale g (dev: 3.5 by default), each
        (B,) or one value, as the pipeline passes them, and the pooled CLIP embedding (B, P).

        As diffusers, t and g are rounded to `dtype` (the image tokens' dtype; None: the model's) and multiplied
        by 1000 in it before the fp32 sin-cos, so in bf16 both are bf16-rounded twice; the sin-cos is then cast to
        the pooled embedding's dtype. `guidance` must be given exactly when the config has `guidance_embeds`."""
        if (guidance is not None) != self.config.guidance_embeds:
            raise ValueError("Flux: guidance is required with guidance_embeds (dev) and refused without (schnell); "
                             f"this model has guidance_embeds={self.config.guidance_embeds}")
        dtype = dtype or self.dtype
        B = pooled_projections.shape[0]
        emb = self.time_text_embed

        def embed(embedder, value):
            v = torch.as_tensor(value, device=pooled_projections.device).reshape(-1).to(dtype) * 1000
            freq = timestep_embedding(v.expand(B) if v.numel() == 1 else v, 256)  # (B, 256) fp32, cos first
            return embedder(freq.to(pooled_projections.dtype))

        temb = embed(emb.timestep_embedder, timestep)
        if guidance is not None:
            temb = temb + embed(emb.guidance_embedder, guidance)
        return temb + emb.text_embedder(pooled_projections)  # (B, D)

    def rope(self, txt_ids, img_ids):
        """(cos, sin), each (L+N, Dh) fp32, for the joint sequence, text first. The ids are (L, 3) and (N, 3);
        a batched (1, ., 3) input, which diffusers still accepts, gives its first row."""
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        return rope_tables(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope)

    def embed(self, hidden_states, encoder_hidden_states):
        """Packed latents (B, N, C) and T5 tokens (B, L, C_txt) -> image tokens (B, N, D), text tokens (B, L, D)."""
        return self.x_embedder(hidden_states), self.context_embedder(encoder_hidden_states)

    def double_block(self, i: int, hidden_states, encoder_hidden_states, temb, rope):
        """Double block i: image (B, N, D), text (B, L, D) -> (text, image), as diffusers' blocks return them."""
        return self.transformer_blocks[i](hidden_states, encoder_hidden_states, temb, rope)

    def single_block(self, i: int, s, temb, rope):
        """Single block i on the joint sequence s = cat(text, image) (B, L+N, D). diffusers' block takes the two
        streams apart and concatenates them inside; the computation is the same."""
        return self.single_transformer_blocks[i](s, temb, rope)

    def unembed(self, hidden_states, temb):
        """The final norm and projection of the image tokens: (B, N, D) -> (B, N, p*p*C_out)."""
        return self.proj_out(self.norm_out(hidden_states, temb))

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                controlnet_single_block_samples=None, return_dict=True, controlnet_blocks_repeat=False):
        """Packed latents (B, N, C), T5 tokens (B, L, C_txt), pooled CLIP (B, P), timestep (B,) = sigma, ids
        (N, 3) and (L, 3), guidance (B,) for dev -> the predicted velocity (B, N, p*p*C_out).

        `return_dict=False` gives the 1-tuple `(out,)` the pipeline indexes; True gives the tensor itself.
        ControlNet residuals and non-empty `joint_attention_kwargs` (IP-Adapter, LoRA scale) are refused.
        """
        if joint_attention_kwargs:
            raise ValueError(f"Flux: joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported")
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise ValueError("Flux: controlnet_block_samples / controlnet_single_block_samples (ControlNet "
                             "residuals) are not supported")
        needed = dict(encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                      timestep=timestep, img_ids=img_ids, txt_ids=txt_ids)
        if any(v is None for v in needed.values()):
            raise ValueError(f"Flux: {', '.join(k for k, v in needed.items() if v is None)} required")
        x, context = self.embed(hidden_states, encoder_hidden_states)  # (B, N, D), (B, L, D)
        temb = self.timestep_conditioning(timestep, guidance, pooled_projections, x.dtype)
        rope = self.rope(txt_ids, img_ids)
        for i in range(len(self.transformer_blocks)):
            context, x = self.double_block(i, x, context, temb, rope)
        L = context.shape[1]
        s = torch.cat([context, x], dim=1)  # (B, L+N, D)
        for i in range(len(self.single_transformer_blocks)):
            s = self.single_block(i, s, temb, rope)
        out = self.unembed(s[:, L:], temb)
        return out if return_dict else (out,)


def __getattr__(name: str):
    """The checkpoint conversion's names (`flux_checkpoints.py`, beside this spec), importable from here too."""
    from . import flux_checkpoints

    try:
        return getattr(flux_checkpoints, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
