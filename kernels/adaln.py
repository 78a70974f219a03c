"""adaLN modulation and gated residual + adaLN: the memory-bound half of a DiT block.

    adaln_modulate:        y = norm(x) * weight * (1 + scale) + shift
    gated_residual_adaln:  x_new = x + gate * o ;  y = norm(x_new) * weight * (1 + scale) + shift

norm normalises over the last dim: LayerNorm without affine by default (`rms=False`: x - mean over the
standard deviation), or RMSNorm with `rms=True` (x * rsqrt(mean(x^2) + eps), no mean subtraction). `weight`
is the norm's learned elementwise weight (D,), applied to the normalised x before the modulation; None (the
default) is no weight. DiT runs `adaln_modulate` before attention (shift_msa, scale_msa) and
`gated_residual_adaln` after each branch: after attention it adds the gated attention output and prepares
the MLP input, after the MLP it adds the gated MLP output and prepares the next block's attention input.
ACE-Step 1.5 normalises with a weighted RMSNorm (`rms=True, weight=...`); its un-modulated cross-attention
pre-norm is `gated_residual_adaln` with a unit gate and zero shift and scale rows. SD3.5's dual-attention
layers modulate one norm twice (`second=(shift2, scale2)`: a second output y2 from the same row statistics,
for the layer's second attention).
Eager PyTorch spends 5-7 passes over the activations on this; each kernel makes one read of each input
and one write of each output.

Shapes: x, o (B, T, D); shift, scale, gate (B, D) with any row stride, so `.chunk(6, dim=1)` columns of the
adaLN output or rows of a precomputed (steps, B, depth, 6, D) table are read without copies; weight (D,) of
any of the float dtypes. The last dim of every tensor must be contiguous. dtypes fp32 / fp16 / bf16 in and
out; statistics and arithmetic in fp32. `x` in `gated_residual_adaln` is the residual stream and keeps its
own dtype: pass it in fp32 with a bf16 `o` to hold the residual in fp32 (fp16 residual streams overflow in
DiT-like models) while `y` is bf16.
Limits: D <= 16384 (one row per program of the Triton kernel): the public functions refuse a wider x on every
backend; a direct op call refuses it where the Triton kernel runs, and takes it where the C++ kernel or the
reference runs (neither has a limit). NaN or Inf in a row touches that row and no other: with LayerNorm the row
is NaN; with RMSNorm a NaN makes the row NaN, and an Inf gives NaN in its element and `shift` in the row's
finite ones (x * rsqrt(inf) = 0), as an eager RMSNorm does.

On CPU the ops run the C++ kernels of csrc/adaln.cpp when the native extension is built (registered for
the CPU dispatch key of the ops defined below); this file's Triton kernel then runs on CUDA, and on CPU
through the interpreter only when asked for (`backend="triton"`).

Bad arguments: one check (`_check_inputs`: shapes, dtypes, devices, contiguous last dims, eps, rms, weight,
out_dtype; metadata only, no host sync) runs in the public functions and again in the ops' Python body, which a
direct op call reaches on CUDA and on CPU without the extension; csrc/adaln.cpp checks the same. Each path raises
the same exception type (ValueError for a value or shape, TypeError for a dtype) with a message naming the
argument.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ._backend import route, tl, triton, use_triton
from ._checks import FLOAT_DTYPES, check_tensor

MAX_D = 16384


# -- references ------------------------------------------------------------------------------------------
def _norm_ref(x, eps: float, rms: bool):
    """LayerNorm without affine, or RMSNorm as diffusers' `RMSNorm` computes it: the mean of squares in fp32
    whatever x's dtype, the normalised row rounded back to x's dtype."""
    if rms:
        return (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def adaln_modulate_ref(x, shift, scale, eps: float = 1e-6, out_dtype=None, upcast: bool = True, *,
                       rms: bool = False, weight=None, second=None):
    """The plain-PyTorch `adaln_modulate`; math in fp32 when `upcast`, else in x's dtype (the low-precision reference).
    `rms` picks RMSNorm over LayerNorm; `weight` (D,) or None multiplies the normalised x. `second` (shift2,
    scale2) also returns the same normalised x under that modulation: (y, y2)."""
    out_dtype = out_dtype or x.dtype
    compute = torch.float32 if upcast else x.dtype
    h = _norm_ref(x.to(compute), eps, rms)
    if weight is not None:
        h = h * weight.to(compute)
    outs = tuple((h * (1 + sc.to(compute)[:, None]) + sh.to(compute)[:, None]).to(out_dtype)  # (B, T, D)
                 for sh, sc in ((shift, scale),) + ((tuple(second),) if second is not None else ()))
    return outs if second is not None else outs[0]


def gated_residual_adaln_ref(x, gate, o, shift, scale, eps: float = 1e-6, out_dtype=None, upcast: bool = True, *,
                             rms: bool = False, weight=None, second=None):
    """The plain-PyTorch `gated_residual_adaln`: returns (x_new, y), or (x_new, y, y2) with `second`. x_new keeps
    x's dtype; y defaults to o's dtype."""
    out_dtype = out_dtype or o.dtype
    if upcast:
        x_new = (x.float() + gate.float()[:, None] * o.float()).to(x.dtype)
    else:
        x_new = x + gate.to(x.dtype)[:, None] * o.to(x.dtype)
    y = adaln_modulate_ref(x_new, shift, scale, eps, out_dtype, upcast, rms=rms, weight=weight, second=second)
    return (x_new, *y) if second is not None else (x_new, y)


# -- kernels ---------------------------------------------------------------------------------------------
@triton.jit
def _norm_row(x, weight_ptr, cols, mask, D, eps, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """LayerNorm or RMSNorm of one fp32 row (masked lanes are 0 on entry), times the weight."""
    if RMS:
        xc = x  # no mean: the masked lanes stay 0 and add nothing to the sum of squares
    else:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    h = xc * rstd
    if HAS_WEIGHT:
        h = h * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _modulate(h, shift_ptr, scale_ptr, cols, mask):
    shift = tl.load(shift_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return h * (1.0 + scale) + shift


@triton.jit
def _adaln_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, weight_ptr, y_ptr, shift2_ptr, scale2_ptr, y2_ptr,
    T, D,
    stride_xb, stride_xt, stride_shift, stride_scale, stride_yb, stride_yt, stride_shift2, stride_scale2,
    eps,
    BLOCK_D: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SECOND: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # B*T*D can pass 2**31
    b, t = row // T, row % T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b * stride_xb + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    h = _norm_row(x, weight_ptr, cols, mask, D, eps, RMS, HAS_WEIGHT)
    y = _modulate(h, shift_ptr + b * stride_shift, scale_ptr + b * stride_scale, cols, mask)
    tl.store(y_ptr + b * stride_yb + t * stride_yt + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    if SECOND:  # y2 (contiguous like y) shares the row's statistics
        y2 = _modulate(h, shift2_ptr + b * stride_shift2, scale2_ptr + b * stride_scale2, cols, mask)
        tl.store(y2_ptr + b * stride_yb + t * stride_yt + cols, y2.to(y2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_adaln_kernel(
    x_ptr, gate_ptr, o_ptr, shift_ptr, scale_ptr, weight_ptr, x_out_ptr, y_ptr, shift2_ptr, scale2_ptr, y2_ptr,
    T, D,
    stride_xb, stride_xt, stride_gate, stride_ob, stride_ot, stride_shift, stride_scale,
    stride_xob, stride_xot, stride_yb, stride_yt, stride_shift2, stride_scale2,
    eps,
    BLOCK_D: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SECOND: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // T, row % T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b * stride_xb + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + b * stride_ob + t * stride_ot + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    x_new = (x + gate * o).to(x_out_ptr.dtype.element_ty)
    tl.store(x_out_ptr + b * stride_xob + t * stride_xot + cols, x_new, mask=mask)
    # Normalise the residual as stored, so y matches an eager norm of x_new bit for bit in fp32.
    h = _norm_row(x_new.to(tl.float32), weight_ptr, cols, mask, D, eps, RMS, HAS_WEIGHT)
    y = _modulate(h, shift_ptr + b * stride_shift, scale_ptr + b * stride_scale, cols, mask)
    tl.store(y_ptr + b * stride_yb + t * stride_yt + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    if SECOND:
        y2 = _modulate(h, shift2_ptr + b * stride_shift2, scale2_ptr + b * stride_scale2, cols, mask)
        tl.store(y2_ptr + b * stride_yb + t * stride_yt + cols, y2.to(y2_ptr.dtype.element_ty), mask=mask)


def _launch_config(D: int, rms: bool, weight) -> dict:
    block = triton.next_power_of_2(D)
    return dict(BLOCK_D=block, num_warps=min(max(block // 256, 1), 8), RMS=rms, HAS_WEIGHT=weight is not None)


# -- launchers -------------------------------------------------------------------------------------------
def _check_eps(eps) -> float:
    """LayerNorm's eps as the kernels take it, checked here for every backend: a NaN turns every row NaN, and
    0 divides a constant row by zero."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a finite number > 0, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    return float(eps)


def _check_modulation(x, names_and_tensors):
    B, _, D = x.shape
    for name, t in names_and_tensors:
        check_tensor(name, t, shape=(B, D), device=x.device, layout="(B, D)")


def _check_norm(x, rms, weight) -> None:
    """`rms` a bool and `weight` None or (D,) on x's device, checked for every backend (the Triton kernel reads
    D weights per row without bounds of its own)."""
    if not isinstance(rms, bool):
        raise TypeError(f"rms: expected a bool, got {type(rms).__name__}")
    if weight is not None:
        check_tensor("weight", weight, shape=(x.shape[-1],), device=x.device, layout="(D,) like x's last dim")


def _check_out_dtype(out_dtype) -> None:
    """y's dtype: one the kernels store (the C++ kernels refuse any other with the same TypeError); None (the
    public functions' default: x's or o's dtype, checked already) passes."""
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        got = str(out_dtype).removeprefix("torch.") if isinstance(out_dtype, torch.dtype) else type(out_dtype).__name__
        raise TypeError(f"out_dtype: expected float32, float16 or bfloat16, got {got}")


def _check_inputs(x, modulation, eps, out_dtype, rms, weight, *, o=None, limit_d: bool = True) -> float:
    """The ops' one check, shared by the public functions and the registered ops' Python body (what runs on CUDA,
    and on CPU without the native extension); csrc/adaln.cpp checks the same in C++, raising the same exception
    types with messages that name the same arguments. Metadata only: no host sync on CUDA.

    x (B, T, D); `modulation` the (name, tensor) pairs of the (B, D) rows; `o` (B, T, D) like x for the gated
    ops; eps, out_dtype, rms, weight. `limit_d`: refuse D > MAX_D, the Triton kernel's limit (one row per
    program). The public functions apply it on every backend; the ops' Python body where the Triton kernel runs
    (the reference and the C++ kernel take any D). Returns eps as a float."""
    check_tensor("x", x, ndim=3, layout="(B, T, D)")
    if limit_d and x.shape[-1] > MAX_D:
        raise ValueError(f"x: hidden size {x.shape[-1]} exceeds the kernel's limit {MAX_D}")
    if o is not None:
        check_tensor("o", o, shape=tuple(x.shape), device=x.device, layout="(B, T, D) like x")
    _check_modulation(x, modulation)
    _check_norm(x, rms, weight)
    _check_out_dtype(out_dtype)
    return _check_eps(eps)


def _second_args(x, y, second):
    """The kernels' (shift2, scale2, y2) pointers and (shift2, scale2) strides; without a second modulation,
    pointers the kernel never reads."""
    if second is None:
        return (x, x, y), (0, 0)
    shift2, scale2 = second
    return (shift2, scale2, torch.empty_like(y)), (shift2.stride(0), scale2.stride(0))


def _launch_adaln_modulate(x, shift, scale, eps, out_dtype, rms, weight, second=None):
    """y, or (y, y2) with `second`."""
    B, T, D = x.shape
    y = torch.empty((B, T, D), device=x.device, dtype=out_dtype)
    pointers, strides = _second_args(x, y, second)
    if y.numel():
        _adaln_modulate_kernel[(B * T,)](
            x, shift, scale, x if weight is None else weight, y, *pointers, T, D,  # x: a pointer never read
            x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), y.stride(0), y.stride(1), *strides,
            eps, SECOND=second is not None, **_launch_config(D, rms, weight))
    return (y, pointers[2]) if second is not None else y


def _launch_gated_residual_adaln(x, gate, o, shift, scale, eps, out_dtype, x_out, rms, weight, second=None):
    """y, or (y, y2) with `second`; x_new goes to x_out."""
    B, T, D = x.shape
    y = torch.empty((B, T, D), device=x.device, dtype=out_dtype)
    pointers, strides = _second_args(x, y, second)
    if y.numel():
        _gated_residual_adaln_kernel[(B * T,)](
            x, gate, o, shift, scale, x if weight is None else weight, x_out, y, *pointers, T, D,
            x.stride(0), x.stride(1), gate.stride(0), o.stride(0), o.stride(1), shift.stride(0), scale.stride(0),
            x_out.stride(0), x_out.stride(1), y.stride(0), y.stride(1), *strides,
            eps, SECOND=second is not None, **_launch_config(D, rms, weight))
    return (y, pointers[2]) if second is not None else y


# -- torch.library registration (composes with torch.compile and CUDA graphs) ---------------------------
def _use_triton_checked(op: str, x, modulation, eps, out_dtype, rms, weight, o=None) -> bool:
    """In an op's Python body: its arguments checked as the public functions check them (an op can be called past
    them), D's limit only where the Triton kernel runs, then whether it runs."""
    triton_runs = use_triton(op, x)
    _check_inputs(x, modulation, eps, out_dtype, rms, weight, o=o, limit_d=triton_runs)
    return triton_runs


# The norm's arguments come last with defaults, so that calls written before they existed keep their meaning.
@torch.library.custom_op("ditengine::adaln_modulate", mutates_args=())
def _adaln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       out_dtype: torch.dtype, rms: bool = False, weight: torch.Tensor | None = None) -> torch.Tensor:
    if _use_triton_checked("adaln_modulate", x, (("shift", shift), ("scale", scale)), eps, out_dtype, rms, weight):
        return _launch_adaln_modulate(x, shift, scale, eps, out_dtype, rms, weight)
    return adaln_modulate_ref(x, shift, scale, eps, out_dtype, rms=rms, weight=weight).contiguous()


@_adaln_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype, rms=False, weight=None):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("ditengine::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_op(x: torch.Tensor, gate: torch.Tensor, o: torch.Tensor, shift: torch.Tensor,
                             scale: torch.Tensor, eps: float, out_dtype: torch.dtype, rms: bool = False,
                             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton_checked("gated_residual_adaln", x, (("gate", gate), ("shift", shift), ("scale", scale)), eps,
                           out_dtype, rms, weight, o):
        x_new = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        return x_new, _launch_gated_residual_adaln(x, gate, o, shift, scale, eps, out_dtype, x_new, rms, weight)
    x_new, y = gated_residual_adaln_ref(x, gate, o, shift, scale, eps, out_dtype, rms=rms, weight=weight)
    return x_new.contiguous(), y.contiguous()


@_gated_residual_adaln_op.register_fake
def _(x, gate, o, shift, scale, eps, out_dtype, rms=False, weight=None):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("ditengine::gated_residual_adaln_", mutates_args=("x",))
def _gated_residual_adaln_inplace_op(x: torch.Tensor, gate: torch.Tensor, o: torch.Tensor, shift: torch.Tensor,
                                     scale: torch.Tensor, eps: float, out_dtype: torch.dtype, rms: bool = False,
                                     weight: torch.Tensor | None = None) -> torch.Tensor:
    if _use_triton_checked("gated_residual_adaln_", x, (("gate", gate), ("shift", shift), ("scale", scale)), eps,
                           out_dtype, rms, weight, o):
        return _launch_gated_residual_adaln(x, gate, o, shift, scale, eps, out_dtype, x, rms, weight)
    x_new, y = gated_residual_adaln_ref(x, gate, o, shift, scale, eps, out_dtype, rms=rms, weight=weight)
    x.copy_(x_new)
    return y.contiguous()


@_gated_residual_adaln_inplace_op.register_fake
def _(x, gate, o, shift, scale, eps, out_dtype, rms=False, weight=None):
    return x.new_empty(x.shape, dtype=out_dtype)


# SD3.5's dual-attention layers modulate one norm of the residual twice (the MLP's input and the second
# attention's); these two ops write both outputs from one pass over each row.
@torch.library.custom_op("ditengine::adaln_modulate_dual", mutates_args=())
def _adaln_modulate_dual_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, shift2: torch.Tensor,
                            scale2: torch.Tensor, eps: float, out_dtype: torch.dtype, rms: bool = False,
                            weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton_checked("adaln_modulate_dual", x, (("shift", shift), ("scale", scale), ("shift2", shift2),
                                                      ("scale2", scale2)), eps, out_dtype, rms, weight):
        return _launch_adaln_modulate(x, shift, scale, eps, out_dtype, rms, weight, (shift2, scale2))
    y, y2 = adaln_modulate_ref(x, shift, scale, eps, out_dtype, rms=rms, weight=weight, second=(shift2, scale2))
    return y.contiguous(), y2.contiguous()


@_adaln_modulate_dual_op.register_fake
def _(x, shift, scale, shift2, scale2, eps, out_dtype, rms=False, weight=None):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("ditengine::gated_residual_adaln_dual_", mutates_args=("x",))
def _gated_residual_adaln_dual_op(x: torch.Tensor, gate: torch.Tensor, o: torch.Tensor, shift: torch.Tensor,
                                  scale: torch.Tensor, shift2: torch.Tensor, scale2: torch.Tensor, eps: float,
                                  out_dtype: torch.dtype, rms: bool = False,
                                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton_checked("gated_residual_adaln_dual_", x, (("gate", gate), ("shift", shift), ("scale", scale),
                                                             ("shift2", shift2), ("scale2", scale2)), eps, out_dtype,
                           rms, weight, o):
        return _launch_gated_residual_adaln(x, gate, o, shift, scale, eps, out_dtype, x, rms, weight, (shift2, scale2))
    x_new, y, y2 = gated_residual_adaln_ref(x, gate, o, shift, scale, eps, out_dtype, rms=rms, weight=weight,
                                            second=(shift2, scale2))
    x.copy_(x_new)
    return y.contiguous(), y2.contiguous()


@_gated_residual_adaln_dual_op.register_fake
def _(x, gate, o, shift, scale, shift2, scale2, eps, out_dtype, rms=False, weight=None):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=out_dtype)


def _check_second(second):
    """`second` None or a (shift2, scale2) pair, returned as the (name, tensor) pairs that `_check_inputs` checks as
    (B, D) rows (() for None)."""
    if second is None:
        return ()
    if not isinstance(second, (tuple, list)) or len(second) != 2:
        raise TypeError(f"second: expected None or a (shift2, scale2) pair of (B, D) tensors, got "
                        f"{type(second).__name__}")
    return (("second[0] (shift2)", second[0]), ("second[1] (scale2)", second[1]))


# -- public API ------------------------------------------------------------------------------------------
# backend: None / "auto" lets the dispatcher choose (C++ on CPU where built, Triton on CUDA); "native",
# "triton" (on CPU: the interpreter) or "reference" force one, and raise a ValueError where it cannot run.
def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                   out_dtype: torch.dtype | None = None, backend: str | None = None, *, rms: bool = False,
                   weight: torch.Tensor | None = None, second: tuple | None = None):
    """y = norm(x) * weight * (1 + scale) + shift; x (B, T, D), shift and scale (B, D). Returns (B, T, D).

    norm: LayerNorm without affine, or RMSNorm with `rms=True`. weight: the norm's learned weight (D,), any
    float dtype, last dim contiguous, on x's device; None for none. eps: a finite number > 0 (a ValueError
    otherwise, on every backend). second: a (shift2, scale2) pair of (B, D) tensors to return also
    y2 = norm(x) * weight * (1 + scale2) + shift2 from the same pass: (y, y2).
    """
    pair = _check_second(second)
    eps = _check_inputs(x, (("shift", shift), ("scale", scale), *pair), eps, out_dtype, rms, weight)
    second = tuple(second) if pair else None
    out_dtype = out_dtype or x.dtype
    how = route("adaln_modulate" if second is None else "adaln_modulate_dual", x.device, backend)
    if how.startswith("reference"):
        y = adaln_modulate_ref(x, shift, scale, eps, out_dtype, rms=rms, weight=weight, second=second)
        return tuple(t.contiguous() for t in y) if second is not None else y.contiguous()
    if how == "triton-interpreter":  # the dispatcher's CPU slot may belong to the native kernel
        return _launch_adaln_modulate(x, shift, scale, eps, out_dtype, rms, weight, second)
    if second is not None:
        return _adaln_modulate_dual_op(x, shift, scale, *second, eps, out_dtype, rms, weight)
    return _adaln_modulate_op(x, shift, scale, eps, out_dtype, rms, weight)


def gated_residual_adaln(x: torch.Tensor, gate: torch.Tensor, o: torch.Tensor, shift: torch.Tensor,
                         scale: torch.Tensor, eps: float = 1e-6, inplace: bool = False,
                         out_dtype: torch.dtype | None = None, backend: str | None = None, *, rms: bool = False,
                         weight: torch.Tensor | None = None, second: tuple | None = None) -> tuple:
    """x_new = x + gate * o and y = norm(x_new) * weight * (1 + scale) + shift, in one pass.

    x, o (B, T, D); gate, shift, scale (B, D). Returns (x_new, y); with `inplace=True` x_new is x itself,
    updated. x_new keeps x's dtype (the residual stream), y has `out_dtype` (default: o's dtype).
    norm: LayerNorm without affine, or RMSNorm with `rms=True`. weight: the norm's learned weight (D,), any
    float dtype, last dim contiguous, on x's device; None for none. A unit gate with zero shift and scale
    rows is the un-modulated pre-norm (x_new = x + o, y = norm(x_new) * weight).
    eps: a finite number > 0 (a ValueError otherwise, on every backend). second: a (shift2, scale2) pair of
    (B, D) tensors to return also y2 = norm(x_new) * weight * (1 + scale2) + shift2 from the same pass:
    (x_new, y, y2). (Its fused op works in place; without `inplace` x is copied first.)
    """
    pair = _check_second(second)
    eps = _check_inputs(x, (("gate", gate), ("shift", shift), ("scale", scale), *pair), eps, out_dtype, rms, weight,
                        o=o)
    second = tuple(second) if pair else None
    out_dtype = out_dtype or o.dtype
    if second is not None:
        how = route("gated_residual_adaln_dual_", x.device, backend)
    else:
        how = route("gated_residual_adaln_" if inplace else "gated_residual_adaln", x.device, backend)
    if how.startswith("reference"):
        x_new, *ys = gated_residual_adaln_ref(x, gate, o, shift, scale, eps, out_dtype, rms=rms, weight=weight,
                                              second=second)
        x_new = x.copy_(x_new) if inplace else x_new.contiguous()
        return (x_new, *(y.contiguous() for y in ys))
    if how == "triton-interpreter":
        x_new = x if inplace else torch.empty(x.shape, device=x.device, dtype=x.dtype)
        ys = _launch_gated_residual_adaln(x, gate, o, shift, scale, eps, out_dtype, x_new, rms, weight, second)
        return (x_new, *ys) if second is not None else (x_new, ys)
    if second is not None:
        x_new = x if inplace else x.clone(memory_format=torch.contiguous_format)
        return (x_new, *_gated_residual_adaln_dual_op(x_new, gate, o, shift, scale, *second, eps, out_dtype, rms,
                                                      weight))
    if inplace:
        return x, _gated_residual_adaln_inplace_op(x, gate, o, shift, scale, eps, out_dtype, rms, weight)
    return _gated_residual_adaln_op(x, gate, o, shift, scale, eps, out_dtype, rms, weight)
