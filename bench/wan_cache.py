"""What each step cache skips on a small Wan, and what it costs: `python -m ditengine.bench.wan_cache [--steps 30]`.

A random Wan (D 128, 4 layers, 9 frames at 64 x 96: 3 x 4 x 6 = 72 tokens, 512 text tokens) sampled by the fused
loop in fp32 with Wan's own scheduler (UniPC, flow sigmas, shift 3) and CFG 5, uncached and under each policy: the
first-block cache, the static schedule and TeaCache with the published Wan 2.1 T2V 1.3B polynomials (both signals)
and with the identity polynomial. Per policy: the steps it computed, which it skipped, and the distance of its
latents from the uncached ones (relative L2 error and SQNR). A random model's timestep embedding moves far more per
step (relative L1 about 0.5) than a trained one's, outside the range the published polynomials were fitted on, so
their schedules here show the rule at work, not the quality a trained Wan keeps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ditengine as de
from ditengine.cache import FirstBlockCache, StaticCache, TeaCache
from ditengine.models.wan import Wan, WanConfig

from .metrics import sqnr_db

SMALL = dict(num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64, freq_dim=256,
             ffn_dim=256, num_layers=4)


def policies() -> dict:
    return {"uncached": None, "first-block:0.1": FirstBlockCache(0.1), "static:3": StaticCache(3),
            "teacache:0.08 (e0, 1.3B)": TeaCache(0.08), "teacache:0.08 (e, 1.3B)": TeaCache(0.08, use_ret_steps=False),
            "teacache:1.0 (e0, identity)": TeaCache(1.0, coefficients=(1.0, 0.0)),
            "teacache:2.0 (e0, identity)": TeaCache(2.0, coefficients=(1.0, 0.0))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = Wan(WanConfig(**SMALL)).eval()
    with torch.no_grad():  # every table live, as in a trained model
        for block in model.blocks:
            block.scale_shift_table.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 3, 8, 12, generator=g)
    text = dict(prompt_embeds=torch.randn(1, 512, 64, generator=g), negative_prompt_embeds=torch.randn(1, 512, 64,
                                                                                                        generator=g))
    sched = de.schedulers.UniPC(args.steps, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    rows, base = [], None
    for name, policy in policies().items():
        sampler = de.FastSampler(model, sched, cfg_scale=5.0, dtype=torch.float32, cuda_graph=None, cache=policy)
        latents = sampler(noise, **text)
        stats = sampler.stats
        base = latents if base is None else base
        rows.append({"policy": name, "full_steps": stats["full_steps"], "steps": stats["steps"],
                     "block_share": stats["block_share"], "skipped": stats["cached_steps"],
                     "rel_err": float((latents - base).norm() / base.norm()), "sqnr_db": sqnr_db(latents, base)})
    print(f"Wan (D 128, 4 layers, 72 tokens), UniPC {args.steps} steps, shift 3, CFG 5, fp32 fused\n")
    print("| policy | steps computed | blocks | skipped steps | rel. L2 vs uncached | SQNR dB |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        sqnr = "inf" if r["sqnr_db"] == float("inf") else f"{r['sqnr_db']:.1f}"
        print(f"| {r['policy']} | {r['full_steps']} / {r['steps']} | {100 * r['block_share']:.0f}% | "
              f"{r['skipped'] or '-'} | {r['rel_err']:.2e} | {sqnr} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
