"""The SwiGLU MLP's gate and up projections as one GEMM, with the `silu(g) * u` epilogue fused.

    linear_swiglu(x) = silu(x @ Wg^T + bg) * (x @ Wu^T + bu),   silu(g) = g * sigmoid(g)
    swiglu(gu)       = silu(gu[..., :F]) * gu[..., F:]

ACE-Step 1.5's MLP (diffusers `AceStepMLP`) is `down(silu(gate(h)) * up(h))` with no biases, gate / up
(F, D) = (6144, 2048); Stable Audio's has biases (pass them; its value / gate order is the caller's to
map onto gate / up). Eager PyTorch runs two GEMMs, writes both (N, F) results to memory and reads them back
for SiLU and the product; here the two GEMMs are one and the epilogue runs on the GEMM's output tile.

`prepack_swiglu` makes one weight for one GEMM, once per sampler, in the form its backend wants:

- "native" (CPU, the default where the extension is built; for bf16 only where F.linear has no oneDNN bf16
  GEMM, see `choose_backend`): `torch.ops.ditengine.linear_swiglu`
  (csrc/linear_swiglu.cpp). The weight is panels (n_panels, D, 2 BN) fp32: panel j is the gate rows
  j BN .. j BN + BN - 1 transposed, then the matching up rows (zero columns past F), the B operand of one
  oneDNN brgemm call; the epilogue pairs each gate column with its up column while the (rows, 2 BN) tile is
  in cache, so the (N, 2F) GEMM result is never written to memory. x is widened to fp32 once per call, the
  output is in x's dtype.
- "stacked" (CUDA, the default there; CPU bf16 where oneDNN runs bf16 GEMMs): one `F.linear` over the
  stacked weight (2F, D) = [Wg; Wu] in `dtype` (cuBLAS on CUDA, oneDNN's bf16 matmul on CPU), then the
  epilogue op `swiglu` as the dispatcher chooses it (the Triton kernel on CUDA, the C++ kernel on CPU).
- "triton": the stacked GEMM, then the Triton epilogue kernel by name (on CPU Triton's interpreter, for tests).
- "reference": the stacked GEMM, then `swiglu_ref`.

`swiglu` is the epilogue alone, for GEMM outputs that come from elsewhere (the int8 and fp8 linear ops run
on the stacked weight): gu (..., 2F) holds the gate in its first half and the up projection in its second,
the layout of `F.linear(x, torch.cat([Wg, Wu]))`.

Shapes: x (..., D), gate / up weights (F, D), biases (F,); out (..., F) in x's dtype. dtypes fp32 / bf16 /
fp16; the epilogue in fp32. A NaN in one row of x stays in that row of the output.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _native
from ._backend import choose_prepacked, register_prepacked, route, tl, triton, use_triton
from ._checks import FLOAT_DTYPES, check_packed_input, check_tensor, cpp_dtype, cpp_sizes

log = logging.getLogger("ditengine")

FORMS = ("native", "stacked", "triton", "reference")  # see `_backend.choose_prepacked`
PANEL = 32  # BN: gate (and up) columns per panel; the native GEMM tile is (TILE_M rows, 2 BN = 64 columns)


# -- references ------------------------------------------------------------------------------------------
def swiglu_ref(gu: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """silu(gu[..., :F]) * gu[..., F:] for gu (..., 2F) -> (..., F) in gu's dtype; math in fp32 when `upcast`."""
    g, u = gu.float().chunk(2, dim=-1) if upcast else gu.chunk(2, dim=-1)
    return (F.silu(g) * u).to(gu.dtype)


def linear_swiglu_ref(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
                      gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
                      upcast: bool = True) -> torch.Tensor:
    """silu(x @ Wg^T + bg) * (x @ Wu^T + bu) as eager PyTorch runs it (two GEMMs, then the epilogue); math in
    fp32 when `upcast`, else in x's dtype (the low-precision reference). Returns (..., F) in x's dtype."""
    dt = torch.float32 if upcast else x.dtype

    def cast(t):
        return None if t is None else t.to(dt)

    g = F.linear(x.to(dt), cast(gate_weight), cast(gate_bias))
    u = F.linear(x.to(dt), cast(up_weight), cast(up_bias))
    return (F.silu(g) * u).to(x.dtype)


# -- the epilogue kernel ---------------------------------------------------------------------------------
@triton.jit
def _swiglu_kernel(
    gu_ptr, out_ptr,
    F,
    stride_gu, stride_out,
    BLOCK_F: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows * 2F can pass 2**31
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + F + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_swiglu(gu: torch.Tensor) -> torch.Tensor:
    Fo = gu.shape[-1] // 2
    rows = gu.reshape(-1, 2 * Fo)  # a view wherever the leading dims collapse
    out = torch.empty((*gu.shape[:-1], Fo), device=gu.device, dtype=gu.dtype)
    if out.numel():
        block = min(1024, triton.next_power_of_2(Fo))
        _swiglu_kernel[(rows.shape[0], triton.cdiv(Fo, block))](
            rows, out, Fo, rows.stride(0), Fo, BLOCK_F=block, num_warps=max(1, min(block // 256, 4)))
    return out


SWIGLU_OP, LINEAR_SWIGLU_OP = "ditengine::swiglu", "ditengine::linear_swiglu"


def _check_gu(gu: torch.Tensor) -> None:
    """swiglu's argument, checked by the public function, the op's Python body and its fake; the C++ kernel
    (csrc/linear_swiglu.cpp) checks the same in the same words (there on the CPU)."""
    check_tensor("gu", gu, op=SWIGLU_OP)  # a tensor, fp32 / fp16 / bf16, its last dimension contiguous
    if gu.dim() < 1 or gu.shape[-1] % 2:
        raise ValueError(f"{SWIGLU_OP}: gu: expected (..., 2F) with an even last dimension (gate then up), got "
                         f"{tuple(gu.shape)}")


# -- torch.library registration (composes with torch.compile and CUDA graphs) ---------------------------
@torch.library.custom_op("ditengine::swiglu", mutates_args=())
def _swiglu_op(gu: torch.Tensor) -> torch.Tensor:
    """gu (..., 2F), gate then up -> (..., F) in gu's dtype."""
    _check_gu(gu)
    if use_triton("swiglu", gu):
        return _launch_swiglu(gu)
    return swiglu_ref(gu).contiguous()


@_swiglu_op.register_fake
def _(gu):
    _check_gu(gu)
    return gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2))


def _linear_swiglu_panels_torch(x, weight, bias, out_features: int) -> torch.Tensor:
    """The panel op's computation in PyTorch: x (..., K), weight (n_panels, K, 2 BN), bias (n_panels, 2 BN)."""
    n_panels, K, two_bn = weight.shape
    bn = two_bn // 2
    x2 = x.reshape(-1, K).to(weight.dtype)  # (M, K)
    y = torch.matmul(x2, weight)  # (n_panels, M, 2 BN): each panel's gate columns, then its up columns
    if bias is not None:
        y = y + bias[:, None]
    out = (F.silu(y[..., :bn]) * y[..., bn:]).transpose(0, 1).reshape(x2.shape[0], n_panels * bn)  # (M, Fp)
    return out[:, :out_features].to(x.dtype).contiguous().view(*x.shape[:-1], out_features)


def _check_panels(x, weight, bias, out_features: int) -> None:
    """The panel op's arguments, checked as its C++ kernel (csrc/linear_swiglu.cpp) checks them: the same order,
    exception types and messages, except that the tensors must share x's device rather than be on the CPU.
    The op's Python body and its fake call this (the public `linear_swiglu` checks x against the packed weights,
    which `prepack_swiglu` made right)."""
    op = LINEAR_SWIGLU_OP
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (..., K)")
    if weight.dim() != 3 or weight.shape[2] == 0 or weight.shape[2] % 2:
        raise ValueError(f"{op}: weight must be prepacked panels (n_panels, K, 2 BN), got shape {cpp_sizes(weight)}")
    if weight.dtype != torch.float32:
        raise TypeError(f"{op}: weight must be float32 (prepacked), got {cpp_dtype(weight.dtype)}")
    n_panels, K, bn = weight.shape[0], x.shape[-1], weight.shape[2] // 2
    if weight.shape[1] != K:
        raise ValueError(f"{op}: weight {cpp_sizes(weight)} does not take x's last dimension {K}")
    if not (n_panels - 1) * bn < out_features <= n_panels * bn:
        raise ValueError(f"{op}: out_features {out_features} does not fit {n_panels} panels of {bn} columns")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, bfloat16 or float16, got {cpp_dtype(x.dtype)}")
    if weight.device != x.device:
        raise ValueError(f"{op}: x and weight must be on one device, got {x.device} and {weight.device}")
    if bias is not None:
        if bias.dim() != 2 or bias.shape[0] != n_panels or bias.shape[1] != 2 * bn:
            raise ValueError(f"{op}: bias must be prepacked ({n_panels}, {2 * bn}), got shape {cpp_sizes(bias)}")
        if bias.dtype != torch.float32:
            raise TypeError(f"{op}: bias must be float32, got {cpp_dtype(bias.dtype)}")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias must be on x's device {x.device}, got {bias.device}")


@torch.library.custom_op("ditengine::linear_swiglu", mutates_args=())
def _linear_swiglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      out_features: int) -> torch.Tensor:
    """x (..., K); weight (n_panels, K, 2 BN) and bias (n_panels, 2 BN) fp32 panels (`prepack_swiglu`)
    -> (..., out_features) in x's dtype, math in fp32."""
    _check_panels(x, weight, bias, out_features)
    return _linear_swiglu_panels_torch(x, weight, bias, out_features)


@_linear_swiglu_op.register_fake
def _(x, weight, bias, out_features):
    _check_panels(x, weight, bias, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


def native_available() -> bool:
    """Whether the native extension registered its CPU kernel for the fused op."""
    return _native.serves("linear_swiglu")


# -- prepacking and the calls ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedSwiGLU:
    """A SwiGLU MLP's gate and up projections as one weight, made once per sampler by `prepack_swiglu`."""

    backend: str                # "native", "stacked", "triton" or "reference"
    weight: torch.Tensor        # native: panels (n_panels, D, 2 BN) fp32; else stacked [Wg; Wu] (2F, D) in dtype
    bias: torch.Tensor | None   # native: (n_panels, 2 BN) fp32; else stacked [bg; bu] (2F,) in dtype
    dtype: torch.dtype          # the activations' dtype
    in_features: int            # D
    out_features: int           # F


def _panels(gate: torch.Tensor, up: torch.Tensor, bn: int) -> torch.Tensor:
    """gate and up (F, *rest) -> panels (n_panels, *rest, 2 bn): panel j holds gate rows j bn .. j bn + bn - 1,
    then the same up rows, along its last dim; rows past F are zeros."""
    Fo, rest = gate.shape[0], gate.shape[1:]
    n_panels = -(-Fo // bn)

    def blocks(t):  # (F, *rest) -> (n_panels, *rest, bn)
        padded = t.new_zeros((n_panels * bn, *rest))
        padded[:Fo] = t
        return padded.view(n_panels, bn, *rest).movedim(1, -1)

    return torch.cat([blocks(gate), blocks(up)], dim=-1).contiguous()


def _check_weights(gate_weight, up_weight, gate_bias, up_bias) -> None:
    check_tensor("gate_weight", gate_weight, ndim=2, layout="(F, D)", last_dim_contiguous=False)
    check_tensor("up_weight", up_weight, shape=tuple(gate_weight.shape), device=gate_weight.device,
                 layout="(F, D) like gate_weight", last_dim_contiguous=False)
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("gate_bias, up_bias: expected both or neither, got "
                         f"{'gate_bias' if up_bias is None else 'up_bias'} alone")
    for name, b in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if b is not None:
            check_tensor(name, b, shape=(gate_weight.shape[0],), device=gate_weight.device, layout="(F,)",
                         last_dim_contiguous=False)


def mkldnn_bf16() -> bool:
    """Whether F.linear in bf16 runs oneDNN's bf16 matmul on this CPU."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The form `prepack_swiglu` picks for weights on `device` and activations of `dtype`
    (`_backend.choose_prepacked`)."""
    return choose_prepacked("linear_swiglu", device, dtype)


def _auto_form(device: torch.device, dtype: torch.dtype) -> str:
    """CUDA: "stacked" (cuBLAS, then the Triton epilogue). CPU: "stacked" for bf16 where oneDNN runs bf16
    GEMMs (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`, what routes F.linear in bf16 to oneDNN: AVX-512
    and newer CPUs), whose bf16 dots beat the native kernel's fp32 ones (201 against 387 ms at 750 x 2048 ->
    2 x 6144 on the 2-core AVX-512 development CPU of 2026-12-02; eager bf16 206 ms); else "native" where
    the extension serves it (on AVX2 CPUs a bf16 GEMM is emulated and several times slower than the fp32
    one); else "reference"."""
    if device.type == "cuda":
        return "stacked"
    if device.type != "cpu":
        return "reference"
    if dtype == torch.bfloat16 and mkldnn_bf16():
        return "stacked"
    return "native" if native_available() else "reference"


register_prepacked("linear_swiglu", FORMS, _auto_form)


def prepack_swiglu(gate_weight: torch.Tensor, up_weight: torch.Tensor, gate_bias: torch.Tensor | None = None,
                   up_bias: torch.Tensor | None = None, *, dtype: torch.dtype, batch_size: int | None = None,
                   backend: str = "auto") -> PackedSwiGLU:
    """Prepare gate / up weights (F, D) and optional biases (F,) for `linear_swiglu` on activations of `dtype`.

    The weights' device decides where the op runs. `batch_size`, the expected number of rows of x (tokens x
    batch), is checked and otherwise not needed: no form's layout depends on it (the native panels of
    `PANEL` columns measured fastest from 64 to 750 rows). Once per sampler: the returned weights are
    copies, later changes to the inputs are not seen.
    """
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {[str(d).removeprefix('torch.') for d in FLOAT_DTYPES]}, got {dtype}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
    _check_weights(gate_weight, up_weight, gate_bias, up_bias)
    device = gate_weight.device
    backend = choose_prepacked("linear_swiglu", device, dtype, backend)
    Fo, D = gate_weight.shape
    gw, uw = gate_weight.detach(), up_weight.detach()
    gb, ub = (None, None) if gate_bias is None else (gate_bias.detach(), up_bias.detach())
    if backend == "native":
        weight = _panels(gw.float(), uw.float(), PANEL)  # (n_panels, D, 2 BN)
        bias = None if gb is None else _panels(gb.float(), ub.float(), PANEL)  # (n_panels, 2 BN)
        return PackedSwiGLU("native", weight, bias, dtype, D, Fo)
    weight = torch.cat([gw, uw]).to(dtype).contiguous()  # (2F, D)
    bias = None if gb is None else torch.cat([gb, ub]).to(dtype).contiguous()  # (2F,)
    return PackedSwiGLU(backend, weight, bias, dtype, D, Fo)


def linear_swiglu(x: torch.Tensor, packed: PackedSwiGLU) -> torch.Tensor:
    """silu(x @ Wg^T + bg) * (x @ Wu^T + bu) for x (..., D) -> (..., F) in x's dtype, with
    `packed = prepack_swiglu(Wg, Wu, bg, bu, dtype=x.dtype)`."""
    check_packed_input(x, packed.dtype, packed.in_features, packed.weight.device)  # then the ops' checks hold
    if packed.backend == "native":
        return torch.ops.ditengine.linear_swiglu(x, packed.weight, packed.bias, packed.out_features)
    gu = F.linear(x, packed.weight, packed.bias)  # (..., 2F): gate, then up
    return swiglu(gu, backend=None if packed.backend == "stacked" else packed.backend)


def swiglu(gu: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gu[..., :F]) * gu[..., F:] for gu (..., 2F), the stacked gate-then-up GEMM output -> (..., F) in gu's
    dtype, fp32 math. backend: None / "auto" lets the dispatcher choose (C++ on CPU where built, Triton on
    CUDA); "native", "triton" (on CPU: the interpreter) or "reference" force one."""
    _check_gu(gu)
    how = route("swiglu", gu.device, backend)
    if how.startswith("reference"):
        return swiglu_ref(gu).contiguous()
    if how == "triton-interpreter":  # the dispatcher's CPU slot may belong to the native kernel
        return _launch_swiglu(gu)
    return _swiglu_op(gu)
