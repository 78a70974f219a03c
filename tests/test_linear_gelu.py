import importlib
import logging

import pytest
import torch

from ditengine.kernels import linear, linear_gelu, linear_gelu_ref, prepack_linear
from ditengine.kernels._backend import _log_choice

from support.backends import bad_input_table, cpu_backends
from support.native_helpers import isa_runner, needs_native, skip_unless_cpu_runs
from support.tolerance import assert_within_tolerance, fp32_floor

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
native = needs_native("linear_gelu")
lg = importlib.import_module("ditengine.kernels.linear_gelu")  # the module; the package exports the function
# The prepacked forms on CPU (`lg.FORMS`): the C++ kernel ("native", skipped where the extension does not serve
# the op), the op's torch body ("reference"), and oneDNN's fused GEMM ("mkldnn", usable per dtype where its
# probe passes: `usable`).
FORMS = [*cpu_backends("linear_gelu", ("native", "reference")), pytest.param("mkldnn", id="mkldnn")]
assert sorted(p.values[0] for p in FORMS) == sorted(lg.FORMS)
# The registered op's implementations: its C++ CPU kernel (what the dispatcher runs on CPU tensors) and its
# Python body (the fallback without the extension), reached past the C++ kernel.
OP_IMPLS = [pytest.param("native", marks=native, id="native"), pytest.param("python", id="python-body")]
PYTHON_BODY = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def usable(form, dtype):
    """Skip, saying why, where `form` cannot run activations of `dtype` here (oneDNN's probe decides)."""
    if form == "mkldnn" and not lg.mkldnn_gelu_is_tanh(dtype):
        pytest.skip(f"oneDNN linear+GELU-tanh is not usable in {dtype} on this CPU (the probe says so)")


def run_op(impl, *args):
    op = torch.ops.ditengine.linear_gelu
    return op(*args) if impl == "native" else op.default.redispatch(PYTHON_BODY, *args)


def layer(M, K, N, dtype, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    return x, w, b


def check(out, x, w, b, gelu=True, name="out"):
    """Tolerance rule against the fp32 reference; ref_lp is PyTorch's own run in x's dtype."""
    if gelu:
        ref32 = linear_gelu_ref(x.float(), w.float(), b.float())
        ref_lp = linear_gelu_ref(x, w, b)
    else:
        ref32 = torch.nn.functional.linear(x.float(), w.float(), b.float())
        ref_lp = torch.nn.functional.linear(x, w, b)
    assert out.shape == ref32.shape and out.dtype == x.dtype
    assert_within_tolerance(out, ref32, ref_lp if x.dtype != torch.float32 else ref32, FLOOR[x.dtype], name)


def test_reference_is_the_tanh_gelu():
    x, w, b = layer(8, 16, 12, torch.float32)
    y = x @ w.t() + b
    expected = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3)))
    torch.testing.assert_close(linear_gelu_ref(x, w, b), expected)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gelu", [True, False], ids=["gelu", "plain"])
def test_prepacked_form_matches(form, dtype, gelu):
    usable(form, dtype)
    for M, K, N, lead, seed in ((37, 48, 80, (2,), 1), (64, 96, 160, (), 2), (64, 96, 200, (), 5)):
        x, w, b = layer(M, K, N, dtype, seed=seed, lead=lead)
        packed = prepack_linear(w, b, dtype=dtype, backend=form, batch_size=x.numel() // K)
        assert packed.backend == form and packed.out_features == N
        if form != "mkldnn":  # the native and reference forms hold fp32 weights (x is widened per call)
            assert packed.weight.dtype == torch.float32
        check((linear_gelu if gelu else linear)(x, packed), x, w, b, gelu, f"{form} {M}x{K}->{N}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tuned_pack_hint_is_timed_once_and_either_layout_computes_the_same(monkeypatch, caplog, dtype):
    """The layout oneDNN packs a weight in is chosen by timing (`pack_hint`, the suite pins it off); both candidate
    layouts must give the op's result, whichever wins on this CPU."""
    usable("mkldnn", dtype)
    M, K, N = 96, 64, 200
    x, w, b = layer(M, K, N, dtype, seed=6)
    for hint in (M, 1):  # each layout, forced
        check(lg._mkldnn_call(x, lg._mkldnn_pack(w, hint), b, True), x, w, b, True, f"packed for {hint} rows")
    assert lg.pack_hint(N, K, dtype, M) == M  # tuning off (tests/conftest.py)
    monkeypatch.setenv("DITENGINE_AUTOTUNE", "1")
    lg.pack_hint.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="ditengine"):
            chosen = lg.pack_hint(N, K, dtype, M)
            assert lg.pack_hint(N, K, dtype, M) == chosen  # cached: timed once per shape
            packed = prepack_linear(w, b, dtype=dtype, backend="mkldnn", batch_size=M)
        assert chosen in (M, 1)
        assert sum("packed for" in r.message for r in caplog.records) == 1
        assert lg.pack_hint(N, K, dtype, 1) == 1  # nothing to choose
        assert lg.pack_hint(4096, 4096, dtype, 4096) == 4096  # past TUNED_MAX_FLOP: not timed
        check(linear_gelu(x, packed), x, w, b, True, f"tuned ({chosen} rows)")
    finally:
        lg.pack_hint.cache_clear()


def test_probe_decides_from_what_the_op_computes(monkeypatch):
    """The probe accepts only an op that runs and computes the tanh GELU: an erf GELU or an error is refused."""
    real = lg._mkldnn_call

    def erf_gelu(x, w, b, apply_gelu):
        y = real(x, w, b, False)
        return torch.nn.functional.gelu(y) if apply_gelu else y

    def unsupported(x, w, b, apply_gelu):
        raise RuntimeError("could not create a primitive descriptor for the inner product")

    if torch.backends.mkldnn.is_available():
        monkeypatch.setattr(lg, "_mkldnn_call", erf_gelu)
        lg.mkldnn_gelu_is_tanh.cache_clear()
        assert not lg.mkldnn_gelu_is_tanh(torch.float32)
    monkeypatch.setattr(lg, "_mkldnn_call", unsupported)
    lg.mkldnn_gelu_is_tanh.cache_clear()
    assert not lg.mkldnn_gelu_is_tanh(torch.float32)
    monkeypatch.setattr(lg, "_mkldnn_call", real)
    lg.mkldnn_gelu_is_tanh.cache_clear()


@pytest.mark.parametrize("capability, fp32_choice", [("AVX512", "mkldnn"), ("AVX2", "native")])
def test_choice_follows_the_probe_the_cpu_and_the_extension(monkeypatch, capability, fp32_choice):
    monkeypatch.setattr(lg, "mkldnn_gelu_is_tanh", lambda dtype: True)
    monkeypatch.setattr(lg, "native_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert lg.choose_backend(torch.bfloat16) == "mkldnn"  # bf16 dots in oneDNN beat fp32 GEMMs
    assert lg.choose_backend(torch.float32) == fp32_choice  # oneDNN's AVX-512 fp32 GEMM beats the BLAS
    monkeypatch.setattr(lg, "mkldnn_gelu_is_tanh", lambda dtype: False)
    assert lg.choose_backend(torch.bfloat16) == "native"
    monkeypatch.setattr(lg, "native_available", lambda: False)
    assert lg.choose_backend(torch.bfloat16) == "reference"
    monkeypatch.setattr(lg, "mkldnn_gelu_is_tanh", lambda dtype: dtype == torch.float32)
    assert lg.choose_backend(torch.float32) == "mkldnn"
    assert lg.choose_backend(torch.bfloat16) == "reference"


def test_backend_choice_is_logged_once(caplog):
    _log_choice.cache_clear()
    _, w, b = layer(4, 8, 8, torch.float32)
    with caplog.at_level(logging.INFO, logger="ditengine"):
        prepack_linear(w, b, backend="reference")
        prepack_linear(w, b, backend="reference")
    assert sum("linear_gelu (float32, prepacked) on cpu runs reference" in r.message for r in caplog.records) == 1


def test_auto_packing_runs_and_matches():
    x, w, b = layer(20, 32, 64, torch.bfloat16, seed=3)
    packed = prepack_linear(w, b, dtype=torch.bfloat16)
    assert packed.backend in ("mkldnn", "native", "reference")
    check(linear_gelu(x, packed), x, w, b, True, f"auto ({packed.backend})")


def test_registered_op_passes_opcheck():
    x, w, b = layer(6, 16, 24, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.ditengine.linear_gelu, (x, w, b, True))


# -- the native CPU kernel (csrc/linear_gelu.cpp) --------------------------------------------------------
@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M, K, N", [(1, 8, 8), (97, 72, 300), (300, 384, 1536), (130, 40, 520)])
@pytest.mark.parametrize("gelu", [True, False], ids=["gelu", "plain"])
def test_native_matches_reference(M, K, N, dtype, gelu):
    """fp32 prepacked weights (the fast form) and weights in x's dtype; odd sizes cross every tile edge."""
    x, w, b = layer(M, K, N, dtype, seed=M + K + N, lead=(2,))
    for weight, bias in ((w.float(), b.float()), (w, b)):
        out = torch.ops.ditengine.linear_gelu(x, weight, bias, gelu)
        check(out, x, w, b, gelu, f"native M={M} K={K} N={N} weight {weight.dtype}")
    out = torch.ops.ditengine.linear_gelu(x, w.float(), None, gelu)
    check(out, x, w, torch.zeros_like(b), gelu, "native without bias")


@native
def test_native_extreme_and_nan_inputs():
    x, w, b = layer(16, 8, 24, torch.float32, seed=6)
    x[0] *= 1e4  # pre-activations far into both saturated ends of the GELU
    x[3, 2] = float("nan")  # one row of x: only that output row is NaN
    out = torch.ops.ditengine.linear_gelu(x, w, b, True)
    assert torch.isnan(out[3]).all() and torch.isfinite(out[torch.arange(16) != 3]).all()
    # The tolerance rule with an fp64 reference (an fp32 one against itself would leave only the floor), row 0
    # apart: its fp32 rounding (|y| ~ 1e4) would otherwise set the bound for rows of |y| ~ 1.
    ref_hi, ref_lp = linear_gelu_ref(x.double(), w.double(), b.double()), linear_gelu_ref(x, w, b)
    for rows, name in (([0], "saturated row"), ([r for r in range(16) if r not in (0, 3)], "ordinary rows")):
        assert_within_tolerance(out[rows], ref_hi[rows], ref_lp[rows], fp32_floor(ref_hi[rows]), name)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_same_inputs_same_bits(dtype):
    x, w, b = layer(300, 96, 600, dtype, seed=7)
    first = torch.ops.ditengine.linear_gelu(x, w.float(), b.float(), True)
    assert all(torch.equal(first, torch.ops.ditengine.linear_gelu(x, w.float(), b.float(), True)) for _ in range(3))


@native
def test_native_float64_runs_the_torch_form():
    x, w, b = layer(5, 8, 12, torch.float64, seed=9)
    torch.testing.assert_close(torch.ops.ditengine.linear_gelu(x, w, b, True), linear_gelu_ref(x, w, b))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_passes_opcheck(dtype):
    x, w, b = layer(6, 16, 24, dtype, seed=8, lead=(2,))
    torch.library.opcheck(torch.ops.ditengine.linear_gelu, (x, w.float(), b.float(), True))
    torch.library.opcheck(torch.ops.ditengine.linear_gelu, (x, w, None, False))


@native
def test_native_bf16_rounding_is_torchs():
    """With K = 1 each output is one exact fp32 product, so the kernel's bf16 rounding (vectorised) must
    give torch's bits: round to nearest even, ties included, inf kept, NaN kept (its payload may differ)."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(67, 1, generator=g).bfloat16()
    x[5, 0], x[6, 0], x[7, 0] = float("nan"), float("inf"), -float("inf")
    w = torch.randn(45, 1, generator=g)
    w[3, 0] = 1.0 + 2.0**-8  # products exactly halfway between two bf16 values
    out = torch.ops.ditengine.linear_gelu(x, w, None, False)
    expected = (x.float() * w.t()).bfloat16()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan) and nan.sum() == 45
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


# -- GELU on a column range (Flux's single-stream block: stacked q / k / v / proj_mlp, GELU from 3D on) ------
D_FLUX = 24  # a small hidden size: the stacked weight is (3D + 4D, D) = (168, 24), GELU from column 72


def check_cols(out, x, w, b, gelu_from, name="out"):
    """Tolerance rule against F.linear + GELU-tanh on the columns [gelu_from, N), in fp32 and in x's dtype."""
    def ref(xx, ww, bb):
        y = torch.nn.functional.linear(xx, ww, bb)
        y[..., gelu_from:] = torch.nn.functional.gelu(y[..., gelu_from:], approximate="tanh")
        return y
    ref32 = ref(x.float(), w.float(), None if b is None else b.float())
    ref_lp = ref(x, w, b) if x.dtype != torch.float32 else ref32
    assert out.shape == ref32.shape and out.dtype == x.dtype
    assert_within_tolerance(out, ref32, ref_lp, FLOOR[x.dtype], name)


def flux_layer(M, dtype, seed=0):
    return layer(M, D_FLUX, 7 * D_FLUX, dtype, seed=seed)


@pytest.mark.parametrize("gelu_from", [0, 37, 3 * D_FLUX, 7 * D_FLUX])
def test_reference_gelu_columns(gelu_from):
    x, w, b = flux_layer(9, torch.float32, seed=11)
    y = torch.nn.functional.linear(x, w, b)
    out = linear_gelu_ref(x, w, b, gelu_from=gelu_from)
    torch.testing.assert_close(out[:, :gelu_from], y[:, :gelu_from], rtol=0, atol=0)  # the bias alone
    torch.testing.assert_close(out[:, gelu_from:], torch.nn.functional.gelu(y[:, gelu_from:], approximate="tanh"))
    torch.testing.assert_close(linear_gelu_ref(x.bfloat16(), w, b, upcast=True, gelu_from=gelu_from).float(),
                               out, rtol=2e-2, atol=2e-2)


def test_flux_block_one_gemm_is_the_four_linears():
    """The stacked form computes what FluxSingleTransformerBlock does with four separate layers."""
    x, _, _ = flux_layer(13, torch.float32, seed=12)
    g = torch.Generator().manual_seed(13)
    ws = [torch.randn(n, D_FLUX, generator=g) * D_FLUX**-0.5 for n in (D_FLUX,) * 3 + (4 * D_FLUX,)]
    bs = [torch.randn(w.shape[0], generator=g) for w in ws]
    packed = prepack_linear(torch.cat(ws), torch.cat(bs))
    out = linear_gelu(x, packed, gelu_from=3 * D_FLUX)  # (13, 7D)
    q, k, v, mlp = out.split([D_FLUX] * 3 + [4 * D_FLUX], dim=-1)
    for got, w, b in zip((q, k, v), ws, bs):
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlp, torch.nn.functional.gelu(torch.nn.functional.linear(x, ws[3], bs[3]),
                                                             approximate="tanh"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gelu_from", [0, 37, 3 * D_FLUX, 7 * D_FLUX - 1, 7 * D_FLUX])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gelu_columns(form, dtype, gelu_from, with_bias):
    usable(form, dtype)
    x, w, b = layer(33, D_FLUX, 7 * D_FLUX, dtype, seed=14 + gelu_from, lead=(3,))  # 99 rows
    b = b if with_bias else None
    packed = prepack_linear(w, b, dtype=dtype, backend=form, batch_size=99)
    check_cols(linear_gelu(x, packed, gelu_from), x, w, b, gelu_from, f"{form} gelu_from={gelu_from}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gelu_from_edges_are_the_existing_calls(form, dtype):
    """gelu_from = 0 is today's whole-row GELU, bit for bit; gelu_from = N is `linear`; without the GELU a
    gelu_from changes nothing."""
    usable(form, dtype)
    for x, w, b in (flux_layer(21, dtype, seed=15), layer(97, 72, 300, dtype, seed=17)):
        packed = prepack_linear(w, b, dtype=dtype, backend=form, batch_size=x.shape[0])
        N = w.shape[0]
        assert torch.equal(linear_gelu(x, packed, 0), linear_gelu(x, packed))
        assert torch.equal(linear_gelu(x, packed, N), linear(x, packed))
        assert torch.equal(lg._call(x, packed, False, 100), linear(x, packed))


@pytest.mark.parametrize("impl", OP_IMPLS)
def test_op_gelu_from_zero_and_plain_keep_their_bits(impl):
    """The registered op: an explicit gelu_from = 0 is the schema's default, gelu_from = N no GELU, and without
    the GELU a gelu_from changes nothing."""
    x, w, b = layer(97, 72, 300, torch.bfloat16, seed=17)
    w, b = w.float(), b.float()
    assert torch.equal(run_op(impl, x, w, b, True, 0), run_op(impl, x, w, b, True))
    assert torch.equal(run_op(impl, x, w, b, True, 300), run_op(impl, x, w, b, False))
    assert torch.equal(run_op(impl, x, w, b, False, 100), run_op(impl, x, w, b, False))


@pytest.mark.parametrize("gelu_from", [0, 3 * D_FLUX, 101])
def test_registered_op_with_gelu_from_passes_opcheck(gelu_from):
    x, w, b = flux_layer(6, torch.float32, seed=16)
    torch.library.opcheck(torch.ops.ditengine.linear_gelu, (x, w, b, True, gelu_from))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 97, 131])  # odd row counts, one beyond a 128-row tile
@pytest.mark.parametrize("gelu_from", [0, 72, 255, 256, 301, 512, 517, 520])
def test_native_gelu_columns_cross_the_tiles(M, dtype, gelu_from):
    """N = 520 spans three 256-column tiles: gelu_from at a tile edge (256, 512), inside one (72, 301, 517),
    at 0 and at N; fp32 prepacked weights and weights in x's dtype, with and without bias."""
    x, w, b = layer(M, 40, 520, dtype, seed=M + gelu_from)
    op = torch.ops.ditengine.linear_gelu
    for weight, bias in ((w.float(), b.float()), (w, b), (w.float(), None)):
        out = op(x, weight, bias, True, gelu_from)
        check_cols(out, x, w, None if bias is None else b, gelu_from, f"native M={M} weight {weight.dtype} "
                   f"bias={bias is not None} gelu_from={gelu_from}")


@native
def test_native_gelu_columns_nan_isolation_and_saturation():
    x, w, b = layer(16, 8, 300, torch.float32, seed=18)
    x[0] *= 1e4  # both saturated ends of the GELU, on the GELU columns; the linear columns stay exact
    x[5, 1] = float("nan")
    out = torch.ops.ditengine.linear_gelu(x, w, b, True, 131)
    assert torch.isnan(out[5]).all() and torch.isfinite(out[torch.arange(16) != 5]).all()
    ref_hi, ref_lp = linear_gelu_ref(x.double(), w.double(), b.double(), gelu_from=131), \
        linear_gelu_ref(x, w, b, gelu_from=131)
    for rows, name in (([0], "saturated row"), ([r for r in range(16) if r not in (0, 5)], "ordinary rows")):
        assert_within_tolerance(out[rows], ref_hi[rows], ref_lp[rows], fp32_floor(ref_hi[rows]), name)


@native
def test_native_gelu_columns_other_paths():
    """float64 (the torch form inside the kernel) and K = 0 (the bias alone) honour gelu_from too."""
    x, w, b = layer(5, 8, 12, torch.float64, seed=19)
    torch.testing.assert_close(torch.ops.ditengine.linear_gelu(x, w, b, True, 7), linear_gelu_ref(x, w, b, gelu_from=7))
    x0, w0 = torch.empty(5, 0), torch.empty(12, 0)
    torch.testing.assert_close(torch.ops.ditengine.linear_gelu(x0, w0, b.float(), True, 7),
                               linear_gelu_ref(x0, w0, b.float(), gelu_from=7))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_gelu_columns_pass_opcheck(dtype):
    x, w, b = layer(6, 16, 300, dtype, seed=20, lead=(2,))
    torch.library.opcheck(torch.ops.ditengine.linear_gelu, (x, w.float(), b.float(), True, 259))
    torch.library.opcheck(torch.ops.ditengine.linear_gelu, (x, w, None, True, 300))


# -- bad inputs: one table, every form; the registered op's C++ checks against its Python body -------------
def packed_call(f, dtype=torch.float32):
    """f(x, packed) on fresh seeded Flux-sized (4, 24) x and (168, 24) weights packed in the case's form."""
    def call(form):
        usable(form, dtype)
        x, w, b = flux_layer(4, dtype, seed=21)
        return f(x, prepack_linear(w, b, dtype=dtype, backend=form))
    return call


def op_call(**change):
    """The registered op on fresh seeded bf16 (4, 8) x, weight (12, 8) and bias, one argument changed (a
    callable of the defaults), called through "native" (the C++ kernel) or "python" (its Python body)."""
    def call(impl):
        x, w, b = layer(4, 8, 12, torch.bfloat16, seed=22)
        args = dict(x=x, weight=w, bias=b, apply_gelu=True, gelu_from=0)
        args.update({k: v(**args) for k, v in change.items()})
        return run_op(impl, *args.values())
    return call


def weights(w=lambda w: w, b=lambda b: b):
    """Fresh seeded (8, 8) weight and (8,) bias, each passed through its function."""
    _, weight, bias = layer(4, 8, 8, torch.float32, seed=23)
    return w(weight), b(bias)


# linear_gelu / linear check x against the packed weights (`_checks.check_packed_input`, as linear_swiglu does) in
# every form; the registered op's Python body and fake check with `check_linear_gelu`, in its C++ kernel's words.
# (id, call(form or impl), exception type, regex naming the argument[, {form or impl: why it fails instead}])
API_ROWS = [
    ("prepack-b-shape", lambda form: prepack_linear(*weights(b=lambda b: b[:7]), backend=form), ValueError,
     r"w: expected \(N, K\) and b \(N,\), got \(8, 8\) and \(7,\)"),
    ("prepack-w-3d", lambda form: prepack_linear(weights(w=lambda w: w.view(2, 4, 8))[0], backend=form), ValueError,
     r"w: expected \(N, K\) and b \(N,\), got \(2, 4, 8\) and None"),
    ("x-dtype", packed_call(lambda x, p: linear_gelu(x.bfloat16(), p)), TypeError,
     "x: expected dtype torch.float32 .* got torch.bfloat16"),
    ("x-dtype-linear", packed_call(lambda x, p: linear(x.double(), p)), TypeError,
     "x: expected dtype torch.float32 .* got torch.float64"),
    ("x-last-dim", packed_call(lambda x, p: linear_gelu(x[:, :7], p)), ValueError,
     r"x: expected \(\.\.\., 24\), got \(4, 7\)"),
    ("x-device", packed_call(lambda x, p: linear_gelu(x.to("meta"), p)), ValueError,
     "x: on meta, expected cpu like the packed weights"),
    *((f"gelu_from={bad}", packed_call(lambda x, p, bad=bad: linear_gelu(x, p, bad)), ValueError,
       rf"gelu_from: expected 0 <= gelu_from <= out_features = 168, got {bad}") for bad in (-1, 7 * D_FLUX + 1)),
    *((f"gelu_from-{type(bad).__name__}", packed_call(lambda x, p, bad=bad: linear_gelu(x, p, bad)), TypeError,
       "gelu_from: expected an int column index") for bad in (True, 3.0, torch.tensor(3))),
]
# The bad input is the backend argument itself: once.
BACKEND_ROWS = [("prepack-backend=cuda", lambda _: prepack_linear(*weights(), backend="cuda"),
                 ValueError, "backend='cuda'")]
# The op's fake (meta) form checks gelu_from as its Python body does.
FAKE_ROWS = [(f"op-gelu_from={bad}", lambda _, bad=bad: torch.ops.ditengine.linear_gelu(
                  *(t.to("meta") for t in flux_layer(4, torch.float32)), True, bad), ValueError,
              f"gelu_from: expected 0 <= gelu_from <= out_features = 168, got {bad}") for bad in (-2, 169)]
# The C++ kernel and the Python body (`check_linear_gelu`) raise the same error: ValueError for a shape or value,
# TypeError for a dtype (csrc/checks.h's convention), each naming the argument. (The C++ kernel raised RuntimeError
# for all of these, with gelu_from's message its own, before they agreed.)
OP_ROWS = [
    ("op-weight-1d", op_call(weight=lambda weight, **_: weight[0]), ValueError, r"weight must be \(N, K\)"),
    ("op-weight-K", op_call(weight=lambda weight, **_: weight[:, :7]), ValueError,
     "does not take x's last dimension 8"),
    ("op-weight-dtype", op_call(weight=lambda weight, **_: weight.half(), bias=lambda bias, **_: bias.half()),
     TypeError, "weight must be float32 or x's dtype"),
    ("op-bias-shape", op_call(bias=lambda bias, **_: bias[:5]), ValueError, r"bias must be \(12\)"),
    ("op-bias-dtype", op_call(bias=lambda bias, **_: bias.float()), TypeError,
     "bias dtype Float must match weight dtype BFloat16"),
    # float64 x runs the torch form in C++: the bias is checked before it all the same
    ("op-bias-shape-float64-x", op_call(x=lambda x, **_: x.double(), weight=lambda weight, **_: weight.float(),
                                        bias=lambda bias, **_: bias[:5].float()), ValueError, r"bias must be \(12\)"),
    # A meta x among CPU tensors: the dispatcher sends the call to the fake, which checks as the body does.
    ("op-x-device", op_call(x=lambda x, **_: x.to("meta")), ValueError,
     "x and weight must be on one device, got meta and cpu"),
    *((f"op-gelu_from={bad}", op_call(gelu_from=lambda bad=bad, **_: bad), ValueError,
       rf"gelu_from: expected 0 <= gelu_from <= out_features = 12, got {bad}") for bad in (-1, 13)),
]


@pytest.mark.parametrize("call, where, error, match", [
    *bad_input_table(API_ROWS, FORMS), *bad_input_table(BACKEND_ROWS, [pytest.param(None, id="any")]),
    *bad_input_table(FAKE_ROWS, [pytest.param(None, id="fake")]), *bad_input_table(OP_ROWS, OP_IMPLS)])
def test_bad_input_names_the_argument(call, where, error, match):
    """The public calls in every prepacked form, and the registered op called directly: its C++ kernel and its
    Python body must raise the same exception type, each naming the argument."""
    with pytest.raises(error, match=match):
        call(where)


@pytest.fixture(scope="module")
def isa_variant(tmp_path_factory):
    """isa -> the native outputs with DITENGINE_ISA=isa (gelu_from at offsets that start the GELU part of a
    tile off every vector width), computed once per ISA in a fresh interpreter."""
    code = """
        import torch
        from ditengine.kernels import _native
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(37, 40, generator=g), torch.randn(300, 40, generator=g) * 0.3,
                   torch.randn(300, generator=g))
        outs = [_native.build_info()["isa"]]
        for gelu_from in (0, 5, 72, 263, 291, 300):
            for dt in (torch.float32, torch.bfloat16):
                outs.append(torch.ops.ditengine.linear_gelu(x.to(dt), w, b, True, gelu_from))
        torch.save(outs, "{path}")
    """
    return isa_runner(tmp_path_factory, code)


@native
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_native_gelu_columns_isa_variants_agree(isa, isa_variant):
    """Each vector epilogue against the scalar baseline (the GEMM is the same BLAS call in all three)."""
    skip_unless_cpu_runs(isa)
    for a, b in zip(isa_variant(isa), isa_variant("baseline")):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5 if a.dtype == torch.float32 else 1e-2,
                                   rtol=1e-5 if a.dtype == torch.float32 else 1e-2)
