"""`FastSampler`: the one family-agnostic sampling loop over a fused denoiser.

The loop owns the static buffers (the sampler state, the CFG-doubled model input, the per-call context,
the modulation of every step), graph capture (one step, or the whole loop, as a CUDA graph), step caching
and the fused scheduler step (`scheduler_step`, which also writes the next CFG-doubled model input). What a family
computes is behind the denoiser contract (`base.FusedDenoiser`); this file never names a family.

With a step cache (`ditengine.cache`), a step is split into a head (the embedding and, for the first-block
cache, block 0 and the skip decision as a device tensor) and one of two tails: the remaining blocks,
refreshing the cache, or the cached stand-in for them. A static schedule picks the tail on the host
before the loop; the first-block decision picks it on the device (see `decision_mode`).
"""
from __future__ import annotations

import hashlib
import logging

import torch


from ..cache import FirstBlockCache, StaticCache, TeaCache, stats_dict
from ..cache import resolve as resolve_cache
from ..experts import Expert
from ..guidance import APG, check_guider
from ..inputs import check_cfg_scale, check_conditioning, check_guided_channels, check_scheduler, guided_steps
from ..parallel import ParallelConfig, check_sequence_heads
from ..schedulers import Scheduler
from .base import FusedDenoiser
from .plan import CACHE_DECISIONS, Plan, decision_mode  # noqa: F401 (re-exported)

log = logging.getLogger("ditengine")

def fused_denoiser(model: torch.nn.Module, dtype: torch.dtype, mlp_epilogue: str = "auto",
                   backend: str | None = None, quantize: str | None = None):
    """The fused denoiser of a reference model's family (`ditengine.families`)."""
    from .. import families

    return families.of_model(model).fast(model, dtype, mlp_epilogue, backend=backend, quantize=quantize)


def shared_denoiser(denoiser: FusedDenoiser, model: torch.nn.Module, dtype: torch.dtype, backend: str | None,
                    quantize: str | None) -> FusedDenoiser:
    """`denoiser`, checked to be what `fused_denoiser(model, dtype, backend=backend, quantize=quantize)` would build."""
    if not isinstance(denoiser, FusedDenoiser) or denoiser.config != model.config:
        raise TypeError(f"denoiser: expected the fused denoiser of this model ({type(model).__name__}), got "
                        f"{type(denoiser).__name__}")
    asked = {"dtype": dtype, "backend": None if backend == "auto" else backend, "quantize": quantize}
    built = {"dtype": denoiser.dtype, "backend": denoiser.backend, "quantize": denoiser.quantize}
    if asked != built:
        raise ValueError(f"denoiser: built with {built}, but this sampler asks for {asked}")
    return denoiser


class FastSampler:
    """The whole denoising loop through the fused path; same answer as `ditengine.sample(backend="reference")`.

    `model` is a ditengine reference model of any served family; its fused denoiser is built once (weights
    converted to `dtype`, the compute dtype of the weights and activations; the sampler state stays fp32).
    Called as the family's conditioning asks: `sampler(noise, class_labels)` for a DiT,
    `sampler(noise, prompt_embeds=..., prompt_attention_mask=..., negative_prompt_embeds=...,
    negative_prompt_attention_mask=...)` for PixArt (the diffusers pipelines' names),
    `sampler(noise, encoder_hidden_states=..., context_latents=..., null_encoder_hidden_states=...)` for
    ACE-Step (noise and context latents channels-first, (B, C, T); see `FastAceStep`).

    `cuda_graph`: None (eager), "step" (one captured step replayed per step) or "loop" (the whole loop
    captured, replayed once). Graphs are cached by batch size and re-captured when it changes;
    DITENGINE_CUDA_GRAPHS=0 turns capture off. On a CPU the same buffers run eagerly.

    `cache`: a `ditengine.cache` policy (`FirstBlockCache`, `StaticCache`) or None. A static schedule is
    unrolled into the loop (the captured loop stays one static graph); the first-block cache decides on
    the device (`cache_decision`, see `decision_mode`). `sampler.stats` says what the last call computed.

    `backend` runs every kernel of the loop on one implementation (see `FusedDenoiser`): e.g. "triton" on a
    CPU runs the whole fast path through Triton's interpreter, "reference" through the ops' references.

    `cfg_interval` = (lo, hi): guidance only at the steps whose timestep t lies in [lo, hi] (Kynkaanniemi
    et al. 2024; see `inputs.guided_steps`); the other steps run the conditional rows alone, half the model
    batch. The schedule is static: the captured loop unrolls it, a step graph is captured once for each kind
    of step. Not combined with a step cache.

    `quantize`: None, "int8" or "fp8": every block's token GEMMs as W8A8 (weights per output channel,
    activations per token; see `FusedDenoiser`). "int8" is the CPU's fast form, "fp8" Hopper's.

    `guider`: None (plain CFG, inside the scheduler step) or `ditengine.guidance.APG()` (ACE-Step's base and
    SFT models): one fused guidance op on the device, its momentum a static buffer, so the loop stays
    capturable.

    `denoiser`: a fused denoiser already built from `model` (`fused_denoiser`) with this sampler's `dtype`,
    `backend` and `quantize`, shared instead of converting the weights again: samplers for other step counts or
    guidance scales then hold one copy of the fast path's weights between them (what `accelerate` does).

    `expert`: a `ditengine.experts.Expert`, the second model of the low-noise steps with its own guidance scale (Wan
    2.2 A14B's `transformer_2`, below `boundary_ratio * 1000`); its fused denoiser is built (or `expert_denoiser`
    shared) alike. The switch is static: the captured loop holds both denoisers' steps, a step graph is captured per
    expert. Not combined with a step cache, the guidance interval or APG.

    `parallel`: a `ditengine.ParallelConfig` for a run over the ranks of a torch.distributed group: with
    `cfg_degree=2` the conditional and unconditional rows run on two ranks, one all-gather a step joining them; with
    `ulysses_degree=U` and `ring_degree=R` each of U R ranks holds a shard of the tokens, all-to-alls or a ring of
    K/V around each self-attention (`ditengine.parallel`). Every rank returns the same latents.
    """

    def __init__(self, model: torch.nn.Module, sched: Scheduler, cfg_scale: float = 4.0,
                 dtype: torch.dtype = torch.bfloat16, cuda_graph: str | None = "loop",
                 guided_channels: int | None = None, precompute_conditioning: bool = True,
                 conditioning_budget: int = 1 << 30, mlp_epilogue: str = "auto",
                 cache: FirstBlockCache | StaticCache | None = None, cache_decision: str = "auto",
                 backend: str | None = None, quantize: str | None = None, cfg_interval: tuple | None = None,
                 guider: APG | None = None, denoiser: FusedDenoiser | None = None, expert: Expert | None = None,
                 expert_denoiser: FusedDenoiser | None = None, parallel: ParallelConfig | None = None):
        if cuda_graph not in (None, "step", "loop"):
            raise ValueError(f"cuda_graph={cuda_graph!r}: expected None, 'step' or 'loop'")
        check_scheduler(sched)
        check_cfg_scale(cfg_scale)
        if cache is not None and not isinstance(cache, (FirstBlockCache, StaticCache, TeaCache)):
            raise TypeError(f"cache: expected a ditengine.cache policy (FirstBlockCache, StaticCache, TeaCache) or "
                            f"None, got {type(cache).__name__}")
        cache = resolve_cache(cache, model, sched.timesteps)
        if cache is not None:
            cache.check(len(sched))
        guided_steps(sched.timesteps.tolist(), cfg_interval)  # checks it
        if cache is not None and cfg_interval is not None:
            raise ValueError("cfg_interval: not supported with a step cache "
                             "(its residuals are kept per CFG-doubled row)")
        self.cfg_interval = cfg_interval
        if cache_decision not in CACHE_DECISIONS:
            raise ValueError(f"cache_decision={cache_decision!r}: expected one of {CACHE_DECISIONS}")
        self.cache, self.cache_decision = cache, cache_decision
        self.model, self.sched = model, sched
        self.fast = fused_denoiser(model, dtype, mlp_epilogue, backend, quantize) if denoiser is None else \
            shared_denoiser(denoiser, model, dtype, backend, quantize)
        if cache is not None and self.fast.reuse_block is None:
            raise ValueError(f"cache: {type(self.fast).__name__} has no reuse_block, so it offers no step caching")
        self.guided_channels = check_guided_channels(guided_channels, self.fast.latent_shape[0])
        check_guider(guider, self.fast.latent_shape)
        if guider is not None and guided_channels is not None:
            raise ValueError("guided_channels: not used by APG, which guides every channel")
        self.guider = guider
        self.fasts, self.cfg_scales = [self.fast], [float(cfg_scale)]
        self.expert_of = [0] * len(sched)  # per step: which denoiser runs it
        if expert is not None:
            expert.check(model)
            if cache is not None or cfg_interval is not None or guider is not None:
                raise ValueError("expert: not combined with a step cache, cfg_interval or a guider")
            self.fasts.append(fused_denoiser(expert.model, dtype, mlp_epilogue, backend, quantize)
                              if expert_denoiser is None else
                              shared_denoiser(expert_denoiser, expert.model, dtype, backend, quantize))
            self.cfg_scales.append(expert.scale(cfg_scale))
            self.expert_of = [int(low) for low in expert.steps(sched.timesteps)]
        # APG has no native kernel: on a CPU its op's own choice (the reference, or Triton's interpreter).
        self.guider_backend = self.fast.backend if self.fast.backend in ("triton", "reference") else None
        self.device = self.fast.device
        self.sched.to(self.device)
        self.cfg_scale, self.use_cfg = float(cfg_scale), cfg_scale != 1.0
        if parallel is not None and not isinstance(parallel, ParallelConfig):
            raise TypeError(f"parallel: expected a ditengine.ParallelConfig or None, got {type(parallel).__name__}")
        self.parallel = parallel
        self.cfg_group, self.sequence = (None, None) if parallel is None else parallel.bind(self.use_cfg, self.device)
        for fast in self.fasts if self.sequence is not None else ():
            check_sequence_heads(fast, parallel)
        if self.cfg_group is not None and cache is not None:
            raise ValueError("parallel: cfg_degree=2 is not combined with a step cache (its residuals are kept per "
                             "CFG-doubled row, and each rank holds half of them); the sequence degrees are")
        self.cuda_graph = cuda_graph
        self.precompute_conditioning, self.conditioning_budget = precompute_conditioning, conditioning_budget
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" and cuda_graph else None
        self._plans: dict[tuple, Plan] = {}
        self.last_plan: tuple | None = None  # the key of the plan the last call ran
        self.captures = 0  # how many plans (graph captures, on CUDA) were built
        self.stats: dict = {}  # what the last call computed (see ditengine.cache.stats_dict)

    def _signature(self) -> str:
        """What a captured graph bakes in from the scheduler: its table (host copy, no device sync)."""
        return hashlib.sha1(self.sched.table_f64.tobytes()).hexdigest()

    def plan(self, noise_shape: tuple, cond: dict) -> Plan:
        """The static buffers and graphs for this noise shape and conditioning geometry (built once)."""
        key = (tuple(noise_shape), self.fast.context_key(cond), self._signature())
        if key not in self._plans:
            self._plans[key] = Plan(self, tuple(noise_shape), cond)
            self.captures += 1
        self.last_plan = key
        return self._plans[key]

    def clear_cache(self) -> None:
        """Drop every captured graph and its buffers."""
        self._plans.clear()

    def drop_plan(self, key: tuple) -> None:
        """Drop one plan (its static buffers and captured graphs), by the key `plan` built it under."""
        self._plans.pop(key, None)

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, *conditioning, generator: torch.Generator | None = None,
                 progress: bool = False, callback=None, **named_conditioning) -> torch.Tensor:
        """Latents (B, C, ...) fp32 from `noise` ~ N(0, I) (B, C, ...) and the family's conditioning
        (`class_labels` (B,) for a DiT; the prompt embeddings and masks for PixArt). `callback(i, t, x)` runs after
        each step on the state; a tensor it returns becomes the state (not with the whole-loop graph, which runs
        every step in one replay)."""
        if callback is not None and self.cuda_graph == "loop":
            raise ValueError("callback: the whole-loop graph (cuda_graph='loop') runs every step in one replay; use "
                             "cuda_graph='step' or None for a per-step callback")
        check_conditioning(type(self.fast), noise, self.device, conditioning, named_conditioning)
        cond = self.fast.inputs(self.model, noise, self.use_cfg, *conditioning, **named_conditioning)
        depth, S = self.fast.depth, len(self.sched)
        if noise.shape[0] == 0:  # nothing to sample: the reference loop's answer, without building a plan
            self.stats = stats_dict(S, depth, [True] * S, S * depth)
            return torch.zeros(noise.shape, device=noise.device)
        plan = self.plan(noise.shape, cond)
        self.conditioning_mode = plan.conditioning_mode
        plan.prepare(noise, cond)
        plan.run(generator, progress, callback)
        self.stats = plan.stats()
        return plan.x.clone()  # a later call must not overwrite what this one returned
