"""Training a class-conditional DiT: `python -m ditengine.train` (or under `torchrun`).

Objectives:
- "eps" (DiT's): sample t, noise the data by the 1000-step linear schedule, predict the noise (MSE),
  plus the variational-bound term that trains the learned variance (Nichol & Dhariwal 2021, the
  "hybrid" loss DiT uses; the mean is frozen inside it).
- "flow": rectified flow, x_t = (1 - s) x0 + s noise with s ~ U(0, 1), the model predicts noise - x0 and
  is given the timestep 1000 * s (what `schedulers.FlowMatchEuler` feeds it).

AdamW, an EMA of the weights, label dropout to the null label for classifier-free guidance, bf16 autocast
on GPU. Every step's batch, timesteps, noise and dropped labels come from a generator seeded by
(seed, step), so a resumed run continues exactly where it stopped and N processes (DistributedDataParallel,
each taking a slice of the same global batch) follow the single-process run. Checkpoints are written to a
temporary file and renamed: an interrupted save leaves the previous one intact. They use the
facebookresearch layout ({"model", "ema", "opt", "args", "step"}) that `load_checkpoint` reads.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..configs import DiTConfig
from .data import load_dataset
from .distributed import close_distributed, init_distributed
from ..models.dit import DiT
from ..schedulers import make_betas

NUM_TRAIN_TIMESTEPS = 1000


class GaussianDiffusion:
    """The training side of the DDPM schedule: noising and the learned-variance bound (float64 tables)."""

    def __init__(self, num_timesteps: int = NUM_TRAIN_TIMESTEPS, device: torch.device | str = "cpu"):
        betas = make_betas(num_timesteps, 1e-4, 0.02, "linear")
        a = np.cumprod(1 - betas)
        a_prev = np.append(1.0, a[:-1])
        posterior_var = betas * (1 - a_prev) / (1 - a)
        tables = dict(
            sqrt_a=np.sqrt(a), sqrt_1ma=np.sqrt(1 - a), log_beta=np.log(betas),
            # log posterior variance, its t=0 entry (zero) replaced by t=1's, as in the reference code
            post_logvar=np.log(np.append(posterior_var[1], posterior_var[1:])),
            post_c0=betas * np.sqrt(a_prev) / (1 - a), post_ct=(1 - a_prev) * np.sqrt(1 - betas) / (1 - a),
        )
        self.tables = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in tables.items()}

    def at(self, name, t, like):
        return self.tables[name][t].view(-1, *[1] * (like.dim() - 1))

    def q_sample(self, x0, t, noise):
        return self.at("sqrt_a", t, x0) * x0 + self.at("sqrt_1ma", t, x0) * noise

    def vb_term(self, x0, x_t, t, eps, var_out):
        """Bound term in bits per dimension for the learned variance, the mean frozen (eps detached)."""
        pred_x0 = (x_t - self.at("sqrt_1ma", t, x0) * eps.detach()) / self.at("sqrt_a", t, x0)
        mean = self.at("post_c0", t, x0) * pred_x0 + self.at("post_ct", t, x0) * x_t
        true_mean = self.at("post_c0", t, x0) * x0 + self.at("post_ct", t, x0) * x_t
        min_log, max_log = self.at("post_logvar", t, x0), self.at("log_beta", t, x0)
        logvar = min_log + (var_out + 1) / 2 * (max_log - min_log)
        kl = 0.5 * (-1 + logvar - min_log + torch.exp(min_log - logvar) + (true_mean - mean) ** 2 * torch.exp(-logvar))
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)
        per_elem = torch.where((t == 0).view(-1, *[1] * (x0.dim() - 1)), nll, kl)
        return per_elem.flatten(1).mean(1) / math.log(2.0)  # (B,)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2)."""

    def cdf(v):  # the tanh approximation of the standard normal CDF, as in the reference code
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: `path` is either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ditengine.train", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", help="'digits', a PNG folder, or a .npy/.npz file")
    p.add_argument("--model", default="DiT-T/2", help="config name (default: %(default)s)")
    p.add_argument("--depth", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--objective", choices=("eps", "flow"), default="eps")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/dit", help="directory for checkpoints (last.pt)")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--export", help="after training, also write the EMA weights alone (fp16) with the config, "
                                    "the command and the training time here, e.g. engine/weights/digits.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with exported weights
    return args


def build_model(args, data) -> DiT:
    overrides = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden_size),
                                   ("num_heads", args.num_heads)) if v is not None}
    cfg = DiTConfig.from_name(args.model, in_channels=data.images.shape[1], input_size=data.images.shape[-1],
                              num_classes=data.num_classes, learn_sigma=args.objective == "eps",
                              class_dropout_prob=args.label_dropout, **overrides)
    return DiT(cfg).initialize_weights()


def train(args) -> Path:
    """Run (or resume) training; returns the checkpoint path."""
    device, rank, world = init_distributed(torch.device(args.device))
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    data = load_dataset(args.data)
    images, labels = data.images.to(device), data.labels.to(device)
    torch.manual_seed(args.seed)
    model = build_model(args, data).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    out = Path(args.out)
    path = out / "last.pt"
    step, seconds_before = 0, 0.0
    if args.resume and path.exists():
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, seconds_before = ckpt["step"], ckpt.get("train_seconds", 0.0)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    diffusion = GaussianDiffusion(device=device)
    shard = args.batch_size // world

    def seconds():
        return seconds_before + time.perf_counter() - start

    def save():
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "args": vars(args), "config": vars(model.config), "step": step,
                         "train_seconds": seconds()}, path)

    bar = tqdm(total=args.steps, initial=step, desc="training", disable=not args.progress or rank > 0)
    start, start_step = time.perf_counter(), step
    model.train()
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # the whole global batch's randomness
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = shard_loss(net, diffusion, images, labels, args, g, data.num_classes, rank, shard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
        step += 1
        bar.update()
        if step % 10 == 0 or step == args.steps:
            rate = (step - start_step) * args.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_per_s=f"{rate:.0f}")
        if step % args.ckpt_every == 0 or step == args.steps:
            save()
    bar.close()
    if args.export and rank == 0:
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"ema": {k: v.half() for k, v in ema.state_dict().items()}, "config": vars(model.config),
                     "meta": {"command": "python -m ditengine.train " + shlex.join(args.argv), "seed": args.seed,
                              "steps": step, "train_seconds": round(seconds(), 1), "device": str(device),
                              "processes": world, "torch": str(torch.__version__)}},
                    Path(args.export))
    close_distributed()
    return path


def shard_loss(net, diffusion, images, labels, args, g, num_classes, rank, shard):
    """This process's part of the global-batch loss. Every process draws the global batch's randomness
    (images, dropped labels, noise, timesteps) from `g` and keeps its slice: N processes = one process."""
    B = args.batch_size
    idx = torch.randint(0, len(images), (B,), generator=g)
    drop = torch.rand(B, generator=g) < args.label_dropout
    noise = torch.randn((B, *images.shape[1:]), generator=g)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (B,), generator=g)
    s = torch.rand(B, generator=g)
    part = slice(rank * shard, (rank + 1) * shard)
    dev = images.device
    x0, y = images[idx[part].to(dev)], labels[idx[part].to(dev)]
    y = torch.where(drop[part].to(dev), torch.full_like(y, num_classes), y)
    noise, t, s = noise[part].to(dev), t[part].to(dev), s[part].to(dev)
    if args.objective == "flow":
        x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        return F.mse_loss(net(x_t, s * NUM_TRAIN_TIMESTEPS, y).float(), noise - x0)
    x_t = diffusion.q_sample(x0, t, noise)
    out = net(x_t, t.float(), y).float()
    C = x0.shape[1]
    eps = out[:, :C]
    loss = (eps - noise).pow(2).flatten(1).mean(1)
    if out.shape[1] == 2 * C:
        loss = loss + diffusion.vb_term(x0, x_t, t, eps, out[:, C:])
    return loss.mean()


def main(argv=None) -> int:
    path = train(parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
