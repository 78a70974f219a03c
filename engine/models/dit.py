"""The DiT, as a readable spec in plain PyTorch.

Parameter names and semantics follow facebookresearch/DiT (`models.py`), so its checkpoints load as they
are. Nothing here is tuned for speed: the fast path (`ditengine.fast.dit`) reads these same parameters and
applies fused kernels from outside. The default initialisation is PyTorch's (every output path is live,
which the tests rely on); `initialize_weights()` gives the paper's (zeroed adaLN and output layers) for
training.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configs import DiTConfig


def timestep_embedding(t: torch.Tensor, dim: int = 256, freq_shift: int = 0, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps: `cat[cos, sin]`, shape (B, dim).

    facebookresearch/DiT divides the frequency exponent by dim/2 (`freq_shift=0`); diffusers by
    dim/2 - 1 (`freq_shift=1`).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (T, dim), computed in float64 like the original.

    The first half of the channels encodes the column, the second half the row; each half is
    `cat[sin, cos]` over dim/4 frequencies.
    """

    def embed_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (T, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid_size, dtype=np.float32)
    cols, rows = np.meshgrid(coords, coords)  # cols varies along the row, as in the original
    table = np.concatenate([embed_1d(dim // 2, cols), embed_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, T, D)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.freq_dim, self.freq_shift = cfg.frequency_embedding_size, cfg.timestep_freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(self.freq_dim, cfg.hidden_size), nn.SiLU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)
        )

    def forward(self, t):
        freqs = timestep_embedding(t, self.freq_dim, self.freq_shift)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null label `num_classes`, for classifier-free guidance.
    (Training drops labels to the null label itself; see `ditengine.train`.)"""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.hidden_size)

    def forward(self, y):
        return self.embedding_table(y)  # (B, D)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.use_sdpa = True  # False: the explicit softmax(q k^T / sqrt(d)) v, for the benchmark's eager baseline

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, Dh)
        if self.use_sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, T)
            o = attn.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulation (shift, scale, gate) x (attention, MLP) from the conditioning c."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=cfg.mlp_norm_eps)
        self.mlp = Mlp(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, T, D)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


class DiT(nn.Module):
    """Diffusion transformer: `forward(x, t, y)` maps latents (B, C, H, W), timesteps (B,) and labels (B,)
    to the model output (B, C_out, H, W): the noise (or v / velocity) prediction, then, when
    `learn_sigma`, the variance interpolation channels."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = LabelEmbedder(cfg)
        grid = cfg.input_size // cfg.patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.hidden_size, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def initialize_weights(self):
        """The paper's initialisation: Xavier linears, zeroed adaLN modulation and output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return self

    def use_sdpa(self, enabled: bool = True):
        """Choose `scaled_dot_product_attention` (default) or the explicit softmax attention."""
        for block in self.blocks:
            block.attn.use_sdpa = enabled
        return self

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_emb + y_emb, shape (B, D); depends only on the timestep and label, not on x."""
        return self.t_embedder(t) + self.y_embedder(y)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        p, c = cfg.patch_size, cfg.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)  # (B, C_out, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, T, D)
        c = self.conditioning(t, y)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = None):
        """Classifier-free guidance over a batch whose second half carries the null label.

        The first half of `x` is duplicated; `guided_channels` prediction channels are guided
        (default: all of them; 3 reproduces the original DiT sampling script) and the rest, with the
        learned variance, are passed through.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        return guide(out, cfg_scale, self.config.in_channels if guided_channels is None else guided_channels)


def guide(out: torch.Tensor, cfg_scale: float, guided_channels: int) -> torch.Tensor:
    """`u + s * (c - u)` on the first `guided_channels` channels of a (cond; uncond) batch, duplicated back."""
    k = guided_channels
    cond, uncond = out[:, :k].chunk(2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), out[:, k:]], dim=1)
