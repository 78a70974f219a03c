"""ACE-Step 1.5's fused denoiser: adaLN-single modulation precomputed per step, every block's cross-attention
K/V and the context latents' share of the patch embedding precomputed per call, and the fused forward.

Per block (the reference is `ditengine.models.ace_step.AceStepBlock`; `[gra]` marks a `gated_residual_adaln`):

    qkv = h @ [W_q; W_k; W_v]                          h RMS-normed, modulated: by the previous [gra] (block 0:
                                                       adaln_modulate)
    o = gqa_attention(q, k, v; q/k RMSNorm, RoPE, window) @ W_o      the norms and RoPE in the prologue
    [gra] x += gate_msa * o ; h = RMS_w(x)               the cross-attention pre-norm: zero shift and scale
    c = gqa_attention(h @ W_cq; q RMSNorm, K/V of the condition) @ W_co   K/V computed before the loop
    [gra] x += c ; h = RMS_w(x)(1 + c_scale) + c_shift  ungated: [gra] with a unit gate
    o = linear_swiglu(h) @ W_down                       gate and up as one GEMM, silu(g) u in its epilogue
    [gra] x += c_gate * o ; h = RMS_w(x)(1 + scale) + shift of the next block, or of the output norm

Modulation: t6 = time_proj(SiLU(temb(t))) is shared by the blocks, each adds its own (6, D) table; the
output norm's shift and scale are the raw temb plus a (2, D) table. The second timestep path embeds t - r,
which the pipeline holds at 0 (r = t): a constant, added once. Rows are ordered [conditional; null].

Latents are channels-first (B, C, T) here, as every ditengine loop holds them (the pipeline's are (B, T, C));
the context latents too. T is any length: odd T is zero-padded to whole patches and the output cropped.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ditengine.kernels import adaln_modulate, gated_residual_adaln

from ..inputs import check_noise_values
from ..models.ace_step import AceStep, rope_tables
from .base import FusedDenoiser, StackedLinear


LATENTS_PER_SECOND = 25  # 48 kHz audio, 1920 samples a latent frame: the default length is 30 s


def check_sequence(name: str, x, channels: int, batch: int | None, length: int | None, device) -> None:
    """A (B, C, T) channels-first sequence tensor on `device`."""
    expected = f"({batch if batch is not None else 'B'}, {channels}, {length if length is not None else 'T'})"
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != channels \
            or (batch is not None and x.shape[0] != batch) or (length is not None and x.shape[2] != length):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a channels-first sequence {expected}, got {shape}")
    if x.device.type != torch.device(device).type:
        raise ValueError(f"{name}: on {x.device}, expected {device} like the model")


def check_inputs(cfg, device, noise: torch.Tensor, use_cfg: bool, encoder_hidden_states=None, context_latents=None,
                 null_encoder_hidden_states=None) -> dict:
    """The conditioning of an ACE-Step call, checked: noise (B, C, T) and context latents (B, C_ctx, T)
    channels-first, the packed condition (B, L, C_enc), and with guidance the null condition like it."""
    check_sequence("noise", noise, cfg.audio_acoustic_hidden_dim, None, None, device)
    check_noise_values(noise, torch.device(device))
    B, _, T = noise.shape
    check_sequence("context_latents", context_latents, cfg.context_channels, B, T, device)
    named = [("encoder_hidden_states", encoder_hidden_states)]
    if use_cfg:
        if null_encoder_hidden_states is None:
            raise ValueError("null_encoder_hidden_states: required with guidance (cfg_scale != 1): the "
                             "unconditional half (the condition encoder's null_condition_emb, broadcast)")
        named.append(("null_encoder_hidden_states", null_encoder_hidden_states))
    for name, enc in named:
        if not isinstance(enc, torch.Tensor) or enc.dim() != 3 or enc.shape[0] != B \
                or enc.shape[2] != cfg.encoder_hidden_size:
            shape = tuple(enc.shape) if isinstance(enc, torch.Tensor) else type(enc).__name__
            raise ValueError(f"{name}: expected shape ({B}, L, {cfg.encoder_hidden_size}) (the packed condition, "
                             f"one per noise row), got {shape}")
    if use_cfg and null_encoder_hidden_states.shape != encoder_hidden_states.shape:
        raise ValueError(f"null_encoder_hidden_states: expected {tuple(encoder_hidden_states.shape)} like "
                         f"encoder_hidden_states, got {tuple(null_encoder_hidden_states.shape)}")
    return {name: enc for name, enc in named} | {"context_latents": context_latents}


class FastAceStep(FusedDenoiser):
    """The weights of a `ditengine.models.ace_step.AceStep` in the fast path's layout, and the fused forward.

    Called by `FastSampler` as `sampler(noise, encoder_hidden_states=..., context_latents=...,
    null_encoder_hidden_states=...)`: noise (B, C, T) and context latents (B, C_ctx, T) channels-first, the
    packed condition (B, L, C_enc) from the pipeline's condition encoder, and with guidance the null condition
    (the encoder's learned `null_condition_emb`, broadcast to the condition's shape).
    """

    branches = 3  # self-attention, cross-attention, MLP: what the per-block cache reuse keeps

    def __init__(self, model: AceStep, dtype: torch.dtype = torch.bfloat16, mlp_epilogue: str = "auto",
                 residual_dtype: torch.dtype | None = None, backend: str | None = None,
                 quantize: str | None = None):
        super().__init__(model, dtype, mlp_epilogue, residual_dtype, backend, quantize)
        cfg = self.config
        D, p = cfg.hidden_size, cfg.patch_size
        # Whether the attention runs the reference (diffusers' test config: head dim 8), logged once.
        self.small_heads = not self.gqa_attention_fits(cfg.head_dim)
        self.latent_shape = (cfg.audio_acoustic_hidden_dim, 30 * LATENTS_PER_SECOND)
        self.out_channels = cfg.audio_acoustic_hidden_dim
        rows = 2 * (self.latent_shape[1] // p)
        conv = model.proj_in_conv.weight  # (D, C_ctx + C, p): the context latents' channels first
        C_ctx = cfg.context_channels
        self.patch = self.token_linear((conv[:, C_ctx:].flatten(1), None), rows)  # (D, C * p), rows (c, k)
        self.context_patch = (self.cast(conv[:, :C_ctx].flatten(1)), self.cast(model.proj_in_conv.bias))
        gemm = functools.partial(self.token_linear, rows=rows, block=True)

        self.blocks = []
        for blk in model.layers:
            sa, ca = blk.self_attn, blk.cross_attn
            self.blocks.append({
                "qkv": gemm([sa.to_q, sa.to_k, sa.to_v]), "proj": gemm(sa.to_out[0]), "q": gemm(ca.to_q),
                "cross_proj": gemm(ca.to_out[0]),
                "gate_up": self.swiglu_linear(blk.mlp.gate_proj, blk.mlp.up_proj, rows, block=True),
                "down": gemm(blk.mlp.down_proj),
                "q_norm": self.cast(sa.norm_q.weight, torch.float32),
                "k_norm": self.cast(sa.norm_k.weight, torch.float32),
                "cross_q_norm": self.cast(ca.norm_q.weight, torch.float32),
                "attn_norm": self.cast(blk.self_attn_norm.weight, torch.float32),
                "cross_norm": self.cast(blk.cross_attn_norm.weight, torch.float32),
                "mlp_norm": self.cast(blk.mlp_norm.weight, torch.float32)})
        self.out_norm = self.cast(model.norm_out.weight, torch.float32)
        # Per call: the condition projection, then every block's cross k / v projection (StackedLinear, aliased).
        self.condition = (self.cast(model.condition_embedder.weight), self.cast(model.condition_embedder.bias))
        kv = [m for blk in model.layers for m in (blk.cross_attn.to_k, blk.cross_attn.to_v)]
        self.kv = StackedLinear(kv, self)  # D -> depth * 2 * Hkv * Dh
        self.cross_k_norm = self.cast(torch.stack([blk.cross_attn.norm_k.weight for blk in model.layers]),
                                      torch.float32)  # (depth, Dh)
        # Per step: fp32 embedders (tiny; the modulation they feed scales every activation).
        self.t_mlp, self.t_proj = self._embedder(model.time_embed)
        r_mlp, r_proj = self._embedder(model.time_embed_r)
        zero = torch.zeros(1, device=self.device)  # t - r, as the pipelines run it (r = t): one constant
        self.temb_r = self.embed_sinusoidal(r_mlp, zero)  # (1, D)
        self.t6_r = F.linear(F.silu(self.temb_r), *r_proj).view(1, 6, D)
        self.tables = self.cast(torch.stack([blk.scale_shift_table[0] for blk in model.layers]), torch.float32)
        self.final_table = self.cast(model.scale_shift_table[0], torch.float32)  # (2, D)
        # The output ConvTranspose1d as a GEMM: rows (c, k) of the (C * p, D) weight, the bias per k.
        deconv = model.proj_out_conv.weight  # (D, C, p)
        self.final = self.token_linear((deconv.permute(1, 2, 0).reshape(-1, D),
                                        model.proj_out_conv.bias.repeat_interleave(p)), rows)
        self.hidden = D

    def _embedder(self, te) -> tuple[tuple, tuple]:
        """A timestep embedder's MLP and its 6-way projection as fp32 weights."""
        proj = (self.cast(te.time_proj.weight, torch.float32), self.cast(te.time_proj.bias, torch.float32))
        return self.mlp_weights(te.linear_1, te.linear_2), proj

    @property
    def depth(self) -> int:
        return self.config.num_hidden_layers

    def tokens(self, T: int) -> int:
        return -(-T // self.config.patch_size)

    def token_shape(self, latent_shape: tuple, cond: dict | None = None) -> tuple[int, int]:
        return self.tokens(latent_shape[-1]), self.hidden

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T) -> (N, T', C * p) zero-padded to whole patches, each row ordered (channel, offset)."""
        p = self.config.patch_size
        N, C, T = x.shape
        x = F.pad(x, (0, -T % p))
        return x.view(N, C, -1, p).permute(0, 2, 1, 3).reshape(N, -1, C * p)

    # -- conditioning ------------------------------------------------------------------------------------
    def inputs(self, model: AceStep, noise: torch.Tensor, use_cfg: bool, **conditioning) -> dict:
        return check_inputs(self.config, self.device, noise, use_cfg, **conditioning)

    def context_key(self, cond: dict) -> tuple:
        """What the static context buffers' shapes depend on beyond the batch and T: the condition length."""
        return (cond["encoder_hidden_states"].shape[1],)

    def context_buffers(self, rows: int, latent_shape: tuple, cond: dict) -> dict:
        cfg = self.config
        L, dev, T = cond["encoder_hidden_states"].shape[1], self.device, latent_shape[-1]
        tokens = self.tokens(T)
        return {"kv": torch.zeros(self.depth, rows, L, 2, cfg.num_key_value_heads, cfg.head_dim, device=dev,
                                  dtype=self.dtype),
                "context": torch.zeros(rows, tokens, self.hidden, device=dev, dtype=self.residual_dtype),
                "rope": rope_tables(tokens, cfg.head_dim, cfg.rope_theta, dev),
                "unit_gate": torch.ones(rows, self.hidden, device=dev, dtype=self.dtype),
                "zeros": torch.zeros(rows, self.hidden, device=dev, dtype=self.dtype),
                "length": T}

    def write_context(self, ctx: dict, cond: dict, use_cfg: bool) -> None:
        """Once per call: every block's cross-attention K (k-normed) and V, and the context latents' patch share."""
        cfg = self.config
        names = ["encoder_hidden_states"] + (["null_encoder_hidden_states"] if use_cfg else [])
        enc = torch.cat([cond[n].to(self.device, self.dtype) for n in names])  # (N, L, C_enc)
        c = F.linear(enc, *self.condition)  # (N, L, D)
        N, L, _ = c.shape
        kv = self.kv(c).view(N, L, self.depth, 2, cfg.num_key_value_heads, cfg.head_dim)
        k = kv[:, :, :, 0].float()  # (N, L, depth, Hkv, Dh): RMSNorm over the head dim, fp32 statistic
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * self.cross_k_norm[:, None]
        ctx["kv"][:, :, :, 0].copy_(k.permute(2, 0, 1, 3, 4))
        ctx["kv"][:, :, :, 1].copy_(kv[:, :, :, 1].permute(2, 0, 1, 3, 4))
        context = cond["context_latents"].to(self.device, self.dtype).repeat(len(names), 1, 1)  # (N, C_ctx, T)
        ctx["context"].copy_(F.linear(self._patches(context), *self.context_patch))

    def context_rows(self, ctx: dict, rows: int, start: int = 0) -> dict:
        """Rows [start, start + rows); the K/V keep their block dim first."""
        return super().context_rows(ctx, rows, start) | {"kv": ctx["kv"][:, start:start + rows]}

    def modulation(self, t: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps t (S,) in [0, 1] -> every block's modulation (S, N, depth, 6, D) and the output norm's
        (S, N, 2, D)."""
        N = ctx["unit_gate"].shape[0]
        temb = self.embed_sinusoidal(self.t_mlp, t.float() * 1000.0)  # (S, D) fp32
        t6 = F.linear(F.silu(temb), *self.t_proj).view(-1, 1, 6, self.hidden) + self.t6_r  # (S, 1, 6, D)
        block_mod = (t6 + self.tables).to(self.dtype)  # (S, depth, 6, D)
        final_mod = (temb[:, None] + self.temb_r + self.final_table).to(self.dtype)  # (S, 2, D)
        return (block_mod[:, None].expand(-1, N, -1, -1, -1).contiguous(),
                final_mod[:, None].expand(-1, N, -1, -1).contiguous())

    def modulation_shapes(self, steps: int, rows: int) -> list[tuple]:
        return [(steps, rows, self.depth, 6, self.hidden), (steps, rows, 2, self.hidden)]

    # -- forward -----------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """x (N, C, T) in `dtype` -> the residual stream (N, T', D): the latents' patch GEMM plus the context's."""
        return self.patch(self._patches(x)).to(self.residual_dtype).add_(ctx["context"])

    def _norm(self, resid, gate, o, shift, scale, weight):
        """`gated_residual_adaln` in its RMSNorm form: resid += gate * o (in place); the next op's input
        RMS_w(resid)(1 + scale) + shift."""
        return gated_residual_adaln(resid, gate, o, shift, scale, eps=self.config.rms_norm_eps, inplace=True,
                                    out_dtype=self.dtype, backend=self.backend, weight=weight, rms=True)

    def first_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        m = mod[0][:, 0]
        return adaln_modulate(resid, m[:, 0], m[:, 1], eps=self.config.rms_norm_eps, out_dtype=self.dtype,
                              backend=self.backend, weight=self.blocks[0]["attn_norm"], rms=True)

    def _next(self, i: int, mod: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2, D) shift and scale of the norm after block i, and its weight."""
        block_mod, final_mod = mod
        if i + 1 < self.depth:
            return block_mod[:, i + 1, :2], self.blocks[i + 1]["attn_norm"]
        return final_mod, self.out_norm

    def sequence_heads(self) -> tuple[int, ...]:
        return self.config.num_attention_heads, self.config.num_key_value_heads

    def block(self, i: int, resid: torch.Tensor, h: torch.Tensor, mod: tuple, ctx: dict,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on the residual stream (in place) and its norm's output h -> (resid, the next norm's output).
        `keep` (3, N, T', D) receives the self-attention, cross-attention and MLP outputs (a cache reuses them)."""
        cfg, layers = self.config, self.blocks[i]
        N, T, D = resid.shape
        H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        m = mod[0][:, i]  # (N, 6, D): shift, scale, gate for attention, then for the MLP
        qkv = layers["qkv"](h)  # (N, T', (H + 2 Hkv) Dh)
        q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        attended = self.self_attention(ctx, self.gqa, q.view(N, T, H, Dh), k.view(N, T, Hkv, Dh),
                                       v.view(N, T, Hkv, Dh), q_norm=layers["q_norm"], k_norm=layers["k_norm"],
                                       eps=cfg.rms_norm_eps, rope=ctx["rope"], window=cfg.window(i))
        o = layers["proj"](attended.reshape(N, T, D))
        resid, h = self._norm(resid, m[:, 2], o, ctx["zeros"], ctx["zeros"], layers["cross_norm"])
        kv = ctx["kv"][i]  # (N, L, 2, Hkv, Dh)
        crossed = self.gqa(layers["q"](h).view(N, T, H, Dh), kv[:, :, 0], kv[:, :, 1],
                                  q_norm=layers["cross_q_norm"], eps=cfg.rms_norm_eps)
        c = layers["cross_proj"](crossed.reshape(N, T, D))
        if keep is not None:
            keep[0].copy_(o)
            keep[1].copy_(c)
        resid, h = self._norm(resid, ctx["unit_gate"], c, m[:, 3], m[:, 4], layers["mlp_norm"])
        o = layers["down"](layers["gate_up"](h))
        if keep is not None:
            keep[2].copy_(o)
        nxt, weight = self._next(i, mod)
        return self._norm(resid, m[:, 5], o, nxt[:, 0], nxt[:, 1], weight)

    def reuse_block(self, i: int, resid: torch.Tensor, mod: tuple, ctx: dict,
                    kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i with its three branch outputs from `kept` (3, N, T', D): only the residual adds (this step's
        gates) and the norm after them run."""
        m = mod[0][:, i]
        resid.addcmul_(m[:, 2, None], kept[0]).add_(kept[1])
        nxt, weight = self._next(i, mod)
        return self._norm(resid, m[:, 5], kept[2], nxt[:, 0], nxt[:, 1], weight)

    def final_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        final_mod = mod[1]
        return adaln_modulate(resid, final_mod[:, 0], final_mod[:, 1], eps=self.config.rms_norm_eps,
                              out_dtype=self.dtype, backend=self.backend, weight=self.out_norm, rms=True)

    def unpatchify(self, out: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The output GEMM's (the ConvTranspose1d's) rows (N, T', C p) -> (N, C, T) cropped."""
        N, T, _ = out.shape
        out = out.view(N, T, self.out_channels, -1)  # (N, T', C, p)
        return out.permute(0, 2, 1, 3).reshape(N, self.out_channels, -1)[..., :ctx["length"]].contiguous()

    def step_gemms(self, rows: int, latent_shape: tuple | None = None, cond: dict | None = None) -> list[tuple]:
        """The token GEMMs of one step as (call, activation shape), in the order the step runs them."""
        T, D = self.token_shape(latent_shape or self.latent_shape)
        gemms = [(self.patch, (rows, T, self.patch.in_features))]
        for layers in self.blocks:
            gemms += [(layers["qkv"], (rows, T, D)), (layers["proj"], (rows, T, D)), (layers["q"], (rows, T, D)),
                      (layers["cross_proj"], (rows, T, D)), (layers["gate_up"], (rows, T, D)),
                      (layers["down"], (rows, T, self.config.intermediate_size))]
        return gemms + [(self.final, (rows, T, D))]
