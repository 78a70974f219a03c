"""What a LoRA change costs the accelerated Flux: `python -m ditengine.bench.lora`.

Flux.1 at its real width (D 3072; 1 double and 2 single blocks by default, `--depth N`: N and 2N), diffusers'
`FluxTransformer2DModel` with two LoRA adapters of rank `--rank` (16) on every attention and MLP layer of both
block kinds, loaded with `load_lora_adapter` as `pipe.load_lora_weights` loads them. In one process it times:

    step        one fused denoising step at `--image-size` (256 px: 256 image and 512 text tokens, dev)
    refit       `LoraSync.sync` after `set_adapters` changed both adapters' weights: every LoRA layer's
                W + sum s B A folded into the fused forms, in place
    unchanged   `LoraSync.sync` with nothing changed (the fingerprint of every LoRA layer compared)
    one pass    every LoRA layer's base weight read once and written once in the compute dtype: the memory
                traffic below which no fold of W + B A into the weights can go

and prints each with the refit's share of a step (the target: at most 10%).
"""
from __future__ import annotations

import argparse
import json
import pathlib

import torch

import ditengine as de
from ditengine.lora import LoraSync, peft_layers
from ditengine.models.flux import Flux, FluxConfig

from .memory import fill_random
from .timing import environment, measure
from .twin import diffusers_transformer

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
           "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
TEXT_TOKENS = 512  # dev's padded T5 prompt


def adapter(transformer: torch.nn.Module, rank: int, seed: int) -> dict:
    """A random rank-`rank` LoRA (peft keys, as `load_lora_adapter` reads them) on every attention and MLP layer of the
    transformer blocks (not the output projection of the whole model)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and "transformer_blocks." in name and name.endswith(TARGETS):
            A = torch.randn(rank, m.in_features, generator=g) / m.in_features**.5
            state[f"transformer.{name}.lora_A.weight"] = A
            state[f"transformer.{name}.lora_B.weight"] = 0.01 * torch.randn(m.out_features, rank, generator=g)
    return state


def run(depth: int, image_size: int, rank: int, dtype: torch.dtype, repeats: int, seed: int = 0, **config) -> dict:
    """The report of one measurement; `config` overrides FluxConfig's real-width fields (the tests' tiny model)."""
    cfg = FluxConfig(num_layers=depth, num_single_layers=2 * depth, guidance_embeds=True, **config)
    with torch.device("meta"):
        model = Flux(cfg)
    model = fill_random(model.to_empty(device="cpu").eval(), seed)
    transformer = diffusers_transformer(model, "FluxTransformer2DModel")
    if transformer is None:
        raise SystemExit("python -m ditengine.bench.lora needs diffusers and peft (pip install -e '.[test]')")
    del model
    for i, name in enumerate(("one", "two")):
        transformer.load_lora_adapter(adapter(transformer, rank, seed + 1 + i), adapter_name=name)
    reference = de.from_diffusers(transformer, peft_base=True)
    fast = de.fast.fused_denoiser(reference, dtype)
    lora = LoraSync(transformer, reference, fast)
    lora.sync()
    grid = image_size // 8
    sched = de.schedulers.FlowMatchEuler(sigmas=[1.0, 0.5])
    sampler = de.FastSampler(reference, sched, cfg_scale=1.0, dtype=dtype, cuda_graph=None, denoiser=fast)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, cfg.in_channels // 4, grid, grid, generator=g)
    named = dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, cfg.joint_attention_dim, generator=g),
                 pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g), guidance=3.5)
    with torch.inference_mode():
        cond = fast.inputs(reference, noise, False, **named)
        plan = sampler.plan(noise.shape, cond)
        plan.prepare(noise, cond)
        step = measure(lambda: plan.step_body(0), torch.device("cpu"), warmup=1, repeats=repeats)
        weights = iter([[1.0, 0.5], [0.8, 0.5]] * (repeats + 2))

        def refit():
            transformer.set_adapters(["one", "two"], next(weights))
            lora.sync()

        changed = measure(refit, torch.device("cpu"), warmup=1, repeats=repeats)
        unchanged = measure(lora.sync, torch.device("cpu"), warmup=1, repeats=max(repeats, 20))
        bases = [layer.base_layer.weight for layer in peft_layers(transformer).values()]
        one_pass = measure(lambda: [w.to(dtype, copy=True) for w in bases], torch.device("cpu"), warmup=1,
                           repeats=repeats)
    return {"env": environment(torch.device("cpu")), "depth": f"{depth} double + {2 * depth} single",
            "image_size": image_size, "dtype": str(dtype).removeprefix("torch."), "rank": rank,
            "lora_layers": len(peft_layers(transformer)), "step_ms": step["median_ms"],
            "refit_ms": changed["median_ms"], "unchanged_ms": unchanged["median_ms"],
            "one_pass_ms": one_pass["median_ms"],
            "refit_share_of_step": changed["median_ms"] / step["median_ms"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditengine.bench.lora", description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    r = run(args.depth, args.image_size, args.rank, dtype, args.repeats)
    print(f"Flux width, {r['depth']} blocks, {r['image_size']} px, {r['dtype']} | {r['env']['device']} | "
          f"two rank-{r['rank']} adapters on {r['lora_layers']} layers\n")
    print("| what | ms |\n|---|---:|")
    print(f"| one fused step | {r['step_ms']:.1f} |")
    print(f"| refit after set_adapters (every LoRA layer) | {r['refit_ms']:.1f} "
          f"({100 * r['refit_share_of_step']:.1f}% of a step) |")
    print(f"| a call with nothing changed | {r['unchanged_ms']:.3f} |")
    print(f"| one pass over the LoRA layers' weights (the floor of any fold) | {r['one_pass_ms']:.1f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
