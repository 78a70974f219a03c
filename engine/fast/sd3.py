"""SD3 / SD3.5's fused denoiser: every block's and stream's modulation precomputed per step, the text tokens and
the pooled embedding per call, and the fused forward.

The residual stream is the joint sequence s = [image; text] (N, T + L, D), the order SD3's attention
concatenates them in: a block works on its two row ranges in place (each stream its own norms, projections and
MLP, one attention over both), so the sampling loop and a step cache see one tensor, as for every family. Per
block i (the reference is `ditengine.models.sd3.JointBlock`):

    h = [LN(x)(1 + sc1) + sh1 ; LN(c)(1 + cs1) + ch1]   from the previous block's K3s (block 0: two K1s)
    qkv = [h_x @ W_qkv ; h_c @ W_add_qkv]               each stream's q, k, v as one GEMM
    o = gqa_attention(qkv; SD3.5: per-stream q/k RMSNorm in the prologue), no mask
    x += g1 * o_x @ W_out                               dual-attention layers, then:
        x += g3 * attn2(h3),  h3 = LN(x_in)(1 + sc3) + sh3   h3 from the previous [gra], the same LN as h's
    [gra] x += g1 (or g3) * ... ; h_x = LN(x)(1 + sc2) + sh2    and the same for the text rows
    [gra] x += g2 * ff(h_x) ; h_x = the next block's norm       ff: linear_gelu then the down GEMM; text alike

The last block (`context_pre_only`) reads the text rows but leaves them as they are, and its text norm and
the final norm give (scale, shift), the reverse of the others. The final norm modulates every row (the text
rows' share is discarded: one LayerNorm of L rows a step, for one tensor shape through the loop), and the image
rows go through the output projection.

SD3.5's dual-attention layers read the block input's LayerNorm twice, with two modulations: the
`gated_residual_adaln` (or `adaln_modulate`) before such a block writes both from one pass over the row (`second=`
of the adaLN ops), the second into the context's static `second` buffer, which the block's image-only attention
reads.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ditengine.kernels import adaln_modulate, gated_residual_adaln

from ..inputs import check_patch_grid_noise, check_prompt_embeds
from ..models.sd3 import SD3
from ..parallel import pad_rows
from .base import FusedDenoiser, StackedLinear


# Image chunks of a block's modulation (9 in a dual-attention layer), then the text stream's (6; 2 in the last
# block, scale first), then the final norm's (scale, shift): columns of the per-step table.
SH1, SC1, G1, SH2, SC2, G2, SH3, SC3, G3 = range(9)
CH1, CS1, CG1, CH2, CS2, CG2 = range(6)


def check_inputs(cfg, device, noise: torch.Tensor, use_cfg: bool, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None) -> dict:
    """The conditioning of an SD3 call, checked: noise (B, C, H, W) of whole patches within the position table,
    the CLIP + T5 tokens and pooled CLIP embeddings (and the negative prompt's with CFG)."""
    check_patch_grid_noise(noise, cfg.in_channels, cfg.patch_size, device)
    grid = [side // cfg.patch_size for side in noise.shape[-2:]]
    if max(grid) > cfg.pos_embed_max_size:
        raise ValueError(f"noise: a {grid[0]} x {grid[1]} patch grid exceeds this SD3's position table "
                         f"(pos_embed_max_size={cfg.pos_embed_max_size} patches a side)")
    return check_prompt_embeds(noise.shape[0], "CLIP + T5", cfg.joint_attention_dim, cfg.pooled_projection_dim,
                               use_cfg, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                               negative_pooled_prompt_embeds)


class FastSD3(FusedDenoiser):
    """The weights of a `ditengine.models.sd3.SD3` (SD3 or SD3.5) in the fast path's layout, and the fused forward.

    Called by `FastSampler` as `sampler(noise, prompt_embeds=..., pooled_prompt_embeds=...,
    negative_prompt_embeds=..., negative_pooled_prompt_embeds=...)`, `StableDiffusion3Pipeline`'s names: noise
    (B, 16, H, W) on the VAE's latent grid, the CLIP + T5 tokens (B, L, 4096), the pooled CLIP embeddings
    (B, 2048); the negative prompt is the unconditional half of CFG (`cfg_scale` != 1).
    """

    def __init__(self, model: SD3, dtype: torch.dtype = torch.bfloat16, mlp_epilogue: str = "auto",
                 residual_dtype: torch.dtype | None = None, backend: str | None = None,
                 quantize: str | None = None):
        super().__init__(model, dtype, mlp_epilogue, residual_dtype, backend, quantize)
        cfg = self.config
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.gqa_attention_fits(Dh)  # logs the reference attention for a head dim the kernels do not take
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.out_channels = cfg.out_channels
        self.branches = 3 if cfg.dual_attention_layers else 2  # attention, MLP [, second attention] outputs
        rows = 2 * (4096 + 333)  # CFG rows of a 1024 px image's tokens and the prompt's
        gemm = functools.partial(self.token_linear, rows=rows, block=True)

        def norms(*pairs):  # (2, Dh) per-stream RMSNorm weights, image rows first; None without q/k norm
            return tuple(None if a is None else self.cast(torch.stack([a.weight, b.weight]), torch.float32)
                         for a, b in pairs)

        self.patch = self.token_linear((model.pos_embed.proj.weight.flatten(1), None), rows)  # (D, C*p*p)
        self.patch_bias = self.cast(model.pos_embed.proj.bias, torch.float32)
        self.pos_embed = model.pos_embed  # its cropped tables, per grid (the checkpoint's copy)
        self._pos = {}
        self.context = StackedLinear([model.context_embedder], self)  # per call: the T5 tokens
        self.blocks, mods, K = [], [], 0
        for i, blk in enumerate(model.transformer_blocks):
            a, last = blk.attn, blk.context_pre_only
            layers = {"qkv": gemm([a.to_q, a.to_k, a.to_v]),
                      "add_qkv": gemm([a.add_q_proj, a.add_k_proj, a.add_v_proj]),
                      "out": gemm(a.to_out[0]), "fc1": gemm(blk.ff.net[0].proj), "fc2": gemm(blk.ff.net[2]),
                      "last": last, "dual": blk.use_dual_attention, "image": K, "text": K + blk.norm1.n}
            layers["q_norm"], layers["k_norm"] = norms((a.norm_q, a.norm_added_q), (a.norm_k, a.norm_added_k))
            if not last:
                layers.update(add_out=gemm(a.to_add_out), add_fc1=gemm(blk.ff_context.net[0].proj),
                              add_fc2=gemm(blk.ff_context.net[2]))
            if blk.use_dual_attention:
                a2 = blk.attn2
                layers.update(qkv2=gemm([a2.to_q, a2.to_k, a2.to_v]), out2=gemm(a2.to_out[0]),
                              q_norm2=None if a2.norm_q is None else self.cast(a2.norm_q.weight, torch.float32),
                              k_norm2=None if a2.norm_k is None else self.cast(a2.norm_k.weight, torch.float32))
            self.blocks.append(layers)
            mods += [blk.norm1.linear, blk.norm1_context.linear]
            K += blk.norm1.n + blk.norm1_context.n
        self.final_chunk, self.chunks = K, K + 2
        mods.append(model.norm_out.linear)
        # Per step: fp32 embedders and every block's modulation linear side by side (never in the loop).
        emb = model.time_text_embed
        self.t_mlp = self.mlp_weights(emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2)
        self.pooled_mlp = self.mlp_weights(emb.text_embedder.linear_1, emb.text_embedder.linear_2)
        self.mods = StackedLinear(mods, self, fp32=True)  # D -> chunks * D
        self.final = self.token_linear(model.proj_out, rows)
        self.hidden = D

    @property
    def depth(self) -> int:
        return self.config.num_layers

    def grid(self, latent_shape: tuple) -> tuple[int, int]:
        p = self.config.patch_size
        return latent_shape[-2] // p, latent_shape[-1] // p

    def token_shape(self, latent_shape: tuple, cond: dict | None = None) -> tuple[int, int]:
        """(T + L, D): the image tokens, then the call's text tokens (none without `cond`)."""
        h, w = self.grid(latent_shape)
        return h * w + (0 if cond is None else cond["prompt_embeds"].shape[1]), self.hidden

    # -- conditioning ------------------------------------------------------------------------------------
    def inputs(self, model: SD3, noise: torch.Tensor, use_cfg: bool, **conditioning) -> dict:
        return check_inputs(self.config, self.device, noise, use_cfg, **conditioning)

    def context_key(self, cond: dict) -> tuple:
        return (cond["prompt_embeds"].shape[1],)

    def context_buffers(self, rows: int, latent_shape: tuple, cond: dict) -> dict:
        L, dev, grid = cond["prompt_embeds"].shape[1], self.device, self.grid(latent_shape)
        ctx = {"text": torch.zeros(rows, L, self.hidden, device=dev, dtype=self.residual_dtype),
               "pooled_emb": torch.zeros(rows, self.hidden, device=dev),  # fp32
               "image_len": grid[0] * grid[1], "grid": grid}
        if self.config.dual_attention_layers:  # the second modulation of a dual-attention layer's input
            ctx["second"] = torch.zeros(rows, grid[0] * grid[1], self.hidden, device=dev, dtype=self.dtype)
        return ctx

    def write_context(self, ctx: dict, cond: dict, use_cfg: bool) -> None:
        """Once per call: the text stream's first values and the pooled embedding (conditional rows first)."""
        halves = [("prompt_embeds", "pooled_prompt_embeds")]
        if use_cfg:
            halves.append(("negative_prompt_embeds", "negative_pooled_prompt_embeds"))
        text = torch.cat([cond[t].to(self.device, self.dtype) for t, _ in halves])
        ctx["text"].copy_(self.context(text))
        pooled = torch.cat([cond[p].to(self.device, torch.float32) for _, p in halves])
        ctx["pooled_emb"].copy_(self.apply_mlp(self.pooled_mlp, pooled))

    def modulation(self, t: torch.Tensor, ctx: dict) -> tuple:
        """Timesteps t (S,) = sigma * 1000 -> every block's and the final norm's chunks (S, N, chunks, D)."""
        temb = self.embed_sinusoidal(self.t_mlp, t.float())[:, None] + ctx["pooled_emb"]  # (S, N, D)
        mods = self.mods(F.silu(temb)).to(self.dtype)  # (S, N, chunks * D)
        return (mods.unflatten(-1, (self.chunks, self.hidden)),)

    def modulation_shapes(self, steps: int, rows: int) -> list[tuple]:
        return [(steps, rows, self.chunks, self.hidden)]

    # -- forward -----------------------------------------------------------------------------------------
    def _position_bias(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._pos:
            pos = self.pos_embed.cropped_pos_embed(*grid)[0].to(self.device, torch.float32)
            self._pos[grid] = (pos + self.patch_bias).to(self.residual_dtype)  # (T, D)
        return self._pos[grid]

    def embed(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """x (N, C, H, W) in `dtype` -> the joint residual stream [image; text] (N, T + L, D)."""
        p = self.config.patch_size
        N, C, H, W = x.shape
        h, w = H // p, W // p
        patches = x.view(N, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, -1)
        image = self.patch(patches).to(self.residual_dtype).add_(self._position_bias((h, w)))
        return torch.cat([image, ctx["text"]], dim=1)

    def _next_mods(self, i: int, mod: tuple) -> tuple:
        """The norm before block i + 1: ((image shift, scale), (text shift, scale), the image rows' second
        (shift, scale) for a dual-attention layer or None)."""
        m = mod[0]
        if i + 1 == self.depth:
            f = self.final_chunk
            return ((m[:, f + 1], m[:, f]),) * 2 + (None,)  # scale first
        layers = self.blocks[i + 1]
        a, c = layers["image"], layers["text"]
        text = (m[:, c + 1], m[:, c]) if layers["last"] else (m[:, c + CH1], m[:, c + CS1])  # last: scale first
        second = (m[:, a + SH3], m[:, a + SC3]) if layers["dual"] else None
        return (m[:, a + SH1], m[:, a + SC1]), text, second

    def _norms(self, resid, ctx, mods, gates=(None, None), outs=(None, None)):
        """The next op's input: each row range [image; text] normed with its own (shift, scale) of `mods`,
        after adding gate * out to it in place where given (`gated_residual_adaln`, else `adaln_modulate`); a second
        image modulation goes to ctx["second"]."""
        T = self.local_rows(ctx, ctx["image_len"])
        *streams, second = mods
        parts = []
        for rows, (shift, scale), gate, o, extra in zip((slice(None, T), slice(T, None)), streams, gates, outs,
                                                        (second, None)):
            x, kw = resid[:, rows], dict(out_dtype=self.dtype, backend=self.backend)
            if extra is not None:
                kw["second"] = extra
            y = adaln_modulate(x, shift, scale, **kw) if o is None else \
                gated_residual_adaln(x, gate, o, shift, scale, inplace=True, **kw)[1:]
            if extra is not None:
                y, y2 = y
                ctx["second"][:len(x), :y2.shape[1]].copy_(y2)
            elif o is not None:
                (y,) = y
            parts.append(y)
        return torch.cat(parts, dim=1)

    def first_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        """Block 0's two K1s: the image rows with its image modulation (and the second), the text rows with its
        text one."""
        return self._norms(resid, ctx, self._next_mods(-1, mod))

    def sequence_heads(self) -> tuple[int, ...]:
        return (self.config.num_attention_heads,)

    def _image_attention(self, layers: dict, ctx: dict, rows: int, T: int) -> torch.Tensor:
        """A dual-attention layer's second attention over the image rows alone (their second modulation, this
        rank's T of them). On a token shard the image rows are the first image_len tokens of the joint sequence:
        padded to the shard, they attend through the same shards with every text position taken as padding."""
        x = ctx["second"][:rows, :T]
        shards = ctx.get("sequence")
        if shards is None:
            return self._attention(layers["qkv2"](x), layers["q_norm2"], layers["k_norm2"], None)
        qkv = layers["qkv2"](pad_rows(x, shards.per_rank))
        image = ctx | {"sequence": shards.prefix(ctx["image_len"])}
        return self._attention(qkv, layers["q_norm2"], layers["k_norm2"], None, image)[:, :T]

    def _attention(self, qkv, q_norm, k_norm, split, ctx=None):
        """qkv (N, S, 3D) -> (N, S, D): no mask; SD3.5's q/k RMSNorm (per stream, (2, Dh) weights split at row
        `split`, or one (Dh,) weight) in the attention kernel's prologue. On a token shard (the joint attention,
        given `ctx`) the joint sequence is sharded as one stream and `split` is the global image count."""
        cfg = self.config
        N, S, _ = qkv.shape
        prologue = {} if q_norm is None else dict(q_norm=q_norm, k_norm=k_norm, eps=1e-6, norm_split=split)
        o = self.self_attention(ctx, self.gqa, qkv.view(N, S, 3, cfg.num_attention_heads, cfg.head_dim),
                                **prologue)
        return o.reshape(N, S, -1)

    def block(self, i: int, resid: torch.Tensor, h: torch.Tensor, mod: tuple, ctx: dict,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on the joint residual (in place) and its norm's output h -> (resid, the next norm's output).
        `keep` (branches, N, T + L, D) receives the attention, MLP [and second attention] outputs, ungated."""
        T, layers, m = self.local_rows(ctx, ctx["image_len"]), self.blocks[i], mod[0]  # this rank's image rows
        a, c, last = layers["image"], layers["text"], layers["last"]
        qkv = torch.cat([layers["qkv"](h[:, :T]), layers["add_qkv"](h[:, T:])], dim=1)
        o = self._attention(qkv, layers["q_norm"], layers["k_norm"], ctx["image_len"], ctx)
        o_x = layers["out"](o[:, :T])
        o_c = None if last else layers["add_out"](o[:, T:])
        if keep is not None:
            keep[0][:, :T].copy_(o_x)
            if o_c is not None:
                keep[0][:, T:].copy_(o_c)
        gate_x = m[:, a + G1]
        if layers["dual"]:  # x += g1 * o, then the second attention's gated add feeds the MLP's norm
            resid[:, :T].addcmul_(gate_x[:, None], o_x)
            o_x = layers["out2"](self._image_attention(layers, ctx, len(h), T))
            gate_x = m[:, a + G3]
            if keep is not None:
                keep[2][:, :T].copy_(o_x)
        h = self._norms(resid, ctx, ((m[:, a + SH2], m[:, a + SC2]), (m[:, c + CH2], m[:, c + CS2]) if not last
                                     else (m[:, c + 1], m[:, c]), None),
                        (gate_x, None if last else m[:, c + CG1]), (o_x, o_c))
        mlp_x = layers["fc2"](layers["fc1"].gelu(h[:, :T]))
        mlp_c = None if last else layers["add_fc2"](layers["add_fc1"].gelu(h[:, T:]))
        if keep is not None:
            keep[1][:, :T].copy_(mlp_x)
            if mlp_c is not None:
                keep[1][:, T:].copy_(mlp_c)
        return resid, self._norms(resid, ctx, self._next_mods(i, mod), (m[:, a + G2], None if last else m[:, c + CG2]),
                                  (mlp_x, mlp_c))

    def reuse_block(self, i: int, resid: torch.Tensor, mod: tuple, ctx: dict,
                    kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i with its outputs from `kept`: only the gated residual adds and the next norm."""
        T, layers, m = self.local_rows(ctx, ctx["image_len"]), self.blocks[i], mod[0]
        a, c, last = layers["image"], layers["text"], layers["last"]
        resid[:, :T].addcmul_(m[:, a + G1, None], kept[0][:, :T])
        if layers["dual"]:
            resid[:, :T].addcmul_(m[:, a + G3, None], kept[2][:, :T])
        gates, outs = (m[:, a + G2], None), (kept[1][:, :T], None)
        if not last:
            resid[:, T:].addcmul_(m[:, c + CG1, None], kept[0][:, T:])
            gates, outs = (m[:, a + G2], m[:, c + CG2]), (kept[1][:, :T], kept[1][:, T:])
        return resid, self._norms(resid, ctx, self._next_mods(i, mod), gates, outs)

    def final_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        f = self.final_chunk
        return adaln_modulate(resid, mod[0][:, f + 1], mod[0][:, f], out_dtype=self.dtype, backend=self.backend)

    def unpatchify(self, out: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The output projection's image rows unpatchified to (N, C_out, H, W) (the text rows are projected too, a
        narrow output, so that a token shard needs no split)."""
        (gh, gw), p, C = ctx["grid"], self.config.patch_size, self.out_channels
        out = out[:, :ctx["image_len"]].view(out.shape[0], gh, gw, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], C, gh * p, gw * p)

    def step_gemms(self, rows: int, latent_shape: tuple | None = None, cond: dict | None = None) -> list[tuple]:
        """The token GEMMs of one step as (call, activation shape), in the order the step runs them (333 text
        tokens, the pipeline's CLIP 77 + T5 256, without `cond`)."""
        h, w = self.grid(latent_shape or self.latent_shape)
        T, L, D = h * w, 333 if cond is None else cond["prompt_embeds"].shape[1], self.hidden
        gemms = [(self.patch, (rows, T, self.patch.in_features))]
        for layers in self.blocks:
            gemms += [(layers["qkv"], (rows, T, D)), (layers["add_qkv"], (rows, L, D)), (layers["out"], (rows, T, D))]
            if layers["dual"]:
                gemms += [(layers["qkv2"], (rows, T, D)), (layers["out2"], (rows, T, D))]
            gemms += [(layers["fc1"].gelu, (rows, T, D)), (layers["fc2"], (rows, T, 4 * D))]
            if not layers["last"]:
                gemms += [(layers["add_out"], (rows, L, D)), (layers["add_fc1"].gelu, (rows, L, D)),
                          (layers["add_fc2"], (rows, L, 4 * D))]
        return gemms + [(self.final, (rows, T, D))]
