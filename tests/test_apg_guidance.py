import json

import pytest
import torch

from ditengine.kernels import apg_guidance, apg_guidance_ref

from support.backends import bad_input_table, cpu_backends
from support.native_helpers import triton_cpu
from support.tolerance import assert_within_tolerance, fp32_floor

# ACE-Step 1.5's latent: 64 channels, up to 7500 frames (25 Hz, 300 s).
ACE_C = 64
# The op's backends on CPU tensors, each skipped where it cannot run here: the Triton kernel through the
# interpreter, and the reference. It has no C++ kernel (the bad-input table asserts that backend="native" says so).
BACKENDS = cpu_backends("apg_guidance", ("triton", "reference"))
# Asserted against diffusers' fp32 run: max|out - diffusers| <= REL_BOUND * max|diffusers|. Both sides
# share the fp32 momentum bit for bit; they differ by the fp32 rounding of the clamped diff and of the
# projection's terms (diffusers rounds them to fp32 before the final combination, the op does not), i.e.
# a few fp32 ulps at the output's scale.
REL_BOUND = 1e-6


class DiffusersAPG:
    """diffusers' APG as ACE-Step's pipeline runs it (one MomentumBuffer for the whole loop), fed the
    (B, C, L) layout transposed to its (B, L, C), with `norm_dim=(1,)`: per (b, c) over time."""

    def __init__(self, guidance_scale, norm_threshold, eta, dtype=torch.float32):
        self.apg = pytest.importorskip("diffusers.guiders.adaptive_projected_guidance")
        self.buffer = self.apg.MomentumBuffer(momentum=-0.75)
        self.kwargs = dict(guidance_scale=guidance_scale, eta=eta, norm_threshold=norm_threshold,
                           use_original_formulation=True, norm_dim=(1,))
        self.dtype = dtype

    def __call__(self, model_out):
        B = model_out.shape[0] // 2
        blc = model_out.to(self.dtype).transpose(1, 2)  # (2B, L, C)
        out = self.apg.normalized_guidance(blc[:B], blc[B:], momentum_buffer=self.buffer, **self.kwargs)
        return out.transpose(1, 2)  # (B, C, L)

    @property
    def momentum(self):
        return self.buffer.running_average.transpose(1, 2)  # (B, C, L)


def guided_output(B, C, L, gen, spread=(0.01, 0.3)):
    """(2B, C, L) model output, cond rows first, whose cond - uncond differs in size from channel to channel
    (log-spaced over `spread`, times ~sqrt(L) in norm), so the clamp at 2.5 triggers on some rows only."""
    cond = torch.randn(B, C, L, generator=gen)
    size = torch.logspace(torch.log10(torch.tensor(spread[0])), torch.log10(torch.tensor(spread[1])), C)
    uncond = cond - size[:, None] * torch.randn(B, C, L, generator=gen)
    return torch.cat([cond, uncond])


DIFFUSERS_CASES = [
    (1, 16, 97, 2.5, 0.0),    # ACE-Step's settings, odd L: one masked block
    (2, 16, 333, 2.5, 0.5),
    (2, 16, 2500, 0.0, 0.0),  # no clamp; three blocks of 1024, the last one partial
    (1, 16, 1111, 0.0, 0.5),
]


@pytest.mark.parametrize("backend, B, C, L, norm_threshold, eta", [
    *(pytest.param(backend.values[0], *case, marks=backend.marks, id=f"{backend.id}-{'-'.join(map(str, case))}")
      for backend in BACKENDS for case in DIFFUSERS_CASES),
    pytest.param("reference", 1, ACE_C, 7500, 2.5, 0.0, id="reference-ace"),  # a 300 s ACE-Step 1.5 latent; the
    # interpreter at that shape: test_interpreter_ace_shape (two steps against the reference)
])
def test_matches_diffusers_over_four_steps(backend, B, C, L, norm_threshold, eta):
    """Four consecutive guided steps against diffusers' normalized_guidance + MomentumBuffer: the fp32 run
    within REL_BOUND, and the flash-attention rule against diffusers in float64 (ref32 there is the float64
    run, ref_lp the fp32 one)."""
    gen = torch.Generator().manual_seed(B * 1000 + L)
    ref32, ref64 = DiffusersAPG(4.0, norm_threshold, eta), DiffusersAPG(4.0, norm_threshold, eta, torch.float64)
    momentum = torch.zeros(B, C, L)
    for step in range(4):
        model_out = guided_output(B, C, L, gen)
        prev = momentum.clone()
        out = apg_guidance(model_out, momentum, 4.0, norm_threshold=norm_threshold, eta=eta, backend=backend)
        expected, expected64 = ref32(model_out), ref64(model_out)
        err = (out - expected).abs().max().item()
        assert err <= REL_BOUND * expected.abs().max().item(), f"step {step}: max|out - diffusers| = {err:.3e}"
        assert torch.equal(momentum, ref32.momentum), f"step {step}: momentum differs from diffusers'"
        assert_within_tolerance(out, expected64, expected, fp32_floor(expected64), f"step {step}")
        rows = momentum.norm(dim=-1) > 2.5  # (B, C): the rows a clamp at 2.5 scales down
        assert rows.any() and not rows.all(), f"step {step}: the inputs must exceed the threshold on some rows only"
        if norm_threshold > 0:  # the clamp changed exactly those rows
            unclamped = apg_guidance_ref(model_out, prev, 4.0, norm_threshold=0.0, eta=eta)
            assert not torch.isclose(out[rows], unclamped[rows], rtol=1e-4, atol=0).all(dim=-1).any()
            torch.testing.assert_close(out[~rows], unclamped[~rows], rtol=1e-6, atol=1e-6)


@triton_cpu
def test_interpreter_ace_shape():
    """The Triton kernel at ACE-Step's shape (8 blocks of 1024 per row), two steps, against the reference."""
    gen = torch.Generator().manual_seed(5)
    momentum, momentum_ref = torch.zeros(1, ACE_C, 7500), torch.zeros(1, ACE_C, 7500)
    for _ in range(2):
        model_out = guided_output(1, ACE_C, 7500, gen)
        out = apg_guidance(model_out, momentum, 6.0, backend="triton")
        ref = apg_guidance_ref(model_out, momentum_ref, 6.0)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
        assert torch.equal(momentum, momentum_ref)


@triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("norm_threshold, eta", [(2.5, 0.0), (0.0, 0.5), (1.0, 1.0)])
def test_interpreter_matches_reference(dtype, norm_threshold, eta):
    gen = torch.Generator().manual_seed(3)
    momentum = torch.randn(2, 12, 1500, generator=gen)  # a running state from earlier steps
    momentum_ref = momentum.clone()
    model_out = guided_output(2, 12, 1500, gen).to(dtype)
    out = apg_guidance(model_out, momentum, 2.5, norm_threshold=norm_threshold, eta=eta, backend="triton")
    ref = apg_guidance_ref(model_out, momentum_ref, 2.5, norm_threshold=norm_threshold, eta=eta)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(momentum, momentum_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_model_output(backend, dtype):
    """A bf16/fp16 model output read into fp32 state. The rule: ref32 is diffusers in fp32 on the rounded
    inputs, ref_lp diffusers in the low precision throughout (its diff, momentum and update). bf16 loads run
    in the interpreter too: the kernel converts them to fp32 before any arithmetic."""
    gen = torch.Generator().manual_seed(4)
    ref32, ref_lp = DiffusersAPG(6.0, 2.5, 0.0), DiffusersAPG(6.0, 2.5, 0.0, dtype)
    momentum = torch.zeros(2, 16, 333)
    for step in range(3):
        model_out = guided_output(2, 16, 333, gen).to(dtype)
        out = apg_guidance(model_out, momentum, 6.0, backend=backend)
        expected = ref32(model_out.float())
        assert_within_tolerance(out, expected, ref_lp(model_out), fp32_floor(expected), f"step {step}")
        assert torch.equal(momentum, ref32.momentum)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_follow_diffusers(backend):
    """A zero cond row (F.normalize's eps: no projection) and a zero diff (the clamp's thr / ||m|| is
    infinite: factor 1), without NaN."""
    gen = torch.Generator().manual_seed(6)
    model_out = guided_output(1, 4, 97, gen)
    model_out[0, 1] = 0.0
    model_out[1, 1] = torch.randn(97, generator=gen)
    model_out[1, 2] = model_out[0, 2]
    momentum = torch.zeros(1, 4, 97)
    out = apg_guidance(model_out, momentum, 3.0, backend=backend)
    expected = DiffusersAPG(3.0, 2.5, 0.0)(model_out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0, 2], model_out[0, 2])  # no difference: out is the cond prediction


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("norm_threshold", [0.0, 2.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_row(backend, norm_threshold):
    gen = torch.Generator().manual_seed(7)
    model_out = guided_output(2, 6, 97, gen)
    momentum = torch.randn(2, 6, 97, generator=gen)
    clean_out = apg_guidance_ref(model_out, momentum.clone(), 3.0, norm_threshold=norm_threshold)
    model_out[0, 3, 10] = float("nan")  # cond of (b=0, c=3)
    model_out[3, 5, 20] = float("nan")  # uncond of (b=1, c=5)
    out = apg_guidance(model_out, momentum, 3.0, norm_threshold=norm_threshold, backend=backend)
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[0, 3] = bad[1, 5] = True
    assert torch.isnan(out[bad]).all()  # the row's norms and projection are NaN
    torch.testing.assert_close(out[~bad], clean_out[~bad], rtol=1e-6, atol=1e-6)
    assert torch.isnan(momentum[0, 3, 10]) and torch.isnan(momentum[1, 5, 20]) and torch.isnan(momentum).sum() == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_and_first_step(backend):
    """The given `out` is written and returned; from zero momentum the stored state is cond - uncond."""
    gen = torch.Generator().manual_seed(8)
    model_out = guided_output(1, 4, 65, gen)
    momentum, out = torch.zeros(1, 4, 65), torch.full((1, 4, 65), 7.0)
    result = apg_guidance(model_out, momentum, 2.0, out=out, backend=backend)
    assert result is out
    assert torch.equal(momentum, model_out[:1] - model_out[1:])
    torch.testing.assert_close(out, apg_guidance_ref(model_out, torch.zeros(1, 4, 65), 2.0))
    # guidance_scale 0 (ACE-Step's g = 1): the conditional prediction itself, momentum still updated.
    before = momentum.clone()
    torch.testing.assert_close(apg_guidance(model_out, momentum, 0.0, backend=backend), model_out[:1])
    torch.testing.assert_close(momentum, (model_out[:1] - model_out[1:]) - 0.75 * before)


@triton_cpu
def test_interpreter_same_inputs_same_bits():
    gen = torch.Generator().manual_seed(9)
    model_out, state = guided_output(2, 8, 1500, gen), torch.randn(2, 8, 1500, generator=gen)
    runs = []
    for _ in range(2):
        momentum = state.clone()
        runs.append((apg_guidance(model_out, momentum, 5.0, eta=0.5, backend="triton"), momentum))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# -- bad inputs: one table, every backend ---------------------------------------------------------------------
# The op has no C++ kernel, so the public function's checks are the only ones on CPU.
def bad_call(model_out=None, momentum=None, guidance_scale=2.0, **kw):
    """The public call on fresh seeded (4, 8, 33) model output and (2, 8, 33) momentum, one argument changed
    (a callable changes it from the defaults)."""
    def run(backend):
        g = torch.Generator().manual_seed(14)
        mo, mom = torch.randn(4, 8, 33, generator=g), torch.randn(2, 8, 33, generator=g)
        args = [f(mo, mom) if callable(f) else (d if f is None else f) for f, d in ((model_out, mo), (momentum, mom))]
        extra = {k: v(mo, mom) if callable(v) else v for k, v in kw.items()}
        return apg_guidance(*args, guidance_scale, **{"backend": backend, **extra})
    return run


# (id, call(backend), exception type, regex naming the argument)
BAD_INPUTS = [
    ("model_out-2d", bad_call(model_out=lambda mo, mom: mo[:, :, 0]), ValueError,
     r"model_out: expected 3 dimensions \(2B, C, L\), got shape \(4, 8\)"),
    ("model_out-odd-rows", bad_call(model_out=lambda mo, mom: mo[:3]), ValueError,
     r"model_out: expected an even, non-zero number of rows.*got shape \(3, 8, 33\)"),
    ("model_out-not-contiguous", bad_call(model_out=lambda mo, mom: torch.cat([mo, mo], 1)[:, ::2]), ValueError,
     "model_out: expected a contiguous tensor"),
    ("model_out-dtype", bad_call(model_out=lambda mo, mom: mo.double()), TypeError,
     r"model_out: expected dtype in \['float32', 'float16', 'bfloat16'\], got float64"),
    ("momentum-shape", bad_call(momentum=lambda mo, mom: mom[:1]), ValueError,
     r"momentum: expected shape \(2, 8, 33\) \(B, C, L\).*got \(1, 8, 33\)"),
    ("momentum-dtype", bad_call(momentum=lambda mo, mom: mom.bfloat16()), TypeError,
     r"momentum: expected dtype in \['float32'\], got bfloat16"),
    ("momentum-device", bad_call(momentum=torch.empty(2, 8, 33, device="meta")), ValueError,
     "momentum: on meta, expected cpu"),
    ("momentum-overlaps-model_out", bad_call(momentum=lambda mo, mom: mo[2:]), ValueError,
     "momentum: overlaps model_out in memory"),
    ("out-dtype", bad_call(out=torch.empty(2, 8, 33, dtype=torch.float16)), TypeError,
     r"out: expected dtype in \['float32'\], got float16"),
    ("out-shape", bad_call(out=torch.empty(2, 8, 32)), ValueError, r"out: expected shape \(2, 8, 33\)"),
    ("out-overlaps-momentum", bad_call(out=lambda mo, mom: mom), ValueError, "out: overlaps momentum in memory"),
    ("out-overlaps-model_out", bad_call(out=lambda mo, mom: mo[:2]), ValueError, "out: overlaps model_out in memory"),
    ("guidance_scale-tensor", bad_call(guidance_scale=torch.tensor(2.0)), TypeError,
     "guidance_scale: expected a Python float.*got Tensor"),
    ("momentum_coef-str", bad_call(momentum_coef="-0.75"), TypeError,
     "momentum_coef: expected a Python float.*got str"),
    ("eta-bool", bad_call(eta=True), TypeError, "eta: expected a Python float.*got bool"),
    ("norm_threshold-none", bad_call(norm_threshold=None), TypeError,
     "norm_threshold: expected a Python float.*got NoneType"),
]
# Rows whose bad input is the backend argument itself: once each.
BAD_BACKENDS = [
    ("backend=native", lambda _: bad_call()("native"), ValueError,
     "backend='native': apg_guidance has no native kernel"),
    ("backend=cuda", lambda _: bad_call()("cuda"), ValueError, "backend: expected one of"),
]


@pytest.mark.parametrize("call, backend, error, match", bad_input_table(BAD_INPUTS, BACKENDS)
                         + bad_input_table(BAD_BACKENDS, [pytest.param(None, id="any")]))
def test_bad_input_names_the_argument(call, backend, error, match):
    with pytest.raises(error, match=match):
        call(backend)


def test_registered_op_passes_opcheck():
    gen = torch.Generator().manual_seed(10)
    for dtype, thr in ((torch.float32, 2.5), (torch.float16, 0.0)):
        args = (guided_output(1, 4, 97, gen).to(dtype), torch.randn(1, 4, 97, generator=gen), torch.empty(1, 4, 97),
                4.0, -0.75, thr, 0.5)
        torch.library.opcheck(torch.ops.ditengine.apg_guidance, args)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiles_without_graph_break():
    """Under torch.compile the public function is the registered op alone (its checks run on fake tensors)."""
    gen = torch.Generator().manual_seed(13)
    model_out, state = guided_output(1, 4, 97, gen), torch.randn(1, 4, 97, generator=gen)
    momentum, momentum_ref = state.clone(), state.clone()
    step = torch.compile(lambda x, m: apg_guidance(x, m, 4.0, eta=0.5), fullgraph=True)
    out = step(model_out, momentum)
    ref = apg_guidance_ref(model_out, momentum_ref, 4.0, eta=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(momentum, momentum_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_matches_reference_over_steps(dtype):
    """The compiled kernel (fp64 reductions on the device) over four steps at ACE-Step's shape, B = 2."""
    gen = torch.Generator().manual_seed(11)
    momentum, momentum_ref = torch.zeros(2, ACE_C, 7500, device="cuda"), torch.zeros(2, ACE_C, 7500)
    for step in range(4):
        model_out = guided_output(2, ACE_C, 7500, gen).to(dtype)
        out = apg_guidance(model_out.cuda(), momentum, 6.0, eta=0.5)
        ref = apg_guidance_ref(model_out, momentum_ref, 6.0, eta=0.5)
        err = (out.cpu() - ref).abs().max().item()
        assert err <= REL_BOUND * ref.abs().max().item(), f"step {step}: max|out - ref| = {err:.3e}"
        torch.testing.assert_close(momentum.cpu(), momentum_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_runs_in_a_captured_graph():
    """No host synchronisation: the step captures into a CUDA graph, and replays advance the momentum."""
    gen = torch.Generator().manual_seed(12)
    inputs = [guided_output(1, ACE_C, 7500, gen).cuda() for _ in range(3)]
    static_in, momentum = inputs[0].clone(), torch.zeros(1, ACE_C, 7500, device="cuda")
    out = torch.empty(1, ACE_C, 7500, device="cuda")
    apg_guidance(static_in, momentum.clone(), 6.0, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apg_guidance(static_in, momentum, 6.0, out=out)
    momentum_ref = torch.zeros(1, ACE_C, 7500)
    for x in inputs:
        static_in.copy_(x)
        graph.replay()
        ref = apg_guidance_ref(x.cpu(), momentum_ref, 6.0)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
        torch.testing.assert_close(momentum.cpu(), momentum_ref, rtol=1e-6, atol=1e-6)


def test_triton_kernel_compiles_for_the_h100_without_a_gpu():
    """ptxas from Triton's wheel (as bench/sm90.py does for the other kernels): the float64 reductions and the
    clamp compile for sm_90 at the launch's block sizes, nothing spilled."""
    from support.native_helpers import run_python

    out = run_python("""
        import json
        import ditengine.kernels
        from ditengine.bench.sm90 import compile_sm90, resources
        from ditengine.kernels.apg_guidance import NORMALIZE_EPS, _apg_guidance_kernel as fn
        rows = []
        for dtype in ("bf16", "fp32"):
            for block, warps in ((1024, 4), (128, 2)):
                pointers = {"model_ptr": dtype, "mom_ptr": "fp32", "out_ptr": "fp32"}
                scalars = {"L": "i32", "HALF": "i32", "guidance_scale": "fp32", "momentum_coef": "fp32",
                           "norm_threshold": "fp32", "eta": "fp32"}
                kernel = compile_sm90(fn, pointers, scalars, dict(CLAMP=True, EPS=NORMALIZE_EPS, BLOCK=block), warps)
                rows.append(dict(dtype=dtype, block=block, fp64="f64" in kernel.asm["ptx"], **resources(kernel)))
        print(json.dumps(rows))
    """, TRITON_INTERPRET="0")
    rows = json.loads(out.strip().splitlines()[-1])
    assert len(rows) == 4
    for row in rows:
        assert row["local_bytes"] == 0 and row["fp64"], row
