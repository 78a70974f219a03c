"""Step caching: skip transformer work on steps whose hidden states barely change (docs/design.md section 9).

Three policies, applied by `FastSampler(cache=...)` and `ditengine.sample(..., cache=...)`:

- `FirstBlockCache(threshold)`: every step computes block 0. When the relative mean absolute change of
  block 0's residual output since the last fully computed step is below `threshold`, the other blocks
  are skipped and the residual they added at that step is added instead; otherwise every block runs and
  the cache is refreshed. The decision is a device tensor (`skip_decision`), one for the whole batch, so
  the two halves of a CFG batch share it.
- `StaticCache(interval, warmup, cooldown)`: a schedule fixed before the loop (FORA): full steps during
  the warm-up, the cool-down and on every `interval`-th step in between; the other steps reuse the whole
  residual contribution of the blocks (`reuse="residual"`) or each block's attention and MLP outputs
  under the current step's gates (`reuse="blocks"`), both saved at the last full step.
- `TeaCache(threshold, model)`: TeaCache's schedule from the timestep embedding's relative change (its published
  rescale polynomials, per Wan 2.1 model): fixed before the loop, since it depends on the timesteps alone, and run
  as a static schedule reusing the whole residual.

The first step is always computed in full, and the last one except by TeaCache with retention steps. Only the
transformer's work is approximated: the scheduler (noise, multistep history) runs exactly as without caching.

`ReferenceCachedForward` is the readable form of the policies on any family's reference model (it calls the
model's own blocks, handed to it by the family's reference forward as `Stages`); the fast path (`ditengine.fast`)
implements the same decisions on its fused forward and is tested against it, family by family.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

REUSE_MODES = ("residual", "blocks")


@dataclass(frozen=True)
class FirstBlockCache:
    """Skip blocks 1.. while block 0's residual output changes by less than `threshold` (relative mean
    absolute change since the last full step). `threshold=0` never skips."""

    threshold: float = 0.1

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"FirstBlockCache: threshold={self.threshold!r}: expected a finite number >= 0")

    def check(self, steps: int) -> None:
        """Nothing depends on the number of steps: the first and last are full, every other may skip."""

    def skippable(self, steps: int) -> list[bool]:
        """Which steps may be skipped: all but the first and the last."""
        return [0 < i < steps - 1 for i in range(steps)]

    def __str__(self) -> str:
        return f"first-block:{self.threshold:g}"


@dataclass(frozen=True)
class StaticCache:
    """Full steps during `warmup`, during `cooldown` and on every `interval`-th step in between; the other
    steps reuse what the last full step computed (`reuse`: "residual" or "blocks"). `interval=1` caches
    nothing."""

    interval: int = 3
    warmup: int = 2
    cooldown: int = 2
    reuse: str = "residual"

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"StaticCache: interval={self.interval!r}: expected an int >= 1")
        for name in ("warmup", "cooldown"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"StaticCache: {name}={value!r}: expected an int >= 0")
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"StaticCache: reuse={self.reuse!r}: expected one of {REUSE_MODES}")

    def check(self, steps: int) -> None:
        if self.warmup + self.cooldown > steps:
            raise ValueError(f"StaticCache: warmup ({self.warmup}) + cooldown ({self.cooldown}) is longer than "
                             f"the run ({steps} steps)")

    def schedule(self, steps: int) -> list[bool]:
        """Per step: True where it is computed in full."""
        self.check(steps)
        anchor = max(self.warmup, 1) - 1  # the last warm-up step (step 0 is full even without warm-up)
        first_cool = min(steps - self.cooldown, steps - 1)  # the last step is full even without cool-down
        return [i <= anchor or i >= first_cool or (i - anchor) % self.interval == 0 for i in range(steps)]

    def __str__(self) -> str:
        return f"static:{self.interval}"


@dataclass(frozen=True)
class ScheduledCache(StaticCache):
    """A static schedule given step by step (`full[i]`: step i computed in full), reusing the whole residual: what a
    `TeaCache` decides for one run's timesteps."""

    full: tuple = ()
    name: str = "scheduled"

    def check(self, steps: int) -> None:
        if len(self.full) != steps:
            raise ValueError(f"cache: a schedule of {len(self.full)} steps for a run of {steps}")

    def schedule(self, steps: int) -> list[bool]:
        self.check(steps)
        return list(self.full)

    def __str__(self) -> str:
        return self.name


# TeaCache's published rescale polynomials (numpy.poly1d order, highest power first), fitted by its authors on the
# relative L1 change of each Wan 2.1 model's timestep signal against that of its output: keyed by (model,
# use_ret_steps). use_ret_steps=True measures e0 (the time projection, 6 D), False measures e (the time embedding, D).
TEACACHE_COEFFICIENTS = {
    ("Wan2.1-T2V-1.3B", True): (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    ("Wan2.1-T2V-1.3B", False): (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
    ("Wan2.1-T2V-14B", True): (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    ("Wan2.1-T2V-14B", False): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("Wan2.1-I2V-14B-480P", True): (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01,
                                    1.32517977e-01),
    ("Wan2.1-I2V-14B-480P", False): (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00,
                                     -2.01973289e-01),
    ("Wan2.1-I2V-14B-720P", True): (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01,
                                    -4.17769401e-02),
    ("Wan2.1-I2V-14B-720P", False): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}


@dataclass(frozen=True)
class TeaCache:
    """TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model") as its
    authors run it on Wan 2.1: the relative L1 change of the timestep signal between steps, mapped through the
    model's rescale polynomial, is accumulated; while the sum stays below `threshold` the step reuses the residual
    of the whole block stack saved at the last full step (per CFG row), else it runs in full and the sum restarts.
    `use_ret_steps=True` measures e0 (the time projection) and computes the first 5 steps in full; False measures e
    (the time embedding) and computes the first and the last step in full.

    The signal is the timestep's alone (never the latents'), so the schedule is fixed before the loop: it stays
    inside a captured loop, costs no host read, and is the same in both loops and on every rank. `model` names the
    published coefficients (`TEACACHE_COEFFICIENTS`: "Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B", "Wan2.1-I2V-14B-480P",
    "Wan2.1-I2V-14B-720P"), or `coefficients` gives a polynomial (highest power first). The authors' thresholds:
    0.08 (T2V 1.3B), 0.2 (T2V 14B), 0.26 (I2V 480P), 0.3 (I2V 720P). A family offers it when its record has a
    `timestep_signal` (Wan)."""

    threshold: float = 0.08
    model: str = "Wan2.1-T2V-1.3B"
    use_ret_steps: bool = True
    coefficients: tuple | None = None

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"TeaCache: threshold={self.threshold!r}: expected a finite number >= 0")
        if self.coefficients is None and (self.model, bool(self.use_ret_steps)) not in TEACACHE_COEFFICIENTS:
            names = sorted({name for name, _ in TEACACHE_COEFFICIENTS})
            raise ValueError(f"TeaCache: model={self.model!r}: expected one of {names}, or coefficients=")

    def polynomial(self) -> tuple:
        return tuple(self.coefficients or TEACACHE_COEFFICIENTS[(self.model, bool(self.use_ret_steps))])

    def decide(self, e: torch.Tensor, e0: torch.Tensor) -> ScheduledCache:
        """The schedule of a run whose steps have the timestep signals e (S, D) and e0 (S, 6 D), fp32, as the
        reference implementation takes it: `previous` follows every step, the polynomial's value is added as it
        is (no abs), the comparison is strict."""
        signal = (e0 if self.use_ret_steps else e).double().flatten(1)
        S = len(signal)
        coefficients = self.polynomial()
        retained, cutoff = (5, S) if self.use_ret_steps else (1, S - 1)
        full, total = [], 0.0
        for i in range(S):
            if i < retained or i >= cutoff:
                compute, total = True, 0.0
            else:
                x = float((signal[i] - signal[i - 1]).abs().mean() / signal[i - 1].abs().mean())
                total += float(np.polyval(coefficients, x))
                compute = total >= self.threshold
                total = 0.0 if compute else total
            full.append(compute)
        return ScheduledCache(full=tuple(full), name=str(self))

    def __str__(self) -> str:
        return f"teacache:{self.threshold:g}"


CachePolicy = FirstBlockCache | StaticCache | TeaCache


def resolve(policy, model: nn.Module, timesteps: torch.Tensor):
    """The policy a loop runs: a TeaCache becomes the static schedule it decides for these timesteps, from the model
    family's `timestep_signal` (a ValueError where the family has none); the others as they are."""
    if not isinstance(policy, TeaCache):
        return policy
    from . import families

    family = families.of_model(model)
    if family.timestep_signal is None:
        raise ValueError(f"cache: TeaCache needs a timestep signal, which the {family.name} family does not offer "
                         "(Wan does); use FirstBlockCache or StaticCache")
    with torch.no_grad():
        return policy.decide(*family.timestep_signal(getattr(model, "_orig_mod", model), timesteps))


def parse_cache(spec: str | None) -> CachePolicy | None:
    """A policy from its command-line form: "first-block[:threshold]", "static[:interval]", "teacache[:threshold]"
    (Wan 2.1 T2V 1.3B's coefficients) or "none"."""
    if spec is None or spec in ("", "none"):
        return None
    name, _, value = spec.partition(":")
    try:
        if name == "first-block":
            return FirstBlockCache(float(value)) if value else FirstBlockCache()
        if name == "static":
            return StaticCache(int(value)) if value else StaticCache()
        if name == "teacache":
            return TeaCache(float(value)) if value else TeaCache()
    except ValueError as err:
        raise ValueError(f"--cache {spec!r}: {err}") from None
    raise ValueError(f"--cache {spec!r}: expected 'first-block[:threshold]', 'static[:interval]', "
                     "'teacache[:threshold]' or 'none'")


def relative_change(new: torch.Tensor, old: torch.Tensor, reduce=None) -> torch.Tensor:
    """mean|new - old| / mean|old| over the whole batch, a float32 device scalar (no host sync). `reduce` sums a
    tensor over the ranks that hold the other parts of the batch's tokens (in place), so that every rank computes
    the statistic of the whole sequence."""
    new, old = new.float(), old.float()
    if reduce is None:
        return (new - old).abs().mean() / old.abs().mean().clamp_min(torch.finfo(torch.float32).tiny)
    sums = reduce(torch.stack([(new - old).abs().sum(), old.abs().sum()]))  # equal counts: sums for means
    return sums[0] / sums[1].clamp_min(torch.finfo(torch.float32).tiny)


def skip_decision(first_residual: torch.Tensor, last_full_residual: torch.Tensor, threshold: float,
                  skippable: torch.Tensor, reduce=None) -> torch.Tensor:
    """The first-block cache's decision as a bool device scalar: skip the other blocks on this step.
    `skippable` (bool scalar tensor) is False on the steps that must run in full; `reduce`: see `relative_change`."""
    return (relative_change(first_residual, last_full_residual, reduce) < threshold) & skippable


def stats_dict(steps: int, depth: int, full_mask: list[bool], block_evals: int) -> dict:
    """What a cached run did: its steps, which ran in full and how many transformer blocks it computed."""
    return {
        "steps": steps,
        "full_steps": sum(full_mask),
        "cached_steps": [i for i, full in enumerate(full_mask) if not full],
        "block_evals": block_evals,
        "block_evals_uncached": steps * depth,
        "block_share": block_evals / (steps * depth) if steps else 1.0,
    }


@dataclass
class Stages:
    """One model call cut where a step cache works on it, in the spec's own modules: `stream`, the residual stream
    after the embedding (N, S, D); `blocks[i](stream) -> stream`, block i; `end(stream)`, the final norm,
    projection and unpatchify; `branches[i]`, the modules of block i whose outputs StaticCache(reuse="blocks")
    keeps (those the fused denoiser's `reuse_block` takes from its cache, e.g. attention and MLP)."""

    stream: torch.Tensor
    blocks: list[Callable[[torch.Tensor], torch.Tensor]]
    end: Callable[[torch.Tensor], torch.Tensor]
    branches: list[list[nn.Module]]
    model: nn.Module  # the spec whose blocks these are (where a reused branch is stood in for)


@contextmanager
def _recorded(modules: list[nn.Module], outputs: list):
    """Each module's output into `outputs[j]`, for the duration (a forward hook)."""
    handles = [m.register_forward_hook(lambda _, args, out, j=j: outputs.__setitem__(j, out))
               for j, m in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Replay(nn.Module):
    """Stands in for a branch module on a reused step: its call returns what the branch gave at the last full step;
    anything else a block asks of the branch (PixArt's `cross_attn.kv`) is the branch's own."""

    def __init__(self, branch: nn.Module, output):
        super().__init__()
        self.output = output
        object.__setattr__(self, "branch", branch)  # not a submodule: the stand-in holds no parameters

    def forward(self, *args, **kwargs):
        return self.output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "branch"), name)


@contextmanager
def _replayed(model: nn.Module, modules: list[nn.Module], outputs: list):
    """`modules` (submodules of `model`) replaced by their kept `outputs` for the duration: the branches do not
    run, the rest of the block does."""
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    places = [parents[id(m)] for m in modules]
    for (parent, name), m, output in zip(places, modules, outputs):
        setattr(parent, name, _Replay(m, output))
    try:
        yield
    finally:
        for (parent, name), m in zip(places, modules):
            setattr(parent, name, m)


class ReferenceCachedForward:
    """Either policy around a reference model's blocks: the readable form of the cached step, for every family.

    A family's reference forward hands each call to it cut into `Stages`: `forward(stages, step)` for step = 0,
    1, ... of a run of `steps`; `reset()` before a run. `stats` reports what was computed (`block_evals` counts the
    blocks actually called). Per-block reuse keeps each branch module's output at a full step (a forward hook) and
    at a reused step runs the block with stand-ins returning those outputs in place of the branches: the gates,
    norms and residual adds are the current step's, as in the fused `reuse_block`.
    """

    def __init__(self, policy: CachePolicy, steps: int, depth: int):
        if not isinstance(policy, (FirstBlockCache, StaticCache)):
            raise TypeError(f"cache: expected a ditengine.cache policy (FirstBlockCache, StaticCache) or None, "
                            f"got {type(policy).__name__}")
        policy.check(steps)
        self.policy, self.steps, self.depth = policy, steps, depth
        self.reset()

    def reset(self) -> None:
        self.full_mask: list[bool] = []
        self.block_evals = 0
        self.rest = None  # the residual added by the blocks the cache stands in for, at the last full step
        self.first_residual = None  # block 0's residual output at the last full step (first-block cache)
        self.kept = None  # each block's branch outputs at the last full step (static, "blocks")

    @property
    def stats(self) -> dict:
        return stats_dict(self.steps, self.depth, self.full_mask, self.block_evals)

    def _run(self, stages: Stages, h: torch.Tensor, blocks: range) -> torch.Tensor:
        for i in blocks:
            self.block_evals += 1
            h = stages.blocks[i](h)
        return h

    def _run_keeping(self, stages: Stages, h: torch.Tensor) -> torch.Tensor:
        self.kept = []
        for i, block in enumerate(stages.blocks):
            outputs = [None] * len(stages.branches[i])
            with _recorded(stages.branches[i], outputs):
                h = block(h)
            self.block_evals += 1
            self.kept.append(outputs)
        return h

    def _reuse(self, stages: Stages, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(stages.blocks):
            with _replayed(stages.model, stages.branches[i], self.kept[i]):
                h = block(h)
        return h

    def __call__(self, stages: Stages, step: int) -> torch.Tensor:
        policy, h = self.policy, stages.stream
        if len(stages.blocks) != self.depth:
            raise ValueError(f"cache: the model has {len(stages.blocks)} blocks, the cache was made for {self.depth}")
        if isinstance(policy, FirstBlockCache):
            before = h
            h = self._run(stages, h, range(1))
            first_residual = h - before
            skip = policy.skippable(self.steps)[step] and bool(
                skip_decision(first_residual, self.first_residual, policy.threshold, torch.tensor(True)))
            if skip:
                h = h + self.rest
            else:
                after_first = h
                h = self._run(stages, h, range(1, self.depth))
                self.rest, self.first_residual = h - after_first, first_residual
            self.full_mask.append(not skip)
        else:
            full = policy.schedule(self.steps)[step]
            if full and policy.reuse == "blocks":
                h = self._run_keeping(stages, h)
            elif full:
                before = h
                h = self._run(stages, h, range(self.depth))
                self.rest = h - before
            elif policy.reuse == "blocks":
                h = self._reuse(stages, h)
            else:
                h = h + self.rest
            self.full_mask.append(full)
        return stages.end(h)
