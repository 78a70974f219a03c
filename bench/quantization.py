"""`python -m ditengine.bench.quantization`: what the approximations cost a whole sampling run at real widths.

For each DiT width, one sampling run per form from the same noise and labels, against the fp32 reference loop
(`ditengine.sample`): SQNR and max error of the final latents, and the median fused step time of each form
in the same process. Forms: the fused path in fp32 and bf16, int8 (`quantize="int8"`) in both, fp8's
emulated numerics (`quantize="fp8"`, backend="reference": Hopper's arithmetic, not its speed), and the
guidance interval (`cfg_interval`) in fp32, which samples another function: its SQNR is against the
reference loop with the same interval (a correctness check), its step time the gain.
The weights are random (no DiT-XL/2 checkpoint is shipped), with
every layer live; the digits model's accuracy and pixel FD (`python -m ditengine.eval --quantize int8`)
judge the same forms on a trained model.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import ditengine as de
from ditengine.fast import FastSampler

from .metrics import sqnr_db
from .timing import environment, measure

FORMS = {  # name -> FastSampler arguments
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "int8 (fp32 around it)": dict(dtype=torch.float32, quantize="int8"),
    "int8 (bf16 around it)": dict(dtype=torch.bfloat16, quantize="int8"),
    "fp8 (emulated)": dict(dtype=torch.float32, quantize="fp8", backend="reference"),
}


def live_dit(name: str, input_size: int, depth: int | None, seed: int) -> de.DiT:
    """A DiT whose every layer contributes: DiT's own init zeroes the adaLN and final layers."""
    torch.manual_seed(seed)
    model = de.DiT(de.DiTConfig.from_name(name, input_size=input_size, **({"depth": depth} if depth else {})))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
                torch.nn.init.normal_(module.bias, std=0.02)
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditengine.bench.quantization", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="DiT-S/2,DiT-XL/2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--depth", type=int, help="override the number of blocks (quick runs)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--cfg-interval", default="0,700", help="LO,HI for the guidance-interval row")
    p.add_argument("--repeats", type=int, default=5, help="timed fused steps per form")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    interval = tuple(float(v) for v in args.cfg_interval.split(","))
    rows = []
    for name in args.models.split(","):
        model = live_dit(name, args.input_size, args.depth, args.seed)
        sched = de.schedulers.DDIM(args.steps, timestep_spacing="trailing", clip_sample=False)
        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(1, model.config.in_channels, args.input_size, args.input_size, generator=g)
        labels = torch.randint(0, model.config.num_classes, (1,), generator=g)
        with torch.inference_mode():
            forms = dict(FORMS) | {f"cfg interval {interval} (fp32)": dict(dtype=torch.float32, cfg_interval=interval)}
            refs = {iv: de.sample(model, sched, noise, labels, cfg_scale=args.cfg_scale, progress=False,
                                  cfg_interval=iv)
                    for iv in (None, interval)}
            for form, kwargs in forms.items():
                ref = refs[kwargs.get("cfg_interval")]
                sampler = FastSampler(model, sched, cfg_scale=args.cfg_scale, cuda_graph=None, **kwargs)
                out = sampler(noise, labels)
                cond = sampler.fast.inputs(model, noise, sampler.use_cfg, labels)
                plan = sampler.plan(noise.shape, cond)
                plan.prepare(noise, cond)
                # The loop's mean step: every step once per call (an interval mixes guided and unguided ones).
                timing = measure(lambda: [plan.step_body(i) for i in range(len(sched))], noise.device, 1,
                                 max(1, args.repeats // 5))
                rows.append({"model": name, "form": form, "sqnr_db": sqnr_db(out, ref),
                             "max_err": (out - ref).abs().max().item(),
                             "ms_per_step": timing["median_ms"] / len(sched)})
                print(f"| {name} | {form} | {rows[-1]['sqnr_db']:.1f} | {rows[-1]['max_err']:.2e} | "
                      f"{rows[-1]['ms_per_step']:.1f} |", flush=True)
    env = environment(torch.device("cpu"))
    print(f"\n{args.steps}-step DDIM, cfg {args.cfg_scale}, latent {args.input_size}, batch 1 + CFG | "
          f"{env['device']} | "
          f"torch {env['torch']} | commit {env['commit']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=2,
                                              default=str))
    return 0 if all(math.isfinite(r["sqnr_db"]) or r["form"] == "fp32" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
