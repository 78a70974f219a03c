"""`ditengine-bench`: milliseconds per denoising step, per backend, on the current device.

One "step" is what a sampling loop repeats: the DiT forward on the CFG-doubled batch, the guidance
combine and the scheduler update. Every row is timed in the same process (warm-up, then median and
p20/p80 over repeated steps, synchronised on GPU). The default is CPU-sized (DiT-S/2, 32x32 latent,
batch 1 with CFG); `--model DiT-XL/2 --image-size 256 --batch 1,8 --dtype bf16` is the GPU case.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import ditengine as de
from ditengine.model import guide
from ditengine.sampling import guided_labels
from ditengine.schedulers import COL

from .timing import environment, measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dit_flops(cfg: de.DiTConfig, batch: int) -> float:
    """FLOPs of one forward on `batch` samples: the GEMMs and attention (2 FLOPs per multiply-add)."""
    T, D, H = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    per_block = 2 * T * (3 * D * D + D * D + 2 * D * H) + 4 * T * T * D + 2 * 6 * D * D
    patch = 2 * T * D * cfg.in_channels * cfg.patch_size**2
    final = 2 * T * D * cfg.patch_size**2 * cfg.out_channels + 2 * 2 * D * D
    return batch * (cfg.depth * per_block + patch + final)


def reference_step(model, sched, x, labels, cfg_scale, dtype, i=0):
    """One eager reference step as `ditengine.sample` runs it; returns a closure."""
    use_cfg = cfg_scale != 1.0
    y = guided_labels(labels, model.config.num_classes, use_cfg)
    k = model.config.in_channels

    def step():
        x_in = x * sched.table[i, COL["c_in"]]
        x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
        out = model(x_in.to(dtype), sched.timesteps[i].expand(len(x_in)), y).float()
        if use_cfg:
            out = guide(out, cfg_scale, k)[: len(x)]
        return sched.step(i, x, out)

    return step


def build_rows(args, cfg, device):
    """(name, dtype, builder) for each benchmarked variant; builder(model, sched, x, labels) -> step()."""
    dtype = DTYPES[args.dtype]
    rows = [("reference fp32", torch.float32, lambda m, s, x, y: reference_step(m, s, x, y, args.cfg_scale,
                                                                                  torch.float32))]
    if dtype != torch.float32:
        rows.append((f"reference {args.dtype}", dtype, lambda m, s, x, y: reference_step(m, s, x, y, args.cfg_scale,
                                                                                          dtype)))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ditengine-bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2", help="config name, e.g. DiT-XL/2 (default: %(default)s)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--input-size", type=int, help="latent height = width (default 32)")
    size.add_argument("--image-size", type=int, help="pixel size; the latent is image-size / 8 (VAE factor)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes before CFG doubling (default: 1)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="low-precision dtype of the compared rows")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="1.0 disables guidance (no batch doubling)")
    p.add_argument("--depth", type=int, help="override the number of blocks (quick runs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench-out", help="directory for the JSON results (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    input_size = args.image_size // 8 if args.image_size else (args.input_size or 32)
    overrides = {"input_size": input_size} | ({"depth": args.depth} if args.depth else {})
    cfg = de.DiTConfig.from_name(args.model, **overrides)
    batches = [int(b) for b in args.batch.split(",")]
    torch.manual_seed(args.seed)
    base = de.DiT(cfg).eval().to(device)
    sched = de.schedulers.DDIM(50).to(device)
    env = environment(device)
    results = []
    rows = build_rows(args, cfg, device)
    bar = tqdm(total=len(rows) * len(batches), desc="benchmark", leave=False)
    for batch in batches:
        x = torch.randn(batch, cfg.in_channels, input_size, input_size, device=device)
        labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
        model_batch = batch * (2 if args.cfg_scale != 1.0 else 1)
        flops = dit_flops(cfg, model_batch)
        for name, dtype, builder in rows:
            bar.set_postfix_str(f"{name}, batch {batch}")
            model = base.to(dtype)
            t0 = time.perf_counter()
            with torch.inference_mode():
                step = builder(model, sched, x, labels)
                setup_s = time.perf_counter() - t0
                timing = measure(step, device, args.warmup, args.repeats)
            ms = timing["median_ms"]
            results.append({
                "variant": name, "batch": batch, "model_batch": model_batch, "dtype": str(dtype).removeprefix("torch."),
                **timing, "setup_s": setup_s, "images_per_s": batch * 1e3 / ms / len(sched),
                "tflops": flops / ms / 1e9,
            })
            bar.update()
        base = base.float()
    bar.close()
    report = {"env": env, "config": vars(cfg) if hasattr(cfg, "__dict__") else str(cfg),
              "args": vars(args), "scheduler": repr(sched), "flops_per_step": {b: dit_flops(cfg, b * 2) for b in batches},
              "results": results}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(format_table(report))
    print(f"\nresults: {path}")
    return 0


def format_table(report: dict) -> str:
    env = report["env"]
    head = (f"{report['args']['model']} latent {report['config']['input_size']}, cfg {report['args']['cfg_scale']} | "
            f"{env['device']} | torch {env['torch']}, triton {env['triton']} | commit {env['commit']}")
    lines = [head, "", "| variant | batch | ms/step (median) | p20 | p80 | img/s (50 steps) | TFLOP/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['median_ms']:.2f} | {r['p20_ms']:.2f} | {r['p80_ms']:.2f} "
                     f"| {r['images_per_s']:.2f} | {r['tflops']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
