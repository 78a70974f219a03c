"""Two processes against one, same run: `python -m ditengine.bench.parallel [--parallel cfg | ulysses | ring]
[--model DiT-XL/2] [--depth 4] [--input-size 64] [--steps 10]`.

One process with `--threads` threads runs the fused loop with the CFG batch; then two processes (gloo, `--threads`
threads each) run it with `ParallelConfig(cfg_degree=2)` (each rank the conditional or the unconditional rows, one
all-gather of the model output a step), `ParallelConfig(ulysses_degree=2)` (each rank half the tokens, all-to-alls
around every self-attention) or `ParallelConfig(ring_degree=2)` (each rank half the tokens, the other half's K/V
received while its own block is attended, the partials merged through their log-sum-exp). Reported: the median
whole-loop time of each (after a warm-up run) and the ratio, and that both return the same latents. The two
processes need two cores' worth of `--threads`: on a 2-core machine, `--threads 1`.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ditengine as de


def setup(args):
    torch.manual_seed(args.seed)
    cfg = de.DiTConfig.from_name(args.model, input_size=args.input_size, depth=args.depth)
    model = de.DiT(cfg).eval()
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    labels = torch.tensor([207])
    return model, de.schedulers.DDIM(args.steps, timestep_spacing="trailing"), noise, labels


def timed(sampler, noise, labels, repeats: int) -> tuple[float, torch.Tensor]:
    out = sampler(noise, labels)  # warm-up: the plan is built here
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = sampler(noise, labels)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _rank(rank: int, port: int, args, out_dir: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, sched, noise, labels = setup(args)
        degree = {f"{args.parallel}_degree": 2}
        sampler = de.FastSampler(model, sched, cfg_scale=4.0, dtype=torch.float32, cuda_graph=None,
                                 parallel=de.ParallelConfig(**degree))
        seconds, out = timed(sampler, noise, labels, args.repeats)
        torch.save((seconds, out), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parallel", choices=("cfg", "ulysses", "ring"), default="cfg")
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--input-size", type=int, default=64, help="latent size (64: 1024 tokens of patch 2)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, sched, noise, labels = setup(args)
    one, want = timed(de.FastSampler(model, sched, cfg_scale=4.0, dtype=torch.float32, cuda_graph=None),
                      noise, labels, args.repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(port, args, out), nprocs=2, join=True, start_method="spawn")
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    two = max(seconds for seconds, _ in ranks)
    err = max(float((latents - want).norm() / want.norm()) for _, latents in ranks)
    tokens = (args.input_size // 2) ** 2
    print(f"{args.model}, {args.depth} blocks, {tokens} tokens, CFG batch 2, {args.steps} steps, fp32, "
          f"{args.threads} thread(s) a process")
    print(f"1 process: {one * 1e3 / args.steps:.1f} ms/step")
    name = f"{args.parallel}_degree=2"
    print(f"2 processes, {name}: {two * 1e3 / args.steps:.1f} ms/step ({one / two:.2f}x), latents rel. error {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
