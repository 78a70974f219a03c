"""`python -m ditengine.eval`: do the samples look like the digits they were conditioned on?

A classifier trained on the real digits (scikit-learn, an RBF SVM on the 64 pixels) labels generated
samples; the score is the fraction classified as the class they were conditioned on, per scheduler and
backend. Pixel statistics (mean, standard deviation, and the distance between per-class mean images) say
how close the samples' distribution is to the data's.
"""
from __future__ import annotations

import argparse
import functools
import json
import warnings

import numpy as np
import torch

from .data import digits
from .generate import SCHEDULERS, generate, load_model, make_scheduler


@functools.lru_cache(maxsize=1)
def digit_classifier():
    from sklearn.svm import SVC

    data = digits()
    return SVC(gamma=0.001, C=10.0).fit(to_features(data.images), data.labels.numpy())


def to_features(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, 1, 8, 8) -> the 0..16 pixel scale the classifier is trained on, (N, 64)."""
    return ((images.float().clamp(-1, 1) + 1) * 8).reshape(len(images), -1).numpy()


def pixel_frechet_distance(samples: torch.Tensor) -> float:
    """Fréchet distance between the 64-dim pixel statistics of `samples` (N, 1, 8, 8) and of the real
    digits, both clamped to [-1, 1]: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), in float64."""
    from scipy import linalg

    def stats(images):
        x = images.double().clamp(-1, 1).reshape(len(images), -1).numpy()
        return x.mean(0), np.cov(x, rowvar=False)

    mu1, s1 = stats(samples)
    mu2, s2 = stats(digits().images)
    with warnings.catch_warnings():  # a few border pixels are constant in the digits: S2 is singular
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


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
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def evaluate(args) -> list[dict]:
    model = load_model(args.checkpoint).to(args.device)
    labels = torch.arange(model.config.num_classes).repeat_interleave(args.per_class)
    rows = []
    for name in args.schedulers.split(","):
        for backend in args.backends.split(","):
            sched = make_scheduler(name, args.steps, model)
            samples = generate(model, sched, labels, seed=args.seed, cfg_scale=args.cfg_scale, backend=backend,
                               progress=False)
            rows.append({"scheduler": name, "backend": backend, "samples": len(samples), **score(samples, labels)})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = evaluate(args)
    print(f"{args.checkpoint}: {args.per_class} samples per class, {args.steps} steps, cfg {args.cfg_scale}, "
          f"seed {args.seed}\n")
    print("| scheduler | backend | accuracy | pixel mean (data) | pixel std (data) | class-mean MSE |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheduler']} | {r['backend']} | {r['accuracy']:.3f} | {r['pixel_mean']:.3f} "
              f"({r['data_pixel_mean']:.3f}) | {r['pixel_std']:.3f} ({r['data_pixel_std']:.3f}) | "
              f"{r['class_mean_image_mse']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
