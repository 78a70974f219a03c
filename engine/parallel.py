"""Past one device: `ParallelConfig`, the layout of a sampling run over the ranks of a torch.distributed group.

    torchrun --nproc_per_node 4 my_script.py        # every rank runs the same script
    torch.distributed.init_process_group("nccl")   # "gloo" on CPUs
    parallel = de.ParallelConfig(ulysses_degree=2, ring_degree=2)
    sampler = de.FastSampler(model, sched, cfg_scale=5.0, parallel=parallel)
    latents = sampler(noise, **conditioning)        # the same latents on every rank

CFG parallel (`cfg_degree=2`): the conditional rows run on one rank and the unconditional rows on the other, each
with its half of the per-call context and modulation; one all-gather of the model output per step joins the
halves, and every rank then runs the same fused scheduler step, so the state stays identical everywhere without a
broadcast. It needs guidance on (cfg_scale != 1); the steps outside a guidance interval run the conditional rows
on every rank.

Sequence parallel (`ulysses_degree=U`, `ring_degree=R`, U R ranks, USP's layout): the token sequence, padded at its
tail to a multiple of U R, is cut into R contiguous chunks and each chunk into U shards; rank r U + u holds shard u
of chunk r of every row's residual stream (the small patch embedding runs whole and is sliced). The per-token work
(adaLN, the MLPs, the gated residuals, cross-attention to the per-call K/V, the scheduler step) runs on the shard
with no communication. Around each self-attention:
  - Ulysses: one all-to-all within the chunk's U ranks turns q, k and v from (tokens / U R, every head) into (the
    chunk's tokens, heads / U), and one turns the output back;
  - Ring: the chunk's keys and values travel around the R chunks with batch_isend_irecv while the block just
    received is attended; the partial results merge exactly through the log-sum-exp the attention kernel returns.
    The family's q/k norm and RoPE prologue is applied before the ring, at each token's global position. A sliding
    window (ACE-Step) exchanges only the neighbouring chunks' edge rows instead.
Padded keys are never attended (a block's keys are cut to its valid count) and padded rows are dropped when the
output projection's rows are gathered for the unpatchify, once a step. A family takes part through the denoiser
contract (`FusedDenoiser.self_attention` and `sequence_heads`); the joint text-and-image families shard their joint
sequence as one stream.

The collectives (all-to-all, all-gather, batch_isend_irecv) are ones NCCL runs inside a captured CUDA graph, so on
CUDA `cuda_graph="loop"` keeps the loop one graph; on gloo the loop runs eagerly. On a group of one rank the
sequence path still runs, its collectives on that rank alone: the NCCL path proved on one GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditengine.kernels.gqa_attention import merge_attention, rope_ref, stream_norm_ref

# torch 2.13 renames the flat all-gather (same arguments); the GPU machine's torch 2.11 has the old name only.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ParallelConfig:
    """The degrees of a parallel run; their product must equal the size of `process_group` (default: the default
    group that `torchrun` and `init_process_group` set up; a one-dimensional `DeviceMesh` names its group)."""

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

    @property
    def degree(self) -> int:
        return self.ulysses_degree * self.ring_degree * self.cfg_degree

    def group(self):
        """The process group: the one given, a one-dimensional mesh's, or None for the default group."""
        group = self.process_group
        mesh_type = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
        if mesh_type is not None and isinstance(group, mesh_type):
            if group.ndim != 1:
                raise ValueError(f"parallel: process_group: a {group.ndim}-D DeviceMesh; pass a 1-D mesh (or its "
                                 "group): the degrees lay out the ranks themselves")
            return group.get_group()
        return group

    def bind(self, use_cfg: bool, device: torch.device) -> tuple["CfgGroup | None", "SequenceGroup | None"]:
        """The run's view of the group, checked: (its CFG pair or None, its sequence group). Rank c R U + r U + u
        runs CFG half c, ring chunk r, Ulysses shard u; every rank creates every subgroup, in one order, as
        torch.distributed asks."""
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("parallel: no initialised torch.distributed process group: launch with torchrun and "
                             "call torch.distributed.init_process_group first")
        pg = self.group()
        world = dist.get_world_size(pg)
        if self.degree != world:
            raise ValueError(f"parallel: ulysses_degree x ring_degree x cfg_degree = {self.degree}, but the process "
                             f"group has {world} ranks")
        if self.cfg_degree > 1 and not use_cfg:
            raise ValueError("parallel: cfg_degree=2 splits the guided rows, but guidance is off (cfg_scale == 1)")
        backend = dist.get_backend(pg)
        if device.type == "cuda" and backend != "nccl" or device.type == "cpu" and backend != "gloo":
            raise ValueError(f"parallel: a {backend} process group for a model on {device.type}: NCCL serves CUDA "
                             "tensors, gloo CPU tensors")
        rank = dist.get_rank(pg)
        ranks = list(dist.get_process_group_ranks(pg)) if pg is not None else list(range(world))
        U, R, C = self.ulysses_degree, self.ring_degree, self.cfg_degree
        RU = R * U
        c, r, u = rank // RU, rank // U % R, rank % U

        def subgroup(members: list[int]):
            return pg if len(members) == world else dist.new_group([ranks[m] for m in members])

        # Each family of subgroups in one order on every rank: CFG halves, Ulysses groups, rings, CFG pairs.
        halves = [subgroup(list(range(h * RU, (h + 1) * RU))) for h in range(C)] if C > 1 else [pg]
        ulysses = [subgroup([h * RU + i * U + j for j in range(U)]) for h in range(C) for i in range(R)] \
            if U > 1 or world == 1 else None
        rings = [[h * RU + i * U + j for i in range(R)] for h in range(C) for j in range(U)] if R > 1 else None
        ring_groups = [subgroup(members) for members in rings] if rings else None
        pairs = [subgroup([h * RU + s for h in range(C)]) for s in range(RU)] if C > 1 else None

        cfg = CfgGroup(pairs[rank % RU], c) if pairs else None
        ring = None
        if rings:
            members = [ranks[m] for m in rings[c * U + u]]
            ring = Ring(ring_groups[c * U + u], r, R, prev=members[(r - 1) % R], next=members[(r + 1) % R])
        if C > 1 and RU == 1:
            return cfg, None
        return cfg, SequenceGroup(halves[c], r * U + u, RU, Ulysses(ulysses[c * R + r], U) if ulysses else None,
                                  ring)


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


def check_sequence_heads(fast, parallel: ParallelConfig) -> None:
    """A denoiser that runs on a token shard: its family takes part, and the Ulysses degree divides its heads."""
    name = type(fast).__name__
    degrees = f"ulysses_degree={parallel.ulysses_degree}, ring_degree={parallel.ring_degree}"
    if fast.sequence_heads is None:
        raise ValueError(f"parallel: {degrees}: {name} does not run on a shard of the tokens; use cfg_degree")
    heads = fast.sequence_heads()
    if any(h % parallel.ulysses_degree for h in heads):
        raise ValueError(f"parallel: ulysses_degree={parallel.ulysses_degree} must divide the attention's head counts "
                         f"{heads} ({name}): each rank takes 1 / {parallel.ulysses_degree} of the heads")


@dataclass(frozen=True)
class Ulysses:
    """The U ranks of one ring chunk: all-to-alls between token shards and head slices."""

    group: object
    size: int

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T / U, ..., H, Dh) on each rank -> (N, T, ..., H / U, Dh): every token of the chunk, this rank's
        heads."""
        P = self.size
        N, Tp, *mid, H, Dh = x.shape
        send = x.reshape(N, Tp, *mid, P, H // P, Dh).movedim(-3, 0).contiguous()  # block p: rank p's heads
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[p]: rank p's tokens, this rank's heads
        return recv.movedim(0, 1).reshape(N, P * Tp, *mid, H // P, Dh)

    def to_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_heads`: (N, T, ..., H / U, Dh) -> (N, T / U, ..., H, Dh)."""
        P = self.size
        N, T, *mid, Hp, Dh = y.shape
        send = y.reshape(N, P, T // P, *mid, Hp, Dh).movedim(1, 0).contiguous()  # block p: rank p's tokens
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[p]: this rank's tokens, rank p's heads
        return recv.movedim(0, -3).reshape(N, T // P, *mid, P * Hp, Dh).contiguous()  # the output projection's layout


@dataclass(frozen=True)
class Ring:
    """The R ranks that hold one Ulysses slice of every chunk, in chunk order; `prev` and `next` global ranks."""

    group: object
    rank: int
    size: int
    prev: int
    next: int

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> list:
        """Start point-to-point sends and receives (tensor, global peer rank) as one batch; returns the requests."""
        ops = [dist.P2POp(dist.isend, t, peer, self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.group) for t, peer in recvs]
        return dist.batch_isend_irecv(ops) if ops else []


@dataclass(frozen=True)
class SequenceGroup:
    """The U R ranks that share the tokens of the same rows: rank `rank` = r U + u holds shard u of chunk r."""

    group: object
    rank: int
    size: int
    ulysses: Ulysses | None
    ring: Ring | None

    def shards(self, tokens: int) -> "TokenShards":
        return TokenShards(self, tokens, -(-tokens // self.size))


@dataclass(frozen=True)
class TokenShards:
    """A sequence group's layout of `tokens` tokens: padded at the tail to `per_rank` rows a rank."""

    group: SequenceGroup
    tokens: int
    per_rank: int

    def prefix(self, tokens: int) -> "TokenShards":
        """The sequence's first `tokens` tokens on the same shards, the rest taken as padding (SD3.5's second
        attention, over the image rows that open the joint sequence)."""
        return TokenShards(self.group, tokens, self.per_rank)

    @property
    def start(self) -> int:
        return self.group.rank * self.per_rank

    @property
    def chunk(self) -> int:
        """The tokens a rank attends as queries after the Ulysses exchange: its ring chunk."""
        return self.per_rank * (self.group.ulysses.size if self.group.ulysses else 1)

    def valid(self, chunk: int) -> int:
        """How many of ring chunk `chunk`'s tokens are real (the rest is the tail's padding)."""
        return min(max(self.tokens - chunk * self.chunk, 0), self.chunk)

    @property
    def rows(self) -> int:
        """How many of this rank's rows are real tokens."""
        return self.local(self.tokens)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the sequence group's ranks (in place; returned)."""
        dist.all_reduce(x, group=self.group.group)
        return x

    def local(self, rows: int) -> int:
        """How many of the sequence's first `rows` tokens lie in this rank's shard (a stream's split point)."""
        return min(max(rows - self.start, 0), self.per_rank)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The whole sequence (N, T, D) -> this rank's shard (N, T_pad / P, D), zero rows past T."""
        part = full[:, self.start:self.start + self.per_rank]
        return pad_rows(part, self.per_rank).contiguous()

    def gather(self, h: torch.Tensor) -> torch.Tensor:
        """Every rank's shard (N, T_pad / P, D) -> the whole sequence (N, T, D) on every rank, padding dropped."""
        N, Tp, D = h.shape
        P = self.group.size
        out = torch.empty((P * N, Tp, D), dtype=h.dtype, device=h.device)  # rank p's rows at [p N, (p+1) N)
        _all_gather(out, h.contiguous(), group=self.group.group)
        return out.view(P, N, Tp, D).movedim(0, 1).reshape(N, P * Tp, D)[:, :self.tokens]

    def attention(self, attend, tensors: tuple, prologue: dict, partial) -> torch.Tensor:
        """The family's self-attention of this rank's tokens: `attend(*tensors, **prologue)` over the whole chunk
        (Ulysses alone), or the ring (`partial(q, k, v, **kw)` -> (out, lse), the kernel with its log-sum-exp)."""
        ulysses, ring = self.group.ulysses, self.group.ring
        if ulysses is not None:
            tensors = tuple(ulysses.to_heads(t) for t in tensors)  # (N, chunk, ..., H / U, Dh)
        if ring is None:  # the whole sequence is here: padded keys cut off, padded rows added back
            out = pad_rows(attend(*(t[:, :self.tokens] for t in tensors), **prologue), self.chunk)
        else:
            out = self.ring_attention(tensors, prologue, partial)
        return ulysses.to_tokens(out) if ulysses is not None else out

    def ring_attention(self, tensors: tuple, prologue: dict, partial) -> torch.Tensor:
        ring = self.group.ring
        q, k, v = tensors[0].unbind(2) if len(tensors) == 1 else tensors  # packed (N, T, 3, H, Dh) or three
        q, k, kw = apply_prologue(q, k, ring.rank * self.chunk, **prologue)
        window = kw.pop("window", None)
        if window is not None and window < self.tokens - 1:
            return self.band_attention(q, k, v, window, kw, partial)
        kv = torch.stack((k, v))  # (2, N, chunk, Hkv, Dh): one message a hop
        spare = torch.empty_like(kv)
        out = lse = None
        for hop in range(ring.size):
            source = (ring.rank - hop) % ring.size  # whose chunk `kv` holds now
            requests = ring.exchange([(kv, ring.next)], [(spare, ring.prev)]) if hop < ring.size - 1 else []
            n = self.valid(source)
            if n:  # an all-padding chunk has nothing to attend
                o, o_lse = partial(q, kv[0, :, :n], kv[1, :, :n], **kw)
                out, lse = (o.float(), o_lse) if out is None else merge_attention(out, lse, o, o_lse)
            for request in requests:
                request.wait()
            kv, spare = spare, kv
        return out.to(q.dtype)

    def band_attention(self, q, k, v, window: int, kw: dict, partial) -> torch.Tensor:
        """A sliding window over ring chunks: the `window` edge rows of k and v come from the neighbouring chunks
        only. The window kernel needs keys and queries at the same positions, so the queries are padded with zero
        rows where the neighbours' keys sit (2 window rows more of a band attention, discarded)."""
        ring = self.group.ring
        if window > self.chunk:
            raise ValueError(f"parallel: ring_degree={ring.size}: a sliding window of {window} tokens is wider than a "
                             f"ring chunk ({self.chunk} tokens), and only the neighbouring chunks' keys are exchanged; "
                             "use a smaller ring degree or the Ulysses degree")
        kv = torch.stack((k, v))  # (2, N, chunk, Hkv, Dh)
        r, last = ring.rank, ring.rank == ring.size - 1
        edge = (2, kv.shape[1], window, *kv.shape[3:])
        prev_tail = kv.new_empty(edge) if r > 0 else None
        next_head = kv.new_empty(edge) if not last else None
        # Every neighbour pair swaps its edges, padding or not, so that each send meets its receive.
        sends = ([(kv[:, :, :window].contiguous(), ring.prev)] if r > 0 else []) + \
            ([(kv[:, :, self.chunk - window:].contiguous(), ring.next)] if not last else [])
        recvs = ([(prev_tail, ring.prev)] if r > 0 else []) + ([(next_head, ring.next)] if not last else [])
        for request in ring.exchange(sends, recvs):
            request.wait()
        n = self.valid(r)
        if n == 0:  # an all-padding chunk: its rows are dropped
            return q.new_zeros(q.shape)
        before = window if r > 0 else 0
        after = 0 if last else min(window, self.valid(r + 1))  # 0 unless this chunk is full
        parts = [prev_tail, kv[:, :, :n], None if last else next_head[:, :, :after]]
        keys = torch.cat([t for t in parts if t is not None], dim=2)  # (2, N, before + n + after, Hkv, Dh)
        rows = q[:, :n]
        queries = torch.cat([rows.new_zeros((rows.shape[0], before, *rows.shape[2:])), rows,
                             rows.new_zeros((rows.shape[0], after, *rows.shape[2:]))], dim=1)
        out, _ = partial(queries, keys[0], keys[1], window=window, **kw)
        return pad_rows(out[:, before:before + n], self.chunk)


def apply_prologue(q, k, start: int, q_norm=None, k_norm=None, eps: float = 1e-6, rope=None,
                   rope_interleaved: bool = False, norm_split: int | None = None, **rest):
    """The attention prologue (per-stream q/k RMSNorm, then RoPE) on a chunk whose first token sits at global
    position `start`: the ring attends q and k blocks of different positions, which one fused prologue cannot
    (it rotates q and k rows by one table). Returns (q, k, what the kernel still takes)."""
    chunk = q.shape[1]
    split = None if norm_split is None else min(max(norm_split - start, 0), chunk)
    if q_norm is not None:
        q = stream_norm_ref(q, q_norm, eps, split)
    if k_norm is not None:
        k = stream_norm_ref(k, k_norm, eps, split)
    if rope is not None:
        cos, sin = (pad_rows(table[None, start:start + chunk], chunk)[0] for table in rope)  # (chunk, Dh)
        q, k = rope_ref(q, cos, sin, rope_interleaved), rope_ref(k, cos, sin, rope_interleaved)
    return q, k, rest


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (N, T, ...) with zero rows appended to `rows` rows (x itself when it has them)."""
    if x.shape[1] == rows:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], rows - x.shape[1], *x.shape[2:]))], dim=1)
