"""Cross-attention of image tokens to a padded text: the keys past each row's valid length are left out.

    out[b] = softmax(q[b] k[b, :len_b]^T * softmax_scale) v[b, :len_b],   softmax_scale = 1/sqrt(Dh)

PixArt's blocks attend from the image tokens (queries, recomputed every step) to the caption tokens (keys
and values, the same at every step of a call, so the fast path projects them once per prompt for every
block). The tokenizer pads on the right, so a prompt's padding mask is a valid-length per row; diffusers
adds -10000 to the scores of padded keys, whose weight exp(-10000) is exactly 0 in fp32, so leaving them
out is the same computation (`encoder_attention_mask` masks that are not a prefix are refused before they
reach this op). The lengths are a device tensor, so a captured graph does not bake in one prompt's padding.

Layouts: q (B, Tq, H, Dh), the q projection's output viewed per head (any strides, last dim contiguous);
kv (B, L, 2, H, Dh), the packed k/v projection of the caption; kv_lens (B,) int32 or int64 in [1, L];
out (B, Tq, H, Dh), contiguous, so `.reshape(B, Tq, H*Dh)` feeds the output projection without a copy.
Head dims as `attention`'s: multiples of 8 from 16 to 256 (PixArt: 72, split 64 + 16 in the Triton kernel).

Implementations: on CUDA the self-attention Triton kernel with its KEY_LENS switch on (`attention_tile`: online
softmax in fp32 with exp2, tensor-core dots for fp16 / bf16, IEEE fp32 dots for fp32) over a grid of
(query tiles, B*H), each program loading its row's length from the device tensor and running only
cdiv(len_b, BLOCK_N) key blocks (the keys past the length in the last block masked): a one-token negative
prompt costs one block, whatever the padding. On CPU the native kernel (csrc/cross_attention.cpp) where the
extension is built: fp32 GEMMs over the first len_b keys only. The op's Python body (SDPA with a boolean
key mask) is the fallback. A NaN in one query row stays in that row; keys past a row's length are never
read by either kernel, so whatever they hold (NaN included) cannot reach the output.

Bad arguments: `check_inputs` (shapes, dtypes, devices, contiguous last dims; kv_lens' values on a CPU only) runs
in the public function and in the op's Python body; csrc/cross_attention.cpp checks the same, with the same
exception types and messages naming the argument (see kernels/attention.py for what only the public function
refuses).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import use_triton
from ._checks import FLOAT_DTYPES, check_tensor
from .attention import (OP_DTYPES, _attention_fwd_autotuned, _attention_fwd_kernel, check_head_dim, head_blocks,
                        launch_tiles, prelude, triton_takes)


# -- reference -------------------------------------------------------------------------------------------
def key_padding_mask(kv_lens: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L) bool, True for the valid (leading) keys of each row."""
    return torch.arange(L, device=kv_lens.device)[None] < kv_lens[:, None]


def cross_attention_ref(q, kv, kv_lens, softmax_scale: float | None = None, upcast: bool = True):
    """Explicit masked softmax over (B, Tq, H, Dh) queries and (B, L, 2, H, Dh) keys/values; fp32 math when
    `upcast` (float64 stays)."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if upcast and dtype != torch.float64:
        q, kv = q.float(), kv.float()
    k, v = kv.unbind(2)  # (B, L, H, Dh) each
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Tq, L)
    valid = key_padding_mask(kv_lens, kv.shape[1])[:, None, None]  # (B, 1, 1, L)
    weights = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v).to(dtype)  # (B, Tq, H, Dh)


# -- argument checks -------------------------------------------------------------------------------------------
def check_inputs(q, kv, kv_lens, dtypes: tuple = OP_DTYPES) -> None:
    """q, kv, kv_lens as the registered op takes them, checked in one place for the public function (which passes
    FLOAT_DTYPES) and the op's Python body (what runs on CUDA, and on CPU without the native extension);
    csrc/cross_attention.cpp checks the same in C++, with the same exception types and messages naming the same
    argument. Shapes, dtypes and devices are metadata; kv_lens' values are read on a CPU only (on CUDA that would
    sync with the host every call: the caller keeps them in range, and the Triton kernel clamps them to [0, L]).
    Head dims, float64 and queries: the public function's own rules (the op runs any head dim, float64 and no
    queries)."""
    check_tensor("q", q, ndim=4, dtypes=dtypes, layout="(B, Tq, H, Dh)")
    B, Tq, H, Dh = q.shape
    check_tensor("kv", kv, shape=(B, None, 2, H, Dh), dtypes=(q.dtype,), device=q.device,
                 layout="(B, L, 2, H, Dh): the packed k/v projection, batch, heads and head dim as q")
    check_tensor("kv_lens", kv_lens, shape=(B,), dtypes=(torch.int32, torch.int64), device=q.device,
                 last_dim_contiguous=False, layout="(B,): valid keys per row")
    L = kv.shape[1]
    if L == 0:
        raise ValueError(f"cross_attention: sequence lengths must be at least 1, got q {Tq}, kv {L}")
    if Dh == 0:
        raise ValueError(f"q: the head dim must be positive, got shape {tuple(q.shape)}")
    if q.device.type == "cpu" and B and (int(kv_lens.min()) < 1 or int(kv_lens.max()) > L):
        raise ValueError(f"kv_lens: expected values in [1, {L}] (the valid keys of each row), got "
                         f"[{int(kv_lens.min())}, {int(kv_lens.max())}]")


# -- kernel launch (the kernel is attention's) -------------------------------------------------------------
def _launch(q, kv, kv_lens, out, softmax_scale, config=None):
    """q (B, Tq, H, Dh), kv (B, L, 2, H, Dh) with any strides (last dim contiguous), out (B, Tq, H, Dh).
    `config` (see `attention.check_config`) launches that one config instead of the autotuned or pinned one."""
    B, T_Q, H, Dh = q.shape
    L = kv.shape[1]
    k, v = kv[:, :, 0], kv[:, :, 1]  # (B, L, H, Dh) views
    d1, d2 = head_blocks(Dh)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16 / bf16 dots
    # (batch, head, token) strides of each operand, as the shared tile reads them.
    args = (q, k, v, out, kv_lens, q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
            v.stride(0), v.stride(2), v.stride(1), out.stride(0), out.stride(2), out.stride(1), kv_lens.stride(0),
            H, T_Q, L, softmax_scale * math.log2(math.e))
    meta = dict(HEAD_DIM=Dh, D1=d1, D2=d2, PRECISION=precision, KEY_LENS=True)
    launch_tiles(_attention_fwd_kernel, _attention_fwd_autotuned, q, T_Q, B * H, args, meta, config)


# -- torch.library registration --------------------------------------------------------------------------
@torch.library.custom_op("ditengine::cross_attention", mutates_args=())
def _cross_attention_op(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """The Triton kernel where it runs and takes the inputs, else SDPA with a boolean key mask (float64 and head dims
    outside the kernel's, on every device, as the C++ kernel does)."""
    check_inputs(q, kv, kv_lens)
    if use_triton("cross_attention", q) and triton_takes(q):
        out = q.new_empty(q.shape)
        if out.numel():  # no queries: nothing to launch
            _launch(q, kv, kv_lens, out, softmax_scale)
        return out
    k, v = kv.unbind(2)  # (B, L, H, Dh) views
    valid = key_padding_mask(kv_lens, kv.shape[1])[:, None, None]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid,
                                         scale=softmax_scale)  # (B, H, Tq, Dh)
    return out.transpose(1, 2).contiguous()


@_cross_attention_op.register_fake
def _(q, kv, kv_lens, softmax_scale):
    return q.new_empty(q.shape)


# -- public API ------------------------------------------------------------------------------------------
def cross_attention(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, *, softmax_scale: float | None = None,
                    backend: str | None = None, config: dict | None = None) -> torch.Tensor:
    """Attention of q (B, Tq, H, Dh) to the first kv_lens[b] keys of kv (B, L, 2, H, Dh) -> (B, Tq, H, Dh).

    `kv_lens` must lie in [1, L]: on a CPU this is checked; on CUDA it is not (that would sync with the
    host every call), and the caller keeps it in range (`FastSampler` checks the masks it derives it from).
    `backend`: None / "auto" lets the dispatcher choose (C++ on CPU where built, Triton on CUDA); "native",
    "triton" (on CPU: the interpreter) or "reference" (`cross_attention_ref`) force one.
    `config`: with backend="triton" only, launch the Triton kernel with this config (as `attention`'s: BLOCK_M,
    BLOCK_N, num_warps, num_stages, e.g. one of `attention.AUTOTUNE_CONFIGS`): for tests and benchmarks.
    """
    check_inputs(q, kv, kv_lens, FLOAT_DTYPES)
    B, Tq, H, Dh = q.shape
    L = kv.shape[1]
    check_head_dim(Dh, " (cross_attention_ref takes any)")
    if Tq == 0:
        raise ValueError(f"cross_attention: sequence lengths must be at least 1, got q {Tq}, kv {L}")
    how, scale = prelude("cross_attention", q.device, backend, Dh, softmax_scale, config)
    if how.startswith("reference"):
        return cross_attention_ref(q, kv, kv_lens, scale)
    # The interpreter: the dispatcher's CPU slot may belong to the native kernel. A config: the op has none.
    if how == "triton-interpreter" or config is not None:
        out = q.new_empty((B, Tq, H, Dh))
        _launch(q, kv, kv_lens, out, scale, config)
        return out
    return _cross_attention_op(q, kv, kv_lens, scale)
