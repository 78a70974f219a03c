"""`python -m ditengine.eval`: do the samples look like the digits they were conditioned on?

A classifier trained on the real digits (scikit-learn, an RBF SVM on the 64 pixels) labels generated
samples; the score is the fraction classified as the class they were conditioned on, per scheduler and
backend. Pixel statistics say how close the samples' distribution is to the data's: mean, standard
deviation, the distance between per-class mean images, and the Frechet distance between Gaussians fitted
to the 64 pixels of the samples and of the real digits (`pixel_fd`; the FID formula on raw pixels, which
for 8x8 digits need no feature network). Approximations such as step caching are judged by it.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch

from .. import schedulers as S
from ..cache import FirstBlockCache, StaticCache, parse_cache
from .data import digits
from .generate import DDIM_CLIPS, SCHEDULERS, generate, load_model, make_scheduler, parse_interval


@functools.lru_cache(maxsize=1)
def digit_classifier():
    from sklearn.svm import SVC

    data = digits()
    return SVC(gamma=0.001, C=10.0).fit(to_features(data.images), data.labels.numpy())


def to_features(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, 1, 8, 8) -> the 0..16 pixel scale the classifier is trained on, (N, 64)."""
    return ((images.float().clamp(-1, 1) + 1) * 8).reshape(len(images), -1).numpy()


def pixel_statistics(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (64,) and covariance (64, 64) of [-1, 1] images (N, 1, 8, 8), in float64."""
    x = images.double().clamp(-1, 1).reshape(len(images), -1).numpy()
    return x.mean(0), np.cov(x, rowvar=False)


@functools.lru_cache(maxsize=1)
def _real_statistics():
    return pixel_statistics(digits().images)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance between two Gaussians.

    The digits' covariance is singular (border pixels are always blank), where a general matrix square
    root is unstable; tr((S1 S2)^(1/2)) equals the trace of the symmetric PSD root of R S1 R with
    R = S2^(1/2), which eigh computes reliably.
    """
    root = _psd_sqrt(cov2)
    cross = np.sqrt(np.linalg.eigvalsh(root @ cov1 @ root).clip(min=0)).sum()
    return max(float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross), 0.0)


def pixel_frechet_distance(samples: torch.Tensor) -> float:
    """Frechet distance between the samples' 64 pixels and the real digits' (lower is closer)."""
    if samples.dim() != 4 or samples.shape[1:] != (1, 8, 8) or len(samples) < 2:
        raise ValueError(f"samples: expected at least 2 digit images (N, 1, 8, 8), got {tuple(samples.shape)}")
    return frechet_distance(*pixel_statistics(samples), *_real_statistics())


def score(samples: torch.Tensor, labels: torch.Tensor) -> dict:
    """Conditional accuracy and pixel statistics of digit samples against the real digits."""
    if samples.shape[1:] != (1, 8, 8):
        raise ValueError(f"samples: expected digit images (N, 1, 8, 8), got {tuple(samples.shape)}")
    data = digits()
    predicted = digit_classifier().predict(to_features(samples))
    real, fake = data.images.clamp(-1, 1), samples.float().clamp(-1, 1)
    class_means = [(fake[labels == c].mean(0) - real[data.labels == c].mean(0)).pow(2).mean().item()
                   for c in labels.unique().tolist()]
    return {
        "accuracy": float((predicted == labels.numpy()).mean()),
        "pixel_mean": fake.mean().item(), "data_pixel_mean": real.mean().item(),
        "pixel_std": fake.std().item(), "data_pixel_std": real.std().item(),
        "class_mean_image_mse": float(np.mean(class_means)),
        "pixel_fd": pixel_frechet_distance(samples),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ditengine.eval", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="digits")
    p.add_argument("--schedulers", default="ddim,ddpm,dpm", help=f"comma-separated, from {SCHEDULERS}")
    p.add_argument("--backends", default="reference,fused")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--ddim-clip", choices=DDIM_CLIPS, default="paper",
                   help="how DDIM clips (see ditengine.schedulers.DDIM; default: %(default)s)")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cache", help="step caching: first-block[:threshold], static[:interval] or none")
    p.add_argument("--cache-sweep", action="store_true",
                   help="fused backend: quality and speed of both cache policies across their parameters, "
                        "against the uncached sampler; writes a CSV and a PNG (--out)")
    p.add_argument("--sweep-grid", choices=("full", "defaults"), default="full",
                   help="the sweep's points: every parameter value, or the uncached run and the two defaults")
    p.add_argument("--repeats", type=int, default=1, help="cache sweep: timed runs per point (median)")
    p.add_argument("--batch-size", type=int, default=100, help="samples per sampler call")
    p.add_argument("--quantize", choices=("int8", "fp8"), help="the fused backend's block GEMMs as W8A8")
    p.add_argument("--cfg-interval", type=parse_interval, metavar="LO,HI",
                   help="guidance only at timesteps in [LO, HI] (e.g. 0,600; 'inf' allowed)")
    p.add_argument("--out", default="cache-sweep", help="cache sweep: path stem of the CSV and PNG")
    return p.parse_args(argv)


def eval_scheduler(spec: str, steps: int, model, ddim_clip: str = "paper"):
    """`name[:steps]`: the engine's schedulers, plus "ddim-noclip" (DDIM without clipping x0)."""
    name, _, own_steps = spec.partition(":")
    steps = int(own_steps) if own_steps else steps
    if name == "ddim-noclip":
        return S.DDIM(steps, timestep_spacing="trailing", clip_sample=False)
    return make_scheduler(name, steps, model, ddim_clip)


def sweep_policies(grid: str) -> list:
    """The cache sweep's points: None (uncached) first, then each policy across its parameter."""
    if grid == "defaults":
        return [None, FirstBlockCache(), StaticCache()]
    return ([None] + [FirstBlockCache(t) for t in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)]
            + [StaticCache(i) for i in (2, 3, 4, 6)] + [StaticCache(i, reuse="blocks") for i in (2, 3, 4, 6)])


def policy_label(policy) -> str:
    if policy is None:
        return "uncached"
    if isinstance(policy, StaticCache) and policy.reuse != "residual":
        return f"{policy} ({policy.reuse})"
    return str(policy)


def cache_sweep(args) -> list[dict]:
    """Per scheduler, each sweep point on the same labels and seeds: the share of block evaluations, the
    wall-clock of the whole generation (median of `repeats`, points interleaved within each repeat so load
    drifts hit them alike), the conditional accuracy and the pixel Fréchet distance."""
    model = load_model(args.checkpoint).to(args.device)
    labels = torch.arange(model.config.num_classes).repeat_interleave(args.per_class)
    rows = []
    for spec in args.schedulers.split(","):
        policies = sweep_policies(args.sweep_grid)
        times = {i: [] for i in range(len(policies))}
        results = {}
        for policy in policies:  # untimed: first-call set-up (lazy initialisation, allocator) stays out
            generate(model, eval_scheduler(spec, args.steps, model), labels[:: args.per_class], seed=args.seed,
                     cfg_scale=args.cfg_scale, backend="fused", progress=False, cache=policy)
        for _ in range(args.repeats):
            for i, policy in enumerate(policies):
                stats = []
                sched = eval_scheduler(spec, args.steps, model)
                start = time.perf_counter()
                samples = generate(model, sched, labels, seed=args.seed, cfg_scale=args.cfg_scale, backend="fused",
                                   batch_size=args.batch_size, progress=False, cache=policy, stats=stats)
                times[i].append(time.perf_counter() - start)
                evals = sum(s["block_evals"] for s in stats)
                results[i] = (samples, evals / sum(s["block_evals_uncached"] for s in stats), len(sched))
        base = None
        for i, policy in enumerate(policies):
            samples, share, steps = results[i]
            seconds = float(np.median(times[i]))
            row = {"scheduler": spec.partition(":")[0], "steps": steps, "policy": policy_label(policy),
                   "kind": "uncached" if policy is None else type(policy).__name__,
                   "block_share": share, "seconds": seconds, "runs": len(times[i]), **score(samples, labels)}
            base = base or row
            row["speedup"] = base["seconds"] / seconds
            row["accuracy_delta"] = row["accuracy"] - base["accuracy"]
            row["pixel_fd_ratio"] = row["pixel_fd"] / base["pixel_fd"]
            rows.append(row)
    return rows


SWEEP_COLUMNS = ("scheduler", "steps", "policy", "block_share", "seconds", "runs", "speedup", "accuracy",
                 "accuracy_delta", "pixel_fd", "pixel_fd_ratio")


def write_sweep(rows: list[dict], stem: str, title: str) -> None:
    import csv

    from pathlib import Path

    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib
    except ImportError:
        print(f"wrote {stem}.csv (install matplotlib for the PNG)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedulers = list(dict.fromkeys(r["scheduler"] for r in rows))
    fig, axes = plt.subplots(2, len(schedulers), figsize=(6.5 * len(schedulers), 7), squeeze=False)
    styles = {"FirstBlockCache": ("tab:blue", "o", "first-block (threshold)"),
              "StaticCache": ("tab:orange", "s", "static (interval)")}
    for col, spec in enumerate(schedulers):
        mine = [r for r in rows if r["scheduler"] == spec]
        for ax, key, label in ((axes[0, col], "accuracy", "conditional accuracy"),
                               (axes[1, col], "pixel_fd", "pixel Fréchet distance")):
            for r in mine:
                if r["kind"] == "uncached":
                    ax.axhline(r[key], color="gray", ls=":", lw=1)
                    ax.plot([1.0], [r[key]], "k*", ms=12, label="uncached")
            for kind, (color, marker, name) in styles.items():
                for reuse, fill in (("", color), (" (blocks)", "none")):
                    pts = sorted((r["block_share"], r[key], r["policy"]) for r in mine
                                 if r["kind"] == kind and r["policy"].endswith(" (blocks)") == bool(reuse))
                    if not pts:
                        continue
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, mfc=fill,
                            label=name + (", per-block reuse" if reuse else ""))
                    for x, y, policy in pts:
                        ax.annotate(policy.split(":")[1].split(" ")[0], (x, y), fontsize=7,
                                    textcoords="offset points", xytext=(3, 3))
            ax.set_xlabel("share of block evaluations")
            ax.set_ylabel(label)
            ax.set_title(f"{spec}, {mine[0]['steps']} steps", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)
    print(f"wrote {stem}.csv and {stem}.png")


def print_sweep(rows: list[dict]) -> None:
    print("| scheduler | policy | blocks computed | wall-clock s (median) | speed-up | accuracy | "
          "pixel FD | FD vs uncached |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheduler']} {r['steps']} | {r['policy']} | {100 * r['block_share']:.0f}% | "
              f"{r['seconds']:.1f} | {r['speedup']:.2f}x | {r['accuracy']:.3f} | {r['pixel_fd']:.3f} | "
              f"{100 * (r['pixel_fd_ratio'] - 1):+.1f}% |")


def evaluate(args) -> list[dict]:
    model = load_model(args.checkpoint).to(args.device)
    labels = torch.arange(model.config.num_classes).repeat_interleave(args.per_class)
    rows = []
    for name in args.schedulers.split(","):
        for backend in args.backends.split(","):
            sched = eval_scheduler(name, args.steps, model, args.ddim_clip)
            stats = []
            start = time.perf_counter()
            samples = generate(model, sched, labels, seed=args.seed, cfg_scale=args.cfg_scale, backend=backend,
                               progress=False, cache=parse_cache(args.cache), batch_size=args.batch_size,
                               stats=stats, quantize=args.quantize if backend == "fused" else None,
                               cfg_interval=args.cfg_interval)
            seconds = time.perf_counter() - start
            share = sum(s["block_evals"] for s in stats) / sum(s["block_evals_uncached"] for s in stats)
            rows.append({"scheduler": name, "backend": backend, "samples": len(samples), "cache": args.cache,
                         "quantize": args.quantize if backend == "fused" else None, "cfg_interval": args.cfg_interval,
                         "block_share": share, "seconds": seconds, **score(samples, labels)})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cache_sweep:
        rows = cache_sweep(args)
        title = (f"{args.checkpoint}: {args.per_class} samples per class, cfg {args.cfg_scale}, seed {args.seed}, "
                 f"fused backend on {args.device}")
        print(title + "\n")
        print_sweep(rows)
        write_sweep(rows, args.out, title)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return 0
    rows = evaluate(args)
    print(f"{args.checkpoint}: {args.per_class} samples per class, {args.steps} steps, cfg {args.cfg_scale}, "
          f"DDIM clipping {args.ddim_clip!r}, seed {args.seed}, quantize {args.quantize}, "
          f"cfg interval {args.cfg_interval}\n")
    print("| scheduler | backend | accuracy | pixel mean (data) | pixel std (data) | class-mean MSE | pixel FD "
          "| blocks computed | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheduler']} | {r['backend']} | {r['accuracy']:.3f} | {r['pixel_mean']:.3f} "
              f"({r['data_pixel_mean']:.3f}) | {r['pixel_std']:.3f} ({r['data_pixel_std']:.3f}) | "
              f"{r['class_mean_image_mse']:.4f} | {r['pixel_fd']:.3f} | {100 * r['block_share']:.0f}% | "
              f"{r['seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
