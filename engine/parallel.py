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

Ulysses (`ulysses_degree=P`): each rank holds a contiguous 1 / P of the tokens of the residual stream (the small
patch embedding runs whole and is sliced), and the per-token work (adaLN, the MLPs, the gated residuals,
cross-attention to the per-call K/V) runs on the shard with no communication. Around each self-attention, one
all-to-all turns q, k and v from (tokens / P, every head) into (every token, heads / P), the family's own attention
kernel runs on them (its norm and RoPE prologue then sees every position), and one all-to-all turns the output
back; the final norm's output is gathered once a step for the unpatchify, and every rank runs the same scheduler
step. A family takes part through the denoiser contract (`FusedDenoiser.self_attention` and `sequence_heads`):
DiT, PixArt, Wan and ACE-Step do; the joint-attention families (Flux, SD3) are refused by name, and so are a token
count the degree does not divide and a head count it does not divide.

Both at once (`cfg_degree=2, ulysses_degree=U`, 2U ranks): each half of the rows runs on its own Ulysses group.
Ring attention is not implemented yet: a ring degree above 1 is refused by name.
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
        if self.ring_degree > 1:
            raise NotImplementedError(f"ParallelConfig: ring_degree={self.ring_degree}: Ring attention is not "
                                      "implemented yet; Ulysses (ulysses_degree) and CFG parallel (cfg_degree=2) are")

    @property
    def degree(self) -> int:
        return self.ulysses_degree * self.ring_degree * self.cfg_degree

    def bind(self, use_cfg: bool, device: torch.device) -> tuple["CfgGroup | None", "SequenceGroup | None"]:
        """The run's view of the group, checked: (its CFG pair, its Ulysses group), each None where its degree is 1.
        With both, ranks [0, U) run the conditional rows and [U, 2U) the unconditional ones, rank c U + j holding
        token shard j: a Ulysses group per half, a CFG pair per shard (every rank creates every subgroup, in one
        order, as torch.distributed asks)."""
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("parallel: no initialised torch.distributed process group: launch with torchrun and "
                             "call torch.distributed.init_process_group first")
        world = dist.get_world_size(self.process_group)
        if self.degree != world:
            raise ValueError(f"parallel: ulysses_degree x ring_degree x cfg_degree = {self.degree}, but the process "
                             f"group has {world} ranks")
        if world == 1:
            return None, None
        if self.cfg_degree > 1 and not use_cfg:
            raise ValueError("parallel: cfg_degree=2 splits the guided rows, but guidance is off (cfg_scale == 1)")
        backend = dist.get_backend(self.process_group)
        if device.type == "cuda" and backend != "nccl" or device.type == "cpu" and backend != "gloo":
            raise ValueError(f"parallel: a {backend} process group for a model on {device.type}: NCCL serves CUDA "
                             "tensors, gloo CPU tensors")
        rank = dist.get_rank(self.process_group)
        U, C = self.ulysses_degree, self.cfg_degree
        if C == 1:
            return None, SequenceGroup(self.process_group, rank, world)
        if U == 1:
            return CfgGroup(self.process_group, rank), None
        ranks = dist.get_process_group_ranks(self.process_group) if self.process_group is not None else range(world)
        ranks = list(ranks)
        halves = [dist.new_group([ranks[c * U + j] for j in range(U)]) for c in range(C)]
        pairs = [dist.new_group([ranks[c * U + j] for c in range(C)]) for j in range(U)]
        return CfgGroup(pairs[rank % U], rank // U), SequenceGroup(halves[rank // U], rank % U, U)


@dataclass(frozen=True)
class CfgGroup:
    """CFG parallel on two ranks: rank 0 runs the conditional rows, rank 1 the unconditional ones."""

    group: object
    rank: int

    def gather(self, half: torch.Tensor) -> torch.Tensor:
        """This rank's model output (B, ...) -> both halves [conditional; unconditional] (2B, ...) on every rank."""
        half = half.contiguous()
        out = torch.empty((2 * half.shape[0], *half.shape[1:]), dtype=half.dtype, device=half.device)
        _all_gather(out, half, group=self.group)
        return out


def check_sequence_heads(fast, degree: int) -> None:
    """A denoiser that runs Ulysses: its family takes part, and the degree divides its head counts."""
    name = type(fast).__name__
    if fast.sequence_heads is None:
        raise ValueError(f"parallel: ulysses_degree={degree}: {name} does not run on a shard of the tokens (the "
                         "joint text and image attention of Flux and SD3 is not sharded yet); use cfg_degree")
    heads = fast.sequence_heads()
    if any(h % degree for h in heads):
        raise ValueError(f"parallel: ulysses_degree={degree} must divide the attention's head counts {heads} "
                         f"({name}): each rank takes 1 / {degree} of the heads")


# torch 2.13 renames the flat all-gather (same arguments); the GPU machine's torch 2.11 has the old name only.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class SequenceGroup:
    """Ulysses on P ranks: rank r holds tokens [r T / P, (r + 1) T / P) of every row."""

    group: object
    rank: int
    size: int

    def shard(self, tokens: int) -> slice:
        return slice(self.rank * tokens // self.size, (self.rank + 1) * tokens // self.size)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T / P, ..., H, Dh) on each rank -> (N, T, ..., H / P, Dh): every token, this rank's heads."""
        P = self.size
        N, Tp, *mid, H, Dh = x.shape
        send = x.reshape(N, Tp, *mid, P, H // P, Dh).movedim(-3, 0).contiguous()  # block p: rank p's heads
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[p]: rank p's tokens, this rank's heads
        return recv.movedim(0, 1).reshape(N, P * Tp, *mid, H // P, Dh)

    def to_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_heads`: (N, T, ..., H / P, Dh) -> (N, T / P, ..., H, Dh)."""
        P = self.size
        N, T, *mid, Hp, Dh = y.shape
        send = y.reshape(N, P, T // P, *mid, Hp, Dh).movedim(1, 0).contiguous()  # block p: rank p's tokens
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[p]: this rank's tokens, rank p's heads
        return recv.movedim(0, -3).reshape(N, T // P, *mid, P * Hp, Dh).contiguous()  # the output projection's layout

    def gather_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """(N, T / P, D) -> (N, T, D) on every rank."""
        N, Tp, D = h.shape
        out = torch.empty((self.size * N, Tp, D), dtype=h.dtype, device=h.device)  # rank p's rows at [p N, (p+1) N)
        _all_gather(out, h.contiguous(), group=self.group)
        return out.view(self.size, N, Tp, D).movedim(0, 1).reshape(N, self.size * Tp, D)
