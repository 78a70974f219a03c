"""Wan 2.1 / 2.2 (video), as a readable spec in plain PyTorch.

Computes what diffusers' `WanTransformer3DModel` computes (0.42.1: models/transformers/transformer_wan.py with
`WanAttnProcessor`, `WanRotaryPosEmbed`, `WanTimeTextImageEmbedding`), checked in fp32 by tests/test_wan_model.py.
Parameter names are diffusers'. It covers text to video (Wan 2.1 1.3B / 14B, Wan 2.2 A14B's two experts, each one
such model), image to video (Wan 2.1 I2V: CLIP image tokens with their own K/V in every cross-attention) and Wan 2.2
TI2V-5B's per-token timesteps (the conditioning frame's tokens at t = 0).

One forward (D = hidden size, N = F' H' W' tokens of the (1, 2, 2)-patched latents, L = 512 text tokens):

    x = patch_embedding(latents) (B, N, D)                         a Conv3d, stride = kernel = patch
    temb = time_embedder(sinusoid(t)) (B, D), or (B, N, D) per token;  m = time_proj(SiLU(temb)) (.., 6, D)
    c = text_embedder(T5 tokens) (B, L, D)                          Linear, GELU-tanh, Linear
    [img = image_embedder(CLIP tokens)]                             LN, Linear, GELU, Linear, LN (I2V)
    block i: sh, sc, g, csh, csc, cg = table_i + m                  fp32
        x += g * attn1(LN(x)(1 + sc) + sh)     q, k RMSNorm over all of D (across heads), 3-D RoPE, SDPA
        x += attn2(LN_affine(x), c[, img])      q, k RMSNorm; text K/V [+ image K/V, summed]: no gate
        x += cg * ffn(LN(x)(1 + csc) + csh)     GELU-tanh
    out = proj_out(LN(x)(1 + sc) + sh), (sh, sc) = table + temb, unpatched to (B, C, F, H, W)

The 3-D RoPE is interleaved pairs over the head dim split (t, h, w) = (Dh - 2 (2 floor(Dh / 6)), 2 floor(Dh / 6),
2 floor(Dh / 6)), 44 / 42 / 42 at Dh 128, positions (frame, row, column) of the patched grid, theta 10000.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .dit import timestep_embedding
from .flux import apply_rope, rope_tables

TEXT_LEN = 512  # the pipelines pad umT5's tokens to 512 (with zeros, no mask)


@dataclass
class WanConfig:
    """Names and defaults are `WanTransformer3DModel`'s (Wan 2.1 14B T2V). I2V sets `image_dim` (CLIP's 1280) and
    `added_kv_proj_dim`; FLF2V also `pos_embed_seq_len`; TI2V-5B has 48 latent channels."""

    patch_size: tuple = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096  # umT5-XXL width
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.out_channels = self.out_channels or self.in_channels
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("WanConfig: image_dim and added_kv_proj_dim go together (image to video) or not at all")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """The head dim's RoPE channels per axis (frames, rows, columns), as diffusers splits them."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    @classmethod
    def from_diffusers(cls, config) -> "WanConfig":
        """From a `WanTransformer3DModel` config (`dict(module.config)` or a config.json); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(config).items() if k in names})

    def to_diffusers(self) -> dict:
        """Keyword arguments for `WanTransformer3DModel(**...)` building the same model."""
        return {**asdict(self), "patch_size": list(self.patch_size)}


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """diffusers' FP32LayerNorm: the norm in fp32 (its weight and bias too), the result in x's dtype."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


def video_rope(grid: tuple[int, int, int], cfg: WanConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (F' H' W', Dh) fp32, of the patched grid's (frame, row, column) positions (row-major)."""
    f, h, w = grid
    ids = torch.stack(torch.meshgrid(torch.arange(f, device=device), torch.arange(h, device=device),
                                     torch.arange(w, device=device), indexing="ij"), dim=-1).reshape(-1, 3)
    return rope_tables(ids, cfg.rope_axes)


def sdpa(q, k, v):
    """SDPA over (B, S, H, Dh) tensors -> (B, S, H * Dh), no mask (the text padding is attended to, as diffusers)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, Dh)
    return o.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """Self- or cross-attention with q/k RMSNorm over all heads at once (`rms_norm_across_heads`); with
    `added_kv_proj_dim`, image K/V of their own whose attention output is added to the text's."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out[1] is a Dropout: no parameters
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = None
        if added_kv_proj_dim is not None:
            self.add_k_proj, self.add_v_proj = nn.Linear(added_kv_proj_dim, dim), nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.heads, -1))  # (B, S, D) -> (B, S, H, Dh)

    def forward(self, x, context=None, rope=None, image=None) -> torch.Tensor:
        """x (B, N, D); context (B, L, D) for cross-attention (else x); rope for self-attention; image (B, I, D)."""
        source = x if context is None else context
        q = self.split(self.norm_q(self.to_q(x)))
        k = self.split(self.norm_k(self.to_k(source)))
        v = self.split(self.to_v(source))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        o = sdpa(q, k, v).type_as(q)  # (B, N, D)
        if image is not None:
            k_img = self.split(self.norm_added_k(self.add_k_proj(image)))
            o = o + sdpa(q, k_img, self.split(self.add_v_proj(image))).type_as(q)
        return self.to_out[0](o)


class FeedForward(nn.Module):
    """diffusers' FeedForward: `net.0.proj` (Linear), the activation, `net.2` (Linear)."""

    def __init__(self, dim: int, inner: int, out: int | None = None, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(inner, out or dim)])  # net.1: a Dropout
        self.net[0].proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(D, cfg.num_attention_heads, cfg.eps)
        self.attn2 = Attention(D, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim)
        self.norm2 = nn.LayerNorm(D, cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(D, cfg.ffn_dim)
        self.norm3 = nn.LayerNorm(D, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, D) / D**0.5)

    def forward(self, x, context, mod, rope, image=None) -> torch.Tensor:
        """x (B, N, D); mod (B, 6, D) or per token (B, N, 6, D): the shared time projection."""
        table = self.scale_shift_table if mod.ndim == 3 else self.scale_shift_table[None]
        sh, sc, g, csh, csc, cg = (table + mod.float()).unbind(-2)  # each (B, D) or (B, N, D), fp32
        if mod.ndim == 3:
            sh, sc, g, csh, csc, cg = (m[:, None] for m in (sh, sc, g, csh, csc, cg))
        y = (layer_norm(x.float(), self.norm1) * (1 + sc) + sh).type_as(x)
        x = (x.float() + self.attn1(y, rope=rope) * g).type_as(x)
        y = x if self.norm2 is None else layer_norm(x.float(), self.norm2).type_as(x)
        x = x + self.attn2(y, context=context, image=image)
        y = (layer_norm(x.float(), self.norm3) * (1 + csc) + csh).type_as(x)
        return (x.float() + self.ffn(y).float() * cg).type_as(x)


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> D: FP32 LayerNorm, Linear, GELU (erf), Linear, FP32 LayerNorm (FLF2V adds positions)."""

    def __init__(self, in_features: int, out_features: int, pos_embed_seq_len: int | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(in_features), nn.LayerNorm(out_features)
        self.ff = FeedForward(in_features, in_features, out_features, approximate="none")
        self.pos_embed = None if pos_embed_seq_len is None else \
            nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_features))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # first and last frame: their tokens side by side
            image = image.view(-1, 2 * image.shape[1], image.shape[2]) + self.pos_embed
        return layer_norm(self.ff(layer_norm(image, self.norm1)), self.norm2)


class Wan(nn.Module):
    """The Wan DiT. `forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
    return_dict=True)` takes the keyword arguments WanPipeline passes its transformer: latents (B, C, F, H, W),
    timesteps (B,) or per token (B, F' H' W'), the padded umT5 tokens (B, 512, text_dim) and for I2V the CLIP image
    tokens.
    `return_dict=False` gives the 1-tuple `(out,)` the pipeline indexes; True gives the tensor itself."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, D, cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = nn.Module()
        emb = self.condition_embedder
        emb.time_embedder = nn.Module()
        emb.time_embedder.linear_1, emb.time_embedder.linear_2 = nn.Linear(cfg.freq_dim, D), nn.Linear(D, D)
        emb.time_proj = nn.Linear(D, 6 * D)
        emb.text_embedder = nn.Module()
        emb.text_embedder.linear_1, emb.text_embedder.linear_2 = nn.Linear(cfg.text_dim, D), nn.Linear(D, D)
        emb.image_embedder = None if cfg.image_dim is None else \
            ImageEmbedding(cfg.image_dim, D, cfg.pos_embed_seq_len)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(D, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(D, cfg.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, D) / D**0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def conditioning(self, timestep, text, image=None):
        """(temb (B, D) or (B, N, D), m (.., 6, D), text (B, L, D), image (B, I, D) or None): every step's
        conditioning, from the timesteps (per sample or per token), the text and the image tokens."""
        emb = self.condition_embedder
        t = timestep_embedding(timestep.flatten(), self.config.freq_dim).unflatten(0, timestep.shape)
        te = emb.time_embedder
        temb = te.linear_2(F.silu(te.linear_1(t.to(te.linear_1.weight.dtype)))).type_as(text)
        m = emb.time_proj(F.silu(temb)).unflatten(-1, (6, -1))
        tx = emb.text_embedder
        text = tx.linear_2(F.gelu(tx.linear_1(text), approximate="tanh"))
        return temb, m, text, None if image is None else emb.image_embedder(image)

    def embed(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Latents (B, C, F, H, W) -> the token stream (B, F' H' W', D) and the patched grid (F', H', W')."""
        pt, ph, pw = self.config.patch_size
        _, _, f, h, w = hidden_states.shape
        return self.patch_embedding(hidden_states).flatten(2).transpose(1, 2), (f // pt, h // ph, w // pw)

    def unembed(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The modulated output norm and projection, unpatched: (B, N, D) -> (B, C_out, F, H, W)."""
        table = self.scale_shift_table if temb.ndim == 2 else self.scale_shift_table[None]
        sh, sc = (table + temb.unsqueeze(-2)).unbind(-2)
        if temb.ndim == 2:
            sh, sc = sh[:, None], sc[:, None]
        x = (layer_norm(x.float(), self.norm_out) * (1 + sc) + sh).type_as(x)
        B, patch = x.shape[0], self.config.patch_size
        out = self.proj_out(x).reshape(B, *grid, *patch, -1)  # (B, F', H', W', pt, ph, pw, C)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', pt, H', ph, W', pw)
        return out.reshape(B, -1, *(g * p for g, p in zip(grid, patch)))

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict: bool = True, attention_kwargs=None):
        x, grid = self.embed(hidden_states)  # (B, N, D)
        rope = video_rope(grid, self.config, hidden_states.device)
        temb, m, text, image = self.conditioning(timestep, encoder_hidden_states, encoder_hidden_states_image)
        for block in self.blocks:
            x = block(x, text, m, rope, image)
        out = self.unembed(x, temb, grid)
        return out if return_dict else (out,)
