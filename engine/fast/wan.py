"""Wan 2.1 / 2.2's fused denoiser (video): every block's text (and image) K/V and the 3-D RoPE tables per call, the
shared time projection with each block's table per step, and the fused forward.

Per block (the reference is `ditengine.models.wan.Block`; D the width, H heads of Dh):

    qkv = h @ W_qkv ; q, k = RMSNorm over all of D (each its weight)   one fused norm pass each (adaLN kernel, rms)
    o = attention(q, k, v; interleaved 3-D RoPE in the prologue) @ W_o
    [gra] x += g * o ; y = LayerNorm(x) * w2 + b2                       the affine cross-attention norm, same kernel
    o = attention(RMSNorm(y @ W_q), text K/V) [+ image K/V] @ W_o   K/V of the text, computed before the loop
    [gra] x += o ; h = adaLN(x; c_shift, c_scale)                       no gate: [gra] with a unit gate
    o = gelu_tanh(h @ W_1) @ W_2
    [gra] x += c_gate * o ; h = adaLN(x; next block's shift, scale, or the output norm's)

The across-heads q/k norm needs a token's whole row (every head), which one attention tile (one head) does not
see; a separate fused pass over q and k (read once, written once: 4 T D elements) is the cheapest exact form, and
small beside the attention's 4 T^2 D FLOPs at video lengths.

Modulation: m = time_proj(SiLU(temb)) is shared by all blocks, each adds its own (6, D) table; the output norm's
shift and scale are the raw temb plus a (2, D) table. Every row shares the step's timestep, so the table holds
one row (expanded, never copied, to the model's rows). Rows are [conditional; unconditional].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditengine.kernels import adaln_modulate, adaln_modulate_ref, gated_residual_adaln

from ..inputs import check_noise_values
from ..models.wan import TEXT_LEN, Wan, video_rope
from .base import FusedDenoiser, StackedLinear, cross_block_gemms


def check_inputs(cfg, device, noise: torch.Tensor, use_cfg: bool, prompt_embeds=None, negative_prompt_embeds=None,
                 image_embeds=None, condition_latents=None, first_frame_latents=None) -> dict:
    """A Wan call's conditioning, checked: noise (B, C, F, H, W) on the patch grid; umT5 tokens (B, L, text_dim) (the
    pipelines pad them to 512) and the negative prompt's with guidance; for image to video, CLIP's image tokens
    `image_embeds` (B, I, image_dim) (the same for both halves, as the pipeline passes them) and, for a model with
    more input channels than it predicts, `condition_latents` (B, extra, F, H, W), concatenated to the latents on the
    channel axis at every step (Wan 2.1 I2V: the frame mask and the encoded image); for Wan 2.2 TI2V-5B's image mode,
    `first_frame_latents` (B, C, 1, H, W), the encoded image that stands in for the first latent frame at every step,
    its tokens at timestep 0 (the pipeline's `expand_timesteps`)."""
    C = cfg.out_channels
    pt, ph, pw = cfg.patch_size
    if not isinstance(noise, torch.Tensor) or noise.dim() != 5 or noise.shape[1] != C or noise.shape[2] % pt \
            or noise.shape[3] % ph or noise.shape[4] % pw:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise: expected video latents (B, {C}, F, H, W) with F, H, W multiples of the patch "
                         f"{cfg.patch_size}, got {shape}")
    check_noise_values(noise, torch.device(device))
    B = noise.shape[0]
    named = [("prompt_embeds", prompt_embeds)]
    if use_cfg:
        if negative_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds: required with guidance (cfg_scale != 1): the unconditional "
                             "half (the pipeline encodes the negative prompt, \"\" by default)")
        named.append(("negative_prompt_embeds", negative_prompt_embeds))
    cond = {}
    for name, text in named:
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[0] != B \
                or text.shape[2] != cfg.text_dim:
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"{name}: expected ({B}, L, {cfg.text_dim}) (umT5 tokens, padded to {TEXT_LEN}, one per "
                             f"noise row), got {shape}")
        cond[name] = text
    if use_cfg and negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
        raise ValueError(f"negative_prompt_embeds: {negative_prompt_embeds.shape[1]} tokens, expected "
                         f"{prompt_embeds.shape[1]} like prompt_embeds (pad both to one length)")
    if cfg.image_dim is None and image_embeds is not None:
        raise ValueError("image_embeds: this Wan has no image embedder (a text-to-video model); image to video "
                         "needs an I2V checkpoint")
    if cfg.image_dim is not None:
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[0] != B \
                or image_embeds.shape[2] != cfg.image_dim:
            shape = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else image_embeds
            raise ValueError(f"image_embeds: this image-to-video Wan needs CLIP's image tokens ({B}, I, "
                             f"{cfg.image_dim}), got {shape}")
    cond["image_embeds"] = image_embeds
    extra = cfg.in_channels - C
    want = (B, extra, *noise.shape[2:])
    if extra and (not isinstance(condition_latents, torch.Tensor) or tuple(condition_latents.shape) != want):
        shape = tuple(condition_latents.shape) if isinstance(condition_latents, torch.Tensor) else condition_latents
        raise ValueError(f"condition_latents: this Wan takes {cfg.in_channels} input channels for its {C} predicted "
                         f"ones: expected the condition {want} (I2V: frame mask and encoded image), got {shape}")
    if not extra and condition_latents is not None:
        raise ValueError("condition_latents: this Wan takes no input channels beyond its latents (an I2V model does)")
    cond["condition_latents"] = condition_latents
    if first_frame_latents is not None:
        if extra or pt != 1:
            raise ValueError("first_frame_latents: only for a model whose input is its latents alone, patched one "
                             "frame at a time (Wan 2.2 TI2V-5B)")
        want = (B, C, 1, *noise.shape[3:])
        if not isinstance(first_frame_latents, torch.Tensor) or tuple(first_frame_latents.shape) != want:
            shape = tuple(first_frame_latents.shape) if isinstance(first_frame_latents, torch.Tensor) \
                else first_frame_latents
            raise ValueError(f"first_frame_latents: expected the encoded first frame {want}, got {shape}")
    cond["first_frame_latents"] = first_frame_latents
    return cond


def frozen_input(x: torch.Tensor, first_frame: torch.Tensor | None) -> torch.Tensor:
    """The model input with its first latent frame replaced by the encoded image (TI2V's image mode), as the pipeline
    mixes it: (1 - mask) * condition + mask * latents, the mask 0 on frame 0."""
    if first_frame is None:
        return x
    mask = torch.ones(1, 1, x.shape[2], 1, 1, dtype=x.dtype, device=x.device)
    mask[:, :, 0] = 0
    return (1 - mask) * first_frame.to(x.dtype) + mask * x


def rms_across_heads(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None) -> torch.Tensor:
    """RMSNorm of x (N, T, D) over all of D (every head) with its (D,) weight: the adaLN kernel with zero shift and
    scale (one read, one write; x may be a column slice of the fused qkv output)."""
    zero = weight.new_zeros(1, x.shape[-1]).expand(x.shape[0], -1)
    return adaln_modulate(x, zero, zero, eps=eps, rms=True, weight=weight, out_dtype=x.dtype, backend=backend)


class FastWan(FusedDenoiser):
    """The weights of a `ditengine.models.wan.Wan` in the fast path's layout, and the fused forward.

    Called by `FastSampler` as `sampler(noise, prompt_embeds=..., negative_prompt_embeds=..., image_embeds=None,
    condition_latents=None, first_frame_latents=None)` (see `check_inputs`), the diffusers pipelines' names where they
    have one (`WanPipeline`, `WanImageToVideoPipeline`). Latents (B, C, F, H, W) of any grid of whole patches: a plan
    per shape.
    """

    branches = 3  # self-attention, cross-attention, FFN: what the per-block cache reuse keeps

    def __init__(self, model: Wan, dtype: torch.dtype = torch.bfloat16, mlp_epilogue: str = "auto",
                 residual_dtype: torch.dtype | None = None, backend: str | None = None,
                 quantize: str | None = None):
        super().__init__(model, dtype, mlp_epilogue, residual_dtype, backend, quantize)
        cfg = self.config
        if cfg.pos_embed_seq_len is not None:
            raise ValueError("model: a first-last-frame Wan (pos_embed_seq_len) is not served by the fast path; "
                             "sample it with backend='reference'")
        self.hidden = cfg.hidden_size
        self.gqa_attention_fits(cfg.head_dim)  # logs the reference attention for a head dim the kernels do not take
        self.latent_shape = (cfg.out_channels, 21, 60, 104)  # 81 frames at 480 x 832, the pipelines' default
        self.out_channels = cfg.out_channels
        rows = 2 * 21 * 30 * 52  # the prepacked GEMMs' row hint: 480p, 81 frames, the CFG batch
        C = cfg.out_channels
        patch = model.patch_embedding.weight.flatten(2)  # (D, C_in, pt ph pw)
        # The latents' part of the patch GEMM per step; a condition's part (I2V) once per call.
        self.patch = self.token_linear((patch[:, :C].flatten(1), model.patch_embedding.bias), rows)
        self.condition_patch = None if cfg.in_channels == C else \
            self.token_linear((patch[:, C:].flatten(1), None), rows)
        gemm = lambda layers: self.token_linear(layers, rows, block=True)  # noqa: E731
        self.blocks = [{"qkv": gemm([b.attn1.to_q, b.attn1.to_k, b.attn1.to_v]), "proj": gemm(b.attn1.to_out[0]),
                        "q": gemm(b.attn2.to_q), "cross_proj": gemm(b.attn2.to_out[0]),
                        "fc1": gemm(b.ffn.net[0].proj), "fc2": gemm(b.ffn.net[2]),
                        "norm_q": self.cast(b.attn1.norm_q.weight), "norm_k": self.cast(b.attn1.norm_k.weight),
                        "cross_norm_q": self.cast(b.attn2.norm_q.weight),
                        "norm2": None if b.norm2 is None else (self.cast(b.norm2.weight, torch.float32),
                                                               self.cast(b.norm2.bias, torch.float32))}
                       for b in model.blocks]
        # Per call: the text MLP, then every block's K and V side by side; the K norms' weights (depth, D).
        tx = model.condition_embedder.text_embedder
        self.text_mlp = tuple(self.cast(p) for p in (tx.linear_1.weight, tx.linear_1.bias, tx.linear_2.weight,
                                                     tx.linear_2.bias))
        self.kv = StackedLinear([m for b in model.blocks for m in (b.attn2.to_k, b.attn2.to_v)], self)
        self.k_norms = self.cast(torch.stack([b.attn2.norm_k.weight for b in model.blocks]), torch.float32)
        self.image_embedder = model.condition_embedder.image_embedder  # CLIP tokens -> D: once per call, as it is
        if cfg.added_kv_proj_dim is not None:
            self.image_kv = StackedLinear([m for b in model.blocks for m in (b.attn2.add_k_proj, b.attn2.add_v_proj)],
                                          self)
            self.image_k_norms = self.cast(torch.stack([b.attn2.norm_added_k.weight for b in model.blocks]),
                                           torch.float32)
        # Per step: fp32 embedders (tiny; the modulation they feed scales every activation).
        te = model.condition_embedder.time_embedder
        self.t_mlp = self.mlp_weights(te.linear_1, te.linear_2)
        self.time_proj = (self.cast(model.condition_embedder.time_proj.weight, torch.float32),
                          self.cast(model.condition_embedder.time_proj.bias, torch.float32))
        self.tables = self.cast(torch.cat([b.scale_shift_table for b in model.blocks]), torch.float32)  # (depth, 6, D)
        self.final_table = self.cast(model.scale_shift_table[0], torch.float32)  # (2, D)
        self.final = self.token_linear(model.proj_out, rows)

    @property
    def depth(self) -> int:
        return self.config.num_layers

    def grid(self, latent_shape: tuple) -> tuple[int, int, int]:
        return tuple(n // p for n, p in zip(latent_shape[-3:], self.config.patch_size))

    def token_shape(self, latent_shape: tuple, cond: dict | None = None) -> tuple[int, int]:
        f, h, w = self.grid(latent_shape)
        return f * h * w, self.hidden

    # -- conditioning ------------------------------------------------------------------------------------
    def inputs(self, model: Wan, noise: torch.Tensor, use_cfg: bool, prompt_embeds=None, negative_prompt_embeds=None,
               image_embeds=None, condition_latents=None, first_frame_latents=None) -> dict:
        return check_inputs(self.config, self.device, noise, use_cfg, prompt_embeds, negative_prompt_embeds,
                            image_embeds, condition_latents, first_frame_latents)

    def context_key(self, cond: dict) -> tuple:
        """The prompt length, the image tokens' count (the K/V buffers' shapes) and whether a first frame is held."""
        image = cond["image_embeds"]
        return cond["prompt_embeds"].shape[1], None if image is None else image.shape[1], \
            cond["first_frame_latents"] is not None

    def context_buffers(self, rows: int, latent_shape: tuple, cond: dict) -> dict:
        cfg, dev = self.config, self.device
        L, H, Dh, D = cond["prompt_embeds"].shape[1], cfg.num_attention_heads, cfg.head_dim, self.hidden
        T = self.token_shape(latent_shape)[0]
        image = cond["image_embeds"]
        grid = self.grid(latent_shape)
        ctx = {"kv": torch.zeros(self.depth, rows, L, 2, H, Dh, device=dev, dtype=self.dtype),
               "unit_gate": torch.ones(rows, D, device=dev, dtype=self.dtype),
               "zero": torch.zeros(rows, D, device=dev, dtype=torch.float32),
               "rope": video_rope(grid, cfg, dev), "grid": grid,
               "condition": None, "image_kv": None, "frozen": 0}
        if cond["first_frame_latents"] is not None:  # the first frame's tokens, at t = 0 (TI2V's image mode)
            ctx["frozen"] = grid[1] * grid[2]
            ctx["frame0"] = torch.zeros(rows, ctx["frozen"], D, device=dev, dtype=self.residual_dtype)
            ctx["mod0"] = tuple(torch.zeros(shape[1:], device=dev, dtype=self.dtype)
                                for shape in self.modulation_shapes(1, 1))  # (1, depth, 6, D), (1, 2, D)
        if self.condition_patch is not None:
            ctx["condition"] = torch.zeros(rows, T, D, device=dev, dtype=self.residual_dtype)
        if image is not None:
            ctx["image_kv"] = torch.zeros(self.depth, rows, image.shape[1], 2, H, Dh, device=dev, dtype=self.dtype)
        return ctx

    def _kv(self, stacked: StackedLinear, k_norms: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Every block's K (RMS-normed over D, each block's weight) and V of `tokens` (N, L, D): (depth, N, L, 2, H,
        Dh) in the compute dtype."""
        cfg = self.config
        N, L, D = tokens.shape
        kv = stacked(tokens).view(N, L, self.depth, 2, D)
        k = kv[..., 0, :].float()
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + cfg.eps) * k_norms  # (N, L, depth, D)
        kv = torch.stack([k.to(self.dtype), kv[..., 1, :]], dim=3)  # (N, L, depth, 2, D)
        return kv.view(N, L, self.depth, 2, cfg.num_attention_heads, cfg.head_dim).permute(2, 0, 1, 3, 4, 5)

    def write_context(self, ctx: dict, cond: dict, use_cfg: bool) -> None:
        """Once per call: the text MLP and every block's text K/V; the image tokens' K/V; the condition's tokens."""
        halves = 2 if use_cfg else 1
        names = ["prompt_embeds", "negative_prompt_embeds"][:halves]
        text = torch.cat([cond[name].to(self.device, self.dtype) for name in names])  # (N, L, text_dim)
        w1, b1, w2, b2 = self.text_mlp
        text = F.linear(F.gelu(F.linear(text, w1, b1), approximate="tanh"), w2, b2)  # (N, L, D)
        ctx["kv"].copy_(self._kv(self.kv, self.k_norms, text))
        if ctx["image_kv"] is not None:
            image = cond["image_embeds"].to(self.device)
            embedder_dtype = self.image_embedder.norm1.weight.dtype
            tokens = self.image_embedder(image.to(embedder_dtype)).to(self.dtype).repeat(halves, 1, 1)
            ctx["image_kv"].copy_(self._kv(self.image_kv, self.image_k_norms, tokens))
        if ctx["condition"] is not None:
            condition = self._patches(cond["condition_latents"].to(self.device, self.dtype))
            ctx["condition"].copy_(self.condition_patch(condition).repeat(halves, 1, 1))
        if ctx["frozen"]:
            frame = self._patches(cond["first_frame_latents"].to(self.device, self.dtype))
            ctx["frame0"].copy_(self.patch(frame).repeat(halves, 1, 1))
            for into, value in zip(ctx["mod0"], self.modulation(torch.zeros(1, device=self.device), ctx)):
                into.copy_(value[0])

    def context_rows(self, ctx: dict, rows: int, start: int = 0) -> dict:
        """Rows [start, start + rows); the K/V keep their block dim first."""
        out = super().context_rows(ctx, rows, start) | {"kv": ctx["kv"][:, start:start + rows]}
        if ctx["image_kv"] is not None:
            out["image_kv"] = ctx["image_kv"][:, start:start + rows]
        return out

    def modulation(self, t: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps t (S,) -> every block's modulation (S, 1, depth, 6, D) and the output norm's (S, 1, 2, D):
        one row, which every model row shares."""
        temb = self.embed_sinusoidal(self.t_mlp, t)[:, None]  # (S, 1, D) fp32
        m = F.linear(F.silu(temb), *self.time_proj).view(*temb.shape[:2], 1, 6, self.hidden)
        return (m + self.tables).to(self.dtype), (temb[:, :, None] + self.final_table).to(self.dtype)

    def modulation_shapes(self, steps: int, rows: int) -> list[tuple]:
        return [(steps, 1, self.depth, 6, self.hidden), (steps, 1, 2, self.hidden)]

    # -- forward -----------------------------------------------------------------------------------------
    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, F, H, W) -> (N, F' H' W', C pt ph pw): the Conv3d's patches, in its weight's order."""
        pt, ph, pw = self.config.patch_size
        N, C, f, h, w = x.shape
        x = x.view(N, C, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(N, (f // pt) * (h // ph) * (w // pw), -1)

    def embed(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """x (N, C, F, H, W) in `dtype` -> the residual stream (N, T, D), frame-major over the patch grid."""
        resid = self.patch(self._patches(x)).to(self.residual_dtype)
        if ctx["condition"] is not None:
            resid.add_(ctx["condition"][:len(x)])
        if ctx["frozen"]:
            resid[:, :ctx["frozen"]] = ctx["frame0"][:len(x)]
        return resid

    @staticmethod
    def _rows(mod: torch.Tensor, n: int) -> torch.Tensor:
        return mod.expand(n, *mod.shape[1:])

    def first_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        m = self._rows(mod[0][:, 0], len(resid))
        h = adaln_modulate(resid, m[:, 0], m[:, 1], eps=self.config.eps, out_dtype=self.dtype, backend=self.backend)
        return self._hold_first_frame(ctx, resid, h, self._next0(ctx, -1))

    # -- TI2V's image mode: the first frame's tokens run at t = 0 ------------------------------------------
    # The kernels take one modulation row per model row; the first frame's H' W' tokens (a prefix of every row) are
    # computed with the step's modulation, then their residual gate and norm outputs are redone with t = 0's:
    # one small pass over 1 / F' of the tokens, instead of a per-token modulation table.
    def _next0(self, ctx: dict, i: int) -> torch.Tensor | None:
        """t = 0's (2, D) shift and scale of the norm after block i (-1: the first norm), or None (no frozen frame)."""
        if not ctx or not ctx["frozen"]:
            return None
        block0, final0 = ctx["mod0"]
        return block0[0, i + 1, :2] if i + 1 < self.depth else final0[0]

    def _gate0(self, ctx: dict, i: int, j: int) -> torch.Tensor | None:
        return ctx["mod0"][0][0, i, j] if ctx["frozen"] else None

    @staticmethod
    def _regate_first_frame(ctx: dict, resid: torch.Tensor, gate: torch.Tensor, gate0: torch.Tensor | None,
                            o: torch.Tensor) -> None:
        """The first frame's share of x += gate * o redone with t = 0's gate: (gate0 - gate) * o added to its tokens
        (nothing without a held frame, gate0 None)."""
        if gate0 is not None:
            n0 = FusedDenoiser.local_rows(ctx, ctx["frozen"])  # on a token shard: the frame's rows in it
            resid[:, :n0] += ((gate0 - gate)[:, None] * o[:, :n0].float()).to(resid.dtype)

    def _hold_first_frame(self, ctx: dict, resid: torch.Tensor, h: torch.Tensor, norm0: torch.Tensor | None,
                          gate: torch.Tensor | None = None, gate0: torch.Tensor | None = None,
                          o: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The first frame's tokens of resid and h redone at t = 0: the gate's difference (gate0 - gate) * o added to
        the residual, then the norm with shift and scale `norm0` (2, D) (with `weight`: the affine norm)."""
        if norm0 is None:
            return h
        n0, N = self.local_rows(ctx, ctx["frozen"]), len(resid)
        self._regate_first_frame(ctx, resid, gate, gate0, o)
        h[:, :n0] = adaln_modulate_ref(resid[:, :n0], norm0[0].expand(N, -1), norm0[1].expand(N, -1),
                                       eps=self.config.eps, out_dtype=h.dtype, weight=weight)
        return h

    def _next(self, i: int, mod: tuple, n: int) -> torch.Tensor:
        """(n, 2, D) shift and scale of the norm after block i."""
        block_mod, final_mod = mod
        return self._rows(block_mod[:, i + 1, :2] if i + 1 < self.depth else final_mod, n)

    def _self_attention(self, layers: dict, h: torch.Tensor, ctx: dict) -> torch.Tensor:
        cfg = self.config
        N, T, D = h.shape
        qkv = layers["qkv"](h).view(N, T, 3, D)
        q = rms_across_heads(qkv[:, :, 0], layers["norm_q"], cfg.eps, self.backend)
        k = rms_across_heads(qkv[:, :, 1], layers["norm_k"], cfg.eps, self.backend)
        heads = (N, T, cfg.num_attention_heads, cfg.head_dim)
        q, k, v = q.view(heads), k.view(heads), qkv[:, :, 2].view(heads)
        o = self.self_attention(ctx, self.gqa, q, k, v, rope=ctx["rope"], rope_interleaved=True)
        return layers["proj"](o.view(N, T, D))

    def sequence_heads(self) -> tuple[int, ...]:
        return (self.config.num_attention_heads,)

    def _cross(self, i: int, y: torch.Tensor, ctx: dict) -> torch.Tensor:
        cfg, layers = self.config, self.blocks[i]
        N, T, D = y.shape
        q = rms_across_heads(layers["q"](y), layers["cross_norm_q"], cfg.eps, self.backend)
        q = q.view(N, T, cfg.num_attention_heads, cfg.head_dim)
        o = self._attend(q, ctx["kv"][i])
        if ctx["image_kv"] is not None:  # the image's own attention, summed with the text's
            o += self._attend(q, ctx["image_kv"][i])
        return layers["cross_proj"](o.view(N, T, D))

    def _attend(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q (N, T, H, Dh) to every key of kv (N, L, 2, H, Dh): the pipelines pad the text with no mask, so there is
        no padding for `cross_attention`'s per-row lengths to skip; the GQA kernel reads K and V as strided views."""
        return self.gqa(q, kv[:, :, 0], kv[:, :, 1])

    def _cross_norm(self, i: int, layers: dict, resid: torch.Tensor, gate: torch.Tensor, o: torch.Tensor,
                    ctx: dict) -> torch.Tensor:
        """x += gate * o, then the cross-attention's input: the affine LayerNorm (as adaLN with weight w2, shift b2
        and zero scale), or x itself."""
        N, gate0 = len(resid), self._gate0(ctx, i, 2)
        if layers["norm2"] is None:
            resid.addcmul_(gate[:, None], o)
            self._regate_first_frame(ctx, resid, gate, gate0, o)
            return resid.to(self.dtype)
        weight, bias = layers["norm2"]
        _, y = gated_residual_adaln(resid, gate, o, bias.expand(N, -1), ctx["zero"][:N], eps=self.config.eps,
                                    inplace=True, out_dtype=self.dtype, backend=self.backend, weight=weight)
        norm0 = None if gate0 is None else torch.stack([bias, torch.zeros_like(bias)])
        return self._hold_first_frame(ctx, resid, y, norm0, gate, gate0, o, weight)

    def block(self, i: int, resid: torch.Tensor, h: torch.Tensor, mod: tuple, ctx: dict,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on the residual stream (in place) and its adaLN input h -> (resid, the next adaLN input).
        `keep` (3, N, T, D) receives the self-attention, cross-attention and FFN outputs (a cache reuses them)."""
        layers, N = self.blocks[i], len(resid)
        m = self._rows(mod[0][:, i], N)  # (N, 6, D): shift, scale, gate for attention, then for the FFN
        o = self._self_attention(layers, h, ctx)
        c = self._cross(i, self._cross_norm(i, layers, resid, m[:, 2], o, ctx), ctx)
        if keep is not None:
            keep[0].copy_(o)
            keep[1].copy_(c)
        eps = self.config.eps
        resid, h = gated_residual_adaln(resid, ctx["unit_gate"][:N], c, m[:, 3], m[:, 4], eps=eps, inplace=True,
                                        out_dtype=self.dtype, backend=self.backend)
        h = self._hold_first_frame(ctx, resid, h, None if not ctx["frozen"] else ctx["mod0"][0][0, i, 3:5])
        o = layers["fc2"](layers["fc1"].gelu(h))
        if keep is not None:
            keep[2].copy_(o)
        return self._last_residual(i, resid, m, o, mod, ctx)

    def _last_residual(self, i: int, resid: torch.Tensor, m: torch.Tensor, o: torch.Tensor, mod: tuple,
                       ctx: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x += c_gate * o (the FFN's output), then the next norm."""
        nxt = self._next(i, mod, len(resid))
        resid, h = gated_residual_adaln(resid, m[:, 5], o, nxt[:, 0], nxt[:, 1], eps=self.config.eps, inplace=True,
                                        out_dtype=self.dtype, backend=self.backend)
        return resid, self._hold_first_frame(ctx, resid, h, self._next0(ctx, i), m[:, 5], self._gate0(ctx, i, 5), o)

    def reuse_block(self, i: int, resid: torch.Tensor, mod: tuple, ctx: dict,
                    kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i with its three branch outputs from `kept` (3, N, T, D): only the residual adds (this step's
        gates) and the norm after them run."""
        m = self._rows(mod[0][:, i], len(resid))
        resid.addcmul_(m[:, 2, None], kept[0])
        self._regate_first_frame(ctx, resid, m[:, 2], self._gate0(ctx, i, 2), kept[0])
        resid.add_(kept[1])
        return self._last_residual(i, resid, m, kept[2], mod, ctx)

    def final_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        final = self._rows(mod[1], len(resid))
        h = adaln_modulate(resid, final[:, 0], final[:, 1], eps=self.config.eps, out_dtype=self.dtype,
                           backend=self.backend)
        return self._hold_first_frame(ctx, resid, h, self._next0(ctx, self.depth - 1))

    def unpatchify(self, out: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The output projection's rows (N, T, patch C_out) -> (N, C_out, F, H, W)."""
        (f, gh, gw), (pt, ph, pw), c = ctx["grid"], self.config.patch_size, self.out_channels
        N = out.shape[0]
        out = out.view(N, f, gh, gw, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(N, c, f * pt, gh * ph, gw * pw)

    def step_gemms(self, rows: int, latent_shape: tuple | None = None, cond: dict | None = None) -> list[tuple]:
        """The token GEMMs of one step as (call, activation shape), in the order the step runs them."""
        T = self.token_shape(latent_shape or self.latent_shape)[0]
        return cross_block_gemms(self, rows, T, self.config.ffn_dim)
