"""`python -m ditengine.demo.images`: class-conditional samples to a labelled PNG grid (and a .npy).

Uses the shipped digits model by default. Under `torchrun` the seeds are sharded over the processes and
gathered; the samples equal a single process's for the same seeds.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..cache import parse_cache
from .distributed import close_distributed, init_distributed
from .generate import DDIM_CLIPS, SCHEDULERS, generate, load_model, make_scheduler, parse_interval

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ditengine.demo.images", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="digits", help="a shipped model's name or a checkpoint path")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--ddim-clip", choices=DDIM_CLIPS, default="paper",
                   help="how DDIM clips (see ditengine.schedulers.DDIM; default: %(default)s)")
    p.add_argument("--labels", help="comma-separated class ids (default: every class)")
    p.add_argument("--per-class", type=int, default=8, help="samples per label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--backend", choices=("reference", "fused"), default="reference")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="compute dtype of the fused backend")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="grid.png", help="PNG grid; the samples go to the same name with .npy")
    p.add_argument("--cache", help="step caching: first-block[:threshold], static[:interval] or none")
    p.add_argument("--quantize", choices=("int8", "fp8"), help="the fused backend's block GEMMs as W8A8")
    p.add_argument("--cfg-interval", type=parse_interval, metavar="LO,HI",
                   help="guidance only at timesteps in [LO, HI] (e.g. 0,700; 'inf' allowed)")
    return p.parse_args(argv)


def save_grid(samples: torch.Tensor, labels: list[int], names: list[str], path: Path, columns: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = ((samples.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # (N, H, W, C) in [0, 1]
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 1.05), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels):
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(names[label] if label < len(names) else str(label), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, rank, _ = init_distributed(torch.device(args.device))
    model = load_model(args.checkpoint).to(device)
    classes = model.config.num_classes
    wanted = [int(v) for v in args.labels.split(",")] if args.labels else list(range(classes))
    bad = [v for v in wanted if not 0 <= v < classes]
    if bad:
        raise SystemExit(f"--labels: {bad} outside the model's classes 0..{classes - 1}")
    labels = torch.tensor(wanted).repeat_interleave(args.per_class)
    sched = make_scheduler(args.scheduler, args.steps, model, args.ddim_clip)
    samples = generate(model, sched, labels, seed=args.seed, cfg_scale=args.cfg_scale, backend=args.backend,
                       dtype=DTYPES[args.dtype], batch_size=args.batch_size, cache=parse_cache(args.cache),
                       quantize=args.quantize, cfg_interval=args.cfg_interval)
    if rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out.with_suffix(".npy"), samples.numpy())
        save_grid(samples, labels.tolist(), [str(i) for i in range(classes)], out, columns=args.per_class)
        print(f"wrote {out} and {out.with_suffix('.npy')} ({len(samples)} samples, {args.scheduler}, "
              f"{args.steps} steps, cfg {args.cfg_scale}, {args.backend})")
    close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
