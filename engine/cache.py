"""Step caching: skip transformer work on steps whose hidden states barely change (docs/design.md section 9).

Two policies, applied by `FastSampler(cache=...)` and `ditengine.sample(..., cache=...)`:

- `FirstBlockCache(threshold)`: every step computes block 0. When the relative mean absolute change of
  block 0's residual output since the last fully computed step is below `threshold`, the other blocks
  are skipped and the residual they added at that step is added instead; otherwise every block runs and
  the cache is refreshed. The decision is a device tensor (`skip_decision`), one for the whole batch, so
  the two halves of a CFG batch share it.
- `StaticCache(interval, warmup, cooldown)`: a schedule fixed before the loop (FORA): full steps during
  the warm-up, the cool-down and on every `interval`-th step in between; the other steps reuse the whole
  residual contribution of the blocks (`reuse="residual"`) or each block's attention and MLP outputs
  under the current step's gates (`reuse="blocks"`), both saved at the last full step.

The first and the last step are always computed in full. Only the transformer's work is approximated:
the scheduler (noise, multistep history) runs exactly as without caching.

`ReferenceCachedForward` is the readable form of both policies on any family's reference model (it calls the
model's own blocks, handed to it by the family's reference forward as `Stages`); the fast path (`ditengine.fast`)
implements the same decisions on its fused forward and is tested against it, family by family.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

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


CachePolicy = FirstBlockCache | StaticCache


def parse_cache(spec: str | None) -> CachePolicy | None:
    """A policy from its command-line form: "first-block[:threshold]", "static[:interval]" or "none"."""
    if spec is None or spec in ("", "none"):
        return None
    name, _, value = spec.partition(":")
    try:
        if name == "first-block":
            return FirstBlockCache(float(value)) if value else FirstBlockCache()
        if name == "static":
            return StaticCache(int(value)) if value else StaticCache()
    except ValueError as err:
        raise ValueError(f"--cache {spec!r}: {err}") from None
    raise ValueError(f"--cache {spec!r}: expected 'first-block[:threshold]', 'static[:interval]' or 'none'")


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """mean|new - old| / mean|old| over the whole batch, a float32 device scalar (no host sync)."""
    new, old = new.float(), old.float()
    return (new - old).abs().mean() / old.abs().mean().clamp_min(torch.finfo(torch.float32).tiny)


def skip_decision(first_residual: torch.Tensor, last_full_residual: torch.Tensor, threshold: float,
                  skippable: torch.Tensor) -> torch.Tensor:
    """The first-block cache's decision as a bool device scalar: skip the other blocks on this step.
    `skippable` (bool scalar tensor) is False on the steps that must run in full."""
    return (relative_change(first_residual, last_full_residual) < threshold) & skippable


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
