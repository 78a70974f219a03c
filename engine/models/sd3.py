"""Stable Diffusion 3 / 3.5's MMDiT, as a readable spec in plain PyTorch.

Computes what diffusers' `SD3Transformer2DModel` computes (0.42.1: models/transformers/transformer_sd3.py, its
`JointTransformerBlock` in models/attention.py and `JointAttnProcessor2_0` in models/attention_processor.py),
checked in fp32 by tests/test_sd3_model.py. Parameter names are diffusers'; SAI's original checkpoints
(`joint_blocks.N.x_block.attn.qkv`, ...) go through the key map at the end of this file.

One forward (D = hidden size, N = image tokens, L = text tokens; LN = LayerNorm without affine, eps 1e-6):

    temb = t_emb(sincos(t)) + pooled_proj(pooled)                 (B, D)     t = 1000 sigma
    c    = context_embedder(text)                                 (B, L, D)
    x    = conv_pxp(latent) + sincos table cropped to the grid    (B, N, D)
    block i: sh1, sc1, g1, sh2, sc2, g2 [, sh3, sc3, g3] = norm1(temb)         dual-attention layers: 9 chunks
             ch1, cs1, cg1, ch2, cs2, cg2 = norm1_context(temb)      last block: cs, ch (scale first)
        o, oc = attention over [x rows; c rows] of (LN(x)(1 + sc1) + sh1, LN(c)(1 + cs1) + ch1)
                each stream its own q, k, v (SD3.5: per-head q/k RMSNorm) and output projection; no mask
        x += g1 * o  [+ g3 * self_attn(LN(x_in)(1 + sc3) + sh3)]   the second attention reuses the block input's LN
        x += g2 * ff(LN(x)(1 + sc2) + sh2)
        c += cg1 * oc;  c += cg2 * ff_context(LN(c)(1 + cs2) + ch2)       not in the last block
    out = unpatchify(proj_out(LN(x)(1 + sc) + sh)), sc, sh = norm_out(temb) (scale first)

Every modulation vector depends on (t, pooled prompt) only and the text projection on the prompt only, so a fast
path precomputes `timestep_conditioning`, every block's `modulation` and `context`; the text stream is modulated
by t and rewritten in every block, so its K/V are not step-invariant. A step cache can stand in for `block(i, ...)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .ace_step import RMSNorm
from .dit import timestep_embedding
from .pixart import pixart_pos_embed

_EPS = 1e-6  # every LayerNorm and the q/k RMSNorms


@dataclass
class SD3Config:
    """Names and defaults are `SD3Transformer2DModel`'s. SD3-medium: 24 layers of 24 x 64, patch 2,
    `caption_projection_dim` 1536, `pos_embed_max_size` 192; SD3.5 adds `qk_norm="rms_norm"` and, for medium,
    `dual_attention_layers` 0..12. `out_channels=None` means `in_channels`, as in diffusers."""

    sample_size: int = 128  # latent side at training: the position table's base size (sample_size / patch_size)
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # width of the text tokens context_embedder reads
    caption_projection_dim: int = 1152  # its output: the text stream's width, the hidden size
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96  # side of the stored table, cropped around its centre to each grid
    dual_attention_layers: tuple = ()
    qk_norm: str | None = None

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        D = self.hidden_size
        for bad, why in (
            (self.qk_norm not in (None, "rms_norm"),
             f"qk_norm={self.qk_norm!r} is not implemented (only None or 'rms_norm', as SD3 and SD3.5 use)"),
            (self.caption_projection_dim != D,
             f"caption_projection_dim={self.caption_projection_dim} must equal the hidden size {D} "
             "(num_attention_heads * attention_head_dim): the text stream runs through the blocks at that width"),
            (not self.pos_embed_max_size, "pos_embed_max_size must be set (SD3's cropped position table)"),
            (D % 4, f"the 2-D sin-cos position table needs a hidden size divisible by 4, got {D}"),
            (any(not 0 <= i < self.num_layers for i in self.dual_attention_layers),
             f"dual_attention_layers {self.dual_attention_layers} name layers outside 0..{self.num_layers - 1}"),
        ):
            if bad:
                raise ValueError(f"SD3Config: {why}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim  # diffusers' inner_dim

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config) -> "SD3Config":
        """From an `SD3Transformer2DModel` config (`dict(module.config)` or a config.json); keys it does not
        know (`_class_name`, `_diffusers_version`) are ignored, missing ones take diffusers' defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(config).items() if k in names})

    def to_diffusers(self) -> dict:
        """Keyword arguments for `SD3Transformer2DModel(**...)` building the same model."""
        return asdict(self)


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=_EPS)  # no affine: every LN here is modulated afterwards


class PatchEmbed(nn.Module):
    """Conv2d(k = stride = p) plus the fixed sin-cos table. The (M*M, D) table spans the training grid
    (base size sample_size / p) over M = pos_embed_max_size rows and columns, and each grid takes its centre
    crop. diffusers keeps it as a persistent buffer, so checkpoints carry it and it loads with them."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        D, p, M = cfg.hidden_size, cfg.patch_size, cfg.pos_embed_max_size
        self.patch_size, self.max_size = p, M
        self.proj = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        self.register_buffer("pos_embed", pixart_pos_embed(D, M, M, cfg.sample_size // p)[None])  # (1, M*M, D)

    def cropped_pos_embed(self, h: int, w: int):
        """The table's centre (h, w) crop, row-major: (1, h*w, D)."""
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"SD3: a {h} x {w} token grid exceeds pos_embed_max_size={self.max_size}")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        return table.reshape(1, h * w, -1)

    def forward(self, latent):
        p = self.patch_size
        x = self.proj(latent).flatten(2).transpose(1, 2)  # (B, N, D)
        return (x + self.cropped_pos_embed(latent.shape[-2] // p, latent.shape[-1] // p)).to(x.dtype)


class SiLUMLP(nn.Module):
    """Linear, SiLU, Linear: diffusers' `TimestepEmbedding` and the SiLU `PixArtAlphaTextProjection`."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """temb = timestep_embedder(256 sin-cos frequencies, cat[cos, sin] over /128) + text_embedder(pooled)."""

    def __init__(self, D: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder, self.text_embedder = SiLUMLP(256, D), SiLUMLP(pooled_dim, D)

    def forward(self, t, pooled):
        freq = timestep_embedding(t, 256).to(pooled.dtype)  # computed in fp32, cast as diffusers does
        return self.timestep_embedder(freq) + self.text_embedder(pooled)  # (B, D)


class Modulation(nn.Module):
    """The adaLN projection Linear(SiLU(temb)) -> (B, n, D); the chunk order is read at each call site."""

    def __init__(self, D: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(D, n * D)

    def forward(self, temb):
        return self.linear(F.silu(temb)).unflatten(1, (self.n, -1))


class FeedForward(nn.Module):
    """Linear(D, 4D), GELU-tanh, Linear(4D, D), under diffusers' keys net.0.proj and net.2 (net.1: dropout)."""

    def __init__(self, D: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(4 * D, D)])
        self.net[0].proj = nn.Linear(D, 4 * D)

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class Attention(nn.Module):
    """Image-stream q, k, v and output projections; with `joint`, the text stream's as well (add_*_proj,
    to_add_out), attended together as one sequence [image; text]. SD3.5: q and k RMS-normed per head."""

    def __init__(self, cfg: SD3Config, joint: bool, context_out: bool = True):
        super().__init__()
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.heads = cfg.num_attention_heads
        rms = cfg.qk_norm == "rms_norm"
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])  # diffusers' key: to_out.0
        self.norm_q = RMSNorm(Dh, _EPS) if rms else None
        self.norm_k = RMSNorm(Dh, _EPS) if rms else None
        self.joint = joint
        if joint:
            # The last block (context_out False) discards the text rows of the output; its add_q_proj and
            # norm_added_q are in every checkpoint but serve no output, so only the image queries are computed.
            self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
            self.to_add_out = nn.Linear(D, D) if context_out else None
            self.norm_added_q = RMSNorm(Dh, _EPS) if rms else None
            self.norm_added_k = RMSNorm(Dh, _EPS) if rms else None

    def split(self, t, norm=None):
        """(B, T, H*Dh) -> (B, H, T, Dh), then the per-head norm if any."""
        t = t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return t if norm is None else norm(t)

    def forward(self, x, c=None):
        """x (B, N, D) [, c (B, L, D)] -> the image rows' output (B, N, D) [and the text rows' or None]."""
        B, N, _ = x.shape
        q, k, v = self.split(self.to_q(x), self.norm_q), self.split(self.to_k(x), self.norm_k), self.split(self.to_v(x))
        if self.joint:
            text_out = self.to_add_out is not None
            if text_out:  # image rows first, as diffusers concatenates
                q = torch.cat([q, self.split(self.add_q_proj(c), self.norm_added_q)], dim=2)
            k = torch.cat([k, self.split(self.add_k_proj(c), self.norm_added_k)], dim=2)
            v = torch.cat([v, self.split(self.add_v_proj(c))], dim=2)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N [+ L], Dh), no mask
        o = o.transpose(1, 2).reshape(B, q.shape[2], -1)
        if not self.joint:
            return self.to_out[0](o)
        return self.to_out[0](o[:, :N]), (self.to_add_out(o[:, N:]) if text_out else None)


class JointBlock(nn.Module):
    """MMDiT block: each stream its own adaLN-Zero, LN and FF; one attention over both. The last block
    (`context_pre_only`) only reads the text: a 2-chunk (scale, shift) norm, no text output, FF or update."""

    def __init__(self, cfg: SD3Config, i: int):
        super().__init__()
        D = cfg.hidden_size
        self.context_pre_only = i == cfg.num_layers - 1
        self.use_dual_attention = i in cfg.dual_attention_layers
        self.norm1 = Modulation(D, 9 if self.use_dual_attention else 6)
        self.norm1_context = Modulation(D, 2 if self.context_pre_only else 6)
        self.attn = Attention(cfg, joint=True, context_out=not self.context_pre_only)
        self.attn2 = Attention(cfg, joint=False) if self.use_dual_attention else None
        self.ff = FeedForward(D)
        self.ff_context = None if self.context_pre_only else FeedForward(D)

    def modulation(self, temb):
        """(image (B, 6 | 9, D), text (B, 6 | 2, D)): depend on temb only."""
        return self.norm1(temb), self.norm1_context(temb)

    def forward(self, x, c, modulation):
        """x (B, N, D), c (B, L, D) -> (x, c); c is None after the last block."""
        mx, mc = modulation
        sh1, sc1, g1, sh2, sc2, g2, *second = mx.chunk(mx.shape[1], dim=1)  # (B, 1, D) each
        if self.context_pre_only:
            cs1, ch1 = mc.chunk(2, dim=1)  # AdaLayerNormContinuous: scale first
        else:
            ch1, cs1, cg1, ch2, cs2, cg2 = mc.chunk(6, dim=1)
        nx = layer_norm(x)
        o, oc = self.attn(nx * (1 + sc1) + sh1, layer_norm(c) * (1 + cs1) + ch1)
        x = x + g1 * o
        if self.use_dual_attention:
            sh3, sc3, g3 = second
            x = x + g3 * self.attn2(nx * (1 + sc3) + sh3)  # LN of the block input, not of the updated x
        x = x + g2 * self.ff(layer_norm(x) * (1 + sc2) + sh2)
        if self.context_pre_only:
            return x, None
        c = c + cg1 * oc
        return x, c + cg2 * self.ff_context(layer_norm(c) * (1 + cs2) + ch2)


class SD3(nn.Module):
    """SD3 / SD3.5 MMDiT. `forward` is a drop-in for `SD3Transformer2DModel.forward` in
    `StableDiffusion3Pipeline` (same keyword arguments); `config` (sample_size, patch_size, in_channels,
    joint_attention_dim), `dtype` and `device` are there because the pipeline reads them."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.config = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(D, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm_out = Modulation(D, 2)
        self.proj_out = nn.Linear(D, p * p * cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.context_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.context_embedder.weight.device

    def timestep_conditioning(self, timestep, pooled_projections):
        """temb (B, D) from timesteps (B,) (or one, broadcast) and the pooled CLIP embeddings (B, P)."""
        t = torch.as_tensor(timestep, device=pooled_projections.device).reshape(-1)
        return self.time_text_embed(t.expand(pooled_projections.shape[0]), pooled_projections)

    def context(self, encoder_hidden_states):
        """Text tokens (B, L, joint_attention_dim) -> the text stream (B, L, D)."""
        return self.context_embedder(encoder_hidden_states)

    def embed(self, hidden_states):
        """Latents (B, C, H, W) -> tokens (B, N, D), row-major over the (H/p, W/p) grid."""
        p = self.config.patch_size
        if hidden_states.shape[-2] % p or hidden_states.shape[-1] % p:
            raise ValueError(f"SD3: latent size {tuple(hidden_states.shape[-2:])} is not a multiple of the patch "
                             f"size {p}")
        return self.pos_embed(hidden_states)

    def block(self, i: int, x, c, temb):
        blk = self.transformer_blocks[i]
        return blk(x, c, blk.modulation(temb))

    def unembed(self, x, temb, grid: tuple[int, int]):
        """Final norm, proj_out, unpatchify: (B, N, D) -> (B, C_out, H, W); `grid` is (H/p, W/p)."""
        B = x.shape[0]
        (h, w), p, C = grid, self.config.patch_size, self.config.out_channels
        scale, shift = self.norm_out(temb).chunk(2, dim=1)  # scale first
        x = self.proj_out(layer_norm(x) * (1 + scale) + shift).reshape(B, h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * p, w * p)

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True,
                skip_layers=None):
        """latents (B, C, H, W), text tokens (B, L, joint_attention_dim), pooled (B, P), timesteps (B,)
        (1000 sigma) -> the predicted velocity (B, C_out, H, W).

        `return_dict=False` gives the 1-tuple `(out,)` the pipeline indexes; True gives the tensor itself.
        ControlNet residuals, skip-layer guidance's `skip_layers` and `joint_attention_kwargs` (IP-Adapter, LoRA
        scale) are refused."""
        for name, value in (("block_controlnet_hidden_states", block_controlnet_hidden_states),
                            ("skip_layers", skip_layers), ("joint_attention_kwargs", joint_attention_kwargs or None)):
            if value is not None:
                raise ValueError(f"SD3: {name} is not supported")
        if encoder_hidden_states is None or pooled_projections is None or timestep is None:
            raise ValueError("SD3: encoder_hidden_states, pooled_projections and timestep are required")
        p = self.config.patch_size
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        x = self.embed(hidden_states)  # (B, N, D)
        temb = self.timestep_conditioning(timestep, pooled_projections)  # (B, D)
        c = self.context(encoder_hidden_states)  # (B, L, D)
        for i in range(len(self.transformer_blocks)):
            x, c = self.block(i, x, c, temb)
        out = self.unembed(x, temb, grid)
        return out if return_dict else (out,)


def __getattr__(name: str):
    """The checkpoint conversion's names (`sd3_checkpoints.py`, beside this spec), importable from here too."""
    from . import sd3_checkpoints

    try:
        return getattr(sd3_checkpoints, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
