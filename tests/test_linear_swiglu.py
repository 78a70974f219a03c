import importlib
import logging
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from ditengine.kernels import (PackedSwiGLU, linear_swiglu, linear_swiglu_ref, prepack_swiglu, swiglu,
                               swiglu_ref)

from ditengine.kernels._backend import _log_choice
from support.backends import bad_input_table, cpu_backends
from support.native_helpers import isa_runner, needs_native, skip_unless_cpu_runs
from support.tolerance import assert_within_tolerance, fp32_floor

ls = importlib.import_module("ditengine.kernels.linear_swiglu")  # the module; the package exports the function
native = needs_native("linear_swiglu")
native_epilogue = needs_native("swiglu")

# Every prepacked form on CPU tensors (`ls.FORMS`); each skips only where it cannot run here.
FORMS = [*cpu_backends("linear_swiglu"), pytest.param("stacked", id="stacked")]
assert sorted(p.values[0] for p in FORMS) == sorted(ls.FORMS)
# The Triton interpreter gets fp32 and fp16 (its bf16 is wrong: docs/design.md section 6); bf16 Triton runs on a GPU.
CPU_DTYPES = {"reference": (torch.float32, torch.bfloat16), "stacked": (torch.float32, torch.bfloat16),
              "triton": (torch.float32, torch.float16), "native": (torch.float32, torch.bfloat16, torch.float16)}
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def mlp(M, D, Fo, dtype, seed=0, lead=(), bias=True):
    """x (*lead, M, D), gate and up weights (F, D), biases (F,) or None: fresh random values, never zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, D, generator=g).to(dtype)
    wg, wu = ((torch.randn(Fo, D, generator=g) * D**-0.5).to(dtype) for _ in range(2))
    bg, bu = ((torch.randn(Fo, generator=g).to(dtype) for _ in range(2)) if bias else (None, None))
    return x, wg, wu, bg, bu


def double(t):
    return None if t is None else t.double()


def check(out, x, wg, wu, bg, bu, name="out"):
    """The tolerance rule: ref_hi in fp64 from the same (rounded) inputs, ref_lp PyTorch's eager run in x's dtype."""
    ref_hi = linear_swiglu_ref(x.double(), wg.double(), wu.double(), double(bg), double(bu), upcast=False)
    ref_lp = linear_swiglu_ref(x, wg, wu, bg, bu, upcast=False)
    assert out.shape == ref_hi.shape and out.dtype == x.dtype, (out.shape, out.dtype)
    floor = fp32_floor(ref_hi) if x.dtype == torch.float32 else FLOOR[x.dtype]
    assert_within_tolerance(out, ref_hi, ref_lp, floor, name)


def check_epilogue(out, gu, name="swiglu"):
    ref_hi = swiglu_ref(gu.double(), upcast=False)
    ref_lp = swiglu_ref(gu, upcast=False)
    assert out.shape == ref_hi.shape and out.dtype == gu.dtype, (out.shape, out.dtype)
    floor = fp32_floor(ref_hi) if gu.dtype == torch.float32 else FLOOR[gu.dtype]
    assert_within_tolerance(out, ref_hi, ref_lp, floor, name)


def test_reference_is_silu_gate_times_up():
    x, wg, wu, bg, bu = mlp(8, 16, 12, torch.float32)
    g, u = x @ wg.t() + bg, x @ wu.t() + bu
    torch.testing.assert_close(linear_swiglu_ref(x, wg, wu, bg, bu), g * torch.sigmoid(g) * u)
    gu = torch.cat([g, u], dim=-1)  # the stacked GEMM's output: gate first, then up
    torch.testing.assert_close(swiglu_ref(gu), g * torch.sigmoid(g) * u)


# -- against diffusers' ACE-Step 1.5 MLP -----------------------------------------------------------------
@pytest.mark.parametrize("backend", FORMS)
def test_matches_diffusers_ace_step_mlp_before_its_down_projection(backend):
    """AceStepMLP is down(silu(gate(h)) * up(h)) without biases; what down_proj receives is this op's output."""
    ace = pytest.importorskip("diffusers.models.transformers.ace_step_transformer")
    torch.manual_seed(0)
    module = ace.AceStepMLP(hidden_size=256, intermediate_size=768).eval()
    h = torch.randn(2, 37, 256)
    seen = []
    handle = module.down_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            module(h)
    finally:
        handle.remove()
    expected = seen[0]  # (2, 37, 768)
    packed = prepack_swiglu(module.gate_proj.weight, module.up_proj.weight, dtype=torch.float32, backend=backend)
    assert packed.bias is None
    out = linear_swiglu(h, packed)
    assert out.shape == expected.shape and out.dtype == torch.float32
    rel = ((out - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-5, f"{backend}: max|out - diffusers| / max|diffusers| = {rel:.2e}"


# -- linear_swiglu on every CPU backend ------------------------------------------------------------------
# (M, D, F): one row, odd row counts, odd F (72 and 100 are not multiples of a panel), F past one panel.
SHAPES = [(1, 8, 8), (97, 72, 100), (33, 64, 72), (130, 40, 200)]


@pytest.mark.parametrize("backend", FORMS)
@pytest.mark.parametrize("M, D, Fo", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_matches_reference(backend, M, D, Fo, bias):
    for dtype in CPU_DTYPES[backend]:
        x, wg, wu, bg, bu = mlp(M, D, Fo, dtype, seed=M + D + Fo + bias, lead=(2,), bias=bias)
        packed = prepack_swiglu(wg, wu, bg, bu, dtype=dtype, backend=backend)
        assert packed.backend == backend and packed.out_features == Fo and packed.in_features == D
        check(linear_swiglu(x, packed), x, wg, wu, bg, bu, f"{backend} {dtype} M={M} D={D} F={Fo} bias={bias}")


@native_epilogue
def test_stacked_backend_runs_the_epilogue_op():
    x, wg, wu, bg, bu = mlp(5, 16, 40, torch.bfloat16, seed=2)
    packed = prepack_swiglu(wg, wu, bg, bu, dtype=torch.bfloat16, backend="stacked")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = linear_swiglu(x, packed)
    names = {e.name for e in prof.events()}
    assert "ditengine::swiglu" in names and "aten::silu" not in names, names
    check(out, x, wg, wu, bg, bu, "stacked")


def test_triton_backend_runs_the_epilogue_kernel(triton_launches):
    x, wg, wu, bg, bu = mlp(5, 16, 40, torch.float32, seed=3)
    out = linear_swiglu(x, prepack_swiglu(wg, wu, bg, bu, dtype=torch.float32, backend="triton"))
    assert triton_launches["_swiglu_kernel"] == 1
    check(out, x, wg, wu, bg, bu, "triton")


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp(-g), g << 0
@pytest.mark.parametrize("backend", FORMS)
def test_nan_stays_in_its_row(backend):
    dtype = torch.float32
    x, wg, wu, bg, bu = mlp(70, 48, 100, dtype, seed=4)
    x[5, 3] = float("nan")
    x[40, 0] = float("nan")
    x[41] *= 1e3  # pre-activations far into SiLU's saturated ends: large, finite, in their row only
    bad = torch.zeros(70, dtype=torch.bool)
    bad[[5, 40]] = True
    out = linear_swiglu(x, prepack_swiglu(wg, wu, bg, bu, dtype=dtype, backend=backend))
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all(), torch.isnan(out).any(-1).nonzero()
    for rows, name in (([41], "saturated row"), ([r for r in range(70) if not bad[r] and r != 41], "other rows")):
        check(out[rows], x[rows], wg, wu, bg, bu, f"{backend} {name}")


@pytest.mark.parametrize("backend", FORMS)
def test_empty_inputs(backend):
    x, wg, wu, bg, bu = mlp(0, 16, 40, torch.float32, seed=5)
    out = linear_swiglu(x, prepack_swiglu(wg, wu, bg, bu, dtype=torch.float32, backend=backend))
    assert out.shape == (0, 40)
    # D = 0: an empty sum, so the output is the biases' epilogue on every row.
    g = torch.Generator().manual_seed(6)
    bg, bu = torch.randn(40, generator=g), torch.randn(40, generator=g)
    packed = prepack_swiglu(torch.empty(40, 0), torch.empty(40, 0), bg, bu, dtype=torch.float32, backend=backend)
    out = linear_swiglu(torch.empty(3, 0), packed)
    torch.testing.assert_close(out, (F.silu(bg) * bu).expand(3, 40))


def test_same_inputs_same_bits():
    x, wg, wu, bg, bu = mlp(150, 96, 300, torch.float32, seed=7)
    packed = prepack_swiglu(wg, wu, bg, bu, dtype=torch.float32)
    first = linear_swiglu(x, packed)
    assert all(torch.equal(first, linear_swiglu(x, packed)) for _ in range(3))


# -- the prepacked forms ---------------------------------------------------------------------------------
def test_panels_pair_each_gate_row_with_its_up_row():
    _, wg, wu, bg, bu = mlp(1, 6, 72, torch.float32, seed=8)
    bn = ls.PANEL
    panels = ls._panels(wg, wu, bn)  # (n_panels, D, 2 bn)
    n_panels = -(-72 // bn)
    assert panels.shape == (n_panels, 6, 2 * bn) and panels.is_contiguous()
    for f in (0, bn - 1, bn, 71):
        j, c = divmod(f, bn)
        assert torch.equal(panels[j, :, c], wg[f]) and torch.equal(panels[j, :, bn + c], wu[f])
    tail = 72 - (n_panels - 1) * bn  # zero columns past F in the last panel
    assert not panels[-1, :, tail:bn].any() and not panels[-1, :, bn + tail:].any()
    bias = ls._panels(bg, bu, bn)  # (n_panels, 2 bn)
    assert torch.equal(bias[1, :bn], bg[bn:2 * bn]) and torch.equal(bias[1, bn:], bu[bn:2 * bn])


def test_panel_op_python_body_matches_the_reference():
    """The op's Python implementation (its fallback without the native kernel), reached past the C++ kernel."""
    x, wg, wu, bg, bu = mlp(37, 24, 100, torch.float32, seed=9, lead=(2,))
    weight, bias = ls._panels(wg, wu, ls.PANEL), ls._panels(bg, bu, ls.PANEL)
    python_impl = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    out = torch.ops.ditengine.linear_swiglu.default.redispatch(python_impl, x, weight, bias, 100)
    check(out, x, wg, wu, bg, bu, "panel op, Python body")


def test_stacked_forms_hold_gate_then_up_in_dtype():
    _, wg, wu, bg, bu = mlp(1, 16, 24, torch.float32, seed=10)
    packed = prepack_swiglu(wg, wu, bg, bu, dtype=torch.bfloat16, backend="reference")
    assert isinstance(packed, PackedSwiGLU) and packed.weight.dtype == torch.bfloat16
    assert torch.equal(packed.weight, torch.cat([wg, wu]).bfloat16()) and packed.weight.shape == (48, 16)
    assert torch.equal(packed.bias, torch.cat([bg, bu]).bfloat16())


def test_prepack_copies_the_weights():
    x, wg, wu, bg, bu = mlp(4, 16, 24, torch.float32, seed=11)
    packed = prepack_swiglu(wg, wu, bg, bu, dtype=torch.float32)
    before = linear_swiglu(x, packed)
    wg.mul_(2), bu.add_(1)
    assert torch.equal(linear_swiglu(x, packed), before)


def test_auto_backend_and_its_log(caplog):
    _log_choice.cache_clear()
    _, wg, wu, _, _ = mlp(1, 8, 8, torch.float32)
    with caplog.at_level(logging.INFO, logger="ditengine"):
        packed = prepack_swiglu(wg, wu, dtype=torch.float32)
        prepack_swiglu(wg, wu, dtype=torch.float32)
    assert packed.backend == ls.choose_backend(torch.device("cpu"), torch.float32)
    message = f"linear_swiglu (float32, prepacked) on cpu runs {packed.backend}"
    assert sum(message in r.message for r in caplog.records) == 1


def test_choice_follows_the_device_the_extension_and_onednn_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(ls, "native_available", lambda: True)
    monkeypatch.setattr(ls, "mkldnn_bf16", lambda: True)
    assert ls.choose_backend(cuda, torch.bfloat16) == "stacked"  # cuBLAS, then the Triton epilogue
    assert ls.choose_backend(cpu, torch.bfloat16) == "stacked"  # oneDNN's bf16 dots beat fp32 ones
    assert ls.choose_backend(cpu, torch.float32) == "native"
    assert ls.choose_backend(cpu, torch.float16) == "native"
    monkeypatch.setattr(ls, "mkldnn_bf16", lambda: False)
    assert ls.choose_backend(cpu, torch.bfloat16) == "native"  # an emulated bf16 GEMM is slower than fp32
    monkeypatch.setattr(ls, "native_available", lambda: False)
    assert ls.choose_backend(cpu, torch.float32) == "reference"
    assert ls.choose_backend(torch.device("meta"), torch.float32) == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_registered_ops_pass_opcheck(dtype):
    x, wg, wu, bg, bu = mlp(6, 16, 40, dtype, seed=12, lead=(2,))
    weight, bias = ls._panels(wg.float(), wu.float(), 32), ls._panels(bg.float(), bu.float(), 32)
    torch.library.opcheck(torch.ops.ditengine.linear_swiglu, (x, weight, bias, 40))
    torch.library.opcheck(torch.ops.ditengine.linear_swiglu, (x, weight, None, 40))
    torch.library.opcheck(torch.ops.ditengine.swiglu, (torch.randn(2, 5, 80).to(dtype),))


# -- the epilogue alone: swiglu --------------------------------------------------------------------------
EPILOGUE_BACKENDS = cpu_backends("swiglu")


def gu_rows(lead, Fo, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, 2 * Fo, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("backend", EPILOGUE_BACKENDS)
@pytest.mark.parametrize("lead, Fo", [((1,), 1), ((97,), 72), ((2, 33), 100), ((3,), 1100)])
def test_swiglu_matches_reference(backend, lead, Fo):
    for dtype in CPU_DTYPES[backend]:
        gu = gu_rows(lead, Fo, dtype, seed=Fo)
        check_epilogue(swiglu(gu, backend=backend), gu, f"{backend} {dtype} {lead} F={Fo}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("backend", EPILOGUE_BACKENDS)
def test_swiglu_reads_strided_rows_and_extreme_values(backend):
    wide = gu_rows((18,), 130, torch.float32, seed=13)  # (18, 260)
    gu = wide[::2, :200]  # 9 rows 520 apart with 200 columns: a view, F = 100
    assert gu.stride() == (520, 1)
    gu[1, :5] = torch.tensor([-1e4, -100.0, 90.0, 1e4, 0.0])  # SiLU's saturated ends, no NaN from exp
    out = swiglu(gu, backend=backend)
    assert torch.isfinite(out).all()
    check_epilogue(out, gu, f"{backend} strided")
    batched = wide.view(2, 9, 260)[:, ::2, :200]  # leading dims that do not collapse into one row stride
    check_epilogue(swiglu(batched, backend=backend), batched, f"{backend} strided batch")


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", EPILOGUE_BACKENDS)
def test_swiglu_nan_stays_in_its_element(backend):
    gu = gu_rows((6,), 40, torch.float32, seed=14)
    gu[1, 3] = float("nan")  # a gate
    gu[4, 40 + 7] = float("nan")  # an up value
    out = swiglu(gu, backend=backend)
    nan = torch.zeros(6, 40, dtype=torch.bool)
    nan[1, 3] = nan[4, 7] = True
    assert torch.equal(torch.isnan(out), nan), torch.isnan(out).nonzero().tolist()


@native_epilogue
def test_native_swiglu_is_the_cpu_default():
    import ditengine.kernels._backend as backend

    assert backend.choose("swiglu", torch.device("cpu")) == "native"
    gu = gu_rows((4,), 32, torch.float32, seed=15)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        swiglu(gu)
    names = {e.name for e in prof.events()}
    assert "ditengine::swiglu" in names and "aten::silu" not in names, names


@native_epilogue
def test_native_bf16_output_rounds_like_torch():
    """The fp32 epilogue then one round to nearest even: torch's own conversion of the fp32 result."""
    gu = gu_rows((64,), 300, torch.bfloat16, seed=16)
    out = swiglu(gu, backend="native")
    assert torch.equal(out, swiglu(gu.float(), backend="native").bfloat16())


# -- bad inputs: one table per op, every form / backend; the registered ops' C++ checks against their Python bodies
# The registered ops' implementations: the C++ CPU kernel (what the dispatcher runs on CPU tensors) and the Python
# body (the fallback without the extension; what CUDA runs), reached past the C++ kernel. The swiglu body runs its
# reference branch here (its Triton branch would read a mis-shaped gu as if well formed); its checks, if any, come
# before that branch.
PYTHON_BODY = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def op_impls(op):
    return [pytest.param("native", marks=needs_native(op), id="native"), pytest.param("python", id="python-body")]


def run_op(op, impl, *args):
    registered = getattr(torch.ops.ditengine, op)
    if impl == "native":
        return registered(*args)
    with mock.patch.object(ls, "use_triton", lambda *tensors: False):
        return registered.default.redispatch(PYTHON_BODY, *args)


def weights(**change):
    """Fresh seeded gate / up weights (12, 8) and biases (12,), keyword arguments of prepack_swiglu: a function
    changes one from its default."""
    _, wg, wu, bg, bu = mlp(1, 8, 12, torch.float32, seed=24)
    args = dict(gate_weight=wg, up_weight=wu, gate_bias=bg, up_bias=bu)
    return {k: change[k](v) if k in change else v for k, v in args.items()}


def prepack(form, dtype=torch.float32, **change):
    return prepack_swiglu(**weights(**change), dtype=dtype, backend=form)


def packed_call(f):
    """f(x, packed) with fresh seeded (4, 8) x and the weights packed in the case's form."""
    return lambda form: f(mlp(4, 8, 12, torch.float32, seed=24)[0], prepack(form))


def op_call(**change):
    """The panel op on fresh seeded (4, 8) x and 3 panels of 32 columns for F = 72 (a callable of the defaults
    changes one argument)."""
    def call(impl):
        x, wg, wu, bg, bu = mlp(4, 8, 72, torch.float32, seed=25)
        args = dict(x=x, weight=ls._panels(wg, wu, 32), bias=ls._panels(bg, bu, 32), out_features=72)
        args.update({k: v(wg=wg, bg=bg, **args) for k, v in change.items()})
        return run_op("linear_swiglu", impl, *args.values())
    return call


def gu_call(f):
    return lambda backend: swiglu(f(gu_rows((3,), 2, torch.float32, seed=26)), backend=backend)


# The registered ops' Python bodies and fakes check as their C++ kernels do (`_check_panels`, in the C++ kernel's
# words; `_check_gu`, shared with `swiglu`, whose words the C++ kernel took): one error per bad input.
f32 = torch.float32
# (id, call(form, backend or impl), exception type, regex naming the argument[, {where: why it fails instead}])
LINEAR_SWIGLU_ROWS = [
    ("up_weight-shape", lambda form: prepack(form, up_weight=lambda w: w[:, :7]), ValueError,
     r"up_weight: expected shape \(12, 8\) \(F, D\) like gate_weight, got \(12, 7\)"),
    ("gate_weight-1d", lambda form: prepack(form, gate_weight=lambda w: w.reshape(-1)), ValueError,
     r"gate_weight: expected 2 dimensions \(F, D\), got shape \(96,\)"),
    ("bias-alone", lambda form: prepack(form, up_bias=lambda b: None), ValueError,
     "gate_bias, up_bias: expected both or neither, got gate_bias alone"),
    ("up_bias-shape", lambda form: prepack(form, up_bias=lambda b: b[:11]), ValueError,
     r"up_bias: expected shape \(12\) \(F,\), got \(11,\)"),
    ("up_weight-dtype", lambda form: prepack(form, up_weight=lambda w: w.long()), TypeError,
     r"up_weight: expected dtype in .*, got int64"),
    ("up_weight-device", lambda form: prepack(form, up_weight=lambda w: w.to("meta")), ValueError,
     "up_weight: on meta, expected cpu"),
    ("dtype-int8", lambda form: prepack(form, dtype=torch.int8), TypeError,
     "dtype: expected one of .*, got torch.int8"),
    ("batch_size-0", lambda form: prepack_swiglu(**weights(), dtype=f32, batch_size=0, backend=form), ValueError,
     "batch_size: expected a positive int or None, got 0"),
    ("x-dtype", packed_call(lambda x, p: linear_swiglu(x.bfloat16(), p)), TypeError,
     "x: expected dtype torch.float32 .* got torch.bfloat16"),
    ("x-last-dim", packed_call(lambda x, p: linear_swiglu(x[:, :7], p)), ValueError,
     r"x: expected \(\.\.\., 8\), got \(4, 7\)"),
    ("x-device", packed_call(lambda x, p: linear_swiglu(x.to("meta"), p)), ValueError,
     "x: on meta, expected cpu like the packed weights"),
    ("x-list", packed_call(lambda x, p: linear_swiglu([1.0], p)), TypeError, "x: expected a torch.Tensor, got list"),
]
# The bad input is the backend argument itself: once each.
LINEAR_SWIGLU_BACKEND_ROWS = [
    ("backend=cuda", lambda _: prepack_swiglu(**weights(), dtype=f32, backend="cuda"), ValueError,
     "backend='cuda': expected one of"),
    ("backend=native-on-meta", lambda _: prepack_swiglu(
        **weights(gate_weight=lambda w: w.to("meta"), up_weight=lambda w: w.to("meta"), gate_bias=lambda b: None,
                  up_bias=lambda b: None), dtype=f32, backend="native"),
     ValueError, "backend='native': the native kernels run on CPU tensors, got meta"),
]
LINEAR_SWIGLU_OP_ROWS = [
    ("op-weight-2d", op_call(weight=lambda wg, **_: wg, bias=lambda **_: None), ValueError,
     r"weight must be prepacked panels \(n_panels, K, 2 BN\)"),
    ("op-x-last-dim", op_call(x=lambda x, **_: x[:, :7], bias=lambda **_: None), ValueError,
     "does not take x's last dimension 7"),
    ("op-out_features", op_call(out_features=lambda **_: 64, bias=lambda **_: None), ValueError,
     "out_features 64 does not fit 3 panels of 32 columns"),
    ("op-weight-dtype", op_call(weight=lambda weight, **_: weight.bfloat16(), bias=lambda **_: None), TypeError,
     r"weight must be float32 \(prepacked\), got BFloat16"),
    ("op-bias-not-panels", op_call(bias=lambda bg, **_: bg), ValueError,
     r"bias must be prepacked \(3, 64\), got shape \[72\]"),
    ("op-x-dtype", op_call(x=lambda x, **_: x.double()), TypeError,
     "x must be float32, bfloat16 or float16, got Double"),
    ("op-bias-dtype", op_call(bias=lambda bias, **_: bias.double()), TypeError, "bias must be float32, got Double"),
    # A meta x among CPU tensors: the dispatcher sends the call to the fake, which checks as the body does.
    ("op-x-device", op_call(x=lambda x, **_: x.to("meta")), ValueError,
     "x and weight must be on one device, got meta and cpu"),
]


ONCE = [pytest.param(None, id="any")]


@pytest.mark.parametrize("call, where, error, match", [
    *bad_input_table(LINEAR_SWIGLU_ROWS, FORMS), *bad_input_table(LINEAR_SWIGLU_BACKEND_ROWS, ONCE),
    *bad_input_table(LINEAR_SWIGLU_OP_ROWS, op_impls("linear_swiglu"))])
def test_bad_input_names_the_argument(call, where, error, match):
    """prepack_swiglu and linear_swiglu in every form, and the registered panel op called directly: its C++
    kernel and its Python body must raise the same exception type, each naming the argument."""
    with pytest.raises(error, match=match):
        call(where)


SWIGLU_ROWS = [
    ("gu-odd", gu_call(lambda gu: gu[:, :3]), ValueError,
     r"gu: expected \(\.\.\., 2F\) with an even last dimension .* got \(3, 3\)"),
    ("gu-dtype", gu_call(lambda gu: gu.to(torch.int32)), TypeError, r"gu: expected dtype in .*, got int32"),
    ("gu-last-dim-strided", gu_call(lambda gu: gu.t()), ValueError, "gu: the last dimension must be contiguous"),
    ("gu-list", lambda backend: swiglu([1.0, 2.0], backend=backend), TypeError,
     "gu: expected a torch.Tensor, got list"),
]
SWIGLU_BACKEND_ROWS = [("backend=cuda", lambda _: swiglu(gu_rows((3,), 2, f32, seed=26), backend="cuda"), ValueError,
                        "backend: expected one of")]
# The C++ kernel's messages were its own ("gu must be (..., 2F), gate then up, got shape [3, 3]", "gu must be
# float32, bfloat16 or float16, got Double") and it took a strided last dimension; it now checks as `_check_gu`.
SWIGLU_OP_ROWS = [
    ("op-gu-odd", lambda impl: run_op("swiglu", impl, gu_rows((3,), 2, f32, seed=26)[:, :3]), ValueError,
     r"gu: expected \(\.\.\., 2F\) with an even last dimension \(gate then up\), got \(3, 3\)"),
    ("op-gu-dtype", lambda impl: run_op("swiglu", impl, gu_rows((3,), 2, torch.float64, seed=26)), TypeError,
     r"gu: expected dtype in \['float32', 'float16', 'bfloat16'\], got float64"),
    ("op-gu-last-dim-strided", lambda impl: run_op("swiglu", impl, gu_rows((4,), 2, f32, seed=26).t()), ValueError,
     r"gu: the last dimension must be contiguous \(stride 1\), got strides \(1, 4\)"),
]


@pytest.mark.parametrize("call, where, error, match", [
    *bad_input_table(SWIGLU_ROWS, EPILOGUE_BACKENDS), *bad_input_table(SWIGLU_BACKEND_ROWS, ONCE),
    *bad_input_table(SWIGLU_OP_ROWS, op_impls("swiglu"))])
def test_swiglu_bad_input_names_the_argument(call, where, error, match):
    """swiglu on every backend, and the registered epilogue op called directly: its C++ kernel and its Python
    body must raise the same exception type, each naming the argument."""
    with pytest.raises(error, match=match):
        call(where)


# -- the native ISA variants (AVX-512, AVX2, scalar) -----------------------------------------------------
@pytest.fixture(scope="module")
def isa_variant(tmp_path_factory):
    code = """
        import torch
        from ditengine.kernels import _native, linear_swiglu, prepack_swiglu, swiglu
        g = torch.Generator().manual_seed(0)
        x = torch.randn(37, 48, generator=g)
        wg, wu = torch.randn(100, 48, generator=g) * 0.2, torch.randn(100, 48, generator=g) * 0.2
        bg, bu = torch.randn(100, generator=g), torch.randn(100, generator=g)
        gu = torch.randn(37, 2 * 141, generator=g) * 4
        outs = [_native.build_info()["isa"]]
        for dt in (torch.float32, torch.bfloat16):
            outs += [linear_swiglu(x.to(dt), prepack_swiglu(wg, wu, bg, bu, dtype=dt, backend="native")),
                     swiglu(gu.to(dt), backend="native")]
        torch.save(outs, "{path}")
    """
    return isa_runner(tmp_path_factory, code)


@native
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_native_isa_variants_agree(isa, isa_variant):
    """Each vector epilogue against the scalar one (and its libm exp): the same GEMM, then different code."""
    skip_unless_cpu_runs(isa)
    for a, b in zip(isa_variant(isa), isa_variant("baseline")):
        tol = 1e-5 if a.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


# -- CUDA: cuBLAS over the stacked weight, then the Triton epilogue --------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("M, D, Fo", [(750, 2048, 6144), (97, 72, 100), (1, 64, 72)])
def test_gpu_matches_reference(M, D, Fo, dtype):
    x, wg, wu, bg, bu = mlp(M, D, Fo, dtype, seed=M)
    packed = prepack_swiglu(wg.cuda(), wu.cuda(), bg.cuda(), bu.cuda(), dtype=dtype)
    assert packed.backend == "triton"
    out = linear_swiglu(x.cuda(), packed).cpu()
    check(out, x, wg, wu, bg, bu, f"cuda {dtype}")
    gu = gu_rows((M,), Fo, dtype, seed=M)
    check_epilogue(swiglu(gu.cuda()).cpu(), gu, f"cuda swiglu {dtype}")


def test_triton_epilogue_compiles_for_the_h100_without_a_gpu():
    """ptxas from Triton's wheel (as bench/sm90.py does for the other kernels): the epilogue at ACE-Step's
    F = 6144 in bf16 and fp32 compiles for sm_90, nothing spilled."""
    import json

    from support.native_helpers import run_python

    out = run_python("""
        import json
        import ditengine.kernels
        from ditengine.bench.sm90 import compile_sm90, resources
        from ditengine.kernels.linear_swiglu import _swiglu_kernel as fn
        rows = []
        for dtype in ("bf16", "fp32"):
            kernel = compile_sm90(fn, {"gu_ptr": dtype, "out_ptr": dtype},
                                  {"F": "i32", "stride_gu": "i64", "stride_out": "i64"}, dict(BLOCK_F=1024), 4)
            rows.append(dict(dtype=dtype, **resources(kernel)))
        print(json.dumps(rows))
    """, TRITON_INTERPRET="0")
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["dtype"] for r in rows] == ["bf16", "fp32"] and all(r["local_bytes"] == 0 for r in rows), rows
