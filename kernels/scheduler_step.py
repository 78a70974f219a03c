"""The scheduler update: guidance, x0, the update and the next model input, in one pass.

Every scheduler of `ditengine.schedulers` is one computation with per-step scalars from row `step` of
its device table (see that module for the columns):

    m      = u + cfg_scale * (c - u)                     # on the first `guided_channels` channels; c elsewhere
    x0     = clamp(p*x + q*m, -clip, clip)               # clamp only with `clip=True`
    x_next = r*x0 + s*x + w*m + h*hist + h2*hist2 + u*z  # u scaled element-wise by the learned variance if asked
    hist2  = hist                                        # when a second history buffer is given (UniPC)
    hist   = x0                                          # when a history buffer is given (DPM-Solver++, UniPC)
    next_input = x_next * c_in_next, written twice (both CFG halves) when guided

`model_out` is read in the layout the DiT produces: (B or 2B, C or 2C, H, W), the conditional half first,
prediction channels then learned-variance channels. The step index may be a device tensor, so one
captured CUDA graph serves every step. One read of x, the model output, histories and noise; one write of
x_next, histories and the next input. fp32 state; the model output and next input may be bf16/fp16.
The history buffers must be initialised (zeros) before the first step: their coefficients are 0 until they
hold an x0, and 0 * garbage may be NaN.

On CPU the op runs the C++ kernel of csrc/scheduler_step.cpp when the native extension is built; the
Triton kernel below then runs on CUDA, and on CPU through the interpreter only with `backend="triton"`.
"""
from __future__ import annotations

import numbers

import torch

from ..schedulers import COL, COLUMNS

NUM_COLUMNS = len(COLUMNS)
# The kernel reads a row by fixed offsets in this order.
if COLUMNS != ("p", "q", "clip", "r", "s", "w", "h", "u", "logvar_min", "logvar_max", "c_in", "c_in_next", "h2"):
    raise ImportError("scheduler table columns changed: update _scheduler_step_kernel's row offsets")
from ._backend import route, tl, triton, use_triton  # noqa: E402
from ._checks import FLOAT_DTYPES, check_tensor  # noqa: E402

BLOCK = 1024


# -- reference -------------------------------------------------------------------------------------------
def scheduler_step_ref(x, model_out, table, step, *, cfg_scale: float | None = None, guided_channels=None,
                       history=None, noise=None, clip: bool = False, learned_variance: bool = False,
                       out=None, next_input=None, history2=None):
    """The plain-PyTorch step in fp32; writes `out`, `history`, `history2` and `next_input` like the kernel and returns
    x_next."""
    B, C = x.shape[:2]
    k = C if guided_channels is None else guided_channels
    coef = table[step].reshape(-1).float()  # (NUM_COLUMNS,), indexed on the device: no host sync
    m_all = model_out.float()
    m = m_all[:B, :C]
    if cfg_scale is not None:
        uncond = m_all[B:, :C]
        guided = uncond[:, :k] + cfg_scale * (m[:, :k] - uncond[:, :k])
        m = torch.cat([guided, m[:, k:]], dim=1)
    xf = x.float()
    x0 = coef[COL["p"]] * xf + coef[COL["q"]] * m
    if clip:
        x0 = x0.clamp(-coef[COL["clip"]], coef[COL["clip"]])
    x_next = coef[COL["r"]] * x0 + coef[COL["s"]] * xf + coef[COL["w"]] * m
    if history is not None:
        x_next = x_next + coef[COL["h"]] * history.float()
        if history2 is not None:
            x_next = x_next + coef[COL["h2"]] * history2.float()
            history2.copy_(history)
        history.copy_(x0)
    if noise is not None:
        u = coef[COL["u"]]
        if learned_variance:
            frac = (m_all[:B, C:] + 1) / 2
            lmin, lmax = coef[COL["logvar_min"]], coef[COL["logvar_max"]]
            u = u * torch.exp(0.5 * (lmin + frac * (lmax - lmin)))
        x_next = x_next + u * noise.float()
    if next_input is not None:
        scaled = (x_next * coef[COL["c_in_next"]]).to(next_input.dtype)
        next_input.copy_(scaled.repeat(next_input.shape[0] // B, 1, 1, 1))
    if out is not None:
        out.copy_(x_next)
        return out
    return x_next.to(x.dtype)


# -- kernel ----------------------------------------------------------------------------------------------
@triton.jit
def _scheduler_step_kernel(
    x_ptr, out_ptr, coef_ptr, step_ptr, hist_ptr, hist2_ptr, noise_ptr, x_next_ptr, next_in_ptr,
    N, HW, C, MODEL_C, HALF, k, cfg_scale, step_const,
    HAS_CFG: tl.constexpr, HAS_HISTORY: tl.constexpr, HAS_HISTORY2: tl.constexpr, HAS_NOISE: tl.constexpr,
    CLIP: tl.constexpr,
    LEARNED: tl.constexpr, WRITE_NEXT: tl.constexpr, NEXT_TWICE: tl.constexpr, STEP_FROM_PTR: tl.constexpr,
    NCOL: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if STEP_FROM_PTR:
        step = tl.load(step_ptr).to(tl.int64)
    else:
        step = step_const
    row = coef_ptr + step * NCOL
    p, q, clip = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    r, s, w, h, u = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7)

    b = offs // (C * HW)
    c = (offs // HW) % C
    cond_off = b * MODEL_C * HW + c * HW + offs % HW  # the conditional half, prediction channels
    m = tl.load(out_ptr + cond_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        unc = tl.load(out_ptr + cond_off + HALF * MODEL_C * HW, mask=mask, other=0.0).to(tl.float32)
        m = tl.where(c < k, unc + cfg_scale * (m - unc), m)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = p * x + q * m
    if CLIP:
        x0 = tl.clamp(x0, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    x_next = r * x0 + s * x + w * m
    if HAS_HISTORY:
        hist = tl.load(hist_ptr + offs, mask=mask, other=0.0)
        x_next += h * hist
        if HAS_HISTORY2:
            x_next += tl.load(row + 12) * tl.load(hist2_ptr + offs, mask=mask, other=0.0)
            tl.store(hist2_ptr + offs, hist, mask=mask)
        tl.store(hist_ptr + offs, x0, mask=mask)
    if HAS_NOISE:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if LEARNED:
            v = tl.load(out_ptr + cond_off + C * HW, mask=mask, other=0.0).to(tl.float32)
            lmin, lmax = tl.load(row + 8), tl.load(row + 9)
            x_next += u * tl.exp(0.5 * (lmin + (v + 1.0) * 0.5 * (lmax - lmin))) * z
        else:
            x_next += u * z
    tl.store(x_next_ptr + offs, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)
    if WRITE_NEXT:
        scaled = (x_next * tl.load(row + 11)).to(next_in_ptr.dtype.element_ty)
        tl.store(next_in_ptr + offs, scaled, mask=mask)
        if NEXT_TWICE:
            tl.store(next_in_ptr + N + offs, scaled, mask=mask)


def _launch(x, model_out, table, step_tensor, step_int, out, history, history2, noise, next_input, cfg_scale, k,
            clip, learned):
    B, C = x.shape[:2]
    N = x.numel()
    dummy = out  # never read: the matching constexpr flag is off
    _scheduler_step_kernel[(triton.cdiv(N, BLOCK),)](
        x, model_out, table, step_tensor if step_tensor is not None else table,
        history if history is not None else dummy, history2 if history2 is not None else dummy,
        noise if noise is not None else dummy, out, next_input if next_input is not None else dummy,
        N, x[0, 0].numel(), C, model_out.shape[1], B, k, 1.0 if cfg_scale is None else cfg_scale, step_int,
        HAS_CFG=cfg_scale is not None and model_out.shape[0] == 2 * B, HAS_HISTORY=history is not None,
        HAS_HISTORY2=history2 is not None, HAS_NOISE=noise is not None, CLIP=clip, LEARNED=learned,
        WRITE_NEXT=next_input is not None, NEXT_TWICE=next_input is not None and next_input.shape[0] == 2 * B,
        STEP_FROM_PTR=step_tensor is not None, NCOL=NUM_COLUMNS, BLOCK=BLOCK, num_warps=4)


OP = "ditengine::scheduler_step"
STEP_DTYPES = (torch.int32, torch.int64)


def _check_step(step, steps: int) -> int:
    """An int step, checked against the table: the kernels read row `step` without a bound."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{OP}: step: expected an int or a one-element integer tensor, got {type(step).__name__}")
    if not 0 <= step < steps:
        raise IndexError(f"{OP}: step={step} out of range for a table of {steps} steps")
    return int(step)


def _check_args(x, model_out, table, step_tensor, step_int, out, history, noise, next_input, has_cfg: bool,
                guided_channels: int, learned: bool, history2=None, *, step_name: str = "step_tensor",
                learned_name: str = "learned") -> None:
    """The op's arguments, checked as its C++ kernel (csrc/scheduler_step.cpp) checks them: the same order,
    exception types and messages, except that a tensor must be on x's device rather than the CPU. The op's
    Python body and fake and the public function (with its argument names `step`, `learned_variance`, and `out`
    None until it allocates one) all call this. Shapes, dtypes and devices only: a tensor step is not read (that
    would be a device sync; the C++ kernel reads a CPU one and raises an IndexError out of range)."""
    check_tensor("x", x, ndim=4, contiguous=True, layout="(B, C, H, W)", op=OP)
    B, C, H, W = x.shape
    dev = x.device
    if not isinstance(model_out, torch.Tensor):
        check_tensor("model_out", model_out, op=OP)  # raises the TypeError
    # Without CFG the op takes B or 2B rows (reading the first B); the public function wants B.
    if (model_out.dim() != 4 or not (model_out.shape[0] == 2 * B or (not has_cfg and model_out.shape[0] == B))
            or model_out.shape[1] not in (C, 2 * C) or model_out.shape[2:] != x.shape[2:]):
        rows = f"{2 * B}" if has_cfg else f"{B} or {2 * B}"
        raise ValueError(f"{OP}: model_out: expected shape ({rows}, {C} or {2 * C}, {H}, {W})"
                         f"{' with CFG (batch doubled)' if has_cfg else ''}, got {tuple(model_out.shape)}")
    if learned and model_out.shape[1] != 2 * C:
        raise ValueError(f"{OP}: model_out: {learned_name} needs {2 * C} channels (prediction + variance), got "
                         f"{model_out.shape[1]}")
    check_tensor("model_out", model_out, device=dev, contiguous=True, op=OP)
    if not isinstance(table, torch.Tensor):
        check_tensor("table", table, op=OP)
    if table.dim() != 2 or table.shape[1] != NUM_COLUMNS:
        raise ValueError(f"{OP}: table: expected shape (steps, {NUM_COLUMNS}), got {tuple(table.shape)}")
    check_tensor("table", table, dtypes=(torch.float32,), device=dev, contiguous=True, op=OP)
    if step_tensor is not None:
        check_tensor(step_name, step_tensor, dtypes=STEP_DTYPES, device=dev, last_dim_contiguous=False, op=OP)
        if step_tensor.numel() != 1:
            raise ValueError(f"{OP}: {step_name}: expected a one-element tensor, got shape {tuple(step_tensor.shape)}")
    else:
        _check_step(step_int, table.shape[0])
    for name, t, dtypes in (("out", out, FLOAT_DTYPES), ("history", history, (torch.float32,)),
                            ("history2", history2, (torch.float32,)), ("noise", noise, (torch.float32,))):
        if t is not None:
            check_tensor(name, t, shape=tuple(x.shape), dtypes=dtypes, device=dev, contiguous=True, layout="like x",
                         op=OP)
            if name == "history2" and history is None:
                raise ValueError(f"{OP}: history2: needs history (the step moves history into history2)")
    if next_input is not None:
        if not isinstance(next_input, torch.Tensor):
            check_tensor("next_input", next_input, op=OP)
        if next_input.dim() != 4 or next_input.shape[0] not in (B, 2 * B) or next_input.shape[1:] != x.shape[1:]:
            raise ValueError(f"{OP}: next_input: expected shape ({B} or {2 * B}, {C}, {H}, {W}), got "
                             f"{tuple(next_input.shape)}")
        check_tensor("next_input", next_input, device=dev, contiguous=True, op=OP)
    if not 0 <= guided_channels <= C:
        raise ValueError(f"{OP}: guided_channels={guided_channels}: expected 0..{C}")


# -- torch.library registration --------------------------------------------------------------------------
# `history2` comes last, with a default, so that the op's earlier positional form still calls it.
@torch.library.custom_op("ditengine::scheduler_step", mutates_args=("out", "history", "next_input", "history2"))
def _scheduler_step_op(x: torch.Tensor, model_out: torch.Tensor, table: torch.Tensor,
                       step_tensor: torch.Tensor | None, step_int: int, out: torch.Tensor,
                       history: torch.Tensor | None, noise: torch.Tensor | None, next_input: torch.Tensor | None,
                       cfg_scale: float, has_cfg: bool, guided_channels: int, clip: bool, learned: bool,
                       history2: torch.Tensor | None = None) -> None:
    _check_args(x, model_out, table, step_tensor, step_int, out, history, noise, next_input, has_cfg,
                guided_channels, learned, history2)
    scale = cfg_scale if has_cfg else None
    if use_triton("scheduler_step", x):
        _launch(x, model_out, table, step_tensor, step_int, out, history, history2, noise, next_input, scale,
                guided_channels, clip, learned)
        return
    step = step_tensor.reshape(()) if step_tensor is not None else step_int
    scheduler_step_ref(x, model_out, table, step, cfg_scale=scale, guided_channels=guided_channels,
                       history=history, noise=noise, clip=clip, learned_variance=learned, out=out,
                       next_input=next_input, history2=history2)


@_scheduler_step_op.register_fake
def _(x, model_out, table, step_tensor, step_int, out, history, noise, next_input, cfg_scale, has_cfg,
      guided_channels, clip, learned, history2=None):
    _check_args(x, model_out, table, step_tensor, step_int, out, history, noise, next_input, has_cfg,
                guided_channels, learned, history2)
    return None


# -- public API ------------------------------------------------------------------------------------------
def scheduler_step(x: torch.Tensor, model_out: torch.Tensor, table: torch.Tensor, step: int | torch.Tensor, *,
                   cfg_scale: float | None = None, guided_channels: int | None = None,
                   history: torch.Tensor | None = None, noise: torch.Tensor | None = None, clip: bool = False,
                   learned_variance: bool = False, out: torch.Tensor | None = None,
                   next_input: torch.Tensor | None = None, history2: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """One fused scheduler step; returns x_next (written into `out` when given, which may be `x`).

    x (B, C, H, W) contiguous, or any (B, C, ...) of 3 or more dimensions ((B, C, T) music, (B, C, F, H, W)
    video: every tensor argument then of that rank, flattened after C);
    model_out (2B if `cfg_scale` is not None else B, C or 2C, H, W); table the
    scheduler's (S, len(COLUMNS)) float32 device table; step an int or a one-element integer tensor on the device.
    An int step must be in 0..S-1 (IndexError otherwise). A tensor step is not checked here: that would
    need a device sync and could not be captured in a CUDA graph, so the caller must keep it in 0..S-1; out
    of range, the Triton kernel reads past the table (the native CPU kernel raises an IndexError).
    history (B, C, H, W) float32 is read and overwritten with x0; history2 (like history, and only with it: UniPC's
    x0 of two steps back) is read and overwritten with history's old value; noise (B, C, H, W) is added with the
    row's u; next_input (B or 2B, C, H, W) receives x_next * c_in_next (twice when 2B); out like x, x's dtype.
    The arguments are checked as the op checks them (`_check_args`), and, beyond the op's rules, model_out
    has exactly B rows without CFG and out x's dtype.
    backend: None / "auto" lets the dispatcher choose (C++ on CPU where built, Triton on CUDA); "native",
    "triton" (on CPU: the interpreter) or "reference" force one.
    """
    if isinstance(x, torch.Tensor) and x.dim() >= 3 and x.dim() != 4:
        # Any other latent rank ((B, C, T) music, (B, C, F, H, W) video): the step is elementwise per (row,
        # channel), so every dimension after C flattens into one, as (B, C, N, 1) views of the same memory.
        rank, shape = x.dim(), x.shape

        def lift(name, t):
            if not isinstance(t, torch.Tensor):
                return t
            if t.dim() != rank:
                raise ValueError(f"{name}: expected {rank} dimensions like x {tuple(shape)}, got {tuple(t.shape)}")
            check_tensor(name, t, contiguous=True, layout=f"({', '.join(['B', 'C'] + ['...'] * (rank - 2))})")
            return t.view(*t.shape[:2], -1, 1)

        check_tensor("x", x, contiguous=True, layout="(B, C, ...)")
        result = scheduler_step(lift("x", x), lift("model_out", model_out), table, step, cfg_scale=cfg_scale,
                                guided_channels=guided_channels, history=lift("history", history),
                                noise=lift("noise", noise), clip=clip, learned_variance=learned_variance,
                                out=lift("out", out), next_input=lift("next_input", next_input),
                                history2=lift("history2", history2), backend=backend)
        return result.view(shape)
    if not isinstance(x, torch.Tensor) or x.dim() < 3:  # raises: a TypeError, or a ValueError naming the rank
        check_tensor("x", x, ndim=4, layout="(B, C, H, W), or any (B, C, ...) of 3 dimensions or more")
    B, C = x.shape[:2]
    # The public rules beyond the op's: no CFG, no second half of rows; `out` in x's dtype.
    if cfg_scale is None and isinstance(model_out, torch.Tensor) and model_out.dim() == 4 and model_out.shape[0] != B:
        raise ValueError(f"model_out: expected shape ({B}, {C} or {2 * C}, {x.shape[2]}, {x.shape[3]}) for x "
                         f"{tuple(x.shape)} without CFG, got {tuple(model_out.shape)}")
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), last_dim_contiguous=False)
    step_tensor, step_int = (step, 0) if isinstance(step, torch.Tensor) else (None, step)
    k = C if guided_channels is None else guided_channels
    _check_args(x, model_out, table, step_tensor, step_int, out, history, noise, next_input, cfg_scale is not None,
                k, learned_variance, history2, step_name="step", learned_name="learned_variance")
    step_tensor, step_int = (step.reshape(1), 0) if step_tensor is not None else (None, int(step))
    dev = x.device
    if out is None:
        out = torch.empty_like(x)
    how = route("scheduler_step", dev, backend)
    if how.startswith("reference"):
        step_ref = step_tensor.reshape(()) if step_tensor is not None else step_int
        scheduler_step_ref(x, model_out, table, step_ref, cfg_scale=cfg_scale, guided_channels=k, history=history,
                           noise=noise, clip=clip, learned_variance=learned_variance, out=out, next_input=next_input,
                           history2=history2)
    elif how == "triton-interpreter":  # the dispatcher's CPU slot may belong to the native kernel
        _launch(x, model_out, table, step_tensor, step_int, out, history, history2, noise, next_input, cfg_scale, k,
                clip, learned_variance)
    else:
        _scheduler_step_op(x, model_out, table, step_tensor, step_int, out, history, noise, next_input,
                           1.0 if cfg_scale is None else float(cfg_scale), cfg_scale is not None, k, clip,
                           learned_variance, history2)
    return out
