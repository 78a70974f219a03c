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

`ReferenceCachedForward` is the readable form of both policies on a plain `ditengine.DiT` (it calls the
model's own blocks); the fast path (`ditengine.fast`) implements the same decisions on its fused forward
and is tested against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .models.dit import DiT, modulate

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


class ReferenceCachedForward:
    """Either policy around a plain `DiT`, calling its own modules: the readable form of the cached step.

    Called as `forward(x, t, y, step)` for step = 0, 1, ... of a run of `steps`; `reset()` before a run.
    `stats` reports what was computed (`block_evals` counts the blocks actually called).
    """

    def __init__(self, model: DiT, policy: CachePolicy, steps: int):
        if not isinstance(policy, (FirstBlockCache, StaticCache)):
            raise TypeError(f"cache: expected a ditengine.cache policy (FirstBlockCache, StaticCache) or None, "
                            f"got {type(policy).__name__}")
        policy.check(steps)
        self.model, self.policy, self.steps = model, policy, steps
        self.depth = model.config.depth
        self.reset()

    def reset(self) -> None:
        self.full_mask: list[bool] = []
        self.block_evals = 0
        self.rest = None  # the residual added by the blocks the cache stands in for, at the last full step
        self.first_residual = None  # block 0's residual output at the last full step (first-block cache)
        self.kept = None  # each block's attention and MLP outputs at the last full step (static, "blocks")

    @property
    def stats(self) -> dict:
        return stats_dict(self.steps, self.depth, self.full_mask, self.block_evals)

    def _run_block(self, block, h, c, keep: bool):
        self.block_evals += 1
        if not keep:
            return block(h, c), None
        # The block's two branches spelled out (DiTBlock.forward), keeping their outputs before the gates.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        attn = block.attn(modulate(block.norm1(h), shift_msa, scale_msa))
        h = h + gate_msa[:, None] * attn
        mlp = block.mlp(modulate(block.norm2(h), shift_mlp, scale_mlp))
        return h + gate_mlp[:, None] * mlp, (attn, mlp)

    @staticmethod
    def _reuse_block(block, h, c, kept):
        _, _, gate_msa, _, _, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        h = h + gate_msa[:, None] * kept[0]
        return h + gate_mlp[:, None] * kept[1]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        model, policy = self.model, self.policy
        h = model.x_embedder(x) + model.pos_embed.to(x.dtype)  # (B, T, D)
        c = model.conditioning(t, y)
        blocks = list(model.blocks)
        if isinstance(policy, FirstBlockCache):
            before = h
            h, _ = self._run_block(blocks[0], h, c, keep=False)
            first_residual = h - before
            skip = policy.skippable(self.steps)[step] and bool(
                skip_decision(first_residual, self.first_residual, policy.threshold, torch.tensor(True)))
            if skip:
                h = h + self.rest
            else:
                after_first = h
                for block in blocks[1:]:
                    h, _ = self._run_block(block, h, c, keep=False)
                self.rest, self.first_residual = h - after_first, first_residual
            self.full_mask.append(not skip)
        else:
            full = policy.schedule(self.steps)[step]
            keep = policy.reuse == "blocks"
            if full:
                before, kept = h, []
                for block in blocks:
                    h, outputs = self._run_block(block, h, c, keep)
                    kept.append(outputs)
                self.rest, self.kept = h - before, kept
            elif keep:
                for block, outputs in zip(blocks, self.kept):
                    h = self._reuse_block(block, h, c, outputs)
            else:
                h = h + self.rest
            self.full_mask.append(full)
        return model.unpatchify(model.final_layer(h, c))
