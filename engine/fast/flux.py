"""Flux.1's fused denoiser: every block's and stream's modulation precomputed per step, the text tokens, the
guidance and pooled embeddings and the RoPE tables per call, and the fused forward.

The residual stream is the joint sequence s = [text; image] (N, L + T, D) from the start: a double block works
on its two row ranges in place (each stream its own norms, projections and MLP), a single block on all of it,
so the sampling loop and a step cache see one tensor, as for every family. Per double block i (the reference is
`ditengine.models.flux.DoubleBlock`; `[gra]` marks a `gated_residual_adaln`):

    h = [LN(c)(1 + cs1) + ch1 ; LN(x)(1 + s1) + h1]     from the previous block's [gra]s (block 0: adaln_modulate)
    qkv = [h_c @ W_add_qkv ; h_x @ W_qkv]               each stream's q, k, v as one GEMM
    o = gqa_attention(qkv; per-stream q/k RMSNorm, interleaved RoPE over the joint rows)
    [gra] x += g1 * o_x @ W_out ; h_x = LN(x)(1 + s2) + h2   and the same for the text rows
    [gra] x += g2 * ff(h_x) ; h_x = the next block's norm     ff: linear_gelu then the down GEMM; text alike

Per single block: h = LN(s)(1 + sc) + sh; one GEMM [q | k | v | mlp] of 3D + 4D outputs with the GELU on the
MLP columns only; attention; one output GEMM over [attention | MLP]; [gra] s += g * o and the next norm. The final
norm (scale first) modulates the joint rows, and the image rows go through the output projection.

Latents are the VAE's (B, 16, H, W) grid; the 2x2 patch packing of FluxPipeline (`_pack_latents`) is the
embedding's reshape, its inverse the output's.
"""
from __future__ import annotations

import functools
import numbers

import torch
import torch.nn.functional as F

from ditengine.kernels import adaln_modulate, gated_residual_adaln

from ..inputs import check_noise_values, check_prompt_embeds
from ..models.flux import Flux, rope_tables
from .base import FusedDenoiser, StackedLinear


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """The pipeline's position ids of an (h, w) grid of packed tokens (`FluxPipeline._prepare_latent_image_ids`):
    (h * w, 3) = (0, row, column), row-major."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None]
    return ids.reshape(h * w, 3)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """The loop's latents (N, C, H, W) -> FluxPipeline's 2x2-packed tokens (N, H/2 * W/2, 4C), channels (c, dy, dx)
    (its `_pack_latents`)."""
    N, C, H, W = x.shape
    return x.view(N, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(N, -1, 4 * C)


def unpack_latents(packed: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The inverse of `pack_latents`: tokens (N, H/2 * W/2, 4C) -> (N, C, H, W)."""
    N, C = packed.shape[0], packed.shape[-1] // 4
    return packed.reshape(N, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(N, C, H, W)


def check_inputs(cfg, device, noise: torch.Tensor, use_cfg: bool, prompt_embeds=None, pooled_prompt_embeds=None,
                 guidance=None, txt_ids=None, img_ids=None, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, condition_latents=None, reference_latents=None,
                 reference_ids=None) -> dict:
    """The conditioning of a Flux call, checked and completed: noise (B, C, H, W) on the VAE grid, T5 tokens and
    pooled CLIP embeddings (and the negative prompt's with true CFG), the guidance as (B,) fp32 (dev only), the
    position ids (the pipeline's by default), and for a model that takes more input channels than it predicts
    (Fill: the masked image and its mask; Control: the control image) `condition_latents` (B, T, extra), packed as
    the pipeline packs them, concatenated to the packed latents on the channel axis at every step; Kontext's
    reference image as `reference_latents` (B, R, 4C), packed, and its position ids `reference_ids` (R, 3): tokens
    appended to the image tokens, whose outputs are not the model's."""
    C = cfg.out_channels // 4
    if not isinstance(noise, torch.Tensor) or noise.dim() != 4 or noise.shape[1] != C or noise.shape[2] % 2 \
            or noise.shape[3] % 2:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise: expected VAE latents (B, {C}, H, W) with H and W even (2x2 patches), got {shape}")
    check_noise_values(noise, torch.device(device))
    B, _, H, W = noise.shape
    cond = check_prompt_embeds(B, "T5", cfg.joint_attention_dim, cfg.pooled_projection_dim, use_cfg, prompt_embeds,
                               pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)
    L = prompt_embeds.shape[1]
    if (guidance is not None) != cfg.guidance_embeds:
        raise ValueError(f"guidance: {'required' if cfg.guidance_embeds else 'refused'} by this Flux "
                         f"(guidance_embeds={cfg.guidance_embeds}: {'dev' if cfg.guidance_embeds else 'schnell'})")
    cond["guidance"] = None if guidance is None else guidance_rows(guidance, B, device)
    tokens = (H // 2) * (W // 2)
    for name, ids, n in (("txt_ids", txt_ids, L), ("img_ids", img_ids, tokens)):
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.shape[-2:] != (n, 3)):
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name}: expected ({n}, 3) position ids, got {shape}")
    cond["txt_ids"] = torch.zeros(L, 3, device=device) if txt_ids is None else txt_ids.reshape(L, 3)
    cond["img_ids"] = image_ids(H // 2, W // 2, device) if img_ids is None else img_ids.reshape(tokens, 3)
    extra = cfg.in_channels - cfg.out_channels
    if extra and (not isinstance(condition_latents, torch.Tensor) or condition_latents.shape != (B, tokens, extra)):
        shape = tuple(condition_latents.shape) if isinstance(condition_latents, torch.Tensor) else condition_latents
        raise ValueError(f"condition_latents: this Flux takes {cfg.in_channels} input channels for its "
                         f"{cfg.out_channels} predicted ones: expected the packed condition ({B}, {tokens}, {extra}) "
                         f"(Fill: masked image and mask; Control: control image), got {shape}")
    if not extra and condition_latents is not None:
        raise ValueError("condition_latents: this Flux takes no input channels beyond its latents (a Fill or Control "
                         "model does)")
    cond["condition_latents"] = condition_latents
    if (reference_latents is None) != (reference_ids is None):
        raise ValueError("reference_latents and reference_ids: give both (Kontext's reference image tokens and their "
                         "position ids) or neither")
    if reference_latents is not None:
        R = reference_latents.shape[1] if isinstance(reference_latents, torch.Tensor) and reference_latents.dim() == 3 \
            else None
        if R is None or reference_latents.shape != (B, R, 4 * C):
            shape = tuple(reference_latents.shape) if isinstance(reference_latents, torch.Tensor) else reference_latents
            raise ValueError(f"reference_latents: expected the packed reference image ({B}, R, {4 * C}), got {shape}")
        if not isinstance(reference_ids, torch.Tensor) or reference_ids.shape[-2:] != (R, 3):
            shape = tuple(reference_ids.shape) if isinstance(reference_ids, torch.Tensor) else reference_ids
            raise ValueError(f"reference_ids: expected ({R}, 3) position ids of the reference tokens, got {shape}")
        reference_ids = reference_ids.reshape(R, 3)
    cond["reference_latents"], cond["reference_ids"] = reference_latents, reference_ids
    return cond


def guidance_rows(guidance, batch: int, device) -> torch.Tensor:
    """dev's embedded guidance scale as (B,) fp32: one number (or a 1-element tensor) for every row, or one per row."""
    if isinstance(guidance, torch.Tensor):
        if not guidance.is_floating_point() and guidance.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"guidance: expected a real tensor, got {guidance.dtype}")
        if guidance.numel() not in (1, batch):
            raise ValueError(f"guidance: expected one value or one per row ({batch}), got shape "
                             f"{tuple(guidance.shape)}")
    elif not isinstance(guidance, numbers.Real) or isinstance(guidance, bool):
        raise TypeError(f"guidance: expected a number or a tensor of 1 or {batch} values, got "
                        f"{type(guidance).__name__}")
    return torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(batch).to(device)


class FastFlux(FusedDenoiser):
    """The weights of a `ditengine.models.flux.Flux` in the fast path's layout, and the fused forward.

    Called by `FastSampler` as `sampler(noise, prompt_embeds=..., pooled_prompt_embeds=..., guidance=3.5,
    txt_ids=None, img_ids=None, negative_prompt_embeds=..., negative_pooled_prompt_embeds=...)`, the pipeline's
    names: noise (B, 16, H, W) on the VAE's latent grid, T5 tokens (B, L, 4096), the pooled CLIP embedding
    (B, 768); `guidance` (a number, or (B,)) for dev, None for schnell; ids default to the pipeline's; the
    negative prompt is the unconditional half of "true CFG" (`cfg_scale` > 1).
    """

    branches = 2  # attention and MLP outputs: what the per-block cache reuse keeps (of every row)

    def __init__(self, model: Flux, dtype: torch.dtype = torch.bfloat16, mlp_epilogue: str = "auto",
                 residual_dtype: torch.dtype | None = None, backend: str | None = None,
                 quantize: str | None = None):
        super().__init__(model, dtype, mlp_epilogue, residual_dtype, backend, quantize)
        cfg = self.config
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.gqa_attention_fits(Dh)  # logs the reference attention for a head dim the kernels do not take
        self.latent_shape = (cfg.out_channels // 4, 128, 128)  # 1024 px: the VAE's 16 channels, 2x2 packed
        self.out_channels = cfg.out_channels // 4
        rows = 2 * 4096
        gemm = functools.partial(self.token_linear, rows=rows, block=True)

        self.x_embed = self.token_linear(model.x_embedder, rows)
        self.context = StackedLinear([model.context_embedder], self)  # per call: the T5 tokens
        self.double = []
        for blk in model.transformer_blocks:
            a = blk.attn
            self.double.append({
                "qkv": gemm([a.to_q, a.to_k, a.to_v]), "add_qkv": gemm([a.add_q_proj, a.add_k_proj, a.add_v_proj]),
                "out": gemm(a.to_out[0]), "add_out": gemm(a.to_add_out),
                "fc1": gemm(blk.ff.net[0].proj), "fc2": gemm(blk.ff.net[2]),
                "add_fc1": gemm(blk.ff_context.net[0].proj), "add_fc2": gemm(blk.ff_context.net[2]),
                # (2, Dh): text rows first, as the joint sequence
                "q_norm": self.cast(torch.stack([a.norm_added_q.weight, a.norm_q.weight]), torch.float32),
                "k_norm": self.cast(torch.stack([a.norm_added_k.weight, a.norm_k.weight]), torch.float32)})
        self.single = []
        for blk in model.single_transformer_blocks:
            a = blk.attn
            self.single.append({
                "qkv_mlp": gemm([a.to_q, a.to_k, a.to_v, blk.proj_mlp]), "out": gemm(blk.proj_out),
                "q_norm": self.cast(a.norm_q.weight, torch.float32),
                "k_norm": self.cast(a.norm_k.weight, torch.float32)})
        # Per step: fp32 embedders and every block's modulation linear side by side (never in the loop).
        emb = model.time_text_embed
        self.t_mlp = self.mlp_weights(emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2)
        self.g_mlp = None if not cfg.guidance_embeds else \
            self.mlp_weights(emb.guidance_embedder.linear_1, emb.guidance_embedder.linear_2)
        self.pooled_mlp = self.mlp_weights(emb.text_embedder.linear_1, emb.text_embedder.linear_2)
        mods = [m for blk in model.transformer_blocks for m in (blk.norm1_context.linear, blk.norm1.linear)]
        mods += [blk.norm.linear for blk in model.single_transformer_blocks] + [model.norm_out.linear]
        self.mods = StackedLinear(mods, self, fp32=True)  # D -> the rows of every block
        self.final = self.token_linear(model.proj_out, rows)
        self.hidden = D

    @property
    def depth(self) -> int:
        return self.config.num_layers + self.config.num_single_layers

    def token_shape(self, latent_shape: tuple, cond: dict | None = None) -> tuple[int, int]:
        """(L + T + R, D): the joint sequence of the call's text tokens (none without `cond`), the image tokens and a
        Kontext reference image's R tokens."""
        L, R = (0, 0) if cond is None else (cond["prompt_embeds"].shape[1], self._reference_len(cond))
        return L + (latent_shape[-2] // 2) * (latent_shape[-1] // 2) + R, self.hidden

    @staticmethod
    def _reference_len(cond: dict) -> int:
        ref = cond.get("reference_latents")
        return 0 if ref is None else ref.shape[1]

    # -- conditioning ------------------------------------------------------------------------------------
    def inputs(self, model: Flux, noise: torch.Tensor, use_cfg: bool, **conditioning) -> dict:
        return check_inputs(self.config, self.device, noise, use_cfg, **conditioning)

    def context_key(self, cond: dict) -> tuple:
        return cond["prompt_embeds"].shape[1], self._reference_len(cond)

    def context_buffers(self, rows: int, latent_shape: tuple, cond: dict) -> dict:
        L, R, dev = cond["prompt_embeds"].shape[1], self._reference_len(cond), self.device
        S = self.token_shape(latent_shape, cond)[0]
        return {"text": torch.zeros(rows, L, self.hidden, device=dev, dtype=self.residual_dtype),
                "cond_emb": torch.zeros(rows, self.hidden, device=dev),  # pooled (+ guidance) embedding, fp32
                "rope": (torch.zeros(S, self.config.head_dim, device=dev), torch.zeros(S, self.config.head_dim,
                                                                                       device=dev)),
                "text_len": L, "grid": (latent_shape[-2] // 2, latent_shape[-1] // 2),
                # Fill / Control: the packed condition concatenated to the latents at every step
                "condition": None if cond.get("condition_latents") is None else
                torch.zeros(rows, S - L - R, self.config.in_channels - self.config.out_channels, device=dev,
                            dtype=self.dtype),
                # Kontext: the reference tokens, embedded once per call (the embedding does not depend on the step)
                "reference": None if not R else torch.zeros(rows, R, self.hidden, device=dev,
                                                            dtype=self.residual_dtype)}

    def write_context(self, ctx: dict, cond: dict, use_cfg: bool) -> None:
        """Once per call: the text tokens, the pooled (and guidance) embedding, the RoPE tables."""
        halves = [("prompt_embeds", "pooled_prompt_embeds")]
        if use_cfg:
            halves.append(("negative_prompt_embeds", "negative_pooled_prompt_embeds"))
        text = torch.cat([cond[t].to(self.device, self.dtype) for t, _ in halves])
        ctx["text"].copy_(self.context(text))
        emb = self.apply_mlp(self.pooled_mlp, torch.cat([cond[p].to(self.device, torch.float32) for _, p in halves]))
        if self.g_mlp is not None:  # rounded to the latent dtype, then times 1000 in it, as diffusers does
            g = (cond["guidance"].to(self.dtype) * 1000).repeat(len(halves))
            emb = emb + self.embed_sinusoidal(self.g_mlp, g)
        ctx["cond_emb"].copy_(emb)
        ids = [cond["txt_ids"], cond["img_ids"]] + ([] if ctx["reference"] is None else [cond["reference_ids"]])
        for buffer, table in zip(ctx["rope"], rope_tables(torch.cat(ids), self.config.axes_dims_rope)):
            buffer.copy_(table)
        if ctx["reference"] is not None:
            ref = cond["reference_latents"].to(self.device, self.dtype).repeat(len(halves), 1, 1)
            ctx["reference"].copy_(self.x_embed(ref).to(self.residual_dtype))
        if ctx["condition"] is not None:
            ctx["condition"].copy_(cond["condition_latents"].to(self.device, self.dtype).repeat(len(halves), 1, 1))

    def modulation(self, t: torch.Tensor, ctx: dict) -> tuple:
        """Timesteps t (S,) = sigma * 1000 -> the double blocks' (S, N, depth_d, 12, D) (text stream's 6, then the
        image's), the single blocks' (S, N, depth_s, 3, D) and the final norm's (S, N, 2, D) (scale first)."""
        cfg = self.config
        # The pipeline passes t / 1000 in the latent dtype; the model rounds it to that dtype and multiplies by 1000.
        v = ((t.to(self.dtype) / 1000).to(self.dtype) * 1000).float()
        temb = self.embed_sinusoidal(self.t_mlp, v)[:, None] + ctx["cond_emb"]  # (S, N, D)
        mods = self.mods(F.silu(temb)).to(self.dtype)  # (S, N, rows)
        S, N = mods.shape[:2]
        nd, ns, D = cfg.num_layers, cfg.num_single_layers, self.hidden
        double, single, final = mods.split([nd * 12 * D, ns * 3 * D, 2 * D], dim=-1)
        return (double.reshape(S, N, nd, 12, D), single.reshape(S, N, ns, 3, D), final.reshape(S, N, 2, D))

    def modulation_shapes(self, steps: int, rows: int) -> list[tuple]:
        cfg, D = self.config, self.hidden
        return [(steps, rows, cfg.num_layers, 12, D), (steps, rows, cfg.num_single_layers, 3, D), (steps, rows, 2, D)]

    # -- forward -----------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """x (N, C, H, W) in `dtype` -> the joint residual stream [text; image; reference] (N, L + T + R, D)."""
        packed = pack_latents(x)  # (N, T, 4C)
        if ctx["condition"] is not None:  # (N, T, 4C + extra), as the pipeline concatenates them
            packed = torch.cat([packed, ctx["condition"]], dim=-1)
        parts = [ctx["text"], self.x_embed(packed).to(self.residual_dtype)]
        return torch.cat(parts if ctx["reference"] is None else parts + [ctx["reference"]], dim=1)

    def _norms(self, resid, L, mods, gates=None, outs=None):
        """The next op's input: each row range normed with its own (shift, scale) of `mods` [(text), (image)],
        after adding gate * out to it in place when given (`gated_residual_adaln`, else `adaln_modulate`)."""
        parts = []
        for rows, (shift, scale), gate, o in zip((slice(None, L), slice(L, None)), mods, gates or (None, None),
                                                 outs or (None, None)):
            x = resid[:, rows]
            if o is None:
                parts.append(adaln_modulate(x, shift, scale, out_dtype=self.dtype, backend=self.backend))
            else:
                parts.append(gated_residual_adaln(x, gate, o, shift, scale, inplace=True, out_dtype=self.dtype,
                                                  backend=self.backend)[1])
        return torch.cat(parts, dim=1)

    def _next_mods(self, i: int, mod: tuple) -> tuple:
        """((text shift, scale), (image shift, scale)) of the norm that follows block i."""
        double, single, final = mod
        nd = self.config.num_layers
        if i + 1 < nd:
            m = double[:, i + 1]
            return (m[:, 0], m[:, 1]), (m[:, 6], m[:, 7])
        if i + 1 < self.depth:
            m = single[:, i + 1 - nd]
            return ((m[:, 0], m[:, 1]),) * 2
        return ((final[:, 1], final[:, 0]),) * 2  # the final norm: scale first

    def first_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        """Double block 0's two K1s: the text rows with its text stream's modulation, the image rows with its own."""
        return self._norms(resid, self.local_rows(ctx, ctx["text_len"]), self._next_mods(-1, mod))

    def sequence_heads(self) -> tuple[int, ...]:
        return (self.config.num_attention_heads,)

    def _attention(self, qkv, q_norm, k_norm, ctx, split):
        """qkv (N, S, 3D) -> (N, S, D): q/k RMSNorm (per stream, (2, Dh) weights split at joint row `split`, or one
        (Dh,) weight), interleaved RoPE over the joint rows, no mask: all in the attention kernel's prologue. On a
        token shard the joint sequence is sharded as one stream: `split` and the RoPE rows are global positions."""
        cfg = self.config
        N, S, _ = qkv.shape
        o = self.self_attention(ctx, self.gqa, qkv.view(N, S, 3, cfg.num_attention_heads, cfg.head_dim),
                                q_norm=q_norm, k_norm=k_norm, eps=1e-6, rope=ctx["rope"], rope_interleaved=True,
                                norm_split=split)
        return o.reshape(N, S, -1)

    def block(self, i: int, resid: torch.Tensor, h: torch.Tensor, mod: tuple, ctx: dict,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i (double blocks first) on the joint residual (in place) and its norm's output h -> (resid,
        the next norm's output). `keep` (2, N, L + T, D) receives the gated-in attention and MLP outputs."""
        L = self.local_rows(ctx, ctx["text_len"])  # the text rows of this rank's part of the joint sequence
        nxt = self._next_mods(i, mod)
        if i < self.config.num_layers:
            layers, m = self.double[i], mod[0][:, i]  # (N, 12, D): text shift, scale, gate x2, then image's
            qkv = torch.cat([layers["add_qkv"](h[:, :L]), layers["qkv"](h[:, L:])], dim=1)
            o = self._attention(qkv, layers["q_norm"], layers["k_norm"], ctx, ctx["text_len"])
            outs = (layers["add_out"](o[:, :L]), layers["out"](o[:, L:]))
            h = self._norms(resid, L, ((m[:, 3], m[:, 4]), (m[:, 9], m[:, 10])), (m[:, 2], m[:, 8]), outs)
            if keep is not None:
                keep[0].copy_(torch.cat(outs, 1))
            mlp = (layers["add_fc2"](layers["add_fc1"].gelu(h[:, :L])), layers["fc2"](layers["fc1"].gelu(h[:, L:])))
            if keep is not None:
                keep[1].copy_(torch.cat(mlp, 1))
            return resid, self._norms(resid, L, nxt, (m[:, 5], m[:, 11]), mlp)
        layers, m = self.single[i - self.config.num_layers], mod[1][:, i - self.config.num_layers]  # (N, 3, D)
        D = self.hidden
        fused = layers["qkv_mlp"].gelu_from(h, 3 * D)  # (N, S, 7D): q, k, v, then the MLP's 4D, GELU'd
        attended = self._attention(fused[..., :3 * D], layers["q_norm"], layers["k_norm"], ctx, None)
        o = layers["out"](torch.cat([attended, fused[..., 3 * D:]], dim=-1))
        if keep is not None:
            keep[0].copy_(o)
        return resid, self._norms(resid, L, nxt, (m[:, 2], m[:, 2]), (o[:, :L], o[:, L:]))

    def reuse_block(self, i: int, resid: torch.Tensor, mod: tuple, ctx: dict,
                    kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i with its outputs from `kept` (2, N, L + T, D): only the gated residual adds and the next norm."""
        L = self.local_rows(ctx, ctx["text_len"])
        nxt = self._next_mods(i, mod)
        if i < self.config.num_layers:
            m = mod[0][:, i]
            gates = ((m[:, 2], m[:, 5]), (m[:, 8], m[:, 11]))  # (attention, MLP) gates of each stream
            for rows, (g_attn, g_mlp) in zip((slice(None, L), slice(L, None)), gates):
                resid[:, rows].addcmul_(g_attn[:, None], kept[0][:, rows])
            return resid, self._norms(resid, L, nxt, (gates[0][1], gates[1][1]), (kept[1][:, :L], kept[1][:, L:]))
        g = mod[1][:, i - self.config.num_layers, 2]
        return resid, self._norms(resid, L, nxt, (g, g), (kept[0][:, :L], kept[0][:, L:]))

    def final_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        final = mod[2]
        return adaln_modulate(resid, final[:, 1], final[:, 0], out_dtype=self.dtype, backend=self.backend)

    def unpatchify(self, out: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The output projection's image rows (not the text's, nor the reference tokens') unpacked to (N, C_out, H,
        W). The text rows are projected too (a 64-wide output: negligible) so that a token shard needs no split."""
        (gh, gw), L = ctx["grid"], ctx["text_len"]
        return unpack_latents(out[:, L:L + gh * gw], 2 * gh, 2 * gw)

    def step_gemms(self, rows: int, latent_shape: tuple | None = None, cond: dict | None = None) -> list[tuple]:
        """The token GEMMs of one step as (call, activation shape), in the order the step runs them (512 text
        tokens, dev's padding, without `cond`)."""
        shape = latent_shape or self.latent_shape
        L = 512 if cond is None else cond["prompt_embeds"].shape[1]
        T, D = (shape[-2] // 2) * (shape[-1] // 2), self.hidden
        M = self.config.mlp_hidden
        gemms = [(self.x_embed, (rows, T, self.x_embed.in_features))]
        for layers in self.double:
            for n, prefix in ((L, "add_"), (T, "")):
                gemms += [(layers[prefix + "qkv"], (rows, n, D)), (layers[prefix + "out"], (rows, n, D)),
                          (layers[prefix + "fc1"].gelu, (rows, n, D)), (layers[prefix + "fc2"], (rows, n, M))]
        for layers in self.single:
            gemms += [(functools.partial(layers["qkv_mlp"].gelu_from, start=3 * D), (rows, L + T, D)),
                      (layers["out"], (rows, L + T, D + M))]
        return gemms + [(self.final, (rows, T, D))]
