"""Attention with grouped key/value heads (GQA), a fused q/k RMSNorm + RoPE prologue and a sliding window.

    q' = rope(rmsnorm(q) * w_q),   k' = rope(rmsnorm(k) * w_k)        (each step optional)
    out[b, i, h] = sum_j softmax_j(q'[b, i, h] . k'[b, j, g] * scale) v[b, j, g],   g = h // (Hq // Hkv)
    over the keys j with |i - j| <= window (every key without a window); scale = Dh ** -0.5 by default

ACE-Step 1.5 (diffusers `AceStepAttnProcessor2_0`) runs this in every block: self-attention with 16 q heads
over 8 k/v heads (head dim 128), q and k RMS-normalised over the head dim (a learned (Dh,) weight, eps 1e-6,
statistic in fp32), rotate-half RoPE (Qwen3's layout, cos/sin from `get_1d_rotary_pos_embed(Dh, positions,
theta, use_real=True, repeat_interleave_real=False)`, applied in fp32), and on every other layer a band
|i - j| <= 128; cross-attention to the condition with the same GQA and k-norm but no RoPE and no mask (its K/V
are projected and k-normed once per call, so that op gets k_norm=None). Eager PyTorch makes a pass over
memory for each of norm, RoPE, the GQA key/value expansion and the dense band mask; here the norm and the
rotation run on each q and k tile as it is loaded, kv heads are indexed rather than copied, and the key blocks
outside the band are never visited.

Joint attention (SD3.5, Flux.1): one attention over two token streams concatenated along the sequence, [image;
text] (SD3.5, diffusers `JointAttnProcessor2_0`) or [text; image] (Flux, `FluxAttnProcessor`), each stream
with its own q/k RMSNorm weights (`norm_q` / `norm_k` on one, `norm_added_q` / `norm_added_k` on the other)
and, for Flux, interleaved RoPE over all the joint rows after the norms. `q_norm` / `k_norm` then hold both
weights as (2, Dh) and `norm_split` says where the streams meet: row i normalises with weight 0 if i <
norm_split, weight 1 otherwise (k's rows split at the same index, so a (2, Dh) `k_norm` needs S == T). The
kernels pick each row's weight as the row is loaded: a tile across the split uses both, no extra pass.

RMSNorm: x * rsqrt(mean(x**2) + eps) * w (w the row's stream weight), the statistic and product in fp32.
RoPE on the normalised rows, x' = x * cos + rot(x) * sin with cos, sin (T, Dh) fp32 rows per position:
rotate-half (`rope_interleaved=False`, diffusers' `use_real_unbind_dim=-2`): rot(x) = cat(-x2, x1) for the
halves x1, x2; interleaved pairs (True, Flux's `use_real_unbind_dim=-1`): rot(x)[2i] = -x[2i+1],
rot(x)[2i+1] = x[2i]. Any (T, Dh) tables are taken as they are, so the pairing of cos/sin entries follows the
tables given.

Layouts: q (B, T, Hq, Dh), k and v (B, S, Hkv, Dh): per-head views of the projections' outputs, any strides
with a contiguous last dim (ACE-Step's q, k, v are column slices of one fused (B, T, (Hq+2*Hkv)*Dh)
projection). fp32 / fp16 / bf16, all one dtype; Hq a multiple of Hkv. Out (B, T, Hq, Dh), contiguous, in
q's dtype, so `.reshape(B, T, Hq*Dh)` feeds the output projection. RoPE and the window need S == T (self-
attention). Head dims: multiples of 8 from 16 to 256, as `attention`'s (the caller routes smaller heads to
`gqa_attention_ref`, which takes any).

Log-sum-exp (Ring attention): `return_lse=True` also returns lse (B, T, Hq), float32, contiguous, the natural
log of sum_j exp(q'_i . k'_j * scale) over the keys row i sees (after the prologue, within the window): the
softmax's normaliser, from the kernels' running max and sum (Triton's, in the log2 domain of exp2, converted
back: (m + log2(l)) * ln 2). The registered op is then `ditengine::gqa_attention_lse`, which returns (out, lse).
k and v may hold no key at all (S = 0: a key shard that is padding only); out is then 0 and lse -inf, with no
launch and no NaN (without `return_lse`, S = 0 is refused). `merge_attention(out, lse, out_b, lse_b)` combines
the results of two disjoint key sets exactly into the result over their union, in fp32 (out fp32 whatever the
inputs' dtype: the caller keeps it as its running accumulator and casts once); a ring attends its queries to
each key block in turn and merges as it goes.

Numerics: the prologue in fp32; online softmax (exp2, running max and sum) and accumulation in fp32. The
Triton kernel rounds the normalised, rotated q and k tiles to the input dtype for fp16 / bf16 tensor-core
dots (as the eager model rounds them before SDPA), fp32 inputs use IEEE fp32 dots; the native CPU kernel
(csrc/gqa_attention.cpp) keeps them fp32.

NaN: the norm and the rotation mix the elements of one row only, and softmax rows are independent, so a
NaN in one query row reaches only that row of the output. A NaN in a key's k row reaches exactly the
queries that see that key (its kv head's q heads, within the band): its score is NaN there and masked
elsewhere. A NaN in a value row reaches those queries too and, since a probability of 0 times NaN is NaN,
possibly the other queries of a tile that loads the same key block (the eager path's masked SDPA spreads it
to every query of the head).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import tl, triton, use_triton
from ._checks import FLOAT_DTYPES, check_tensor
from .attention import _autotune_configs, check_head_dim, head_blocks, launch_tiles, prelude, store_rows


# -- reference -------------------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim as diffusers' `RMSNorm`: the statistic and the scaling in fp32 (float64
    stays), rounded to x's dtype, then times the weight in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight.to(x.dtype)


def rotate_ref(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """rot(x): cat(-x2, x1) of the halves (rotate-half), or (-x[2i+1], x[2i]) per pair (interleaved)."""
    if interleaved:
        x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([-x_odd, x_even], dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x (B, T, H, Dh) rotated by cos, sin (T, Dh) in fp32 (float64 stays), rounded to x's dtype: diffusers'
    `apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1 if interleaved else -2,
    sequence_dim=1)`."""
    compute = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(compute)[:, None], sin.to(compute)[:, None]  # (T, 1, Dh)
    return (x.to(compute) * cos + rotate_ref(x, interleaved).to(compute) * sin).to(x.dtype)


def stream_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, split: int | None) -> torch.Tensor:
    """RMSNorm of x (B, T, H, Dh) with a (Dh,) weight, or with a (2, Dh) one per stream: weight[0] on the rows
    [0, split), weight[1] on [split, T) (diffusers' two RMSNorm modules, one per row range)."""
    if weight.dim() == 1:
        return rms_norm_ref(x, weight, eps)
    return torch.cat([rms_norm_ref(x[:, :split], weight[0], eps), rms_norm_ref(x[:, split:], weight[1], eps)], dim=1)


def band_mask(T: int, S: int, window: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where |i - j| <= window: the keys query i sees."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return (i - j).abs() <= window


def lse_ref(q, k, mask, scale: float) -> torch.Tensor:
    """The log-sum-exp over the keys of each query row's scaled scores, q (B, T, Hq, Dh) and k (B, S, Hkv, Dh)
    after the prologue, `mask` None or (T, S) bool (True: seen): (B, T, Hq) contiguous, fp32 (float64 stays). The
    scores in the inputs' dtype (an eager model's logits), the sum in fp32; no key at all (S = 0) gives -inf."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # (B, S, Hq, Dh)
    scores = torch.einsum("bthd,bshd->bhts", q, k).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)  # (B, Hq, T, S)
    return torch.logsumexp(scores, dim=-1).transpose(1, 2).contiguous()


def gqa_attention_ref(q, k, v, *, q_norm=None, k_norm=None, eps: float = 1e-6, rope=None,
                      rope_interleaved: bool = False, window: int | None = None, scale: float | None = None,
                      norm_split: int | None = None, upcast: bool = True, return_lse: bool = False):
    """Plain PyTorch: RMSNorm (each stream's on its row range for (2, Dh) weights, split at `norm_split`),
    RoPE, then SDPA with `enable_gqa` and a boolean band mask, over q (B, T, Hq, Dh), k, v (B, S, Hkv, Dh) ->
    (B, T, Hq, Dh) contiguous in q's dtype. Math in fp32 when `upcast` (float64 stays); without it, the eager
    model's roundings in the inputs' dtype. Any head dim. `return_lse`: (out, lse), lse (B, T, Hq) fp32 (float64
    for float64 inputs) from `lse_ref`; S = 0 keys then give out 0 and lse -inf."""
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    if q_norm is not None:
        q = stream_norm_ref(q, q_norm, eps, norm_split)
    if k_norm is not None:
        k = stream_norm_ref(k, k_norm, eps, norm_split)
    if rope is not None:
        cos, sin = rope
        q = rope_ref(q, cos, sin, rope_interleaved)
        k = rope_ref(k, cos, sin, rope_interleaved)
    mask = None if window is None else band_mask(q.shape[1], k.shape[1], window, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.shape[1] == 0:  # SDPA's softmax over no key is 0 / 0
        out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    else:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             scale=scale, enable_gqa=q.shape[2] != k.shape[2])  # (B, Hq, T, Dh)
        out = out.transpose(1, 2).contiguous().to(dtype)
    if return_lse:
        return out, lse_ref(q, k, mask, scale)
    return out


# -- kernel ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, rows, row_ok, stride_t, cols, col_ok):
    """rows x cols of one head's (tokens, Dh) view (token stride stride_t) in fp32; 0 where masked."""
    return tl.load(base + rows[:, None] * stride_t + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _row_weight(w_ptr, stride_w, lanes, lane_ok, rows, split, SPLIT: tl.constexpr):
    """The RMSNorm weight at each (row, lane) in fp32: (1, lanes) when one (Dh,) weight serves every row; with
    two streams (SPLIT), row i < split reads weight row 0 and the others row 1 (stride_w apart), (rows, lanes)."""
    w = tl.load(w_ptr + lanes, mask=lane_ok, other=0.0).to(tl.float32)[None, :]
    if SPLIT:
        w1 = tl.load(w_ptr + stride_w + lanes, mask=lane_ok, other=0.0).to(tl.float32)[None, :]
        w = tl.where(rows[:, None] >= split, w1, w)
    return w


@triton.jit
def _prologue(x, base, rows, row_ok, stride_t, cols, rstd, w_ptr, stride_w, split, cos_ptr, sin_ptr, stride_cos,
              stride_sin, HEAD_DIM: tl.constexpr, NORM: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
              INTERLEAVED: tl.constexpr):
    """x, the fp32 tile of `rows` (token positions) x `cols` (head-dim lanes) loaded by `_load_rows`, normalised
    (per-row rstd, each row's stream weight) and rotated for those positions, in fp32. RoPE needs each lane's
    partner lane of the same row, reloaded from `base` (the same cache lines as x) and normalised alike: no
    pass over memory."""
    col_ok = cols < HEAD_DIM
    if NORM:
        x = x * rstd[:, None] * _row_weight(w_ptr, stride_w, cols, col_ok, rows, split, SPLIT)
    if ROPE:
        if INTERLEAVED:  # pairs (2i, 2i+1): rot = (-x[2i+1], x[2i])
            partner = cols ^ 1
            sign = tl.where(cols % 2 == 0, -1.0, 1.0)
        else:  # halves: rot = cat(-x2, x1)
            partner = tl.where(cols < HEAD_DIM // 2, cols + HEAD_DIM // 2, cols - HEAD_DIM // 2)
            sign = tl.where(cols < HEAD_DIM // 2, -1.0, 1.0)
        xp = _load_rows(base, rows, row_ok, stride_t, partner, col_ok)
        if NORM:
            xp = xp * rstd[:, None] * _row_weight(w_ptr, stride_w, partner, col_ok, rows, split, SPLIT)
        mask = row_ok[:, None] & col_ok[None, :]
        c = tl.load(cos_ptr + rows[:, None] * stride_cos + cols[None, :], mask=mask, other=0.0)
        s = tl.load(sin_ptr + rows[:, None] * stride_sin + cols[None, :], mask=mask, other=0.0)
        x = x * c + (xp * sign[None, :]) * s
    return x


@triton.jit
def _gqa_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh, stride_cos, stride_sin, stride_qw, stride_kw,
    HQ, GROUP, T_Q, T_K, window, norm_split, eps, qk_scale,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    Q_SPLIT: tl.constexpr, K_SPLIT: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    WINDOWED: tl.constexpr, PRECISION: tl.constexpr, RETURN_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Query tile pid_m of q head h (program 1 = b * HQ + h) against kv head h // GROUP: the q tile loaded,
    normalised and rotated once; each k tile the same as it is loaded; the online softmax over the key blocks
    that meet the band only (all of them without a window), the band's edge masked in the blocks it cuts.
    Q_SPLIT / K_SPLIT: (2, Dh) norm weights, rows before norm_split on weight row 0, the rest on row 1.
    RETURN_LSE: each row's natural-log log-sum-exp to lse_ptr (fp32; not read otherwise). T_K >= 1: the launcher
    runs no kernel for zero keys."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # batch and head offsets can pass 2**31 elements
    b, h = bh // HQ, bh % HQ
    hk = h // GROUP
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    o_base = o_ptr + b * stride_ob + h * stride_oh
    in_ty = q_ptr.dtype.element_ty

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T_Q
    offs_n = tl.arange(0, BLOCK_N)
    d1 = tl.arange(0, D1)
    d1_ok = d1 < HEAD_DIM  # all true unless the head dim is padded to D1
    q1 = _load_rows(q_base, rows, row_ok, stride_qt, d1, d1_ok)  # (BLOCK_M, D1) fp32
    ss = tl.sum(q1 * q1, axis=1)
    if D2 > 0:  # the head dim's tail, e.g. 8 of 72 in a 16-wide block
        d2 = D1 + tl.arange(0, D2)
        d2_ok = d2 < HEAD_DIM
        q2 = _load_rows(q_base, rows, row_ok, stride_qt, d2, d2_ok)
        ss += tl.sum(q2 * q2, axis=1)
        acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    rstd = 1.0 / tl.sqrt(ss / HEAD_DIM + eps)  # used only with Q_NORM
    q1 = _prologue(q1, q_base, rows, row_ok, stride_qt, d1, rstd, qw_ptr, stride_qw, norm_split, cos_ptr, sin_ptr,
                   stride_cos, stride_sin, HEAD_DIM, Q_NORM, Q_SPLIT, ROPE, INTERLEAVED).to(in_ty)
    if D2 > 0:
        q2 = _prologue(q2, q_base, rows, row_ok, stride_qt, d2, rstd, qw_ptr, stride_qw, norm_split, cos_ptr,
                       sin_ptr, stride_cos, stride_sin, HEAD_DIM, Q_NORM, Q_SPLIT, ROPE, INTERLEAVED).to(in_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)

    # The keys this tile's rows see: [first row - window, last row + window], from the block holding the first.
    lo = 0
    hi = T_K
    if WINDOWED:
        lo = tl.maximum(pid_m * BLOCK_M - window, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M + window, T_K)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < T_K
        k1 = _load_rows(k_base, cols, col_ok, stride_kt, d1, d1_ok)  # (BLOCK_N, D1) fp32
        kss = tl.sum(k1 * k1, axis=1)
        if D2 > 0:
            k2 = _load_rows(k_base, cols, col_ok, stride_kt, d2, d2_ok)
            kss += tl.sum(k2 * k2, axis=1)
        k_rstd = 1.0 / tl.sqrt(kss / HEAD_DIM + eps)  # used only with K_NORM
        k1 = _prologue(k1, k_base, cols, col_ok, stride_kt, d1, k_rstd, kw_ptr, stride_kw, norm_split, cos_ptr,
                       sin_ptr, stride_cos, stride_sin, HEAD_DIM, K_NORM, K_SPLIT, ROPE, INTERLEAVED).to(in_ty)
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if D2 > 0:
            k2 = _prologue(k2, k_base, cols, col_ok, stride_kt, d2, k_rstd, kw_ptr, stride_kw, norm_split, cos_ptr,
                           sin_ptr, stride_cos, stride_sin, HEAD_DIM, K_NORM, K_SPLIT, ROPE, INTERLEAVED).to(in_ty)
            s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        keep = col_ok[None, :]
        if WINDOWED:
            dist = rows[:, None] - cols[None, :]
            keep = keep & (dist <= window) & (dist >= -window)
        s = tl.where(keep, s * qk_scale, float("-inf"))  # log2 domain: exp2 below
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if WINDOWED:  # a row may have no key yet (a block the band only grazes): no exp2(-inf - -inf)
            m_new = tl.where(m_new == float("-inf"), -1e30, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v1 = tl.load(v_base + cols[:, None] * stride_vt + d1[None, :], mask=col_ok[:, None] & d1_ok[None, :],
                     other=0.0)
        acc1 = acc1 * alpha[:, None] + tl.dot(p.to(in_ty), v1, input_precision=PRECISION)
        if D2 > 0:
            v2 = tl.load(v_base + cols[:, None] * stride_vt + d2[None, :], mask=col_ok[:, None] & d2_ok[None, :],
                         other=0.0)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(in_ty), v2, input_precision=PRECISION)
        m_i = m_new

    if WINDOWED:  # query rows past T may see no key at all: nothing is stored for them, nothing divides by 0
        l_i = tl.where(row_ok, l_i, 1.0)
    inv_l = 1.0 / l_i
    store_rows(o_base, rows, row_ok, stride_ot, d1, d1_ok, acc1, inv_l)
    if D2 > 0:
        store_rows(o_base, rows, row_ok, stride_ot, d2, d2_ok, acc2, inv_l)
    if RETURN_LSE:
        # m_i and l_i are the softmax of s * qk_scale = s * scale * log2(e), base 2: log2(sum_j 2^(.)) back to
        # the natural log of sum_j e^(s * scale). Every stored row saw a key (T_K >= 1; in a band, its own at
        # least): m_i is finite.
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln 2
        tl.store(lse_ptr + b * stride_lb + h * stride_lh + rows * stride_lt, lse, mask=row_ok)


_gqa_attention_fwd_autotuned = (
    triton.autotune(_autotune_configs(), key=["T_Q", "T_K", "HEAD_DIM", "D1", "D2", "Q_NORM", "K_NORM", "Q_SPLIT",
                                              "K_SPLIT", "ROPE", "WINDOWED", "PRECISION", "RETURN_LSE"])(
        _gqa_attention_fwd_kernel)
    if hasattr(triton, "autotune") else None
)


def _windowed(window: int | None, T: int) -> bool:
    """Whether a window hides any key: |i - j| <= T - 1 always holds."""
    return window is not None and window < T - 1


def _launch(q, k, v, out, q_norm, k_norm, eps, cos, sin, rope_interleaved, window, scale, norm_split=None,
            config=None, lse=None):
    """q (B, T, Hq, Dh), k, v (B, S, Hkv, Dh) with any strides (last dim contiguous), out (B, T, Hq, Dh); norm
    weights (Dh,) or (2, Dh) split at `norm_split`; `config` (see `attention.check_config`) launches that one
    config instead of the autotuned or pinned one; `lse` None or (B, T, Hq) fp32, filled too. S = 0 (with `lse`
    only) launches nothing: out 0, lse -inf."""
    if k.shape[1] == 0:
        out.zero_()
        lse.fill_(-math.inf)
        return
    B, T_Q, HQ, Dh = q.shape
    T_K, HKV = k.shape[1], k.shape[2]
    d1, d2 = head_blocks(Dh)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16 / bf16 dots
    windowed = _windowed(window, T_Q)
    q_split, k_split = (w is not None and w.dim() == 2 for w in (q_norm, k_norm))
    # Unused pointers (an absent norm weight or RoPE table) are never read: their constexpr flag is off.
    args = (q, k, v, out, out if lse is None else lse, q if q_norm is None else q_norm,
            q if k_norm is None else k_norm, q if cos is None else cos, q if sin is None else sin,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            *((0, 0, 0) if lse is None else (lse.stride(0), lse.stride(1), lse.stride(2))),
            0 if cos is None else cos.stride(0), 0 if sin is None else sin.stride(0),
            q_norm.stride(0) if q_split else 0, k_norm.stride(0) if k_split else 0,
            HQ, HQ // HKV, T_Q, T_K, window if windowed else 0, norm_split if q_split or k_split else 0, eps,
            scale * math.log2(math.e))
    meta = dict(HEAD_DIM=Dh, D1=d1, D2=d2, Q_NORM=q_norm is not None, K_NORM=k_norm is not None, Q_SPLIT=q_split,
                K_SPLIT=k_split,
                ROPE=cos is not None, INTERLEAVED=bool(rope_interleaved), WINDOWED=windowed, PRECISION=precision,
                RETURN_LSE=lse is not None)
    launch_tiles(_gqa_attention_fwd_kernel, _gqa_attention_fwd_autotuned, q, T_Q, B * HQ, args, meta, config)


# -- torch.library registration --------------------------------------------------------------------------
@torch.library.custom_op("ditengine::gqa_attention", mutates_args=())
def _gqa_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: torch.Tensor | None,
                      k_norm: torch.Tensor | None, eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
                      rope_interleaved: bool, window: int | None, scale: float,
                      norm_split: int | None = None) -> torch.Tensor:
    """Arguments as `gqa_attention` gives them (rope as cos, sin), checked again by its `_check_args` (the C++
    kernel checks the same on the CPU); returns (B, T, Hq, Dh)."""
    _check_args(q, k, v, q_norm, k_norm, eps, _rope(cos, sin), window, scale, norm_split)
    if use_triton("gqa_attention", q):
        out = q.new_empty(q.shape)
        _launch(q, k, v, out, q_norm, k_norm, eps, cos, sin, rope_interleaved, window, scale, norm_split)
        return out
    return gqa_attention_ref(q, k, v, q_norm=q_norm, k_norm=k_norm, eps=eps, rope=None if cos is None else (cos, sin),
                             rope_interleaved=rope_interleaved, window=window, scale=scale, norm_split=norm_split)


@_gqa_attention_op.register_fake
def _(q, k, v, q_norm, k_norm, eps, cos, sin, rope_interleaved, window, scale, norm_split=None):
    # Also what a meta tensor among CPU ones dispatches to: the device check refuses it here.
    _check_args(q, k, v, q_norm, k_norm, eps, _rope(cos, sin), window, scale, norm_split)
    return q.new_empty(q.shape)


@torch.library.custom_op("ditengine::gqa_attention_lse", mutates_args=())
def _gqa_attention_lse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: torch.Tensor | None,
                          k_norm: torch.Tensor | None, eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
                          rope_interleaved: bool, window: int | None, scale: float,
                          norm_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ditengine::gqa_attention` with each query row's log-sum-exp as a second output: (out (B, T, Hq, Dh),
    lse (B, T, Hq) fp32). k and v may have no key (S = 0): out 0, lse -inf. A second op rather than a flag on the
    first: an op's outputs are fixed by its schema, and the first op's stays as it is."""
    _check_args(q, k, v, q_norm, k_norm, eps, _rope(cos, sin), window, scale, norm_split, return_lse=True)
    if use_triton("gqa_attention_lse", q):
        out, lse = _empty_outputs(q)
        _launch(q, k, v, out, q_norm, k_norm, eps, cos, sin, rope_interleaved, window, scale, norm_split, lse=lse)
        return out, lse
    return gqa_attention_ref(q, k, v, q_norm=q_norm, k_norm=k_norm, eps=eps, rope=None if cos is None else (cos, sin),
                             rope_interleaved=rope_interleaved, window=window, scale=scale, norm_split=norm_split,
                             return_lse=True)


@_gqa_attention_lse_op.register_fake
def _(q, k, v, q_norm, k_norm, eps, cos, sin, rope_interleaved, window, scale, norm_split=None):
    _check_args(q, k, v, q_norm, k_norm, eps, _rope(cos, sin), window, scale, norm_split, return_lse=True)
    return _empty_outputs(q)


def _empty_outputs(q):
    """out (B, T, Hq, Dh) in q's dtype and lse (B, T, Hq) fp32, both contiguous, uninitialised."""
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _rope(cos, sin):
    """The op's cos and sin as `gqa_attention`'s rope: one of them None is a pair with a None in it, refused."""
    return None if cos is None and sin is None else (cos, sin)


# -- public API ------------------------------------------------------------------------------------------
def _check_args(q, k, v, q_norm, k_norm, eps, rope, window, scale, norm_split, return_lse=False):
    check_tensor("q", q, ndim=4, layout="(B, T, Hq, Dh)")
    B, T, HQ, Dh = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device, layout="(B, S, Hkv, Dh)")
    if k.shape[0] != B or k.shape[3] != Dh:
        raise ValueError(f"k: batch and head dim must match q {tuple(q.shape)}, got {tuple(k.shape)}")
    check_tensor("v", v, shape=tuple(k.shape), dtypes=(q.dtype,), device=q.device, layout="(B, S, Hkv, Dh) like k")
    S, HKV = k.shape[1], k.shape[2]
    if HKV == 0 or HQ % HKV:
        raise ValueError(f"k: q's {HQ} heads must be a multiple of k's {HKV} heads (GQA: q head h reads kv head "
                         f"h // (Hq // Hkv))")
    check_head_dim(Dh, " (gqa_attention_ref takes any)")
    if T == 0 or (S == 0 and not return_lse):
        hint = " (an empty key shard is taken with return_lse=True)" if T else ""
        raise ValueError(f"gqa_attention: sequence lengths must be at least 1, got q {T}, k {S}{hint}")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None:
            check_tensor(name, w, dtypes=FLOAT_DTYPES, device=q.device)
            if w.shape not in ((Dh,), (2, Dh)):
                raise ValueError(f"{name}: expected shape ({Dh}) (Dh,): the RMSNorm weight, got {tuple(w.shape)} "
                                 f"(per-stream weights: (2, {Dh}) (2, Dh))")
    split_q, split_k = (w is not None and w.dim() == 2 for w in (q_norm, k_norm))
    if norm_split is None:
        if split_q or split_k:
            raise ValueError(f"norm_split: (2, Dh) {'q_norm' if split_q else 'k_norm'} weights need norm_split, the "
                             f"first row of the second stream")
    else:
        if not (split_q or split_k):
            raise ValueError("norm_split: only for (2, Dh) per-stream q_norm / k_norm weights; with (Dh,) weights "
                             "or none, pass norm_split=None")
        if isinstance(norm_split, bool) or not isinstance(norm_split, int) or not 0 < norm_split < T:
            raise ValueError(f"norm_split: expected an int with 0 < norm_split < T = {T} (both streams non-empty), "
                             f"got {norm_split!r}")
        if split_k and S != T:
            raise ValueError(f"k_norm: (2, Dh) weights split k's rows at norm_split as q's and need S = T, got S={S}, "
                             f"T={T}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    cos = sin = None
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise TypeError(f"rope: expected a (cos, sin) pair of (T, Dh) float32 tensors, got {type(rope).__name__}")
        cos, sin = rope
        for name, t in (("rope cos", cos), ("rope sin", sin)):
            check_tensor(name, t, shape=(T, Dh), dtypes=(torch.float32,), device=q.device,
                         layout="(T, Dh): one row per query position")
        if S != T:
            raise ValueError(f"rope: RoPE is for self-attention and needs k's length S = q's length T, got S={S}, "
                             f"T={T}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window: expected None or an int >= 0 (keys with |i - j| <= window), got {window!r}")
        if S != T:
            raise ValueError(f"window: a sliding window is for self-attention and needs S = T, got S={S}, T={T}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0
                              or scale == math.inf):
        raise ValueError(f"scale: expected a finite softmax scale > 0, got {scale!r}")
    return cos, sin


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_norm: torch.Tensor | None = None,
                  k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                  rope: tuple[torch.Tensor, torch.Tensor] | None = None, rope_interleaved: bool = False,
                  window: int | None = None, scale: float | None = None, norm_split: int | None = None,
                  return_lse: bool = False, backend: str | None = None,
                  config: dict | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, T, Hq, Dh) to k, v (B, S, Hkv, Dh) -> (B, T, Hq, Dh), contiguous, in q's dtype.

    `q_norm`, `k_norm`: None or the (Dh,) RMSNorm weight (any float dtype, read as fp32) applied to q / k
    with `eps`, before RoPE; or (2, Dh), one weight per stream of a joint sequence: rows i < `norm_split` use
    weight 0, the others weight 1. `norm_split`: required with a (2, Dh) weight, refused without one,
    0 < norm_split < T; a (2, Dh) `k_norm` splits k's rows at the same index and needs S == T.
    `rope`: None or (cos, sin), each (T, Dh) float32 (last dim contiguous), needs S == T; `rope_interleaved`
    picks the pairing (rotate-half when False). `window`: None or an int >= 0, the band |i - j| <= window;
    needs S == T. `scale`: the softmax scale (> 0), default Dh ** -0.5.
    `backend`: None / "auto" lets the dispatcher choose (C++ on CPU where built, Triton on CUDA); "native",
    "triton" (on CPU: the interpreter) or "reference" (`gqa_attention_ref`) force one.
    `config`: with backend="triton" only, one launch config (as `attention`'s: BLOCK_M, BLOCK_N, num_warps,
    num_stages) instead of the autotuned or pinned one: for tests and benchmarks.
    `return_lse`: True returns (out, lse), lse (B, T, Hq) float32 contiguous, the natural-log log-sum-exp of
    each query row's scaled scores over the keys it sees; k and v may then hold no key (S = 0): out 0, lse -inf.
    The default path then calls the registered op `ditengine::gqa_attention_lse`. `merge_attention` combines
    such partial results over disjoint key sets.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    cos, sin = _check_args(q, k, v, q_norm, k_norm, eps, rope, window, scale, norm_split, return_lse)
    eps = float(eps)
    how, scale = prelude("gqa_attention_lse" if return_lse else "gqa_attention", q.device, backend, q.shape[-1],
                         scale, config)
    if how.startswith("reference"):
        return gqa_attention_ref(q, k, v, q_norm=q_norm, k_norm=k_norm, eps=eps, rope=rope,
                                 rope_interleaved=rope_interleaved, window=window, scale=scale, norm_split=norm_split,
                                 return_lse=return_lse)
    # The interpreter: the dispatcher's CPU slot may belong to the native kernel. A config: the op has none.
    if how == "triton-interpreter" or config is not None:
        out, lse = _empty_outputs(q) if return_lse else (q.new_empty(q.shape), None)
        _launch(q, k, v, out, q_norm, k_norm, eps, cos, sin, rope_interleaved, window, scale, norm_split, config, lse)
        return (out, lse) if return_lse else out
    op = _gqa_attention_lse_op if return_lse else _gqa_attention_op
    return op(q, k, v, q_norm, k_norm, eps, cos, sin, bool(rope_interleaved), window, scale, norm_split)


MERGE_OUT_DTYPES = (*FLOAT_DTYPES, torch.float64)  # partial outputs: a kernel's, or a reference's


def _check_merge_args(out, lse, out_b, lse_b):
    check_tensor("out", out, ndim=4, dtypes=MERGE_OUT_DTYPES, last_dim_contiguous=False, layout="(B, T, H, Dh)")
    check_tensor("lse", lse, shape=tuple(out.shape[:3]), dtypes=(torch.float32,), device=out.device,
                 last_dim_contiguous=False, layout="(B, T, H): out's log-sum-exp")
    check_tensor("out_b", out_b, shape=tuple(out.shape), dtypes=MERGE_OUT_DTYPES, device=out.device,
                 last_dim_contiguous=False, layout="(B, T, H, Dh) like out")
    check_tensor("lse_b", lse_b, shape=tuple(out.shape[:3]), dtypes=(torch.float32,), device=out.device,
                 last_dim_contiguous=False, layout="(B, T, H): out_b's log-sum-exp")


def merge_attention(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of two disjoint key sets, from each set's partial attention: `out`, `out_b`
    (B, T, H, Dh), any float dtypes, as `gqa_attention(..., return_lse=True)` gives them, and their log-sum-exps
    `lse`, `lse_b` (B, T, H) float32. Returns (out, lse) of the union, both float32: a ring keeps the merged out
    as its running fp32 accumulator, merges each key block into it and casts once at the end.

        m = max(lse, lse_b),  w = exp(lse - m),  w_b = exp(lse_b - m)
        out = (out * w + out_b * w_b) / (w + w_b),  lse = m + log(w + w_b)

    A side whose lse is -inf (no key: a key shard of padding) contributes nothing, so the result is the other
    side exactly (its weight is exp(0) = 1); both -inf gives out 0 and lse -inf, never NaN. A NaN lse gives NaN.
    Elementwise tensor ops only (no host sync, no branch on values): it runs inside a captured CUDA graph."""
    _check_merge_args(out, lse, out_b, lse_b)
    m = torch.maximum(lse, lse_b)  # (B, T, H)
    # Both sides keyless: any finite shift leaves both weights 0, where -inf - -inf would be NaN.
    m = m.masked_fill(m == -math.inf, 0.0)
    w, w_b = torch.exp(lse - m), torch.exp(lse_b - m)  # (B, T, H); the larger is exactly 1
    total = w + w_b
    # A keyless side's out is never read into the sum, whatever it holds.
    acc = (torch.where((lse == -math.inf)[..., None], 0.0, out.float() * w[..., None])
           + torch.where((lse_b == -math.inf)[..., None], 0.0, out_b.float() * w_b[..., None]))  # (B, T, H, Dh)
    merged = acc / total.masked_fill(total == 0, 1.0)[..., None]
    return merged, m + torch.log(total)
