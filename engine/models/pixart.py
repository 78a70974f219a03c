"""PixArt-α / PixArt-Σ, as a readable spec in plain PyTorch.

Computes what diffusers' `PixArtTransformer2DModel` computes (0.42.1: models/transformers/pixart_transformer_2d.py,
the "ada_norm_single" branch of models/attention.py's `BasicTransformerBlock`), checked in fp32 by
tests/test_pixart_model.py. Parameter names are the original PixArt-alpha repo's (diffusion/model/nets/PixArt.py,
PixArtMS.py, PixArt_blocks.py), as engine/models/dit.py uses facebookresearch/DiT's: an original `.pth` loads as it is,
and self-attention `qkv` (rows q; k; v) and cross-attention `kv_linear` (rows k; v) are packed the way the fast path
reads them. diffusers checkpoints go through the explicit key map at the end of this file.

One forward (D = hidden size, T = image tokens, L = text tokens):

    emb = t_emb(t) [+ cat(size_emb(h), size_emb(w), ar_emb(h/w))]  (B, D)   micro-conditions: α-1024 only
    t6  = t_block(emb) = Linear(SiLU(emb))                         (B, 6D)  shared by every block (adaLN-single)
    c   = y_proj(T5 tokens)                                        (B, L, D)
    x   = patch_embed(latent) + sincos(grid / interpolation)       (B, T, D)
    block i: sh1, sc1, g1, sh2, sc2, g2 = table_i + t6.view(B, 6, D)
        x += g1 * self_attn(LN(x)(1 + sc1) + sh1)
        x += cross_attn(q = x, kv = c, bias = (1 - mask) * -10000)  no norm before it, no gate
        x += g2 * mlp(LN(x)(1 + sc2) + sh2)
    out = unpatchify(linear(LN(x)(1 + sc) + sh)), sh, sc = table_out + emb (shift first; raw emb, no linear)

So `timestep_conditioning` depends on t (and the micro-conditions) only, `caption` and every block's
`cross_attn.kv` on the prompt only, `embed` on the latent only: a fast path precomputes the first two, and a step
cache can stand in for `block(i, ...)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .dit import timestep_embedding

_GELU = {"gelu-approximate": "tanh", "gelu": "none"}  # diffusers activation_fn -> F.gelu(approximate=)


@dataclass
class PixArtConfig:
    """Names and defaults are `PixArtTransformer2DModel`'s (XL/2; the hub configs set `caption_channels=4096`).
    As in diffusers, `out_channels=None` means `in_channels`, `interpolation_scale=None` max(sample_size // 64, 1)
    and `use_additional_conditions=None` `sample_size == 128` (α-1024's micro-conditions), resolved on construction."""

    sample_size: int = 128  # latent height = width at training: the position grid's base size
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = 8  # 2 * in_channels: eps, then the learned variance
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    cross_attention_dim: int = 1152  # width of the tokens kv_linear reads (D when captions are projected)
    caption_channels: int | None = None  # T5 width (4096); None: the text goes to kv_linear unprojected
    attention_bias: bool = True  # bias on q, k, v (the output projections always have one)
    activation_fn: str = "gelu-approximate"
    norm_eps: float = 1e-6  # the block LayerNorms; the final one is always 1e-6
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.interpolation_scale is None:
            self.interpolation_scale = max(self.sample_size // 64, 1)
        if self.use_additional_conditions is None:
            self.use_additional_conditions = self.sample_size == 128
        D = self.hidden_size
        for bad, why in (
            (self.activation_fn not in _GELU, f"activation_fn={self.activation_fn!r} is not implemented (only "
                                              f"{' or '.join(map(repr, _GELU))})"),
            (self.caption_channels is not None and self.cross_attention_dim != D,
             f"cross_attention_dim={self.cross_attention_dim} must equal the hidden size {D} when captions are "
             f"projected (caption_channels={self.caption_channels})"),
            (self.use_additional_conditions and D % 3, f"use_additional_conditions needs a hidden size divisible "
                                                       f"by 3, got {D}"),
            (D % 4, f"the 2-D sin-cos position embedding needs a hidden size divisible by 4, got {D}"),
        ):
            if bad:
                raise ValueError(f"PixArtConfig: {why}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim  # diffusers' inner_dim

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @property
    def grid_size(self) -> int:
        return self.sample_size // self.patch_size  # also the position embedding's base size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2  # at the training resolution; other latent sizes give other counts

    @property
    def mlp_hidden(self) -> int:
        return 4 * self.hidden_size

    @classmethod
    def from_diffusers(cls, config) -> "PixArtConfig":
        """From a `PixArtTransformer2DModel` config (`dict(module.config)` or a config.json). Missing keys take
        diffusers' defaults and keys it does not know are ignored, as diffusers does; so are `dropout` (eval),
        `upcast_attention` (diffusers' default AttnProcessor2_0 ignores it), `num_embeds_ada_norm` and
        `norm_num_groups` (unused). An option the spec does not implement raises a ValueError naming it."""
        config = dict(config)
        fixed = {"norm_type": "ada_norm_single", "norm_elementwise_affine": False, "attention_type": "default"}
        for key, value in fixed.items():
            if key in config and config[key] != value:
                raise ValueError(f"PixArtConfig.from_diffusers: {key}={config[key]!r} is not implemented "
                                 f"(only {value!r})")
        if "cross_attention_dim" in config and config["cross_attention_dim"] is None:
            raise ValueError("PixArtConfig.from_diffusers: cross_attention_dim=None (no cross-attention) is not "
                             "implemented")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_diffusers(self) -> dict:
        """Keyword arguments for `PixArtTransformer2DModel(**...)` building the same model."""
        return {**asdict(self), "norm_type": "ada_norm_single", "norm_elementwise_affine": False}


def pixart_pos_embed(dim: int, h: int, w: int, base_size: int, interpolation_scale: float = 1.0, device=None):
    """The fixed 2-D sin-cos table (h*w, dim), diffusers' `get_2d_sincos_pos_embed` step for step.

    Each axis runs over `arange(n) / (n / base_size) / interpolation_scale` (float32), so every grid spans the
    training grid's range. The first dim/2 channels encode the column (w), the rest the row, each `cat[sin, cos]`
    over dim/4 frequencies in float64 (the MAE layout, as in DiT).
    """
    grid_h = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / interpolation_scale
    grid_w = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / interpolation_scale
    cols, rows = torch.meshgrid(grid_w, grid_h, indexing="xy")  # each (h, w); cols[i, j] = grid_w[j]

    def embed_1d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64, device=device) / (d / 2.0))
        out = torch.outer(pos.reshape(-1).double(), omega)  # (h*w, d/2)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(dim // 2, cols), embed_1d(dim // 2, rows)], dim=1).float()  # (h*w, dim)


def encoder_mask_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """diffusers' cross-attention mask: a (B, L) keep-mask (1 keep, 0 padding) becomes the score bias
    `(1 - mask) * -10000` in `dtype`, shaped (B, 1, 1, L) to broadcast over heads and queries; a 3-D input is a
    bias already (B, 1, L), as diffusers reads it. Only keys are masked; with right padding the valid keys are a
    prefix, so per-row kv lengths reproduce this up to exp(-10000) = 0."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = ((1 - mask.to(dtype)) * -10000.0)[:, None]  # (B, 1, L)
    if mask.ndim != 3:
        raise ValueError(f"encoder_attention_mask: expected a (B, L) mask or a (B, 1, L) bias, got "
                         f"{tuple(mask.shape)}")
    return mask.to(dtype)[:, None]  # (B, 1, 1, L)


class Mlp(nn.Module):
    """Linear, GELU, Linear (timm's names): the block MLP, and the caption projection `y_embedder.y_proj`."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, approximate: str = "tanh"):
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out), approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class TimestepEmbedder(nn.Module):
    """256 frequencies `cat[cos, sin]` over /128 (diffusers' downscale_freq_shift=0, not DiT-diffusers' /127),
    then Linear, SiLU, Linear. The size embedders (resolution, aspect ratio) are the same with a narrower output."""

    def __init__(self, d_out: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_out), nn.SiLU(), nn.Linear(d_out, d_out))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # (N, d_out)


class Attention(nn.Module):
    """Self-attention from one packed qkv projection (rows q; k; v); SDPA, scale 1/sqrt(Dh)."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    """Image queries against the text tokens; k and v from one packed projection (rows k; v)."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.num_heads, D = cfg.num_attention_heads, cfg.hidden_size
        self.q_linear = nn.Linear(D, D, bias=cfg.attention_bias)
        self.kv_linear = nn.Linear(cfg.cross_attention_dim, 2 * D, bias=cfg.attention_bias)
        self.proj = nn.Linear(D, D)

    def kv(self, context):
        """(B, L, 2, H, Dh): depends on the prompt only, so it can be computed once for all steps."""
        return self.kv_linear(context).reshape(*context.shape[:2], 2, self.num_heads, -1)

    def forward(self, x, kv, bias=None):
        B, T, D = x.shape
        q = self.q_linear(x).reshape(B, T, self.num_heads, -1).transpose(1, 2)  # (B, H, T, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # bias (B, 1, 1, L) or None
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


class PixArtBlock(nn.Module):
    """adaLN-single block: the shared t6 plus this block's learned (6, D) table give its six modulations."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = Mlp(D, cfg.mlp_hidden, D, _GELU[cfg.activation_fn])
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)

    def modulation(self, t6):
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, 1, D)."""
        return (self.scale_shift_table[None] + t6.reshape(t6.shape[0], 6, -1)).chunk(6, dim=1)

    def forward(self, x, t6, kv, bias=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t6)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.cross_attn(x, kv, bias)  # reads the un-normalised x: no norm and no gate here
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x  # (B, T, D)


class FinalLayer(nn.Module):
    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)

    def forward(self, x, emb):
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # shift first, (B, 1, D)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)  # (B, T, p*p*C_out)


class PixArt(nn.Module):
    """PixArt-α / Σ denoiser. `forward` is a drop-in for `PixArtTransformer2DModel.forward` in the diffusers
    pipelines (same arguments, same order); `config` (sample_size, in_channels, out_channels), `dtype` and `device`
    are there because the pipelines read them."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(cfg.in_channels, D, cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        if cfg.use_additional_conditions:
            self.csize_embedder = TimestepEmbedder(D // 3)  # h and w, each -> D/3
            self.ar_embedder = TimestepEmbedder(D // 3)  # h / w -> D/3
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = None
        if cfg.caption_channels is not None:
            self.y_embedder = nn.Module()
            self.y_embedder.y_proj = Mlp(cfg.caption_channels, D, D, "tanh")
        self.blocks = nn.ModuleList(PixArtBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layer = FinalLayer(cfg)
        g = cfg.grid_size
        self.register_buffer("pos_embed", pixart_pos_embed(D, g, g, g, cfg.interpolation_scale, device="cpu")[None],
                             persistent=False)  # (1, T, D) at the training grid, on the CPU even when built on meta

    @property
    def dtype(self) -> torch.dtype:
        return self.t_block[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.t_block[1].weight.device

    def timestep_conditioning(self, timestep, added_cond_kwargs=None, batch: int | None = None):
        """(emb (B, D) for the final layer, t6 (B, 6D) shared by the blocks); a 1-element timestep is broadcast
        to `batch`. With micro-conditions `added_cond_kwargs` carries "resolution" (B, 2), the image [h, w] in
        pixels, and "aspect_ratio" (B, 1), h / w, as the α pipeline passes them."""
        t = torch.as_tensor(timestep, device=self.device).reshape(-1)
        if batch is not None and t.numel() == 1:
            t = t.expand(batch)
        emb = self.t_embedder(t)  # (B, D)
        if self.config.use_additional_conditions:
            res, ar = (added_cond_kwargs or {}).get("resolution"), (added_cond_kwargs or {}).get("aspect_ratio")
            if res is None or ar is None:
                raise ValueError("this PixArt uses micro-conditions (use_additional_conditions): pass added_cond_"
                                 "kwargs={'resolution': (B, 2) [h, w] in pixels, 'aspect_ratio': (B, 1) h / w}")
            B = emb.shape[0]
            emb = emb + torch.cat([self.csize_embedder(res.flatten()).reshape(B, -1),  # (B, 2D/3): h, then w
                                   self.ar_embedder(ar.flatten()).reshape(B, -1)], dim=1)  # (B, D/3)
        return emb, self.t_block(emb)

    def caption(self, encoder_hidden_states):
        """The tokens every cross-attention reads (B, L, D); the raw text when there is no caption projection."""
        if self.y_embedder is None:
            return encoder_hidden_states
        B = encoder_hidden_states.shape[0]
        return self.y_embedder.y_proj(encoder_hidden_states).reshape(B, -1, self.config.hidden_size)

    def embed(self, hidden_states):
        """Latents (B, C, H, W) -> tokens (B, T, D), row-major over the (H/p, W/p) grid."""
        cfg = self.config
        h, w = hidden_states.shape[-2] // cfg.patch_size, hidden_states.shape[-1] // cfg.patch_size
        x = self.x_embedder.proj(hidden_states).flatten(2).transpose(1, 2)  # (B, T, D)
        if (h, w) == (cfg.grid_size, cfg.grid_size):
            pos = self.pos_embed
        else:  # other resolutions and aspect ratios (multi-scale models): the same span, another spacing
            pos = pixart_pos_embed(cfg.hidden_size, h, w, cfg.grid_size, cfg.interpolation_scale, x.device)[None]
        return (x + pos).to(x.dtype)  # the table stays fp32 until the sum, as in diffusers

    def block(self, i: int, x, t6, context, bias=None):
        """Block i on tokens x (B, T, D); context (B, L, Dc) from `caption`, bias from `encoder_mask_bias`."""
        blk = self.blocks[i]
        return blk(x, t6, blk.cross_attn.kv(context), bias)

    def unembed(self, x, emb, grid: tuple[int, int] | None = None):
        """Final layer, unpatchify: (B, T, D) -> (B, C_out, H, W); `grid` is (H/p, W/p), square by default."""
        B, T, _ = x.shape
        h, w = grid if grid is not None else (round(T**0.5),) * 2
        p, c = self.config.patch_size, self.config.out_channels
        x = self.final_layer(x, emb).reshape(B, h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, h * p, w * p)

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None, return_dict=True):
        """latents (B, C, H, W), text tokens (B, L, C_cap), timesteps (B,) -> model output (B, C_out, H, W).

        The return is diffusers' where the pipelines need it and the tensor elsewhere: `return_dict=False` gives
        the 1-tuple `(out,)`, because the PixArt-α/Σ pipelines call `transformer(..., return_dict=False)[0]` (a
        bare tensor there would index the batch); `return_dict=True` (the default) gives the tensor itself, not a
        `Transformer2DModelOutput`, so `model(...)` is the output as for `ditengine.DiT`. Code written for
        diffusers' `.sample` should pass `return_dict=False` and take `[0]`, which works with both.

        `encoder_attention_mask`: (B, L) 1 keep / 0 pad, a (B, 1, L) bias, or None (every key valid).
        `attention_mask` (a self-attention mask) and non-empty `cross_attention_kwargs` are refused: the
        pipelines never pass them.
        """
        if attention_mask is not None:
            raise ValueError("PixArt: attention_mask (a self-attention key mask) is not supported; the PixArt "
                             "pipelines pass encoder_attention_mask only")
        if cross_attention_kwargs:
            raise ValueError(f"PixArt: cross_attention_kwargs {sorted(cross_attention_kwargs)} are not supported")
        if encoder_hidden_states is None or timestep is None:
            raise ValueError("PixArt: encoder_hidden_states and timestep are required")
        p = self.config.patch_size
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        bias = encoder_mask_bias(encoder_attention_mask, hidden_states.dtype)  # (B, 1, 1, L) or None
        x = self.embed(hidden_states)  # (B, T, D)
        emb, t6 = self.timestep_conditioning(timestep, added_cond_kwargs, hidden_states.shape[0])
        context = self.caption(encoder_hidden_states)  # (B, L, D)
        for i in range(len(self.blocks)):
            x = self.block(i, x, t6, context, bias)
        out = self.unembed(x, emb, grid)
        return out if return_dict else (out,)


def __getattr__(name: str):
    """The checkpoint conversion's names (`pixart_checkpoints.py`, beside this spec), importable from here too."""
    from . import pixart_checkpoints

    try:
        return getattr(pixart_checkpoints, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
