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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import route
from ._checks import check_tensor


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


# -- torch.library registration --------------------------------------------------------------------------
@torch.library.custom_op("ditengine::cross_attention", mutates_args=())
def _cross_attention_op(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
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
                    backend: str | None = None) -> torch.Tensor:
    """Attention of q (B, Tq, H, Dh) to the first kv_lens[b] keys of kv (B, L, 2, H, Dh) -> (B, Tq, H, Dh).

    `kv_lens` must lie in [1, L]: on a CPU this is checked; on CUDA it is not (that would sync with the
    host every call), and the caller keeps it in range (`FastSampler` checks the masks it derives it from).
    `backend`: None / "auto" lets the dispatcher choose, "reference" forces the PyTorch form.
    """
    check_tensor("q", q, ndim=4, layout="(B, Tq, H, Dh)")
    B, Tq, H, Dh = q.shape
    check_tensor("kv", kv, shape=(B, None, 2, H, Dh), dtypes=(q.dtype,), device=q.device,
                 layout="(B, L, 2, H, Dh): the packed k/v projection, batch, heads and head dim as q")
    check_tensor("kv_lens", kv_lens, shape=(B,), dtypes=(torch.int32, torch.int64), device=q.device,
                 last_dim_contiguous=False, layout="(B,): valid keys per row")
    L = kv.shape[1]
    if Tq == 0 or L == 0:
        raise ValueError(f"cross_attention: sequence lengths must be at least 1, got q {Tq}, kv {L}")
    if q.device.type == "cpu" and B and (int(kv_lens.min()) < 1 or int(kv_lens.max()) > L):
        raise ValueError(f"kv_lens: expected values in [1, {L}] (the valid keys of each row), got "
                         f"[{int(kv_lens.min())}, {int(kv_lens.max())}]")
    scale = Dh**-0.5 if softmax_scale is None else float(softmax_scale)
    how = route("cross_attention", q.device, backend)
    if how.startswith("reference"):
        return cross_attention_ref(q, kv, kv_lens, scale)
    return _cross_attention_op(q, kv, kv_lens, scale)
