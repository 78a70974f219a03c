"""The fast path: a fused DiT forward over a model's own parameters, and `FastSampler`.

Per block (DESIGN.md section 2):

    K1 h = adaLN(x; shift_msa, scale_msa)            first block only; later blocks get h from K3
    qkv = h @ W_qkv                                  cuBLAS
    o = attention(qkv as (B, T, 3, H, Dh))           Triton, no permutes
    o = o @ W_proj
    K3 x += gate_msa * o ; h = adaLN(x; shift_mlp, scale_mlp)
    h = gelu_tanh(h @ W_fc1)                         cuBLASLt GELU epilogue where it is the tanh GELU
    o = h @ W_fc2
    K3 x += gate_mlp * o ; h = adaLN(x; next block's shift_msa, scale_msa, or the final layer's)

The conditioning (timestep and label embeddings and every block's adaLN modulation) depends only on the
timestep and the label, so `FastSampler` computes it for all steps in one batched GEMM before the loop,
unless the table would pass a memory budget, in which case each step computes its own. The loop (one step,
or all of them) is captured as a CUDA graph and replayed; the scheduler step is the fused K4 kernel, which
also writes the next, CFG-doubled model input.

With a step cache (`ditengine.cache`), a step is split into a head (the patch embedding and, for the
first-block cache, block 0 and the skip decision as a device tensor) and one of two tails: the remaining
blocks, refreshing the cache, or the cached stand-in for them. A static schedule picks the tail on the host
before the loop; the first-block decision picks it on the device (see `decision_mode`).
"""
from __future__ import annotations

import functools
import hashlib
import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ditengine.kernels import (adaln_modulate, attention, choose, gated_residual_adaln, linear, linear_gelu,
                               prepack_linear, scheduler_step)

from .cache import FirstBlockCache, StaticCache, skip_decision, stats_dict
from .graphs import GraphRunner, conditional_capture_supported, graphs_enabled
from .model import DiT, timestep_embedding
from .inputs import check_cfg_scale, check_guided_channels, check_inputs, check_scheduler, draw_noise, guided_labels
from .schedulers import COL, Scheduler

log = logging.getLogger("ditengine")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MLP_EPILOGUES = ("auto", "cublaslt", "separate")
KERNEL_BACKENDS = (None, "auto", "native", "triton", "reference")
# The ops of one fused step, each run on the backend a sampler asks for (kernels/_backend.py `choose`).
STEP_OPS = ("adaln_modulate", "gated_residual_adaln", "attention", "scheduler_step")
CACHE_DECISIONS = ("auto", "cond", "split", "eager")


def decision_mode(device_type: str, cuda_graph: str | None, graphs_on: bool, conditional_capture,
                  requested: str = "auto") -> str:
    """Where a first-block cache takes its per-step decision (a bool device tensor):

    "cond"   inside the captured graph, as CUDA-graph conditional nodes (`torch.cond`): no host read;
    "split"  a head graph (block 0 and the decision), one host read, then a full or a cached tail graph;
    "eager"  no graph: one host read per step (the CPU, or capture turned off).

    `conditional_capture()` probes whether this torch captures `torch.cond`; it is only called when the
    answer matters. `requested` other than "auto" forces a mode (tests, or to compare them).
    """
    if requested not in CACHE_DECISIONS:
        raise ValueError(f"cache_decision={requested!r}: expected one of {CACHE_DECISIONS}")
    if requested != "auto":
        return requested
    if device_type != "cuda" or cuda_graph is None or not graphs_on:
        return "eager"
    return "cond" if conditional_capture() else "split"


@functools.lru_cache(maxsize=None)
def _log_decision(mode: str, cuda_graph: str | None, graph_mode: str | None) -> None:
    log.info("ditengine: first-block cache decides %s (cuda_graph=%s requested, %s ran)", {
        "cond": "on the device, in CUDA-graph conditional nodes",
        "split": "with one host read per step between a head graph and two tail graphs",
        "eager": "with one host read per step, eagerly",
    }[mode], cuda_graph, graph_mode)


@functools.lru_cache(maxsize=None)
def cublaslt_gelu_is_tanh(device: str) -> bool:
    """Whether `torch._addmm_activation(..., use_gelu=True)` computes the tanh GELU on this device.

    On CUDA it maps to cuBLASLt's GELU epilogue (the tanh approximation DiT uses); on the CPU it is the
    exact erf GELU. A small fp32 probe decides, so a device where it differs never silently changes the
    model's math.
    """
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(device) for shape in ((64, 32), (48, 32), (48,)))
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    reference = F.gelu(F.linear(x, w, b), approximate="tanh")
    ok = torch.allclose(fused, reference, rtol=1e-4, atol=1e-5)
    if not ok:
        log.info("ditengine: the GELU GEMM epilogue on %s is not the tanh GELU; using a separate GELU", device)
    return ok


class FastDiT:
    """The weights of a `ditengine.DiT` in the fast path's layout and dtype, and the fused forward.

    Weights are copied (converted once) at construction: later changes to the model are not seen.
    `residual_dtype` is the residual stream's dtype (default: fp32 when `dtype` is fp16, whose range DiT's
    residual stream can overflow; else `dtype`).

    `backend` runs every op of the forward on one implementation: None or "auto" (the dispatcher's choice:
    Triton on CUDA, the native C++ kernels on CPU where built, with the token GEMMs on prepacked weights),
    "native", "triton" (on CPU, Triton's interpreter: `TRITON_INTERPRET=1` before import) or "reference"
    (the ops' PyTorch references). With "triton" or "reference" the GEMMs are plain `F.linear`, as on CUDA.
    A backend that cannot run here raises a ValueError at construction.
    """

    def __init__(self, model: DiT, dtype: torch.dtype = torch.bfloat16, mlp_epilogue: str = "auto",
                 residual_dtype: torch.dtype | None = None, backend: str | None = None):
        if dtype not in DTYPES:
            raise TypeError(f"dtype: expected one of {[str(d) for d in DTYPES]}, got {dtype}")
        if mlp_epilogue not in MLP_EPILOGUES:
            raise ValueError(f"mlp_epilogue={mlp_epilogue!r}: expected one of {MLP_EPILOGUES}")
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {KERNEL_BACKENDS}")
        cfg = self.config = model.config
        self.dtype = dtype
        self.residual_dtype = residual_dtype or (torch.float32 if dtype == torch.float16 else dtype)
        self.device = next(model.parameters()).device
        self.backend = None if backend == "auto" else backend
        for op in STEP_OPS:  # fail here, naming the op, rather than inside the first step
            choose(op, self.device, self.backend)

        def cast(t, to=dtype):
            return t.detach().to(device=self.device, dtype=to).contiguous()

        # The patch embedding as a GEMM over flattened patches, its bias folded into the position table.
        self.patch_w = cast(model.x_embedder.proj.weight.flatten(1))  # (D, C*p*p)
        self.pos_bias = cast(model.pos_embed[0] + model.x_embedder.proj.bias, self.residual_dtype)  # (T, D)
        self.blocks = [
            tuple(cast(p) for p in (b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight, b.attn.proj.bias,
                                    b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight, b.mlp.fc2.bias))
            for b in model.blocks
        ]
        # Every block's adaLN linear stacked: one GEMM gives the whole modulation of a conditioning batch.
        self.ada_w = cast(torch.cat([b.adaLN_modulation[1].weight for b in model.blocks]))  # (depth*6D, D)
        self.ada_b = cast(torch.cat([b.adaLN_modulation[1].bias for b in model.blocks]))
        final = model.final_layer
        self.final_ada = (cast(final.adaLN_modulation[1].weight), cast(final.adaLN_modulation[1].bias))
        self.final_linear = (cast(final.linear.weight), cast(final.linear.bias))
        # Embedders stay fp32: tiny, and the modulation they feed scales every activation.
        mlp = model.t_embedder.mlp
        self.t_mlp = tuple(cast(p, torch.float32) for p in (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias))
        self.y_table = cast(model.y_embedder.embedding_table.weight, torch.float32)  # (classes + 1, D)
        want_epilogue = mlp_epilogue == "cublaslt" or (mlp_epilogue == "auto" and self.device.type == "cuda")
        self.gelu_epilogue = want_epilogue and cublaslt_gelu_is_tanh(str(self.device))
        # On the CPU every token GEMM runs on weights prepacked once (kernels/linear_gelu.py), fc1 with its
        # GELU fused: fp32 weight copies where the CPU has no bf16 dot instructions (a bf16 F.linear is
        # emulated there, ~7x slower), oneDNN's bf16 layout where it has them.
        self.packed = None
        if self.device.type == "cpu" and self.backend in (None, "native"):
            def pack(w, b=None):
                return prepack_linear(w, b, dtype=dtype, batch_size=2 * cfg.num_tokens)

            self.packed = {"patch": pack(self.patch_w), "final": pack(*self.final_linear),
                           "blocks": [tuple(pack(w, b) for w, b in zip(blk[0::2], blk[1::2])) for blk in self.blocks]}
            self.patch_w = self.final_linear = self.blocks = None  # the packed copies serve every CPU GEMM

    # -- conditioning ------------------------------------------------------------------------------------
    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        w0, b0, w2, b2 = self.t_mlp
        freqs = timestep_embedding(t, self.config.frequency_embedding_size, self.config.timestep_freq_shift)
        return F.linear(F.silu(F.linear(freqs, w0, b0)), w2, b2)  # (N, D) fp32

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedding(t) + self.y_table[y]  # (N, D) fp32

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """adaLN modulation of every block, (N, depth, 6, D), and of the final layer, (N, 2, D)."""
        cfg = self.config
        s = F.silu(c).to(self.dtype)
        blocks = F.linear(s, self.ada_w, self.ada_b).view(*c.shape[:-1], cfg.depth, 6, cfg.hidden_size)
        final = F.linear(s, *self.final_ada).view(*c.shape[:-1], 2, cfg.hidden_size)
        return blocks, final

    # -- forward -----------------------------------------------------------------------------------------
    LAYERS = ("qkv", "proj", "fc1", "fc2")

    def linear(self, i: int, layer: str, x: torch.Tensor) -> torch.Tensor:
        """Linear `layer` of block i on x (N, T, K); fc1 comes out with its tanh GELU applied."""
        j = self.LAYERS.index(layer)
        gelu = layer == "fc1"
        if self.packed is not None:
            return (linear_gelu if gelu else linear)(x, self.packed["blocks"][i][j])
        w, b = self.blocks[i][2 * j], self.blocks[i][2 * j + 1]
        if gelu and self.gelu_epilogue:
            return torch._addmm_activation(b, x.flatten(0, 1), w.t(), use_gelu=True).view(*x.shape[:2], -1)
        y = F.linear(x, w, b)
        return F.gelu(y, approximate="tanh") if gelu else y

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in `dtype` -> the residual stream (N, T, D) after the patch embedding."""
        cfg = self.config
        N, p = x.shape[0], cfg.patch_size
        side = cfg.input_size // p
        patches = x.view(N, -1, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(N, side * side, -1)
        return self.embed_tokens(patches).to(self.residual_dtype).add_(self.pos_bias)

    def embed_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """The patch embedding's GEMM: (N, T, C*p*p) -> (N, T, D), without the position table."""
        return linear(patches, self.packed["patch"]) if self.packed else F.linear(patches, self.patch_w)

    def final_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """The final linear's GEMM: (N, T, D) -> (N, T, p*p*C_out)."""
        return linear(h, self.packed["final"]) if self.packed else F.linear(h, *self.final_linear)

    def first_norm(self, resid: torch.Tensor, block_mod: torch.Tensor) -> torch.Tensor:
        """K1: block 0's adaLN input; every later one comes out of the previous block's last K3."""
        return adaln_modulate(resid, block_mod[:, 0, 0], block_mod[:, 0, 1], eps=1e-6, out_dtype=self.dtype,
                              backend=self.backend)

    def _next_mod(self, i: int, block_mod: torch.Tensor, final_mod: torch.Tensor) -> torch.Tensor:
        """(N, 2, D): the shift and scale of the adaLN that follows block i (the next block's, or the final's)."""
        return block_mod[:, i + 1, :2] if i + 1 < self.config.depth else final_mod

    def block(self, i: int, resid: torch.Tensor, h: torch.Tensor, block_mod: torch.Tensor,
              final_mod: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on the residual stream (updated in place) and its adaLN input h; returns (resid, h), h now
        the input of whatever follows. `keep` (2, N, T, D), when given, receives the attention and MLP
        outputs before their gates (what a cache reuses on a later step)."""
        cfg = self.config
        N, T, D = resid.shape
        mod = block_mod[:, i]  # (N, 6, D): shift, scale, gate for attention, then for the MLP
        qkv = self.linear(i, "qkv", h).view(N, T, 3, cfg.num_heads, cfg.head_dim)
        o = self.linear(i, "proj", attention(qkv, backend=self.backend).view(N, T, D))
        if keep is not None:
            keep[0].copy_(o)
        resid, h = gated_residual_adaln(resid, mod[:, 2], o, mod[:, 3], mod[:, 4], eps=cfg.mlp_norm_eps,
                                        inplace=True, out_dtype=self.dtype, backend=self.backend)
        o = self.linear(i, "fc2", self.linear(i, "fc1", h))
        if keep is not None:
            keep[1].copy_(o)
        nxt = self._next_mod(i, block_mod, final_mod)
        return gated_residual_adaln(resid, mod[:, 5], o, nxt[:, 0], nxt[:, 1], eps=1e-6, inplace=True,
                                    out_dtype=self.dtype, backend=self.backend)

    def reuse_block(self, i: int, resid: torch.Tensor, block_mod: torch.Tensor, final_mod: torch.Tensor,
                    kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i with its attention and MLP outputs taken from `kept` (2, N, T, D) instead of computed:
        only the two gated residual adds (with this step's gates) and the adaLN after them run."""
        mod = block_mod[:, i]
        resid, _ = gated_residual_adaln(resid, mod[:, 2], kept[0], mod[:, 3], mod[:, 4],
                                        eps=self.config.mlp_norm_eps, inplace=True, out_dtype=self.dtype,
                                        backend=self.backend)
        nxt = self._next_mod(i, block_mod, final_mod)
        return gated_residual_adaln(resid, mod[:, 5], kept[1], nxt[:, 0], nxt[:, 1], eps=1e-6, inplace=True,
                                    out_dtype=self.dtype, backend=self.backend)

    def final_norm(self, resid: torch.Tensor, final_mod: torch.Tensor) -> torch.Tensor:
        """The final layer's adaLN, for a residual stream that did not come out of the last block's K3."""
        return adaln_modulate(resid, final_mod[:, 0], final_mod[:, 1], eps=1e-6, out_dtype=self.dtype,
                              backend=self.backend)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """The final linear on the final adaLN output h (N, T, D), unpatchified to (N, C_out, H, W)."""
        cfg = self.config
        N, p = h.shape[0], cfg.patch_size
        side = cfg.input_size // p
        out = self.final_tokens(h).view(N, side, side, p, p, cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(N, cfg.out_channels, side * p, side * p)

    def forward(self, x: torch.Tensor, block_mod: torch.Tensor, final_mod: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in `dtype`; block_mod (N, depth, 6, D); final_mod (N, 2, D) -> (N, C_out, H, W)."""
        resid = self.embed(x)
        h = self.first_norm(resid, block_mod)
        for i in range(self.config.depth):
            resid, h = self.block(i, resid, h, block_mod, final_mod)
        return self.unembed(h)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Same contract as `DiT.forward`, through the fused path."""
        block_mod, final_mod = self.modulation(self.conditioning(t, y))
        return self.forward(x.to(self.dtype), block_mod, final_mod)


class _Plan:
    """Static buffers and captured runners for one input shape."""

    def __init__(self, sampler: "FastSampler", batch: int):
        s = sampler
        cfg, sched, dev = s.fast.config, s.sched, s.device
        S, C, L = len(sched), cfg.in_channels, cfg.input_size
        N = batch * (2 if s.use_cfg else 1)
        self.batch, self.rows = batch, N
        self.sampler = s
        self.cache = s.cache
        self.decision = None  # how a first-block cache decides: see `decision_mode`
        self.graph_mode = s.cuda_graph
        if isinstance(self.cache, FirstBlockCache):
            self.decision = decision_mode(dev.type, s.cuda_graph, graphs_enabled(),
                                          lambda: conditional_capture_supported(dev), s.cache_decision)
            if self.decision == "split" and s.cuda_graph == "loop":
                self.graph_mode = "step"  # a host read per step cannot sit inside one captured loop
            elif self.decision == "eager" and dev.type == "cuda" and graphs_enabled():
                self.graph_mode = None  # nor inside any captured graph
            _log_decision(self.decision, s.cuda_graph, self.graph_mode)
        self.x = torch.zeros(batch, C, L, L, device=dev)  # the sampler's state, fp32
        self.x_in = torch.zeros(N, C, L, L, device=dev, dtype=s.fast.dtype)  # the model input
        self.history = torch.zeros_like(self.x) if sched.uses_history else None
        self.y = torch.zeros(N, device=dev, dtype=torch.long)
        self.step_idx = torch.zeros(1, device=dev, dtype=torch.long)
        stochastic = any(sched.needs_noise)
        # Zero-initialised: a step with u = 0 still reads the buffer in a graph, and 0 * garbage may be NaN.
        noise_steps = S if self.graph_mode == "loop" else 1
        self.noise = torch.zeros(noise_steps, batch, C, L, L, device=dev) if stochastic else None
        table_bytes = S * N * (cfg.depth * 6 + 2) * cfg.hidden_size * s.fast.dtype.itemsize
        self.precomputed = s.precompute_conditioning and table_bytes <= s.conditioning_budget
        if self.precomputed:
            D = cfg.hidden_size
            self.block_mod = torch.zeros(S, N, cfg.depth, 6, D, device=dev, dtype=s.fast.dtype)
            self.final_mod = torch.zeros(S, N, 2, D, device=dev, dtype=s.fast.dtype)
        else:
            self.y_emb = torch.zeros(N, cfg.hidden_size, device=dev)
        self.conditioning_mode = "precomputed" if self.precomputed else "per-step"
        log.info("ditengine: FastSampler batch %d: conditioning %s (%.1f MB table), cuda_graph=%s, cache=%s", batch,
                 self.conditioning_mode, table_bytes / 2**20, s.cuda_graph, self.cache)
        if self.cache is not None:
            self._allocate_cache()
        self.runner = self.full_runner = self.cached_runner = None
        pool = s.pool
        if self.cache is None:
            if s.cuda_graph == "step":
                self.runner = GraphRunner(lambda: self.step_body(self.step_idx), dev, pool)
            elif s.cuda_graph == "loop":
                self.runner = GraphRunner(lambda: [self.step_body(i) for i in range(S)], dev, pool)
        elif self.decision == "split" and self.graph_mode == "step":
            # The head (block 0 and the decision), then one host read chooses which tail graph to replay.
            self.runner = GraphRunner(lambda: self.head(self.step_idx), dev, pool)
            self.full_runner = GraphRunner(lambda: self.finish_full(self.step_idx), dev, pool)
            self.cached_runner = GraphRunner(lambda: self.finish_cached(self.step_idx), dev, pool)
        elif isinstance(self.cache, StaticCache) and self.graph_mode == "step":
            # The schedule is known on the host: a full-step graph and a cached-step graph, no host read.
            self.full_runner = GraphRunner(lambda: self.cached_step(self.step_idx, full=True), dev, pool)
            self.cached_runner = GraphRunner(lambda: self.cached_step(self.step_idx, full=False), dev, pool)
        else:
            control_flow = self.decision == "cond"  # torch.cond captured as conditional nodes
            if self.graph_mode == "step":
                self.runner = GraphRunner(lambda: self.cached_step(self.step_idx), dev, pool,
                                          control_flow=control_flow)
            elif self.graph_mode == "loop":
                self.runner = GraphRunner(lambda: [self.cached_step(i) for i in range(S)], dev, pool,
                                          control_flow=control_flow)

    def noise_for(self, step: int | torch.Tensor):
        s = self.sampler
        if self.noise is None:
            return None
        if isinstance(step, int):
            if self.graph_mode == "loop":
                return self.noise[step]
            return self.noise[0] if s.sched.needs_noise[step] else None
        return self.noise[0]  # step graph: always read; u = 0 on steps without noise

    def modulation(self, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's adaLN modulation (N, depth, 6, D) and final modulation (N, 2, D)."""
        s = self.sampler
        fast, sched = s.fast, s.sched
        if self.precomputed:
            if isinstance(step, int):
                return self.block_mod[step], self.final_mod[step]
            return self.block_mod.index_select(0, step)[0], self.final_mod.index_select(0, step)[0]
        t = sched.timesteps[step] if isinstance(step, int) else sched.timesteps.index_select(0, step)
        c = fast.timestep_embedding(t.expand(self.rows)) + self.y_emb
        return fast.modulation(c)

    def scheduler_update(self, step: int | torch.Tensor, out: torch.Tensor) -> None:
        """K4: guidance, the update of x (and history), and the next CFG-doubled model input."""
        s = self.sampler
        sched = s.sched
        scheduler_step(self.x, out, sched.table, step, cfg_scale=s.cfg_scale if s.use_cfg else None,
                       guided_channels=s.guided_channels, history=self.history, noise=self.noise_for(step),
                       clip=sched.clip_sample, learned_variance=sched.learned_variance, out=self.x,
                       next_input=self.x_in, backend=s.fast.backend)

    def step_body(self, step: int | torch.Tensor) -> None:
        """One denoising step on the static buffers; `step` an int, or the device index (step graph)."""
        block_mod, final_mod = self.modulation(step)
        self.scheduler_update(step, self.sampler.fast.forward(self.x_in, block_mod, final_mod))

    # -- step caching (ditengine.cache) --------------------------------------------------------------------
    def _allocate_cache(self) -> None:
        s = self.sampler
        fast, cfg, dev, S = s.fast, s.fast.config, s.device, len(s.sched)
        shape = (self.rows, cfg.num_tokens, cfg.hidden_size)
        self.block_evals = torch.zeros((), device=dev, dtype=torch.long)  # counted as each block runs
        self.full_mask = torch.zeros(S, device=dev, dtype=torch.bool)  # written by the branch that ran
        self.resid = torch.zeros(shape, device=dev, dtype=fast.residual_dtype)  # this step's residual stream
        self.h = torch.zeros(shape, device=dev, dtype=fast.dtype)  # the adaLN output the next op reads
        self.rest = self.kept = None
        if isinstance(self.cache, FirstBlockCache):
            self.skippable = torch.tensor(self.cache.skippable(S), device=dev)
            self.skip = torch.zeros((), device=dev, dtype=torch.bool)
            self.first_residual = torch.zeros(shape, device=dev, dtype=fast.residual_dtype)
            self.last_first_residual = torch.zeros_like(self.first_residual)  # at the last full step
            self.rest = torch.zeros_like(self.resid)
        else:
            self.schedule = self.cache.schedule(S)
            if self.cache.reuse == "blocks":
                self.kept = torch.zeros(cfg.depth, 2, *shape, device=dev, dtype=fast.dtype)
            else:
                self.rest = torch.zeros_like(self.resid)

    def _count_block(self) -> None:
        self.block_evals.add_(1)

    def _mark(self, step: int | torch.Tensor, full: bool) -> None:
        if isinstance(step, int):
            self.full_mask[step] = full
        else:
            self.full_mask.index_fill_(0, step, full)

    def head(self, step: int | torch.Tensor) -> None:
        """The patch embedding into `resid`; with the first-block cache also block 0 and the decision."""
        fast = self.sampler.fast
        self.resid.copy_(fast.embed(self.x_in))
        if not isinstance(self.cache, FirstBlockCache):
            return
        block_mod, final_mod = self.modulation(step)
        before = self.resid.clone()
        _, h = fast.block(0, self.resid, fast.first_norm(self.resid, block_mod), block_mod, final_mod)
        self._count_block()
        self.h.copy_(h)
        torch.sub(self.resid, before, out=self.first_residual)
        skippable = self.skippable[step] if isinstance(step, int) else self.skippable.index_select(0, step)[0]
        self.skip.copy_(skip_decision(self.first_residual, self.last_first_residual, self.cache.threshold,
                                      skippable))

    def tail_full(self, step: int | torch.Tensor):
        """Every block not yet run, refreshing the cache; leaves the final adaLN output in `h`."""
        fast = self.sampler.fast
        block_mod, final_mod = self.modulation(step)
        start = 1 if isinstance(self.cache, FirstBlockCache) else 0
        before = self.resid.clone() if self.rest is not None else None
        h = self.h if start else fast.first_norm(self.resid, block_mod)
        for i in range(start, fast.config.depth):
            keep = self.kept[i] if self.kept is not None else None
            _, h = fast.block(i, self.resid, h, block_mod, final_mod, keep=keep)
            self._count_block()
        self.h.copy_(h)
        if before is not None:
            torch.sub(self.resid, before, out=self.rest)
        if start:
            self.last_first_residual.copy_(self.first_residual)
        self._mark(step, True)
        return ()  # a torch.cond branch returns a (here empty) tuple of tensors

    def tail_cached(self, step: int | torch.Tensor):
        """The blocks not yet run, stood in for by the cache; leaves the final adaLN output in `h`."""
        fast = self.sampler.fast
        block_mod, final_mod = self.modulation(step)
        if self.kept is not None:
            for i in range(fast.config.depth):
                _, h = fast.reuse_block(i, self.resid, block_mod, final_mod, self.kept[i])
        else:
            h = fast.final_norm(self.resid.add_(self.rest), final_mod)
        self.h.copy_(h)
        self._mark(step, False)
        return ()

    def finish_full(self, step: int | torch.Tensor) -> None:
        self.tail_full(step)
        self.scheduler_update(step, self.sampler.fast.unembed(self.h))

    def finish_cached(self, step: int | torch.Tensor) -> None:
        self.tail_cached(step)
        self.scheduler_update(step, self.sampler.fast.unembed(self.h))

    def cached_step(self, step: int | torch.Tensor, full: bool | None = None) -> None:
        """One step under the cache policy. Static: `full` from the schedule (given for a step graph).
        First-block: the device decision picks the tail, through torch.cond or one host read."""
        self.head(step)
        if isinstance(self.cache, StaticCache):
            run_full = self.schedule[step] if full is None else full
            (self.tail_full if run_full else self.tail_cached)(step)
        elif self.decision == "cond":
            torch.ops.higher_order.cond(self.skip, lambda: self.tail_cached(step), lambda: self.tail_full(step), ())
        else:
            (self.tail_cached if bool(self.skip) else self.tail_full)(step)  # the one host read of the step
        self.scheduler_update(step, self.sampler.fast.unembed(self.h))

    def stats(self) -> dict:
        S, depth = len(self.sampler.sched), self.sampler.fast.config.depth
        if self.cache is None:
            return stats_dict(S, depth, [True] * S, S * depth)
        stats = stats_dict(S, depth, self.full_mask.tolist(), int(self.block_evals))
        if self.decision is not None:
            stats["decision"] = self.decision
        return stats

    # -- a run -----------------------------------------------------------------------------------------------
    def prepare(self, noise: torch.Tensor, class_labels: torch.Tensor) -> None:
        s = self.sampler
        sched, fast = s.sched, s.fast
        self.x.copy_(noise.float() * sched.init_noise_sigma)
        self.x_in.copy_((self.x * sched.table[0, COL["c_in"]]).repeat(self.rows // self.batch, 1, 1, 1))
        if self.history is not None:
            self.history.zero_()
        if self.cache is not None:
            self.block_evals.zero_()
            self.full_mask.zero_()
        self.y.copy_(guided_labels(class_labels, fast.config.num_classes, s.use_cfg))
        if self.precomputed:
            S = len(sched)
            c = fast.conditioning(sched.timesteps.repeat_interleave(self.rows), self.y.repeat(S))
            block_mod, final_mod = fast.modulation(c.view(S, self.rows, -1))
            self.block_mod.copy_(block_mod)
            self.final_mod.copy_(final_mod)
        else:
            self.y_emb.copy_(fast.y_table[self.y])

    def run_step(self, i: int) -> None:
        """Step i through the runners (step graphs) or eagerly."""
        if self.runner is None and self.full_runner is None:
            if self.cache is None:
                self.step_body(i)
            else:
                self.cached_step(i)
            return
        self.step_idx.fill_(i)
        if self.full_runner is None:
            self.runner()
        elif self.decision == "split":
            self.runner()
            (self.cached_runner if bool(self.skip) else self.full_runner)()  # the one host read of the step
        else:
            (self.full_runner if self.schedule[i] else self.cached_runner)()

    def run(self, generator: torch.Generator | None, progress: bool) -> None:
        s = self.sampler
        S = len(s.sched)
        if self.graph_mode == "loop":
            for i in range(S):  # the same draws, in the same order, as the step-by-step paths
                z = draw_noise(s.sched, i, self.x, generator)
                if z is not None:
                    self.noise[i].copy_(z)
            self.runner()
            return
        for i in tqdm(range(S), desc="sampling", disable=not progress, leave=False):
            z = draw_noise(s.sched, i, self.x, generator)
            if z is not None:
                self.noise[0].copy_(z)
            self.run_step(i)


class FastSampler:
    """The whole denoising loop through the fused path; same answer as `ditengine.sample(backend="reference")`.

    `cuda_graph`: None (eager), "step" (one captured step replayed per step) or "loop" (the whole loop
    captured, replayed once). Graphs are cached by input shape and re-captured when the batch changes;
    DITENGINE_CUDA_GRAPHS=0 turns capture off. On a CPU the same buffers run eagerly. `dtype` is the
    compute dtype of the weights and activations (converted once); the sampler state stays fp32.

    `cache`: a `ditengine.cache` policy (`FirstBlockCache`, `StaticCache`) or None. A static schedule is
    unrolled into the loop (the captured loop stays one static graph); the first-block cache decides on
    the device (`cache_decision`, see `decision_mode`). `sampler.stats` says what the last call computed.

    `backend` runs every kernel of the loop on one implementation (see `FastDiT`): e.g. "triton" on a CPU
    runs the whole fast path through Triton's interpreter, "reference" through the ops' PyTorch references.
    """

    def __init__(self, model: DiT, sched: Scheduler, cfg_scale: float = 4.0, dtype: torch.dtype = torch.bfloat16,
                 cuda_graph: str | None = "loop", guided_channels: int | None = None,
                 precompute_conditioning: bool = True, conditioning_budget: int = 1 << 30,
                 mlp_epilogue: str = "auto", cache: FirstBlockCache | StaticCache | None = None,
                 cache_decision: str = "auto", backend: str | None = None):
        if cuda_graph not in (None, "step", "loop"):
            raise ValueError(f"cuda_graph={cuda_graph!r}: expected None, 'step' or 'loop'")
        check_scheduler(sched)
        check_cfg_scale(cfg_scale)
        if cache is not None and not isinstance(cache, (FirstBlockCache, StaticCache)):
            raise TypeError(f"cache: expected a ditengine.cache policy (FirstBlockCache, StaticCache) or None, "
                            f"got {type(cache).__name__}")
        if cache is not None:
            cache.check(len(sched))
        if cache_decision not in CACHE_DECISIONS:
            raise ValueError(f"cache_decision={cache_decision!r}: expected one of {CACHE_DECISIONS}")
        self.cache, self.cache_decision = cache, cache_decision
        self.model, self.sched = model, sched
        self.guided_channels = check_guided_channels(guided_channels, model.config.in_channels)
        self.fast = FastDiT(model, dtype, mlp_epilogue, backend=backend)
        self.device = self.fast.device
        self.sched.to(self.device)
        self.cfg_scale, self.use_cfg = float(cfg_scale), cfg_scale != 1.0
        self.cuda_graph = cuda_graph
        self.precompute_conditioning, self.conditioning_budget = precompute_conditioning, conditioning_budget
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" and cuda_graph else None
        self._plans: dict[tuple, _Plan] = {}
        self.captures = 0  # how many plans (graph captures, on CUDA) were built
        self.stats: dict = {}  # what the last call computed (see ditengine.cache.stats_dict)

    def _signature(self) -> str:
        """What a captured graph bakes in from the scheduler: its table (host copy, no device sync)."""
        return hashlib.sha1(self.sched.table_f64.tobytes()).hexdigest()

    def plan(self, batch: int) -> _Plan:
        key = (batch, self._signature())
        if key not in self._plans:
            self._plans[key] = _Plan(self, batch)
            self.captures += 1
        return self._plans[key]

    def clear_cache(self) -> None:
        """Drop every captured graph and its buffers."""
        self._plans.clear()

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, class_labels: torch.Tensor, generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Latents (B, C, H, W) fp32 from `noise` ~ N(0, I) (B, C, H, W) and `class_labels` (B,)."""
        check_inputs(self.model, noise, class_labels)
        if noise.shape[0] == 0:  # nothing to sample: the reference loop's answer, without building a plan
            self.stats = stats_dict(len(self.sched), self.fast.config.depth, [True] * len(self.sched),
                                    len(self.sched) * self.fast.config.depth)
            return torch.zeros(noise.shape, device=noise.device)
        plan = self.plan(noise.shape[0])
        self.conditioning_mode = plan.conditioning_mode
        plan.prepare(noise, class_labels)
        plan.run(generator, progress)
        self.stats = plan.stats()
        return plan.x.clone()  # a later call must not overwrite what this one returned
