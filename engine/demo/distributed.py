"""Joining a `torchrun` job: one place for the process group that training and sampling share."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[torch.device, int, int]:
    """(device, rank, world size). Under torchrun (WORLD_SIZE > 1) join the process group: nccl with one
    GPU per process (LOCAL_RANK) on CUDA, gloo on the CPU. Alone, nothing changes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # nccl's object collectives use the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
