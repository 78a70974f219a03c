"""Flash attention (forward) for DiT: non-causal self-attention read straight from the packed qkv.

    out = softmax(q k^T * softmax_scale) v,   softmax_scale = 1/sqrt(Dh) by default

DiT's qkv projection emits (B, T, 3, H, Dh). Eager PyTorch permutes it into three (B, H, T, Dh) tensors
and transposes the result back before the output projection; this kernel reads q, k and v through their
strides in that layout and writes (B, T, H, Dh), which is (B, T, H*Dh) for the projection: no copies.
It also takes separate q, k, v (B, H, T, Dh) like `scaled_dot_product_attention`.

Online softmax in fp32 (exp2, running max and sum), never materialising the T x T scores; fp32
accumulation; q k^T and p v on tensor cores for fp16 / bf16 (fp32 inputs use IEEE fp32 dots, for checks).
Head dims: multiples of 8 from 16 to 256 (DiT: 64, and 72 for DiT-XL). Triton blocks are powers of two,
so a head dim like 72 is split into a 64-wide and a 16-wide part (8 lanes masked: 11% extra dot work)
instead of one 128-wide padded block (78% extra); `head_split=False` forces the padded form, for
measurement. Sequence lengths need not be multiples of the block size: keys past T are masked to -inf
and queries past T are not stored. A NaN in one query row stays in that row.

Bad arguments: `check_inputs` (shapes, dtypes, devices, contiguous last dims; metadata only) runs in the public
function and in the op's Python body, which a direct op call reaches on CUDA and on CPU without the extension;
csrc/attention.cpp checks the same. Each raises the same exception type (ValueError for a shape or value,
TypeError for a dtype) naming the argument. The public function also refuses float64, head dims outside 16..256
and empty queries, which the op runs on every path (SDPA where the Triton kernel cannot; an empty output).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import autotune_enabled, route, tl, triton, use_triton
from ._checks import FLOAT_DTYPES, check_tensor

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
# The dtypes the registered op takes: the public function's, and float64, which every implementation of the op runs
# through SDPA (the C++ kernel, the Python body on CPU, and on CUDA where the Triton kernel cannot take it).
OP_DTYPES = (*FLOAT_DTYPES, torch.float64)


# -- reference -------------------------------------------------------------------------------------------
def attention_ref(q, k, v, softmax_scale: float | None = None, upcast: bool = True):
    """Explicit softmax(q k^T * scale) v over (B, H, T, Dh); math in fp32 when `upcast` (float64 stays)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    return (scores.softmax(dim=-1) @ v).to(dtype)


# -- kernel ----------------------------------------------------------------------------------------------
@triton.jit
def attention_tile(
    q_base, k_base, v_base, o_base, stride_qt, stride_kt, stride_vt, stride_ot, pid_m, T_Q, T_K, qk_scale,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Query tile `pid_m` (BLOCK_M rows of T_Q) of one (batch, head) against its keys [0, T_K): the online
    softmax over key blocks, then the normalised tile stored. The bases point at the head's first row; T_K
    may be a value loaded in the kernel (cross-attention's per-row key count): the loop runs cdiv(T_K,
    BLOCK_N) blocks and masks the keys past T_K in the last one."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T_Q
    offs_n = tl.arange(0, BLOCK_N)
    d1 = tl.arange(0, D1)
    d1_ok = d1 < HEAD_DIM  # all true unless the head dim is padded to D1
    q1 = tl.load(q_base + rows[:, None] * stride_qt + d1[None, :], mask=row_ok[:, None] & d1_ok[None, :], other=0.0)
    if D2 > 0:  # the head dim's tail, e.g. 8 of 72 in a 16-wide block
        d2 = D1 + tl.arange(0, D2)
        d2_ok = d2 < HEAD_DIM
        q2 = tl.load(q_base + rows[:, None] * stride_qt + d2[None, :], mask=row_ok[:, None] & d2_ok[None, :],
                     other=0.0)
        acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)

    for start in range(0, T_K, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < T_K
        k1 = tl.load(k_base + cols[None, :] * stride_kt + d1[:, None], mask=col_ok[None, :] & d1_ok[:, None],
                     other=0.0)  # (D1, BLOCK_N)
        s = tl.dot(q1, k1, input_precision=PRECISION)
        if D2 > 0:
            k2 = tl.load(k_base + cols[None, :] * stride_kt + d2[:, None], mask=col_ok[None, :] & d2_ok[:, None],
                         other=0.0)
            s += tl.dot(q2, k2, input_precision=PRECISION)
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))  # log2 domain: exp2 below
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v1 = tl.load(v_base + cols[:, None] * stride_vt + d1[None, :], mask=col_ok[:, None] & d1_ok[None, :],
                     other=0.0)
        acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
        if D2 > 0:
            v2 = tl.load(v_base + cols[:, None] * stride_vt + d2[None, :], mask=col_ok[:, None] & d2_ok[None, :],
                         other=0.0)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision=PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    store_rows(o_base, rows, row_ok, stride_ot, d1, d1_ok, acc1, inv_l)
    if D2 > 0:
        store_rows(o_base, rows, row_ok, stride_ot, d2, d2_ok, acc2, inv_l)


@triton.jit
def store_rows(o_base, rows, row_ok, stride_ot, d, d_ok, acc, inv_l):
    """One head-dim part of a finished tile: the accumulator times 1/l, in the output's dtype."""
    tl.store(o_base + rows[:, None] * stride_ot + d[None, :], (acc * inv_l[:, None]).to(o_base.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lens_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_lens,
    H, T_Q, T_K, qk_scale,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, PRECISION: tl.constexpr, KEY_LENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Self-attention, or with KEY_LENS cross-attention to the first lens[b] of T_K keys (lens_ptr is not read
    otherwise)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # batch and head offsets can pass 2**31 elements
    b, h = bh // H, bh % H
    n_keys = T_K
    if KEY_LENS:
        # This row's valid keys, read on the device (no host sync; a captured graph keeps reading the tensor).
        # Clamped to [0, T_K] so that an out-of-range length (unchecked on CUDA) cannot read past the keys (a
        # length of 0 or less gives NaN rows, as SDPA does with an all-False mask).
        n_keys = tl.minimum(tl.maximum(tl.load(lens_ptr + b * stride_lens), 0), T_K).to(tl.int32)
    attention_tile(q_ptr + b * stride_qb + h * stride_qh, k_ptr + b * stride_kb + h * stride_kh,
                   v_ptr + b * stride_vb + h * stride_vh, o_ptr + b * stride_ob + h * stride_oh,
                   stride_qt, stride_kt, stride_vt, stride_ot, pid_m, T_Q, n_keys, qk_scale,
                   HEAD_DIM, D1, D2, PRECISION, BLOCK_M, BLOCK_N)


# What the autotuner chooses from on CUDA (fp16 / bf16), as launch parameters: `attention(..., config=c)`
# launches exactly one of them, so each can be checked against the reference.
AUTOTUNE_CONFIGS = tuple(dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                         for block_m, block_n, warps, stages in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                                                                 (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4),
                                                                 (64, 32, 4, 4)))
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _autotune_configs():
    return [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                          num_stages=c["num_stages"]) for c in AUTOTUNE_CONFIGS]


_attention_fwd_autotuned = (
    # Keyed on the padded key length T_K, not on cross-attention's valid lengths (a device tensor): one choice
    # per caption padding.
    triton.autotune(_autotune_configs(), key=["T_Q", "T_K", "HEAD_DIM", "D1", "D2", "PRECISION", "KEY_LENS"])(
        _attention_fwd_kernel)
    if hasattr(triton, "autotune") else None
)

# The pinned configs: what tests use (autotuning there would time every config), what fp32 (a checking
# precision) always uses, and what the interpreter runs (small tiles keep it fast).
PINNED_GPU = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
PINNED_GPU_FP32 = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)  # fp32 tiles are twice the bytes
PINNED_INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32)


def head_blocks(head_dim: int, head_split: bool = True) -> tuple[int, int]:
    """(D1, D2): power-of-two blocks covering the head dim; D2 = 0 when one block suffices."""
    d1 = 1 << (head_dim.bit_length() - 1)  # largest power of two <= head_dim
    if d1 == head_dim:
        return head_dim, 0
    if not head_split:
        return d1 * 2, 0
    return d1, max(16, 1 << (head_dim - d1 - 1).bit_length())  # tl.dot needs K >= 16


def head_dim_fits(head_dim: int) -> bool:
    """The attention kernels' one head-dim rule: a multiple of 8 from MIN_HEAD_DIM to MAX_HEAD_DIM."""
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def check_head_dim(head_dim: int, note: str = "") -> None:
    if not head_dim_fits(head_dim):
        raise ValueError(f"head dim {head_dim} is not supported: expected a multiple of 8 from {MIN_HEAD_DIM} to "
                         f"{MAX_HEAD_DIM}{note}")


def check_inputs(q, k, v, dtypes: tuple = OP_DTYPES) -> None:
    """q, k, v (B, H, T, Dh) as the registered op takes them, checked in one place for the public function (which
    passes FLOAT_DTYPES) and the op's Python body (what runs on CUDA, and on CPU without the native extension);
    csrc/attention.cpp checks the same in C++, with the same exception types and messages naming the same argument.
    Metadata only: no host sync on CUDA. Head dims, float64 and queries: the public function's own rules (the op
    runs any head dim, float64 and no queries)."""
    check_tensor("q", q, ndim=4, dtypes=dtypes, layout="(B, H, T, Dh)")
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device, layout="(B, H, T, Dh)")
    check_tensor("v", v, shape=tuple(k.shape), dtypes=(q.dtype,), device=q.device, layout="(B, H, T, Dh) like k")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k: batch, head count and head dim must match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"attention: sequence length must be at least 1, got q {q.shape[2]}, k {k.shape[2]}")
    if q.shape[3] == 0:
        raise ValueError(f"q: the head dim must be positive, got shape {tuple(q.shape)}")


def triton_takes(q) -> bool:
    """Whether the Triton kernel runs these queries' dtype and head dim (the public function refuses the others;
    the op runs them through SDPA, as its C++ kernel does)."""
    return q.dtype in FLOAT_DTYPES and head_dim_fits(q.shape[-1])


def prelude(op: str, device: torch.device, backend: str | None, head_dim: int, softmax_scale: float | None,
            config: dict | None) -> tuple[str, float]:
    """What every attention op does before its kernel: the softmax scale (1/sqrt(Dh) unless given), the
    implementation for `device` and `backend` (`_backend.route`), and a launch `config` checked, which only the
    Triton kernel takes. Returns (how, scale)."""
    scale = head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)
    how = route(op, device, backend)
    if config is not None:
        if backend != "triton":
            raise ValueError(f"config: only the Triton kernel takes a launch config; pass backend='triton', got "
                             f"backend={backend!r}")
        check_config(config)
    return how, scale


def check_config(config: dict) -> dict:
    """A launch config for the Triton kernel: BLOCK_M and BLOCK_N powers of two >= 16 (tl.dot's minimum),
    num_warps and num_stages positive; returns it."""
    if not isinstance(config, dict) or set(config) - set(CONFIG_KEYS) or not {"BLOCK_M", "BLOCK_N"} <= set(config):
        raise ValueError(f"config: expected a dict with BLOCK_M and BLOCK_N (and optionally num_warps, num_stages), "
                         f"e.g. one of AUTOTUNE_CONFIGS, got {config!r}")
    for key in ("BLOCK_M", "BLOCK_N"):
        block = config[key]
        if not isinstance(block, int) or block < 16 or block & (block - 1):
            raise ValueError(f"config: {key} must be a power of two >= 16, got {block!r}")
    for key in ("num_warps", "num_stages"):
        if key in config and (not isinstance(config[key], int) or config[key] < 1):
            raise ValueError(f"config: {key} must be a positive int, got {config[key]!r}")
    return config


def _launch(q, k, v, out, softmax_scale, head_split, config=None):
    """q, k, v, out: (B, H, T, Dh) views with any batch / head / token strides, last dim contiguous.
    `config` (see `check_config`) launches that one config instead of the autotuned or pinned choice."""
    B, H, T_Q, Dh = q.shape
    T_K = k.shape[2]
    d1, d2 = head_blocks(Dh, head_split)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16 / bf16 dots
    args = (q, k, v, out, q, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], 0,
            H, T_Q, T_K, softmax_scale * math.log2(math.e))
    meta = dict(HEAD_DIM=Dh, D1=d1, D2=d2, PRECISION=precision, KEY_LENS=False)
    launch_tiles(_attention_fwd_kernel, _attention_fwd_autotuned, q, T_Q, B * H, args, meta, config)


def launch_tiles(kernel, autotuned, q, T_Q: int, heads: int, args: tuple, meta: dict, config: dict | None = None):
    """Launch a kernel built on `attention_tile` over (query tiles, batch * heads) with its config: the one
    given, the autotuned choice (CUDA, fp16 / bf16, autotuning on), or the pinned one for the device."""
    if config is None and q.device.type == "cuda" and autotune_enabled() and q.dtype != torch.float32:
        autotuned[lambda cfg: (triton.cdiv(T_Q, cfg["BLOCK_M"]), heads)](*args, **meta)
        return
    if config is None:
        if q.device.type != "cuda":
            config = PINNED_INTERPRETER
        else:
            config = PINNED_GPU_FP32 if q.dtype == torch.float32 else PINNED_GPU
    kernel[(triton.cdiv(T_Q, config["BLOCK_M"]), heads)](*args, **meta, **config)


# -- torch.library registration --------------------------------------------------------------------------
@torch.library.custom_op("ditengine::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, tokens_first: bool,
                  head_split: bool) -> torch.Tensor:
    """q, k, v as (B, H, T, Dh) views; returns (B, T, H, Dh) when `tokens_first`, else (B, H, T, Dh). The Triton
    kernel where it runs and takes the inputs, else SDPA (float64 and head dims outside the kernel's, on every
    device, as the C++ kernel does)."""
    check_inputs(q, k, v)
    B, H, T, Dh = q.shape
    if use_triton("attention", q) and triton_takes(q):
        out = q.new_empty((B, T, H, Dh) if tokens_first else (B, H, T, Dh))
        if out.numel():  # no queries: nothing to launch
            _launch(q, k, v, out.transpose(1, 2) if tokens_first else out, softmax_scale, head_split)
        return out
    out = F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)  # (B, H, T, Dh)
    return out.transpose(1, 2).contiguous() if tokens_first else out.contiguous()


@_attention_op.register_fake
def _(q, k, v, softmax_scale, tokens_first, head_split):
    B, H, T, Dh = q.shape
    return q.new_empty((B, T, H, Dh) if tokens_first else (B, H, T, Dh))


# -- public API ------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
              softmax_scale: float | None = None, head_split: bool = True, backend: str | None = None,
              config: dict | None = None) -> torch.Tensor:
    """Non-causal attention.

    `attention(qkv)`: qkv (B, T, 3, H, Dh), the qkv projection's output viewed as such (any strides with a
    contiguous last dim) -> (B, T, H, Dh), contiguous, so `.reshape(B, T, H*Dh)` is free.
    `attention(q, k, v)`: each (B, H, T, Dh), like `scaled_dot_product_attention` -> (B, H, T, Dh).
    `backend`: None / "auto" lets the dispatcher choose (C++ on CPU where built, Triton on CUDA);
    "native", "triton" (on CPU: the interpreter) or "reference" (SDPA) force one.
    `config`: with backend="triton" only, launch the Triton kernel with this config (BLOCK_M, BLOCK_N,
    num_warps, num_stages; e.g. one of `AUTOTUNE_CONFIGS`) instead of the autotuned or pinned one: for
    tests and benchmarks. An eager call outside the registered op.
    """
    if k is None and v is None:
        check_tensor("qkv", q, ndim=5, layout="(B, T, 3, H, Dh)")
        if q.shape[2] != 3:
            raise ValueError(f"qkv: expected shape (B, T, 3, H, Dh), got {tuple(q.shape)} (dim 2 must be 3)")
        qkv = q.transpose(1, 3)  # (B, H, 3, T, Dh): a view, strides carry the packed layout
        q, k, v, tokens_first = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], True
    elif k is None or v is None:
        raise ValueError("attention: pass either qkv alone or all of q, k, v")
    else:
        check_inputs(q, k, v, FLOAT_DTYPES)
        tokens_first = False
    Dh = q.shape[-1]
    check_head_dim(Dh)
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"attention: sequence length must be at least 1, got q {q.shape[2]}, k {k.shape[2]}")
    how, scale = prelude("attention", q.device, backend, Dh, softmax_scale, config)
    if how.startswith("reference"):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, T, Dh)
        return out.transpose(1, 2).contiguous() if tokens_first else out.contiguous()
    # The interpreter: the dispatcher's CPU slot may belong to the native kernel. A config: the op has none.
    if how == "triton-interpreter" or config is not None:
        B, H, T, Dh = q.shape
        out = q.new_empty((B, T, H, Dh) if tokens_first else (B, H, T, Dh))
        _launch(q, k, v, out.transpose(1, 2) if tokens_first else out, scale, head_split, config)
        return out
    return _attention_op(q, k, v, scale, tokens_first, head_split)
