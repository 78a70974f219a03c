"""The family registry: one `Family` record per model family, registered once, holding everything the shared code
needs to know of it. The reference loop, the checkpoint loader, `from_diffusers`, `accelerate`, the fused sampler,
the package's exports and the benchmark all look a family up here; none of them names one.

The built-in families register themselves in `ditengine.pipelines` (one file each: the accelerated pipeline, how
that pipeline calls its transformer, and the record). A new family is a spec, a fused denoiser and one
`register(Family(...))` call (see docs/architecture.md).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

# forward(x_in, t, step) -> the model output on the loop's rows: what `Family.forward` returns
Forward = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One model family.

    Required: `name`; `spec`, the reference model class (plain PyTorch, with a `config`); `fast`, its
    `FusedDenoiser` subclass; `forward(model, spec, noise, use_cfg, *conditioning, cache=None, **named) -> Forward`,
    `model` (the spec `spec`, or a module with its call, such as diffusers' transformer) called as the family's
    pipeline calls it on the loop's (CFG-doubled) rows, the conditioning checked once;
    `channels(config)`, the latent channels the loop updates; `depth(model)`, its transformer blocks.

    Optional: `config` (the config class, exported beside the spec); `diffusers_class` and
    `from_diffusers(module, peft_base)`;
    `recognises(state)` and `load(state, diffusers_config, options)` for `load_checkpoint` (families are asked in
    registration order, a `catch_all` one after every other); `pipelines`, diffusers pipeline class names ->
    the accelerated pipeline classes; `reference_cache`, True when `forward` takes `cache=` (a
    `cache.ReferenceCachedForward`) and hands each call to it cut into `cache.Stages`;
    `bench`, (a predicate on `ditengine-bench --model` names, "module:function" of its ladder set-up) with
    `bench_defaults` (argument defaults, e.g. no CFG batch) and `bench_peers` (the CPU runtime peers export it);
    `timestep_signal(spec, timesteps) -> (e, e0)`, the timestep embedding (S, D) and its projection (S, ...) in fp32,
    where `cache.TeaCache` decides from them.
    """

    name: str
    spec: type
    fast: type
    forward: Callable[..., Forward]
    channels: Callable[[object], int]
    depth: Callable[[torch.nn.Module], int]
    config: type | None = None
    diffusers_class: str | None = None
    from_diffusers: Callable | None = None
    recognises: Callable[[dict], bool] | None = None
    load: Callable | None = None
    catch_all: bool = False
    pipelines: dict = field(default_factory=dict)
    reference_cache: bool = False
    bench: tuple[Callable[[str], bool], str] | None = None
    bench_defaults: dict = field(default_factory=dict)
    bench_peers: bool = False
    timestep_signal: Callable | None = None

    def bench_setup(self) -> Callable:
        module, name = self.bench[1].split(":")
        return getattr(importlib.import_module(module), name)


def config_loader(load_state_dict: Callable) -> Callable:
    """`Family.load` for a spec whose `load_state_dict(state, config)` takes diffusers config fields: the folder's
    config.json, with `load_checkpoint`'s config overrides winning."""
    return lambda state, dconfig, options: load_state_dict(state, {**dconfig, **options.get("overrides", {})})


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (a name registered again replaces the earlier record, keeping its place)."""
    if not isinstance(family, Family):
        raise TypeError(f"register: expected a ditengine.families.Family, got {type(family).__name__}")
    from .fast.base import FusedDenoiser

    if not (isinstance(family.fast, type) and issubclass(family.fast, FusedDenoiser)):
        raise TypeError(f"Family {family.name!r}: fast: expected a FusedDenoiser subclass, got {family.fast!r}")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def families() -> list[Family]:
    """Every registered family, in registration order."""
    _load_builtin()
    return list(_REGISTRY.values())


def _names() -> str:
    return ", ".join(f.spec.__name__ for f in _REGISTRY.values())


def of_model(model) -> Family:
    """The family of a reference model (or of `torch.compile`'s wrapper around one); a TypeError otherwise."""
    spec = getattr(model, "_orig_mod", model)
    for family in families():
        if isinstance(spec, family.spec):
            return family
    raise TypeError(f"model: expected a ditengine reference model ({_names()}), got {type(model).__name__} "
                    "(convert a diffusers transformer with ditengine.from_diffusers)")


def of_diffusers(class_name: str) -> Family | None:
    return next((f for f in families() if f.diffusers_class == class_name), None)


def of_pipeline(class_name: str) -> tuple[Family, type] | None:
    return next(((f, f.pipelines[class_name]) for f in families() if class_name in f.pipelines), None)


def of_state(state: dict) -> Family | None:
    """The family whose recogniser takes this state dict (a catch-all one last)."""
    ordered = sorted((f for f in families() if f.recognises is not None), key=lambda f: f.catch_all)
    return next((f for f in ordered if f.recognises(state)), None)


def of_bench_model(name: str) -> Family:
    found = next((f for f in families() if f.bench is not None and f.bench[0](name)), None)
    if found is None:
        raise SystemExit(f"--model {name!r}: no registered family benchmarks it ({_names()})")
    return found


def _load_builtin() -> None:
    """The built-in families register when `ditengine.pipelines` is imported (as `import ditengine` does)."""
    importlib.import_module("ditengine.pipelines")
