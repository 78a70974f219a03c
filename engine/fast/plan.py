"""A sampling run's plan: the static buffers, the per-call context, the modulation table and the captured graphs
of one noise shape and conditioning geometry, and how one step runs on them (embed, blocks or the step cache,
unembed, the fused scheduler step). `FastSampler` (`sampler.py`) keeps one per (noise shape, context key)."""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ditengine.kernels import scheduler_step

from ..cache import FirstBlockCache, StaticCache, skip_decision, stats_dict
from ..graphs import GraphRunner, conditional_capture_supported, graphs_enabled
from ..inputs import check_callback_state, draw_noise, guided_steps
from ..schedulers import COL

if TYPE_CHECKING:
    from .sampler import FastSampler

log = logging.getLogger("ditengine")

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


def _at(tensors: tuple, step: int | torch.Tensor) -> tuple:
    """Row `step` of each tensor: an int indexes on the host, a device index gathers (no sync)."""
    if isinstance(step, int):
        return tuple(t[step] for t in tensors)
    return tuple(t.index_select(0, step)[0] for t in tensors)


class Plan:
    """Static buffers and captured runners for one batch size."""

    def __init__(self, sampler: "FastSampler", noise_shape: tuple, cond: dict):
        s = sampler
        batch = noise_shape[0]
        fast, sched, dev = s.fast, s.sched, s.device
        S = len(sched)
        N = batch * (2 if s.use_cfg else 1)
        self.batch, self.rows = batch, N
        self.sampler = s
        # Per step: guided (the CFG-doubled rows) or, outside the guidance interval, the conditional rows alone.
        self.guided = [s.use_cfg and g for g in guided_steps(sched.timesteps.tolist(), s.cfg_interval)]
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
        shape = tuple(noise_shape[1:])
        self.token_shape = fast.token_shape(shape, cond)
        self.x = torch.zeros(batch, *shape, device=dev)  # the sampler's state, fp32
        self.x_in = torch.zeros(N, *shape, device=dev, dtype=fast.dtype)  # the model input
        self.history = torch.zeros_like(self.x) if sched.uses_history else None
        self.history2 = torch.zeros_like(self.x) if sched.history_depth == 2 else None  # UniPC: x0 two steps back
        # APG's momentum (the state across guided steps) and its guided prediction, fp32.
        self.momentum = torch.zeros_like(self.x) if s.guider is not None and s.use_cfg else None
        self.apg_out = torch.zeros_like(self.x) if self.momentum is not None else None
        # Per call, per denoiser (a second expert has its own): label embeddings, or a prompt's K/V and lengths.
        # On a token shard: the sequence group's layout of this shape's tokens (padded to a multiple of its size).
        shards = None if s.sequence is None else s.sequence.shards(self.token_shape[0])
        self.ctxs = [f.context_buffers(N, shape, cond) | {"sequence": shards} for f in s.fasts]
        self.ctx = self.ctxs[0]
        self.step_idx = torch.zeros(1, device=dev, dtype=torch.long)
        stochastic = any(sched.needs_noise)
        # Zero-initialised: a step with u = 0 still reads the buffer in a graph, and 0 * garbage may be NaN.
        noise_steps = S if self.graph_mode == "loop" else 1
        self.noise = torch.zeros(noise_steps, batch, *shape, device=dev) if stochastic else None
        table_bytes = sum(f.modulation_bytes(S, N) for f in s.fasts)
        self.precomputed = s.precompute_conditioning and table_bytes <= s.conditioning_budget
        if self.precomputed:  # static buffers the captured graphs read, written before each run
            self.mod_tables = [tuple(torch.zeros(shape, device=dev, dtype=f.dtype)
                                     for shape in f.modulation_shapes(S, N)) for f in s.fasts]
        self.conditioning_mode = "precomputed" if self.precomputed else "per-step"
        log.info("ditengine: FastSampler batch %d: conditioning %s (%.1f MB table), cuda_graph=%s, cache=%s", batch,
                 self.conditioning_mode, table_bytes / 2**20, s.cuda_graph, self.cache)
        if self.cache is not None:
            self._allocate_cache()
        self.runner = self.full_runner = self.cached_runner = self.unguided_runner = None
        pool = s.pool
        self.expert_runners = None
        if self.cache is None:
            if s.cuda_graph == "step" and len(s.fasts) > 1:  # a step graph per expert (the switch is on the host)
                self.expert_runners = [GraphRunner(lambda e=e: self.step_body(self.step_idx, s.use_cfg, e), dev, pool)
                                       for e in range(len(s.fasts))]
            elif s.cuda_graph == "step":
                self.runner = GraphRunner(lambda: self.step_body(self.step_idx, s.use_cfg), dev, pool)
                if s.use_cfg and not all(self.guided):  # a second graph for the steps outside the interval
                    self.unguided_runner = GraphRunner(lambda: self.step_body(self.step_idx, False), dev, pool)
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

    def modulation(self, step: int | torch.Tensor, expert: int = 0) -> tuple:
        """This step's modulation vectors (the denoiser's tuple), from the table or computed now."""
        if self.precomputed:
            return _at(self.mod_tables[expert], step)
        s = self.sampler
        t = s.sched.timesteps[step:step + 1] if isinstance(step, int) else s.sched.timesteps.index_select(0, step)
        return _at(s.fasts[expert].modulation(t, self.ctxs[expert]), 0)

    def scheduler_update(self, step: int | torch.Tensor, out: torch.Tensor, guided: bool | None = None,
                         expert: int = 0) -> None:
        """The fused scheduler step: guidance, the update of x (and history), and the next CFG-doubled model input."""
        s = self.sampler
        sched = s.sched
        guided = s.use_cfg if guided is None else guided
        cfg_scale = s.cfg_scales[expert] if guided else None
        # an unembed's permuted view (a 1 x 1 token grid, a family's reshape): the step reads rows
        out = out.contiguous()
        if guided and self.momentum is not None:  # APG combines the halves; the step then runs unguided
            out = s.guider(out, self.momentum, s.cfg_scale, out=self.apg_out, backend=s.guider_backend)
            cfg_scale = None
        scheduler_step(self.x, out, sched.table, step, cfg_scale=cfg_scale,
                       guided_channels=s.guided_channels, history=self.history, noise=self.noise_for(step),
                       clip=sched.clip_sample, learned_variance=sched.learned_variance, out=self.x,
                       next_input=self.x_in, history2=self.history2, backend=s.fast.backend)

    def step_body(self, step: int | torch.Tensor, guided: bool | None = None, expert: int | None = None) -> None:
        """One denoising step on the static buffers; `step` an int, or the device index (step graph, with
        `guided` and `expert` given: which of the step graphs this is)."""
        s = self.sampler
        guided = self.guided[step] if guided is None else guided
        expert = s.expert_of[step] if expert is None else expert
        fast, ctx = s.fasts[expert], self.ctxs[expert]
        if guided and s.cfg_group is not None:  # CFG parallel: this rank's half of the rows, then both halves
            rows, start = self.batch, s.cfg_group.rank * self.batch
            mod = tuple(m if m.shape[0] == 1 else m[start:start + rows] for m in self.modulation(step, expert))
            half = fast.forward(self.x_in[start:start + rows], mod, fast.context_rows(ctx, rows, start))
            out = s.cfg_group.gather(half)
        elif guided or not s.use_cfg:
            out = fast.forward(self.x_in, self.modulation(step, expert), ctx)
        else:  # the conditional rows, first in every buffer, alone
            rows = self.batch
            mod = tuple(m[:rows] for m in self.modulation(step, expert))
            out = fast.forward(self.x_in[:rows], mod, fast.context_rows(ctx, rows))
        self.scheduler_update(step, out, guided, expert)

    # -- step caching (ditengine.cache) --------------------------------------------------------------------
    def _allocate_cache(self) -> None:
        s = self.sampler
        fast, dev, S = s.fast, s.device, len(s.sched)
        shards = self.ctx["sequence"]
        shape = (self.rows, *self.token_shape) if shards is None else (self.rows, shards.per_rank, self.token_shape[1])
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
                self.kept = torch.zeros(fast.depth, fast.branches, *shape, device=dev, dtype=fast.dtype)
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
        """The embedding into `resid`; with the first-block cache also block 0 and the decision."""
        fast = self.sampler.fast
        self.resid.copy_(fast.embed_shard(self.x_in, self.ctx))
        if not isinstance(self.cache, FirstBlockCache):
            return
        mod = self.modulation(step)
        before = self.resid.clone()
        _, h = fast.block(0, self.resid, fast.first_norm(self.resid, mod, self.ctx), mod, self.ctx)
        self._count_block()
        self.h.copy_(h)
        torch.sub(self.resid, before, out=self.first_residual)
        skippable = self.skippable[step] if isinstance(step, int) else self.skippable.index_select(0, step)[0]
        new, old, reduce = self.first_residual, self.last_first_residual, None
        shards = self.ctx["sequence"]
        if shards is not None:  # the statistic of the real tokens of every rank, so that every rank decides the same
            new, old, reduce = new[:, :shards.rows], old[:, :shards.rows], shards.sum
        self.skip.copy_(skip_decision(new, old, self.cache.threshold, skippable, reduce))

    def tail_full(self, step: int | torch.Tensor):
        """Every block not yet run, refreshing the cache; leaves the final adaLN output in `h`."""
        fast = self.sampler.fast
        mod = self.modulation(step)
        start = 1 if isinstance(self.cache, FirstBlockCache) else 0
        before = self.resid.clone() if self.rest is not None else None
        h = self.h if start else fast.first_norm(self.resid, mod, self.ctx)
        for i in range(start, fast.depth):
            keep = self.kept[i] if self.kept is not None else None
            _, h = fast.block(i, self.resid, h, mod, self.ctx, keep=keep)
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
        mod = self.modulation(step)
        if self.kept is not None:
            for i in range(fast.depth):
                _, h = fast.reuse_block(i, self.resid, mod, self.ctx, self.kept[i])
        else:
            h = fast.final_norm(self.resid.add_(self.rest), mod, self.ctx)
        self.h.copy_(h)
        self._mark(step, False)
        return ()

    def finish_full(self, step: int | torch.Tensor) -> None:
        self.tail_full(step)
        self.scheduler_update(step, self.sampler.fast.unembed(self.h, self.ctx))

    def finish_cached(self, step: int | torch.Tensor) -> None:
        self.tail_cached(step)
        self.scheduler_update(step, self.sampler.fast.unembed(self.h, self.ctx))

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
        self.scheduler_update(step, self.sampler.fast.unembed(self.h, self.ctx))

    def stats(self) -> dict:
        S, depth = len(self.sampler.sched), self.sampler.fast.depth
        if self.cache is None:
            return stats_dict(S, depth, [True] * S, S * depth)
        stats = stats_dict(S, depth, self.full_mask.tolist(), int(self.block_evals))
        if self.decision is not None:
            stats["decision"] = self.decision
        return stats

    # -- a run -----------------------------------------------------------------------------------------------
    def write_context(self, cond: dict) -> None:
        """The per-call context (the text side: once per prompt) into its static buffers."""
        s = self.sampler
        for fast, ctx in zip(s.fasts, self.ctxs):
            fast.write_context(ctx, cond, s.use_cfg)

    def prepare(self, noise: torch.Tensor, cond: dict) -> None:
        s = self.sampler
        sched = s.sched
        self.x.copy_(noise.float() * sched.init_noise_sigma)
        self.write_input(0)
        if self.history is not None:
            self.history.zero_()
        if self.history2 is not None:
            self.history2.zero_()
        if self.momentum is not None:
            self.momentum.zero_()
        if self.cache is not None:
            self.block_evals.zero_()
            self.full_mask.zero_()
        self.write_context(cond)
        if self.precomputed:
            for fast, ctx, tables in zip(s.fasts, self.ctxs, self.mod_tables):
                for buffer, table in zip(tables, fast.modulation(sched.timesteps, ctx)):
                    buffer.copy_(table)

    def run_step(self, i: int) -> None:
        """Step i through the runners (step graphs) or eagerly."""
        if self.expert_runners is not None:
            self.step_idx.fill_(i)
            self.expert_runners[self.sampler.expert_of[i]]()
            return
        if self.runner is None and self.full_runner is None:
            if self.cache is None:
                self.step_body(i)
            else:
                self.cached_step(i)
            return
        self.step_idx.fill_(i)
        if self.unguided_runner is not None and not self.guided[i]:
            self.unguided_runner()
        elif self.full_runner is None:
            self.runner()
        elif self.decision == "split":
            self.runner()
            (self.cached_runner if bool(self.skip) else self.full_runner)()  # the one host read of the step
        else:
            (self.full_runner if self.schedule[i] else self.cached_runner)()

    def run(self, generator: torch.Generator | None, progress: bool, callback=None) -> None:
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
            if callback is not None:
                self.after_step(i, callback)

    def after_step(self, i: int, callback) -> None:
        """The step callback on the state; a state it returns replaces it, and the next step's model input (which
        the fused scheduler step wrote from the old state) is written from the new one."""
        sched = self.sampler.sched
        new = callback(i, sched.timesteps[i], self.x)
        if new is None:
            return
        self.x.copy_(check_callback_state(new, self.x))
        if i + 1 < len(sched):
            self.write_input(i + 1)

    def write_input(self, i: int) -> None:
        """Step i's model input from the state: x * c_in, repeated over the CFG rows (the fused scheduler step writes
        it itself after each step; this is for the first step and a state set from outside)."""
        x_in = self.x * self.sampler.sched.table[i, COL["c_in"]]
        self.x_in.copy_(x_in.repeat(self.rows // self.batch, *[1] * (self.x.dim() - 1)))
