"""DiT's fc1 and its tanh GELU in one op, for the CPU fast path.

    out = gelu_tanh(x @ w^T + b),   gelu_tanh(y) = 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))

`gelu_from` limits the GELU to the output columns [gelu_from, N) (the bias goes on every column): Flux's
single-stream block stacks to_q / to_k / to_v (3D outputs, no activation) and proj_mlp (4D outputs, GELU-tanh)
into one (7D, D) weight, so one GEMM reads the normed input once and its epilogue applies the GELU to the
MLP's columns only (gelu_from = 3D). gelu_from = 0 is the whole-row GELU, gelu_from = N none.

In DiT every block's MLP runs fc1 (D -> 4D) then GELU-tanh (then fc2); the GELU reads and writes the
4D-wide activation once more. On CUDA the fast path fuses it as cuBLASLt's GEMM epilogue; on the CPU
there are three forms, chosen once per weight by `prepack_linear` (`choose_backend`):

- "mkldnn": oneDNN's inner product with a GELU-tanh post-op on a prepacked weight
  (`torch.ops.mkldnn._reorder_linear_weight` + `torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [],
  "tanh")`, what torch.compile's CPU backend emits). Used for bf16 where a probe shows it runs and computes
  the tanh GELU: that needs a CPU with bf16 support in oneDNN (avx512 bf16 / AMX), where bf16 GEMMs are
  faster than fp32 ones; for fp32 only when the native kernel is not built (it is not faster there).
- "native": `torch.ops.ditengine.linear_gelu` (csrc/linear_gelu.cpp), an fp32 GEMM per L2-sized tile with
  bias + GELU applied while the tile is in cache, on an fp32 copy of the weight (x widened per call, output
  in x's dtype). On AVX2 CPUs, where a bf16 GEMM is emulated and ~7x slower than fp32, this is the fast
  form for bf16 too.
- "reference": the op's Python body, `gelu_tanh(linear(x.to(w.dtype), w, b))` on the prepacked
  (fp32) weight: still the fp32-weight GEMM, with a separate GELU.

`linear(x, packed)` is the plain linear on the same prepacked weights (qkv, proj, fc2).
Shapes: x (..., K), w (N, K), b (N); out (..., N) in x's dtype. dtypes: fp32, bf16 (fp16 through the
native / reference forms).
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _native
from ._backend import autotune_enabled, choose_prepacked, register_prepacked
from ._checks import check_packed_input, cpp_dtype, cpp_sizes

log = logging.getLogger("ditengine")

FORMS = ("mkldnn", "native", "reference")  # see `_backend.choose_prepacked`


# -- reference -------------------------------------------------------------------------------------------
def linear_gelu_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, upcast: bool = False,
                    gelu_from: int = 0):
    """linear(x, w, b) with gelu_tanh on the output columns [gelu_from, N); math in fp32 when `upcast`
    (output in x's dtype)."""
    y = F.linear(x.float(), w.float(), None if b is None else b.float()) if upcast else F.linear(x, w, b)
    y = torch.cat([y[..., :gelu_from], F.gelu(y[..., gelu_from:], approximate="tanh")], dim=-1)  # (..., N)
    return y.to(x.dtype)


# -- the op: native CPU kernel in csrc/linear_gelu.cpp, this body as the fallback ------------------------
OP = "ditengine::linear_gelu"


def check_gelu_from(gelu_from, out_features: int) -> int:
    """gelu_from: an int in 0..out_features (out_features: no GELU)."""
    if isinstance(gelu_from, bool) or not isinstance(gelu_from, (int, torch.SymInt)):
        raise TypeError(f"{OP}: gelu_from: expected an int column index, got {type(gelu_from).__name__}")
    if not 0 <= gelu_from <= out_features:
        raise ValueError(f"{OP}: gelu_from: expected 0 <= gelu_from <= out_features = {out_features}, got "
                         f"{gelu_from}")
    return gelu_from


def check_linear_gelu(x, weight, bias, gelu_from) -> None:
    """The op's arguments, checked as its C++ kernel (csrc/linear_gelu.cpp) checks them: the same order,
    exception types and messages, except that the tensors must share x's device rather than be on the CPU.
    The op's Python body and its fake call this; the public calls check x against the packed weights
    (`_checks.check_packed_input`) and gelu_from with `check_gelu_from`, which this calls too."""
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension (..., K)")
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be (N, K), got shape {cpp_sizes(weight)}")
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"{OP}: weight {cpp_sizes(weight)} does not take x's last dimension {K}")
    check_gelu_from(gelu_from, N)
    if weight.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{OP}: weight must be float32 or x's dtype {cpp_dtype(x.dtype)}, got "
                        f"{cpp_dtype(weight.dtype)}")
    if weight.device != x.device:
        raise ValueError(f"{OP}: x and weight must be on one device, got {x.device} and {weight.device}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"{OP}: bias must be ({N}), got shape {cpp_sizes(bias)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{OP}: bias dtype {cpp_dtype(bias.dtype)} must match weight dtype "
                            f"{cpp_dtype(weight.dtype)}")
        if bias.device != x.device:
            raise ValueError(f"{OP}: bias must be on x's device {x.device}, got {bias.device}")


def _gelu_columns_(y: torch.Tensor, gelu_from: int) -> torch.Tensor:
    """gelu_tanh on y's columns [gelu_from, N), in place (y is the GEMM's fresh output)."""
    if gelu_from == 0:  # the whole row: one contiguous pass, today's numerics
        return F.gelu(y, approximate="tanh")
    if gelu_from < y.shape[-1]:
        torch.ops.aten.gelu_(y[..., gelu_from:], approximate="tanh")  # (..., N - gelu_from), strided view
    return y


def _linear_gelu_torch(x, weight, bias, apply_gelu: bool, gelu_from: int = 0) -> torch.Tensor:
    y = F.linear(x.to(weight.dtype), weight, bias)  # (..., N)
    return (_gelu_columns_(y, gelu_from) if apply_gelu else y).to(x.dtype)


@torch.library.custom_op("ditengine::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, apply_gelu: bool,
                    gelu_from: int = 0) -> torch.Tensor:
    """x (..., K); weight (N, K) and bias (N) in fp32 or x's dtype -> (..., N) in x's dtype, math in weight's.
    With `apply_gelu` the GELU covers columns [gelu_from, N) (0 <= gelu_from <= N); without, none."""
    check_linear_gelu(x, weight, bias, gelu_from)
    return _linear_gelu_torch(x, weight, bias, apply_gelu, gelu_from)


@_linear_gelu_op.register_fake
def _(x, weight, bias, apply_gelu, gelu_from=0):
    check_linear_gelu(x, weight, bias, gelu_from)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def native_available() -> bool:
    """Whether the native extension registered its CPU kernel for the op."""
    return _native.serves("linear_gelu")


# -- the oneDNN form and its probe -----------------------------------------------------------------------
def _mkldnn_pack(w: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, batch_size)


def _mkldnn_call(x, packed_w, b, apply_gelu: bool, gelu_from: int = 0):
    """oneDNN's post-op covers whole rows: a column range runs the plain linear, then the GELU on its slice."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if apply_gelu and gelu_from == 0:
        out = torch.ops.mkldnn._linear_pointwise(x2, packed_w, b, "gelu", [], "tanh")
    else:
        out = torch.ops.mkldnn._linear_pointwise(x2, packed_w, b, "none", [], "")
        if apply_gelu:
            out = _gelu_columns_(out, gelu_from)
    return out.view(*lead, out.shape[-1])


@functools.lru_cache(maxsize=None)
def mkldnn_gelu_is_tanh(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked linear with a GELU-tanh post-op runs in `dtype` and computes the tanh GELU.

    Two small probes, decided once per dtype and logged: fp32, where the tanh and erf GELUs differ by up
    to 5e-4 while fp32 is good to 1e-5, proves the algorithm; `dtype` itself must run (bf16 needs oneDNN
    bf16 support in the CPU) and match the fp32 reference within bf16 rounding.
    """
    if not torch.backends.mkldnn.is_available():
        log.info("ditengine: oneDNN (mkldnn) is not available; linear+GELU uses the native or reference form")
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((64, 32), (48, 32), (48,)))
    x = x * 2.0  # spread pre-activations over the range where tanh and erf GELUs differ
    ref = linear_gelu_ref(x, w, b)
    try:
        exact = _mkldnn_call(x, _mkldnn_pack(w, 64), b, True)
        ok = torch.allclose(exact, ref, rtol=1e-4, atol=2e-5)
        if ok and dtype != torch.float32:
            low = _mkldnn_call(x.to(dtype), _mkldnn_pack(w.to(dtype), 64), b.to(dtype), True)
            ok = low.dtype == dtype and torch.allclose(low.float(), linear_gelu_ref(x.to(dtype), w.to(dtype),
                                                                                    b.to(dtype), upcast=True).float(),
                                                       rtol=2e-2, atol=2e-2)
    except RuntimeError as err:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
        log.info("ditengine: oneDNN linear+GELU-tanh is not usable in %s here (%s)", dtype,
                 str(err).splitlines()[0][:160])
        return False
    log.info("ditengine: oneDNN linear+GELU-tanh in %s %s", dtype,
             "matches the tanh GELU" if ok else "does not match the tanh GELU; not used")
    return ok


# -- the packed weight's layout ---------------------------------------------------------------------------
# oneDNN lays a packed weight out for the row count it is told to expect, and the layout it picks for the real
# count is not always the fastest: at DiT-S/2's fc2 (512 x 1536 -> 384, bf16, AMX, 2 threads) the layout for one
# row (AB16b64a2b) ran 0.46 ms against 0.69 for the one for 512 rows (AB16b32a2b), while at qkv (384 -> 1152)
# the layout for 512 rows was the faster (0.24 against 0.29). So each shape's hint is chosen once by timing.
TUNED_MAX_FLOP = 4e9  # larger GEMMs are bound by their arithmetic, and timing them would cost seconds


@functools.lru_cache(maxsize=None)
def pack_hint(out_features: int, in_features: int, dtype: torch.dtype, batch_size: int) -> int:
    """The row-count hint `prepack_linear` packs oneDNN weights with: the faster of `batch_size` and 1 on a random
    (N, K) weight and `batch_size` rows, medians of round-robin runs; `batch_size` itself when tuning is off
    (DITENGINE_AUTOTUNE=0) or the GEMM is past TUNED_MAX_FLOP."""
    if not autotune_enabled() or batch_size == 1 or 2 * batch_size * out_features * in_features > TUNED_MAX_FLOP:
        return batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, in_features, generator=g).to(dtype)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    candidates = {hint: _mkldnn_pack(w, hint) for hint in (batch_size, 1)}
    runs = {hint: [] for hint in candidates}
    for i in range(9):
        for hint, packed in candidates.items():
            t0 = time.perf_counter()
            _mkldnn_call(x, packed, None, False)
            if i >= 2:  # two warm-up rounds (oneDNN builds its primitive on the first call)
                runs[hint].append(time.perf_counter() - t0)
    median = {hint: sorted(r)[len(r) // 2] for hint, r in runs.items()}
    best = min(median, key=median.get)
    other = 1 if best == batch_size else batch_size
    log.info("ditengine: oneDNN %s weight %dx%d packed for %d rows (%.3f ms; for %d rows %.3f ms)", dtype,
             out_features, in_features, best, 1e3 * median[best], other, 1e3 * median[other])
    return best


# -- prepacking and the calls ----------------------------------------------------------------------------
def check_linear_weights(w: torch.Tensor, b: torch.Tensor | None) -> None:
    """A linear layer's (weight (N, K), bias (N,) or None), as every prepacked form takes them."""
    if w.dim() != 2 or (b is not None and b.shape != (w.shape[0],)):
        raise ValueError(f"w: expected (N, K) and b (N,), got {tuple(w.shape)} and "
                         f"{None if b is None else tuple(b.shape)}")


@dataclass(frozen=True)
class PackedLinear:
    """A linear layer's weights in the form its backend wants, made once per sampler by `prepack_linear`."""

    backend: str                # "mkldnn", "native" or "reference"
    weight: torch.Tensor        # mkldnn: oneDNN's packed (N, K); native / reference: (N, K) fp32 or dtype
    bias: torch.Tensor | None   # (N,)
    dtype: torch.dtype          # the activations' dtype
    out_features: int

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]  # K of the (N, K) weight, oneDNN's packed one included


def choose_backend(dtype: torch.dtype) -> str:
    """The form `prepack_linear` picks for CPU activations of `dtype` (`_backend.choose_prepacked`)."""
    return choose_prepacked("linear_gelu", torch.device("cpu"), dtype)


def _auto_form(device: torch.device, dtype: torch.dtype) -> str:
    """bf16 with oneDNN bf16 support: mkldnn (bf16 dots beat fp32 there); fp32 on an AVX-512 CPU: mkldnn
    (oneDNN's AVX-512 fp32 GEMM ran 195 GFLOP/s on one core of the development CPU of 2026-12-02, against
    78 for the native kernel's BLAS and `F.linear`, at 512x1152 -> 4608); else native when built; else
    mkldnn where its probe passes; else the reference."""
    if dtype == torch.bfloat16 and mkldnn_gelu_is_tanh(dtype):
        return "mkldnn"
    if dtype == torch.float32 and torch.backends.cpu.get_cpu_capability() == "AVX512" and mkldnn_gelu_is_tanh(dtype):
        return "mkldnn"
    if native_available():
        return "native"
    if dtype == torch.float32 and mkldnn_gelu_is_tanh(dtype):
        return "mkldnn"
    return "reference"


register_prepacked("linear_gelu", FORMS, _auto_form)


def prepack_linear(w: torch.Tensor, b: torch.Tensor | None = None, *, dtype: torch.dtype | None = None,
                   batch_size: int = 512, backend: str = "auto") -> PackedLinear:
    """Prepare (w (N, K), b (N)) for `linear_gelu` / `linear` on CPU activations of `dtype` (default w's).

    `batch_size` is the expected number of rows of x (tokens x batch), for oneDNN's weight layout (`pack_hint`).
    Once per sampler: the returned weights are copies, later changes to w are not seen.
    """
    check_linear_weights(w, b)
    if w.device.type != "cpu":
        raise ValueError(f"prepack_linear is for CPU weights, got {w.device}")
    dtype = dtype or w.dtype
    backend = choose_prepacked("linear_gelu", w.device, dtype, backend)
    if backend == "mkldnn":
        wd = w.detach().to(dtype).contiguous()
        hint = pack_hint(wd.shape[0], wd.shape[1], dtype, batch_size)
        return PackedLinear("mkldnn", _mkldnn_pack(wd, hint), None if b is None else b.detach().to(dtype),
                            dtype, w.shape[0])
    # native / reference: fp32 weights, widened once here rather than every call (see the module docstring).
    w32 = w.detach().float().contiguous()
    return PackedLinear(backend, w32, None if b is None else b.detach().float().contiguous(), dtype, w.shape[0])


def _call(x: torch.Tensor, p: PackedLinear, apply_gelu: bool, gelu_from: int = 0) -> torch.Tensor:
    check_packed_input(x, p.dtype, p.in_features, p.weight.device)  # then the op's checks hold (native: in C++)
    if p.backend == "mkldnn":
        return _mkldnn_call(x, p.weight, p.bias, apply_gelu, gelu_from)
    if p.backend == "native":
        if gelu_from == 0:  # the schema's default: the call the whole-row GELU always made
            return torch.ops.ditengine.linear_gelu(x, p.weight, p.bias, apply_gelu)
        return torch.ops.ditengine.linear_gelu(x, p.weight, p.bias, apply_gelu, gelu_from)
    return _linear_gelu_torch(x, p.weight, p.bias, apply_gelu, gelu_from)


def linear_gelu(x: torch.Tensor, packed: PackedLinear, gelu_from: int = 0) -> torch.Tensor:
    """x @ w^T + b with gelu_tanh on the output columns [gelu_from, N), for x (..., K) -> (..., N) in x's
    dtype, with `packed = prepack_linear(w, b)`. gelu_from = 0 (default): the whole row (DiT's fc1);
    gelu_from = N: no GELU (the same as `linear`); Flux's stacked qkv + proj_mlp weight: gelu_from = 3D."""
    return _call(x, packed, True, check_gelu_from(gelu_from, packed.out_features))


def linear(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """x @ w^T + b on the prepacked weights (the GEMMs without a GELU: qkv, proj, fc2)."""
    return _call(x, packed, False)
