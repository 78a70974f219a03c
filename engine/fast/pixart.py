"""PixArt-alpha / sigma's fused denoiser: adaLN-single modulation precomputed per step, the caption's
cross-attention K/V precomputed per prompt for every block, and the fused forward.

Per block (the reference is `ditengine.models.pixart.PixArtBlock`):

    qkv = h @ W_qkv ; o = attention(qkv) @ W_proj        h from the previous [gra] (block 0: adaln_modulate)
    x += gate_msa * o                                    the next op reads x itself: no norm to fuse
    o = cross_attention(x @ W_q, kv[block], kv_lens) @ W_o   K/V of the caption, computed before the loop
    [gra] x += o ; h = adaLN(x; shift_mlp, scale_mlp)    ungated: [gra] with a unit gate
    o = gelu_tanh(h @ W_fc1) @ W_fc2
    [gra] x += gate_mlp * o ; h = adaLN(x; next block's shift_msa, scale_msa, or the final layer's)

Modulation: t6 = t_block(emb) is shared by all blocks, each adds its own (6, D) table; the final layer's
shift and scale are the raw embedding plus a (2, D) table. emb is the timestep embedding plus, for
PixArt-alpha 1024, the micro-conditions (resolution, aspect ratio): they are per call, so they live in the
context beside the text. Rows are ordered [conditional; unconditional] (the scheduler step's convention;
the diffusers pipeline orders them the other way, which no row's result depends on).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ditengine.kernels import (adaln_modulate, attention, choose, cross_attention, cross_attention_ref,
                               gated_residual_adaln)

from ditengine.kernels.attention import head_dim_fits

from ..inputs import check_patch_grid_noise
from ..models.pixart import PixArt, pixart_pos_embed
from .base import FusedDenoiser, StackedLinear, cross_block_gemms

log = logging.getLogger("ditengine")


@functools.lru_cache(maxsize=None)
def _log_reference_attention(head_dim: int) -> None:
    log.info("ditengine: PixArt head dim %d is below the attention kernels' 16: its attention runs the PyTorch "
             "reference", head_dim)


def prompt_lengths(mask: torch.Tensor | None, batch: int, L: int, name: str) -> torch.Tensor:
    """Valid tokens per row of a right-padded (B, L) keep-mask (1 keep, 0 padding), checked to be a prefix
    of at least one token; all L when the mask is None."""
    if mask is None:
        return torch.full((batch,), L, dtype=torch.int32)
    if not isinstance(mask, torch.Tensor) or mask.shape != (batch, L):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: expected a (B, L) = ({batch}, {L}) keep-mask like the tokenizer's, got {shape}")
    keep = mask.detach().cpu() != 0
    lengths = keep.sum(dim=1)
    if not torch.equal(keep, torch.arange(L)[None] < lengths[:, None]):
        raise ValueError(f"{name}: only right-padded masks (each row 1...1 then 0...0, as the tokenizer pads) are "
                         "supported; this one masks tokens in the middle or at the start of a row")
    if int(lengths.min()) < 1:
        raise ValueError(f"{name}: every row needs at least one valid token, got a row of padding only")
    return lengths.to(torch.int32)


class FastPixArt(FusedDenoiser):
    """The weights of a `ditengine.models.pixart.PixArt` in the fast path's layout, and the fused forward.

    Called by `FastSampler` as `sampler(noise, prompt_embeds=..., prompt_attention_mask=...,
    negative_prompt_embeds=..., negative_prompt_attention_mask=..., added_cond_kwargs=None)`, the names
    of the diffusers pipelines (the negative prompt is the unconditional half, needed with guidance).
    Latents of any grid the model accepts (PixArt is multi-aspect): a plan per shape and prompt length.
    """

    branches = 3  # self-attention, cross-attention, MLP: what the per-block cache reuse keeps

    def __init__(self, model: PixArt, dtype: torch.dtype = torch.bfloat16, mlp_epilogue: str = "auto",
                 residual_dtype: torch.dtype | None = None, backend: str | None = None,
                 quantize: str | None = None):
        super().__init__(model, dtype, mlp_epilogue, residual_dtype, backend, quantize)
        cfg = self.config
        D = cfg.hidden_size
        self.small_heads = not head_dim_fits(cfg.head_dim)  # e.g. diffusers' test config (head dim 2)
        if self.small_heads:
            _log_reference_attention(cfg.head_dim)
        else:
            choose("cross_attention", self.device, self.backend)
        rows = 2 * cfg.num_tokens
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.out_channels = cfg.out_channels
        self.patch = self.token_linear((model.x_embedder.proj.weight.flatten(1), None), rows)  # (D, C*p*p)
        self.patch_bias = self.cast(model.x_embedder.proj.bias, torch.float32)
        gemm = functools.partial(self.token_linear, rows=rows, block=True)
        self.blocks = [{"qkv": gemm(b.attn.qkv), "proj": gemm(b.attn.proj), "q": gemm(b.cross_attn.q_linear),
                        "cross_proj": gemm(b.cross_attn.proj), "fc1": gemm(b.mlp.fc1), "fc2": gemm(b.mlp.fc2)}
                       for b in model.blocks]
        # Per prompt: the caption projection, then every block's k/v projection side by side (StackedLinear).
        y_proj = model.y_embedder.y_proj if model.y_embedder is not None else None
        self.caption_mlp = None if y_proj is None else tuple(
            self.cast(p) for p in (y_proj.fc1.weight, y_proj.fc1.bias, y_proj.fc2.weight, y_proj.fc2.bias))
        kv = [b.cross_attn.kv_linear for b in model.blocks]
        self.kv = StackedLinear(kv, self)  # C_ctx -> depth * 2D
        # Per step: fp32 embedders (tiny; the modulation they feed scales every activation).
        self.t_mlp = self.sinusoidal_mlp(model.t_embedder.mlp)
        self.micro = None
        if cfg.use_additional_conditions:
            self.micro = (self.sinusoidal_mlp(model.csize_embedder.mlp), self.sinusoidal_mlp(model.ar_embedder.mlp))
        self.t_block = (self.cast(model.t_block[1].weight, torch.float32),
                        self.cast(model.t_block[1].bias, torch.float32))
        self.tables = self.cast(torch.stack([b.scale_shift_table for b in model.blocks]),
                                torch.float32)  # (depth, 6, D)
        self.final_table = self.cast(model.final_layer.scale_shift_table, torch.float32)  # (2, D)
        self.final = self.token_linear(model.final_layer.linear, rows)
        self._pos = {}  # (h, w) grid -> position table plus the patch bias, (T, D) in the residual dtype
        self.hidden = D

    @property
    def depth(self) -> int:
        return self.config.num_layers

    def grid(self, latent_shape: tuple) -> tuple[int, int]:
        p = self.config.patch_size
        return latent_shape[-2] // p, latent_shape[-1] // p

    def token_shape(self, latent_shape: tuple, cond: dict | None = None) -> tuple[int, int]:
        h, w = self.grid(latent_shape)
        return h * w, self.hidden

    # -- conditioning ------------------------------------------------------------------------------------
    def inputs(self, model: PixArt, noise: torch.Tensor, use_cfg: bool, prompt_embeds: torch.Tensor | None = None,
               prompt_attention_mask: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
               negative_prompt_attention_mask: torch.Tensor | None = None,
               added_cond_kwargs: dict | None = None) -> dict:
        cfg = self.config
        check_patch_grid_noise(noise, cfg.in_channels, cfg.patch_size, self.device)
        B = noise.shape[0]
        named = [("prompt_embeds", prompt_embeds, prompt_attention_mask, "prompt_attention_mask")]
        if use_cfg:
            if negative_prompt_embeds is None:
                raise ValueError("negative_prompt_embeds: required with guidance (cfg_scale != 1): the "
                                 "unconditional half (the pipeline encodes the negative prompt, \"\" by default)")
            named.append(("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_attention_mask,
                          "negative_prompt_attention_mask"))
        width = cfg.caption_channels or cfg.cross_attention_dim  # the text encoder's width
        cond = {}
        for name, embeds, mask, mask_name in named:
            if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[0] != B \
                    or embeds.shape[2] != width:
                shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(f"{name}: expected shape ({B}, L, {width}) (one text per "
                                 f"noise row), got {shape}")
            cond[name] = embeds
            cond[mask_name] = prompt_lengths(mask, B, embeds.shape[1], mask_name)
        if use_cfg and negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
            raise ValueError(f"negative_prompt_embeds: {negative_prompt_embeds.shape[1]} tokens, expected "
                             f"{prompt_embeds.shape[1]} like prompt_embeds (pad both to one length)")
        if self.micro is not None:
            res, ar = (added_cond_kwargs or {}).get("resolution"), (added_cond_kwargs or {}).get("aspect_ratio")
            if res is None or ar is None:
                raise ValueError("added_cond_kwargs: this PixArt uses micro-conditions: pass {'resolution': (B, 2) "
                                 "[h, w] in pixels, 'aspect_ratio': (B, 1) h / w}")
            cond["resolution"], cond["aspect_ratio"] = res.reshape(-1, 2)[:B], ar.reshape(-1, 1)[:B]
        return cond

    def context_key(self, cond: dict) -> tuple:
        """What the static context buffers' shapes depend on beyond the batch: the prompt length."""
        return (cond["prompt_embeds"].shape[1],)

    def context_buffers(self, rows: int, latent_shape: tuple, cond: dict) -> dict:
        cfg = self.config
        L, H, Dh = cond["prompt_embeds"].shape[1], cfg.num_attention_heads, cfg.head_dim
        dev = self.device
        return {"kv": torch.zeros(self.depth, rows, L, 2, H, Dh, device=dev, dtype=self.dtype),
                "kv_lens": torch.zeros(rows, device=dev, dtype=torch.int32),
                "cond_emb": torch.zeros(rows, self.hidden, device=dev),  # the micro-conditions, fp32
                "unit_gate": torch.ones(rows, self.hidden, device=dev, dtype=self.dtype),
                "grid": self.grid(latent_shape)}

    def write_context(self, ctx: dict, cond: dict, use_cfg: bool) -> None:
        """Once per call: the caption projection and every block's cross-attention K/V, lengths, micro-conditions."""
        cfg = self.config
        halves = [("prompt_embeds", "prompt_attention_mask")]
        if use_cfg:
            halves.append(("negative_prompt_embeds", "negative_prompt_attention_mask"))
        text = torch.cat([cond[e].to(self.device, self.dtype) for e, _ in halves])  # (N, L, C_cap)
        lengths = torch.cat([cond[m] for _, m in halves])
        if self.caption_mlp is not None:
            w1, b1, w2, b2 = self.caption_mlp
            text = F.linear(F.gelu(F.linear(text, w1, b1), approximate="tanh"), w2, b2)  # (N, L, D)
        N, L, _ = text.shape
        kv = self.kv(text).view(N, L, self.depth, 2, cfg.num_attention_heads, cfg.head_dim)
        ctx["kv"].copy_(kv.permute(2, 0, 1, 3, 4, 5))  # (depth, N, L, 2, H, Dh)
        ctx["kv_lens"].copy_(lengths)
        if self.micro is not None:
            csize, ar = self.micro
            res = cond["resolution"].to(self.device, torch.float32)
            aspect = cond["aspect_ratio"].to(self.device, torch.float32)
            B = res.shape[0]
            emb = torch.cat([self.embed_sinusoidal(csize, res.flatten()).reshape(B, -1),
                             self.embed_sinusoidal(ar, aspect.flatten()).reshape(B, -1)], dim=1)  # (B, D)
            ctx["cond_emb"].copy_(emb.repeat(N // B, 1))

    def context_rows(self, ctx: dict, rows: int, start: int = 0) -> dict:
        """Rows [start, start + rows); the K/V keep their block dim first."""
        return super().context_rows(ctx, rows, start) | {"kv": ctx["kv"][:, start:start + rows]}

    def modulation(self, t: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps t (S,) -> every block's modulation (S, N, depth, 6, D) and the final one (S, N, 2, D)."""
        cond_emb = ctx["cond_emb"]  # (N, D)
        emb = self.embed_sinusoidal(self.t_mlp, t)[:, None] + cond_emb  # (S, N, D) fp32
        t6 = F.linear(F.silu(emb), *self.t_block).view(*emb.shape[:2], 1, 6, self.hidden)
        return (t6 + self.tables).to(self.dtype), (emb[:, :, None] + self.final_table).to(self.dtype)

    def modulation_shapes(self, steps: int, rows: int) -> list[tuple]:
        return [(steps, rows, self.depth, 6, self.hidden), (steps, rows, 2, self.hidden)]

    # -- forward -----------------------------------------------------------------------------------------
    def _position_bias(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._pos:
            cfg = self.config
            pos = pixart_pos_embed(self.hidden, *grid, cfg.grid_size, cfg.interpolation_scale, self.device)
            self._pos[grid] = (pos + self.patch_bias).to(self.residual_dtype)  # (T, D)
        return self._pos[grid]

    def embed(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """x (N, C, H, W) in `dtype` -> the residual stream (N, T, D), row-major over the patch grid."""
        p = self.config.patch_size
        N, C, H, W = x.shape
        h, w = H // p, W // p
        patches = x.view(N, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, -1)
        return self.patch(patches).to(self.residual_dtype).add_(self._position_bias((h, w)))

    def first_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        block_mod = mod[0]
        return adaln_modulate(resid, block_mod[:, 0, 0], block_mod[:, 0, 1], eps=self.config.norm_eps,
                              out_dtype=self.dtype, backend=self.backend)

    def _next(self, i: int, mod: tuple) -> tuple[torch.Tensor, float]:
        """(N, 2, D) shift and scale of the adaLN after block i, and its eps (the final norm's is 1e-6)."""
        block_mod, final_mod = mod
        if i + 1 < self.depth:
            return block_mod[:, i + 1, :2], self.config.norm_eps
        return final_mod, 1e-6

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Self-attention of qkv (N, T, 3, H, Dh) -> (N, T, H, Dh)."""
        if self.small_heads:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (N, H, T, Dh) each
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return attention(qkv, backend=self.backend)

    def sequence_heads(self) -> tuple[int, ...]:
        return (self.config.num_attention_heads,)

    def _cross(self, i: int, resid: torch.Tensor, ctx: dict) -> torch.Tensor:
        cfg, layers = self.config, self.blocks[i]
        N, T, D = resid.shape
        q = layers["q"](resid.to(self.dtype)).view(N, T, cfg.num_attention_heads, cfg.head_dim)
        if self.small_heads:
            o = cross_attention_ref(q, ctx["kv"][i], ctx["kv_lens"])
        else:
            o = cross_attention(q, ctx["kv"][i], ctx["kv_lens"], backend=self.backend)
        return layers["cross_proj"](o.reshape(N, T, D))

    def block(self, i: int, resid: torch.Tensor, h: torch.Tensor, mod: tuple, ctx: dict,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on the residual stream (in place) and its adaLN input h -> (resid, the next adaLN input).
        `keep` (3, N, T, D) receives the self-attention, cross-attention and MLP outputs (a cache reuses them)."""
        cfg, layers = self.config, self.blocks[i]
        N, T, D = resid.shape
        m = mod[0][:, i]  # (N, 6, D): shift, scale, gate for attention, then for the MLP
        qkv = layers["qkv"](h).view(N, T, 3, cfg.num_attention_heads, cfg.head_dim)
        attended = self.self_attention(ctx, self._attend, qkv)
        o = layers["proj"](attended.reshape(N, T, D))
        resid.addcmul_(m[:, 2, None], o)  # (N, T, D)
        c = self._cross(i, resid, ctx)
        if keep is not None:
            keep[0].copy_(o)
            keep[1].copy_(c)
        resid, h = gated_residual_adaln(resid, ctx["unit_gate"], c, m[:, 3], m[:, 4], eps=cfg.norm_eps, inplace=True,
                                        out_dtype=self.dtype, backend=self.backend)
        o = layers["fc2"](layers["fc1"].gelu(h))
        if keep is not None:
            keep[2].copy_(o)
        nxt, eps = self._next(i, mod)
        return gated_residual_adaln(resid, m[:, 5], o, nxt[:, 0], nxt[:, 1], eps=eps, inplace=True,
                                    out_dtype=self.dtype, backend=self.backend)

    def reuse_block(self, i: int, resid: torch.Tensor, mod: tuple, ctx: dict,
                    kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i with its three branch outputs from `kept` (3, N, T, D): only the residual adds (this step's
        gates) and the adaLN after them run."""
        m = mod[0][:, i]
        resid.addcmul_(m[:, 2, None], kept[0]).add_(kept[1])
        nxt, eps = self._next(i, mod)
        return gated_residual_adaln(resid, m[:, 5], kept[2], nxt[:, 0], nxt[:, 1], eps=eps, inplace=True,
                                    out_dtype=self.dtype, backend=self.backend)

    def final_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        final_mod = mod[1]
        return adaln_modulate(resid, final_mod[:, 0], final_mod[:, 1], eps=1e-6, out_dtype=self.dtype,
                              backend=self.backend)

    def unpatchify(self, out: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The final linear's rows (N, T, p p C_out) -> (N, C_out, H, W)."""
        (gh, gw), p, c = ctx["grid"], self.config.patch_size, self.out_channels
        N = out.shape[0]
        return torch.einsum("nhwpqc->nchpwq", out.view(N, gh, gw, p, p, c)).reshape(N, c, gh * p, gw * p)

    def step_gemms(self, rows: int, latent_shape: tuple | None = None, cond: dict | None = None) -> list[tuple]:
        """The token GEMMs of one step as (call, activation shape), in the order the step runs them."""
        T = self.token_shape(latent_shape or self.latent_shape)[0]
        return cross_block_gemms(self, rows, T, self.config.mlp_hidden)
