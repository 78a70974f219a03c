"""Past one device: `ParallelConfig`, the layout of a sampling run over the ranks of a torch.distributed group.

    torchrun --nproc_per_node 2 my_script.py        # every rank runs the same script
    torch.distributed.init_process_group("nccl")   # "gloo" on CPUs
    sampler = de.FastSampler(model, sched, cfg_scale=5.0, parallel=de.ParallelConfig(cfg_degree=2))
    latents = sampler(noise, **conditioning)        # the same latents on every rank

CFG parallel (`cfg_degree=2`): the conditional rows run on one rank and the unconditional rows on the other, each
with its half of the per-call context and modulation; one all-gather of the model output per step joins the
halves, and every rank then runs the same fused scheduler step, so the state stays identical everywhere without a
broadcast. It needs guidance on (cfg_scale != 1); the steps outside a guidance interval run the conditional rows
on every rank. The all-gather is a collective NCCL captures, so on CUDA the loop stays one graph; on gloo the loop
runs eagerly.

Sequence parallelism (Ulysses, Ring) is not implemented yet: a degree above 1 is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    """The degrees of a parallel run; their product must equal the size of `process_group` (default: the default
    group that `torchrun` and `init_process_group` set up)."""

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    process_group: object = None

    def __post_init__(self):
        for name in ("ulysses_degree", "ring_degree", "cfg_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelConfig: {name}={value!r}: expected an int >= 1")
        if self.cfg_degree > 2:
            raise ValueError(f"ParallelConfig: cfg_degree={self.cfg_degree}: expected 1 or 2 (the conditional and "
                             "the unconditional rows)")
        for name in ("ulysses_degree", "ring_degree"):
            if getattr(self, name) > 1:
                raise NotImplementedError(f"ParallelConfig: {name}={getattr(self, name)}: sequence parallelism is not "
                                          "implemented yet; CFG parallel (cfg_degree=2) is")

    @property
    def degree(self) -> int:
        return self.ulysses_degree * self.ring_degree * self.cfg_degree

    def bind(self, use_cfg: bool, device: torch.device) -> "CfgGroup | None":
        """The run's view of the group, checked: None for a single rank's run (every degree 1)."""
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("parallel: no initialised torch.distributed process group: launch with torchrun and "
                             "call torch.distributed.init_process_group first")
        world = dist.get_world_size(self.process_group)
        if self.degree != world:
            raise ValueError(f"parallel: ulysses_degree x ring_degree x cfg_degree = {self.degree}, but the process "
                             f"group has {world} ranks")
        if self.cfg_degree == 1:
            return None
        if not use_cfg:
            raise ValueError("parallel: cfg_degree=2 splits the guided rows, but guidance is off (cfg_scale == 1)")
        backend = dist.get_backend(self.process_group)
        if device.type == "cuda" and backend != "nccl" or device.type == "cpu" and backend != "gloo":
            raise ValueError(f"parallel: a {backend} process group for a model on {device.type}: NCCL serves CUDA "
                             "tensors, gloo CPU tensors")
        return CfgGroup(self.process_group, dist.get_rank(self.process_group))


@dataclass(frozen=True)
class CfgGroup:
    """CFG parallel on two ranks: rank 0 runs the conditional rows, rank 1 the unconditional ones."""

    group: object
    rank: int

    def gather(self, half: torch.Tensor) -> torch.Tensor:
        """This rank's model output (B, ...) -> both halves [conditional; unconditional] (2B, ...) on every rank."""
        half = half.contiguous()
        out = torch.empty((2 * half.shape[0], *half.shape[1:]), dtype=half.dtype, device=half.device)
        dist.all_gather_into_tensor(out, half, group=self.group)
        return out
