"""A diffusers pipeline sampled over several processes:

    torchrun --nproc_per_node 2 -m ditengine.demo.parallel black-forest-labs/FLUX.1-dev \\
        --prompt "a lighthouse at dawn" --ulysses-degree 2 --out lighthouse.png

Every rank builds the pipeline (a local folder or a Hub id) and encodes the prompt; `de.accelerate(pipe,
parallel=...)` runs the transformer over the ranks (its tokens sharded by the Ulysses and Ring degrees, its CFG
rows split by the CFG degree); every rank ends with the same latents and decodes them, and rank 0 writes the image.
On several nodes torchrun's rendezvous forms the group (`--nnodes N --rdzv-backend c10d --rdzv-endpoint
HOST:PORT`), and NCCL carries the exchanges; on a CPU the group is gloo's.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ..parallel import ParallelConfig
from ..pipelines import accelerate
from .distributed import close_distributed, init_distributed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run(pipe, parallel: ParallelConfig, out: str, seed: int = 0, **call) -> bool:
    """`pipe(**call)` accelerated over the ranks of the process group; rank 0 saves the first image to `out`.
    Returns whether this rank wrote it."""
    fast = accelerate(pipe, parallel=parallel)
    image = fast(generator=torch.Generator().manual_seed(seed), **call).images[0]
    if dist.get_rank(parallel.group()) != 0:
        return False
    image.save(out)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a diffusers pipeline: a local folder or a Hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=1024, help="height and width in pixels")
    p.add_argument("--ulysses-degree", type=int, default=1)
    p.add_argument("--ring-degree", type=int, default=1)
    p.add_argument("--cfg-degree", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="image.png")
    args = p.parse_args(argv)
    from diffusers import DiffusionPipeline

    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun --nproc_per_node N (N = ulysses x ring x cfg degree)")
    device, _, _ = init_distributed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not dist.is_initialized():  # one process: a group of one all the same
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=DTYPES[args.dtype]).to(device)
        parallel = ParallelConfig(args.ulysses_degree, args.ring_degree, args.cfg_degree)
        if run(pipe, parallel, args.out, args.seed, prompt=args.prompt, num_inference_steps=args.steps,
               height=args.size, width=args.size):
            print(f"wrote {args.out}")
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
