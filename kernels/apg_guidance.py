"""Adaptive projected guidance (APG) as one fused guidance step: momentum, norm clamp, projection, update.

ACE-Step 1.5's base and SFT models guide with APG instead of plain CFG: each guided step the DiT runs on
[cond; uncond] rows and diffusers' `normalized_guidance(pred_cond, pred_uncond, guidance_scale=g - 1,
momentum_buffer=MomentumBuffer(-0.75), eta=0, norm_threshold=2.5, use_original_formulation=True,
norm_dim=(1,))` combines them, every reduction running per (batch row, channel) over time. With the latent
channels-first, (B, C, L), each of those reductions runs over the contiguous last dimension. Per (b, c) row:

    d    = c - u                                    # cond minus uncond prediction
    m    = d + momentum_coef * m_prev               # the momentum running average (stored back)
    d'   = m * min(1, norm_threshold / ||m||)       # only when norm_threshold > 0
    v1   = c / max(||c||, 1e-12)                    # F.normalize's eps
    par  = <d', v1> v1
    out  = c + guidance_scale * ((d' - par) + eta * par)

`guidance_scale` is the factor `normalized_guidance` receives: ACE-Step's pipeline passes `g - 1` for its
user-facing guidance g (the original formulation adds the update to the conditional prediction, so g = 1
is no guidance). The momentum buffer holds the running average *before* the clamp, as diffusers' does; it
must start as zeros (diffusers' MomentumBuffer starts at 0, and 0 * garbage may be NaN) and is only updated
on guided steps, so an unguided step simply does not call this op.

Numerics: d and m are fp32, as in diffusers with an fp32 model output; the three reductions (||m||^2,
||c||^2, <m, c>) and the per-element projection run in float64, like diffusers' projection (its clamp norm
is fp32; float64 there is at least as accurate). There is no host synchronisation: the scalars are Python
floats baked into the launch and every data-dependent value stays on the device, so the op can run inside a
captured CUDA graph. A NaN or Inf stays in its (b, c) row: it makes that row's out NaN (its norms are NaN),
and that row's momentum NaN where the input was.

Shapes: model_out (2B, C, L) fp32/bf16/fp16 contiguous, cond rows first; momentum (B, C, L) fp32
contiguous; out (B, C, L) fp32. On CPU the op runs this reference (no native kernel: the op is tiny); the
Triton kernel below runs on CUDA, and on CPU through the interpreter with `backend="triton"` (or by default
when TRITON_INTERPRET=1).
"""
from __future__ import annotations

import numbers

import torch

from ._backend import route, tl, triton, use_triton
from ._checks import check_tensor

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default eps
MAX_BLOCK = 1024


# -- reference -------------------------------------------------------------------------------------------
def apg_guidance_ref(model_out: torch.Tensor, momentum: torch.Tensor, guidance_scale: float, *,
                     momentum_coef: float = -0.75, norm_threshold: float = 2.5, eta: float = 0.0,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch APG step on (2B, C, L) model output; overwrites `momentum` and returns out (B, C, L) fp32
    (written into `out` when given). Reductions and the projection in float64 (float32 on MPS, which has no
    float64).

    Every term is a per-row multiple of c or m: d' = s m with s = min(1, thr / ||m||), par = k c with
    k = s <m, c> / max(||c||, eps)^2, so out = (1 + g (eta - 1) k) c + g s m. Written that way the step is
    three row reductions and one fused combination instead of a chain of full-size float64 temporaries."""
    B = model_out.shape[0] // 2
    acc = torch.float32 if model_out.device.type == "mps" else torch.float64
    cond, uncond = model_out[:B].float(), model_out[B:].float()  # (B, C, L) each
    # fp32, in diffusers' order (MomentumBuffer.update): the stored state matches it bit for bit.
    m = (cond - uncond) + momentum_coef * momentum  # (B, C, L), the running average before the clamp
    momentum.copy_(m)
    m, c = m.to(acc), cond.to(acc)
    mc = torch.matmul(m.unsqueeze(-2), c.unsqueeze(-1)).squeeze(-1)  # (B, C, 1): <m, c>
    if norm_threshold > 0:
        # min(1, thr / ||m||) written as thr / max(||m||, thr): the same value, no division by a zero norm.
        s = norm_threshold / torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(norm_threshold)
    else:
        s = torch.ones_like(mc)
    c_norm = torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min(NORMALIZE_EPS)  # F.normalize's divisor
    k = s * mc / (c_norm * c_norm)  # (B, C, 1)
    result = torch.addcmul((1 + guidance_scale * (eta - 1) * k) * c, guidance_scale * s, m)  # (B, C, L)
    if out is not None:
        out.copy_(result)
        return out
    return result.float()


# -- kernel ----------------------------------------------------------------------------------------------
@triton.jit
def _cond_and_momentum(c_ptr, u_ptr, m_ptr, offs, mask, momentum_coef):
    # Both passes read the running average through this one expression, so pass 2 recomputes pass 1's m
    # bit for bit (fp32, diffusers' order).
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_prev = tl.load(m_ptr + offs, mask=mask, other=0.0)
    return c, (c - u) + momentum_coef * m_prev


@triton.jit
def _apg_guidance_kernel(
    model_ptr, mom_ptr, out_ptr,
    L, HALF,
    guidance_scale, momentum_coef, norm_threshold, eta,
    CLAMP: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (b, c) row of L elements; the uncond row sits HALF rows (B * C * L elements) later.
    row = tl.program_id(0).to(tl.int64)
    base = row * L
    c_ptr = model_ptr + base
    u_ptr = model_ptr + HALF + base
    offs0 = tl.arange(0, BLOCK)

    # Pass 1: the three reductions, accumulated element-wise in float64 and summed once at the end.
    acc_mm = tl.zeros((BLOCK,), dtype=tl.float64)
    acc_cc = tl.zeros((BLOCK,), dtype=tl.float64)
    acc_mc = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, L, BLOCK):
        offs = start + offs0
        mask = offs < L
        c, m = _cond_and_momentum(c_ptr, u_ptr, mom_ptr + base, offs, mask, momentum_coef)
        m = m.to(tl.float64)
        c64 = c.to(tl.float64)
        acc_mm += m * m
        acc_cc += c64 * c64
        acc_mc += m * c64
    mm = tl.sum(acc_mm, axis=0)
    cc = tl.sum(acc_cc, axis=0)
    mc = tl.sum(acc_mc, axis=0)

    if CLAMP:
        thr = tl.cast(norm_threshold, tl.float64)
        scale = thr / tl.maximum(tl.sqrt(mm), thr)  # min(1, thr / ||m||)
    else:
        scale = 1.0
    c_norm = tl.maximum(tl.sqrt(cc), EPS)
    # par = <d', v1> v1 = k * c with k = scale * <m, c> / max(||c||, eps)^2.
    k = scale * mc / (c_norm * c_norm)
    # out = c + g ((d' - par) + eta par) = (1 + g (eta - 1) k) c + g scale m: two per-row coefficients.
    gs = tl.cast(guidance_scale, tl.float64)
    coef_c = 1.0 + gs * (tl.cast(eta, tl.float64) - 1.0) * k
    coef_m = gs * scale

    # Pass 2: recompute m from the same inputs (bitwise the same), write out and the new momentum.
    for start in range(0, L, BLOCK):
        offs = start + offs0
        mask = offs < L
        c, m = _cond_and_momentum(c_ptr, u_ptr, mom_ptr + base, offs, mask, momentum_coef)
        res = coef_c * c.to(tl.float64) + coef_m * m.to(tl.float64)
        tl.store(out_ptr + base + offs, res.to(tl.float32), mask=mask)
        tl.store(mom_ptr + base + offs, m, mask=mask)


def _launch(model_out, momentum, out, guidance_scale, momentum_coef, norm_threshold, eta):
    B, C, L = momentum.shape
    block = min(MAX_BLOCK, triton.next_power_of_2(L))
    _apg_guidance_kernel[(B * C,)](
        model_out, momentum, out, L, B * C * L,
        float(guidance_scale), float(momentum_coef), float(norm_threshold), float(eta),
        CLAMP=norm_threshold > 0, EPS=NORMALIZE_EPS, BLOCK=block, num_warps=4 if block >= 512 else 2)


# -- torch.library registration --------------------------------------------------------------------------
@torch.library.custom_op("ditengine::apg_guidance", mutates_args=("momentum", "out"))
def _apg_guidance_op(model_out: torch.Tensor, momentum: torch.Tensor, out: torch.Tensor, guidance_scale: float,
                     momentum_coef: float, norm_threshold: float, eta: float) -> None:
    if use_triton("apg_guidance", model_out):
        _launch(model_out, momentum, out, guidance_scale, momentum_coef, norm_threshold, eta)
        return
    apg_guidance_ref(model_out, momentum, guidance_scale, momentum_coef=momentum_coef,
                     norm_threshold=norm_threshold, eta=eta, out=out)


@_apg_guidance_op.register_fake
def _(model_out, momentum, out, guidance_scale, momentum_coef, norm_threshold, eta):
    return None


# -- public API ------------------------------------------------------------------------------------------
def _check_scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a Python float (baked into the launch: no device sync), got "
                        f"{type(value).__name__}")
    return float(value)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory of two contiguous tensors intersects. Not decidable (False) where there is no
    memory: meta tensors, and the fake tensors torch.compile traces with."""
    if a.device.type == "meta" or torch.compiler.is_compiling():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def apg_guidance(model_out: torch.Tensor, momentum: torch.Tensor, guidance_scale: float, *,
                 momentum_coef: float = -0.75, norm_threshold: float = 2.5, eta: float = 0.0,
                 out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """One APG guidance step (see the module docstring); returns out (B, C, L) float32.

    model_out (2B, C, L) float32/bfloat16/float16 contiguous, the B conditional rows first, then the B
    unconditional ones; momentum (B, C, L) float32 contiguous, the running average: read, then overwritten
    with the new one (zeros before the first guided step). out (B, C, L) float32 contiguous, allocated when
    None; it may overlap neither input. guidance_scale: the factor diffusers' `normalized_guidance` takes
    (ACE-Step passes g - 1). norm_threshold <= 0 disables the clamp. Scalars are Python floats.
    backend: None / "auto" lets the dispatcher choose (Triton on CUDA; on CPU the reference, or the
    interpreter when TRITON_INTERPRET=1); "triton" (on CPU: the interpreter) or "reference" force one.
    """
    check_tensor("model_out", model_out, ndim=3, contiguous=True, layout="(2B, C, L)")
    if model_out.shape[0] == 0 or model_out.shape[0] % 2:
        raise ValueError(f"model_out: expected an even, non-zero number of rows (cond rows, then uncond rows) "
                         f"(2B, C, L), got shape {tuple(model_out.shape)}")
    B2, C, L = model_out.shape
    shape = (B2 // 2, C, L)
    dev = model_out.device
    check_tensor("momentum", momentum, shape=shape, dtypes=(torch.float32,), device=dev, contiguous=True,
                 layout="(B, C, L) like model_out's cond half")
    if _overlaps(momentum, model_out):
        raise ValueError("momentum: overlaps model_out in memory; expected its own buffer")
    if out is not None:
        check_tensor("out", out, shape=shape, dtypes=(torch.float32,), device=dev, contiguous=True,
                     layout="(B, C, L) like momentum")
        for other, t in (("model_out", model_out), ("momentum", momentum)):
            if _overlaps(out, t):
                raise ValueError(f"out: overlaps {other} in memory; expected its own buffer")
    scalars = tuple(_check_scalar(n, v) for n, v in (("guidance_scale", guidance_scale),
                                                     ("momentum_coef", momentum_coef),
                                                     ("norm_threshold", norm_threshold), ("eta", eta)))
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out
    how = route("apg_guidance", dev, backend)
    if how.startswith("reference"):
        gs, coef, thr, eta_ = scalars
        apg_guidance_ref(model_out, momentum, gs, momentum_coef=coef, norm_threshold=thr, eta=eta_, out=out)
    elif how == "triton-interpreter":
        _launch(model_out, momentum, out, *scalars)
    else:
        _apg_guidance_op(model_out, momentum, out, *scalars)
    return out
