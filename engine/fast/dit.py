"""The class-conditional DiT's fused denoiser: its weights in the fast path's form, and the fused forward.

Per block (docs/design.md section 2; `[gra]` marks a `gated_residual_adaln`, one pass over the row):

    h = adaLN(x; shift_msa, scale_msa)               adaln_modulate, block 0 only; later blocks get h from [gra]
    qkv = h @ W_qkv                                  cuBLAS (prepacked on a CPU)
    o = attention(qkv as (B, T, 3, H, Dh))           Triton, no permutes
    o = o @ W_proj
    [gra] x += gate_msa * o ; h = adaLN(x; shift_mlp, scale_mlp)
    h = gelu_tanh(h @ W_fc1)                         GELU fused into the GEMM where the device allows
    o = h @ W_fc2
    [gra] x += gate_mlp * o ; h = adaLN(x; next block's shift_msa, scale_msa, or the final layer's)

The conditioning (timestep and label embeddings and every block's adaLN modulation) depends only on the
timestep and the label: the context holds the label embeddings of a call, `modulation` turns timesteps
into every block's modulation in one batched GEMM.
"""
from __future__ import annotations

import functools
import torch
import torch.nn.functional as F

from ditengine.kernels import adaln_modulate, attention, gated_residual_adaln

from ..inputs import check_inputs, guided_labels
from ..models.dit import DiT
from .base import FusedDenoiser, StackedLinear


class FastDiT(FusedDenoiser):
    """The weights of a `ditengine.DiT` in the fast path's layout and dtype, and the fused forward.

    Weights are copied (converted once) at construction: later changes to the model are not seen.
    See `FusedDenoiser` for `dtype`, `residual_dtype`, `mlp_epilogue` and `backend`.
    """

    LAYERS = ("qkv", "proj", "fc1", "fc2")

    def __init__(self, model: DiT, dtype: torch.dtype = torch.bfloat16, mlp_epilogue: str = "auto",
                 residual_dtype: torch.dtype | None = None, backend: str | None = None,
                 quantize: str | None = None):
        super().__init__(model, dtype, mlp_epilogue, residual_dtype, backend, quantize)
        cfg = self.config
        rows = 2 * cfg.num_tokens  # a CFG pair: what the prepacked layouts are tuned for
        self.latent_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.out_channels = cfg.out_channels
        # The patch embedding as a GEMM over flattened patches, its bias folded into the position table.
        self.patch = self.token_linear((model.x_embedder.proj.weight.flatten(1), None), rows)  # (D, C*p*p)
        self.pos_bias = self.cast(model.pos_embed[0] + model.x_embedder.proj.bias, self.residual_dtype)  # (T, D)
        gemm = functools.partial(self.token_linear, rows=rows, block=True)
        self.blocks = [{"qkv": gemm(b.attn.qkv), "proj": gemm(b.attn.proj), "fc1": gemm(b.mlp.fc1),
                        "fc2": gemm(b.mlp.fc2)} for b in model.blocks]
        # Every block's adaLN linear side by side: the whole modulation of a conditioning batch, before the loop.
        self.ada = StackedLinear([b.adaLN_modulation[1] for b in model.blocks], self)  # D -> depth * 6D
        final = model.final_layer
        self.final_ada = (self.cast(final.adaLN_modulation[1].weight), self.cast(final.adaLN_modulation[1].bias))
        self.final = self.token_linear(final.linear, rows)
        self.t_mlp = self.sinusoidal_mlp(model.t_embedder.mlp)
        self.y_table = self.cast(model.y_embedder.embedding_table.weight, torch.float32)  # (classes + 1, D)

    # -- conditioning ------------------------------------------------------------------------------------
    def sequence_heads(self) -> tuple[int, ...]:
        return (self.config.num_heads,)

    def token_shape(self, latent_shape: tuple | None = None, cond: dict | None = None) -> tuple[int, int]:
        return self.config.num_tokens, self.config.hidden_size

    def inputs(self, model: DiT, noise: torch.Tensor, use_cfg: bool, class_labels: torch.Tensor) -> dict:
        check_inputs(model, noise, class_labels, self.device)
        return {"class_labels": class_labels}

    def context_key(self, cond: dict) -> tuple:
        return ()

    def context_buffers(self, rows: int, latent_shape: tuple, cond: dict) -> dict:
        return {"y_emb": torch.zeros(rows, self.config.hidden_size, device=self.device)}  # (N, D) fp32

    def write_context(self, ctx: dict, cond: dict, use_cfg: bool) -> None:
        ctx["y_emb"].copy_(self.y_table[guided_labels(cond["class_labels"], self.config.num_classes, use_cfg)])

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.embed_sinusoidal(self.t_mlp, t, self.config.timestep_freq_shift)  # (N, D) fp32

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedding(t) + self.y_table[y]  # (N, D) fp32

    def modulate_all(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """adaLN modulation of every block, (..., depth, 6, D), and of the final layer, (..., 2, D)."""
        cfg = self.config
        s = F.silu(c).to(self.dtype)
        blocks = self.ada(s).view(*c.shape[:-1], cfg.depth, 6, cfg.hidden_size)
        final = F.linear(s, *self.final_ada).view(*c.shape[:-1], 2, cfg.hidden_size)
        return blocks, final

    def modulation(self, t: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps t (S,) -> (S, N, depth, 6, D) and (S, N, 2, D) for the N context rows."""
        y_emb = ctx["y_emb"]  # (N, D)
        c = self.timestep_embedding(t)[:, None] + y_emb  # (S, N, D): each timestep embedded once, not per row
        return self.modulate_all(c)

    def modulation_shapes(self, steps: int, rows: int) -> list[tuple]:
        cfg = self.config
        return [(steps, rows, cfg.depth, 6, cfg.hidden_size), (steps, rows, 2, cfg.hidden_size)]

    # -- forward -----------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        """x (N, C, H, W) in `dtype` -> the residual stream (N, T, D) after the patch embedding."""
        cfg = self.config
        N, p = x.shape[0], cfg.patch_size
        side = cfg.input_size // p
        patches = x.view(N, -1, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(N, side * side, -1)
        return self.patch(patches).to(self.residual_dtype).add_(self.pos_bias)

    def first_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        """Block 0's adaLN input (`adaln_modulate`); every later one comes out of the previous block's last
        `gated_residual_adaln`."""
        block_mod = mod[0]
        return adaln_modulate(resid, block_mod[:, 0, 0], block_mod[:, 0, 1], eps=1e-6, out_dtype=self.dtype,
                              backend=self.backend)

    def _next_mod(self, i: int, mod: tuple) -> torch.Tensor:
        """(N, 2, D): the shift and scale of the adaLN that follows block i (the next block's, or the final's)."""
        block_mod, final_mod = mod
        return block_mod[:, i + 1, :2] if i + 1 < self.config.depth else final_mod

    def block(self, i: int, resid: torch.Tensor, h: torch.Tensor, mod: tuple, ctx: dict | None = None,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on the residual stream (updated in place) and its adaLN input h; returns (resid, h), h now
        the input of whatever follows. `keep` (2, N, T, D), when given, receives the attention and MLP
        outputs before their gates (what a cache reuses on a later step)."""
        cfg, layers = self.config, self.blocks[i]
        N, T, D = resid.shape
        m = mod[0][:, i]  # (N, 6, D): shift, scale, gate for attention, then for the MLP
        qkv = layers["qkv"](h).view(N, T, 3, cfg.num_heads, cfg.head_dim)
        attended = self.self_attention(ctx, lambda t: attention(t, backend=self.backend), qkv)
        o = layers["proj"](attended.view(N, T, D))
        if keep is not None:
            keep[0].copy_(o)
        resid, h = gated_residual_adaln(resid, m[:, 2], o, m[:, 3], m[:, 4], eps=cfg.mlp_norm_eps, inplace=True,
                                        out_dtype=self.dtype, backend=self.backend)
        o = layers["fc2"](layers["fc1"].gelu(h))
        if keep is not None:
            keep[1].copy_(o)
        nxt = self._next_mod(i, mod)
        return gated_residual_adaln(resid, m[:, 5], o, nxt[:, 0], nxt[:, 1], eps=1e-6, inplace=True,
                                    out_dtype=self.dtype, backend=self.backend)

    def reuse_block(self, i: int, resid: torch.Tensor, mod: tuple, ctx: dict | None,
                    kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i with its attention and MLP outputs taken from `kept` (2, N, T, D) instead of computed:
        only the two gated residual adds (with this step's gates) and the adaLN after them run."""
        m = mod[0][:, i]
        resid, _ = gated_residual_adaln(resid, m[:, 2], kept[0], m[:, 3], m[:, 4], eps=self.config.mlp_norm_eps,
                                        inplace=True, out_dtype=self.dtype, backend=self.backend)
        nxt = self._next_mod(i, mod)
        return gated_residual_adaln(resid, m[:, 5], kept[1], nxt[:, 0], nxt[:, 1], eps=1e-6, inplace=True,
                                    out_dtype=self.dtype, backend=self.backend)

    def final_norm(self, resid: torch.Tensor, mod: tuple, ctx: dict | None = None) -> torch.Tensor:
        """The final layer's adaLN, for a residual stream that did not come out of the last block's
        `gated_residual_adaln`."""
        final_mod = mod[1]
        return adaln_modulate(resid, final_mod[:, 0], final_mod[:, 1], eps=1e-6, out_dtype=self.dtype,
                              backend=self.backend)

    def unpatchify(self, out: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        """The final linear's rows (N, T, p p C_out) -> (N, C_out, H, W)."""
        cfg = self.config
        N, p = out.shape[0], cfg.patch_size
        side = cfg.input_size // p
        out = out.view(N, side, side, p, p, cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(N, cfg.out_channels, side * p, side * p)


    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Same contract as `DiT.forward`, through the fused path."""
        return self.forward(x.to(self.dtype), self.modulate_all(self.conditioning(t, y)))

    def step_gemms(self, rows: int, latent_shape: tuple | None = None, cond: dict | None = None) -> list[tuple]:
        """The token GEMMs of one step as (call, activation shape), in the order the step runs them (fc1 with
        its GELU, as the step runs it)."""
        cfg = self.config
        T, D = self.token_shape()
        gemms = [(self.patch, (rows, T, self.patch.in_features))]
        for layers in self.blocks:
            gemms += [(layers["qkv"], (rows, T, D)), (layers["proj"], (rows, T, D)),
                      (layers["fc1"].gelu, (rows, T, D)), (layers["fc2"], (rows, T, cfg.mlp_hidden))]
        return gemms + [(self.final, (rows, T, D))]
