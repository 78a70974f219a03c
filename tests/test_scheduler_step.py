import importlib
from unittest import mock

import pytest
import torch

import ditengine as de
from ditengine.kernels import scheduler_step, scheduler_step_ref

from support.backends import bad_input_table, cpu_backends
from support.native_helpers import isa_runner, needs_native, requires_native, skip_unless_cpu_runs
from support.tolerance import assert_within_tolerance


S = de.schedulers
SCHEDULERS = [
    lambda: S.DDPM(12),
    lambda: S.DDPM(12, variance_type="fixed_large", prediction_type="v_prediction"),
    lambda: S.DDPM(12, variance_type="learned_range", timestep_spacing="linspace"),
    lambda: S.DDIM(12, eta=0.7),
    lambda: S.DDIM(12, clip_sample=True, prediction_type="sample"),
    lambda: S.Euler(12),
    lambda: S.DPMSolverPP(12),
    lambda: S.FlowMatchEuler(12, shift=3.0),
    lambda: S.DPMSolverPP(12, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
    lambda: S.UniPC(12, solver_type="bh1", final_sigmas_type="sigma_min", disable_corrector=[4]),
    lambda: S.UniPC(12, use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"),
]
IDS = ["ddpm", "ddpm-large-v", "ddpm-learned", "ddim-eta", "ddim-clip", "euler", "dpm++2m", "flow", "dpm++2m-flow",
       "unipc-bh1", "unipc-flow"]


def reference_step(sched, i, x, model_out, cfg_scale, k, noise, B):
    """Guidance in the model output's dtype, then `sched.step`; the histories are restored for the next call and
    returned, (history, history2), as the step left them."""
    histories = sched._history, sched._history2
    guided = model_out[:B].clone()
    cond, uncond = model_out[:B, :k], model_out[B:, :k]
    guided[:, :k] = uncond + cfg_scale * (cond - uncond)
    out = sched.step(i, x, guided.float(), noise=noise)
    new_histories = sched._history, sched._history2
    sched._history, sched._history2 = histories
    return out, new_histories


def trajectory(sched, dtype=torch.float32, cfg_scale=2.5, guided_channels=None, step_as_tensor=False,
               device="cpu", B=2, C=4, H=6, W=6, frames=None, backend=None):
    """Step through the whole schedule with the kernel and `sched.step` side by side. At each step both start
    from the kernel's state (x and, for DPM-Solver++ and UniPC, the histories), and x_next and the histories the
    kernel wrote are checked under the tolerance rule: a history write that goes wrong fails at that step.
    `frames`: video latents (B, C, frames, H, W)."""
    g = torch.Generator(device).manual_seed(0)
    spatial = (H, W) if frames is None else (frames, H, W)
    x = torch.randn(B, C, *spatial, generator=g, device=device) * sched.init_noise_sigma
    histories = [torch.zeros_like(x) for _ in range(sched.history_depth)]
    history, history2 = histories + [None] * (2 - len(histories))
    sched.to(device).reset()
    k = C if guided_channels is None else guided_channels
    for i in range(len(sched)):
        model_out = torch.randn(2 * B, 2 * C, *spatial, generator=g, device=device)
        model_out[:, C:] = model_out[:, C:].tanh()  # learned-variance channels live in [-1, 1]
        noise = torch.randn(B, C, *spatial, generator=g, device=device) if sched.needs_noise[i] else None
        next_input = torch.empty(2 * B, C, *spatial, device=device, dtype=dtype)
        step = torch.tensor(i, device=device) if step_as_tensor else i
        out = scheduler_step(x, model_out.to(dtype), sched.table, step, cfg_scale=cfg_scale, guided_channels=k,
                             history=history, noise=noise, clip=sched.clip_sample,
                             learned_variance=sched.learned_variance, next_input=next_input, history2=history2,
                             backend=backend)
        # As in flash-attention's rule, both references see the kernel's (rounded) inputs: ref32 upcasts
        # them, ref_lp also guides in the low precision.
        ref_lp, histories_lp = reference_step(sched, i, x, model_out.to(dtype), cfg_scale, k, noise, B)
        ref32, histories32 = reference_step(sched, i, x, model_out.to(dtype).float(), cfg_scale, k, noise, B)
        assert_within_tolerance(out, ref32, ref_lp, 1e-5 * (1 + ref32.abs().max().item()), f"step {i}")
        for name, got, want32, want_lp in zip(("history", "history2"), histories, histories32, histories_lp):
            if want32 is None:  # no x0 that far back yet: the buffer keeps its zeros
                assert not got.any(), f"step {i} {name}"
            else:
                assert_within_tolerance(got, want32, want_lp, 1e-5 * (1 + want32.abs().max().item()),
                                        f"step {i} {name}")
        if histories:  # the next reference step reads what the kernel wrote
            sched._history = history.clone()
            sched._history2 = history2.clone() if history2 is not None else None
        scale = sched.table[i, S.COL["c_in_next"]]
        torch.testing.assert_close(next_input[:B].float(), (out * scale).to(dtype).float())
        assert torch.equal(next_input[:B], next_input[B:])
        x = out
    return x


# Every backend on CPU tensors: the C++ kernel ("native"), Triton's interpreter, the reference; each skips only
# where it cannot run here.
BACKENDS = cpu_backends("scheduler_step")
# (model output dtype, step as a one-element tensor) per backend. The interpreter runs fp32 and fp16 (its bf16
# is wrong: docs/design.md section 6); its fp16 runs in test_half_precision_model_output_and_device_step_index.
TRAJECTORY_CASES = {"native": ((torch.float32, True), (torch.bfloat16, True)),
                    "triton": ((torch.float32, False),),
                    "reference": ((torch.float32, False), (torch.bfloat16, True))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", SCHEDULERS, ids=IDS)
def test_matches_sched_step_over_a_trajectory(make, backend):
    for dtype, step_as_tensor in TRAJECTORY_CASES[backend]:
        trajectory(make(), dtype=dtype, step_as_tensor=step_as_tensor, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", SCHEDULERS[2:4] + SCHEDULERS[6:7] + SCHEDULERS[10:11],
                         ids=["ddpm-learned", "ddim-eta", "dpm++2m", "unipc-flow"])
def test_half_precision_model_output_and_device_step_index(make, backend):
    trajectory(make(), dtype=torch.float16, step_as_tensor=True, guided_channels=3, backend=backend)


def test_in_place_update_equals_out_of_place():
    sched = S.DDIM(5, eta=0.5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 4, 4, generator=g)
    model_out = torch.randn(1, 4, 4, 4, generator=g)
    noise = torch.randn(1, 4, 4, 4, generator=g)
    expected = scheduler_step(x, model_out, sched.table, 1, noise=noise)
    state = x.clone()
    result = scheduler_step(state, model_out, sched.table, 1, noise=noise, out=state)
    assert result is state and torch.equal(state, expected)
    torch.testing.assert_close(expected, scheduler_step_ref(x, model_out, sched.table, 1, noise=noise))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_element(backend):
    g = torch.Generator().manual_seed(4)
    x, model_out = torch.randn(1, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    model_out[0, 1, 2, 3] = float("nan")
    out = scheduler_step(x, model_out, S.DDIM(5, clip_sample=True).table, 2, cfg_scale=3.0, backend=backend)
    assert torch.isnan(out[0, 1, 2, 3]) and torch.isnan(out).sum() == 1
    # Learned variance: a NaN variance spoils its own element only; then the clamp keeps a NaN (not +-clip).
    x, model_out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(4, 8, 8, 8, generator=g).tanh()
    model_out[0, 1, 2, 3] = float("nan")  # conditional prediction
    model_out[1, 4, 5, 6] = float("nan")  # learned variance of sample 1, channel 0
    out = scheduler_step(x, model_out, S.DDPM(5, variance_type="learned_range").table, 2, cfg_scale=3.0,
                         noise=torch.randn(2, 4, 8, 8, generator=g), learned_variance=True, backend=backend)
    assert torch.isnan(out[0, 1, 2, 3]) and torch.isnan(out[1, 0, 5, 6]) and torch.isnan(out).sum() == 2
    out = scheduler_step(x, model_out, S.DDIM(5, clip_sample=True).table, 2, cfg_scale=3.0, backend=backend)
    assert torch.isnan(out[0, 1, 2, 3]) and torch.isnan(out).sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_int_step_runs(backend):
    """The table's last row is in range (the bad-input table below refuses the ones past it)."""
    g = torch.Generator().manual_seed(5)
    x, out, table = torch.randn(1, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g), S.DDIM(5).table
    expected = scheduler_step_ref(x, out, table, 4, cfg_scale=2.0)
    torch.testing.assert_close(scheduler_step(x, out, table, 4, cfg_scale=2.0, backend=backend), expected)


# -- bad inputs: one table, every backend; the registered op's C++ checks against its Python body ------------
OP_IMPLS = [pytest.param("native", marks=needs_native("scheduler_step"), id="native"),
            pytest.param("python", id="python-body")]
PYTHON_BODY = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
scheduler_step_module = importlib.import_module("ditengine.kernels.scheduler_step")


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


X, MODEL_OUT = rand(2, 4, 4, 4, seed=1), rand(4, 4, 4, 4, seed=2)  # the defaults of `api` and `op`


def api(step=0, cfg_scale=2.0, x=None, model_out=None, table=None, **kw):
    """The public call on seeded (2, 4, 4, 4) latents and a CFG-doubled model output, one argument changed."""
    x = X if x is None else x
    model_out = MODEL_OUT if model_out is None else model_out
    return lambda backend: scheduler_step(x, model_out, S.DDIM(5).table if table is None else table, step,
                                          cfg_scale=cfg_scale, backend=backend, **kw)


def op(**change):
    """The registered op called directly, one argument changed: "native" is the dispatcher's C++ CPU kernel,
    "python" the op's Python body past it. The Python body runs its reference branch (its Triton branch would read
    and write past mis-shaped buffers); its checks come before that branch."""
    args = dict(x=X, model_out=MODEL_OUT, table=S.DDIM(5).table, step_tensor=None, step_int=0,
                out=torch.empty(2, 4, 4, 4), history=None, noise=None, next_input=None, cfg_scale=2.0, has_cfg=True,
                guided_channels=4, clip=False, learned=False, history2=None)
    args.update(change)
    scheduler_step_op = torch.ops.ditengine.scheduler_step

    def call(impl):
        if impl == "native":
            return scheduler_step_op(*args.values())
        with mock.patch.object(scheduler_step_module, "use_triton", lambda *tensors: False):
            return scheduler_step_op.default.redispatch(PYTHON_BODY, *args.values())
    return call


# The public function, the op's Python body (and fake) share one check (`_check_args`) and the C++ kernel spells its
# checks the same way: one message per bad input. The public function's own rules go beyond the op's (model_out
# with exactly B rows without CFG, out in x's dtype; its arguments are `step` and `learned_variance`).
# (id, call(backend or impl), exception type, regex naming the argument[, {backend: why it fails instead}])
API_ROWS = [
    ("model_out-batch", api(model_out=MODEL_OUT[:2]), ValueError,
     r"model_out: expected shape \(4, 4 or 8, 4, 4\).*CFG.*got \(2, 4, 4, 4\)"),
    ("model_out-learned-channels", api(learned_variance=True), ValueError, "learned_variance needs 8 channels"),
    ("x-not-contiguous", api(x=X.transpose(2, 3)), ValueError, "x: expected a contiguous tensor"),
    ("table-dtype", api(table=S.DDIM(5).table.double()), TypeError,
     r"table: expected dtype in \['float32'\], got float64"),
    *((f"step={step}", api(step=step), IndexError, rf"step={step} out of range for a table of 5 steps")
      for step in (5, 17, -1)),  # -1: the last row by the reference's indexing, memory before the table in kernels
    *((f"step-{type(step).__name__}", api(step=step), TypeError,
       f"step: expected an int or a one-element integer tensor, got {type(step).__name__}") for step in (1.0, True)),
    ("step-tensor-dtype", api(step=torch.tensor(1.0)), TypeError,
     r"step: expected dtype in \['int32', 'int64'\], got float32"),
    ("step-tensor-elements", api(step=torch.tensor([1, 2])), ValueError, "step: expected a one-element tensor"),
    ("history-shape", api(history=rand(1, 4, 4, 4)), ValueError, r"history: expected shape \(2, 4, 4, 4\) like x"),
    ("history-dtype", api(history=rand(2, 4, 4, 4, dtype=torch.bfloat16)), TypeError,
     r"history: expected dtype in \['float32'\], got bfloat16"),
    ("history2-shape", api(history=rand(2, 4, 4, 4), history2=rand(2, 4, 4, 3)), ValueError,
     r"history2: expected shape \(2, 4, 4, 4\) like x"),
    ("history2-without-history", api(history2=rand(2, 4, 4, 4)), ValueError,
     "history2: needs history"),
    ("history2-rank", api(x=rand(2, 4, 3, 5, 7), model_out=rand(4, 4, 3, 5, 7), history=rand(2, 4, 3, 5, 7),
                          history2=rand(2, 4, 15, 7)), ValueError, r"history2: expected 5 dimensions like x"),
    ("noise-dtype", api(noise=rand(2, 4, 4, 4, dtype=torch.half)), TypeError,
     r"noise: expected dtype in \['float32'\], got float16"),
    ("noise-device", api(noise=torch.empty(2, 4, 4, 4, device="meta")), ValueError, "noise: on meta, expected cpu"),
    ("noise-rank", api(x=rand(2, 4, 3, 5, 7), model_out=rand(4, 4, 3, 5, 7), noise=rand(2, 4, 3, 5)), ValueError,
     r"noise: expected 5 dimensions like x"),
    ("next_input-shape", api(next_input=torch.empty(3, 4, 4, 4)), ValueError,
     r"next_input: expected shape \(2 or 4, 4, 4, 4\)"),
    ("guided_channels", api(guided_channels=5), ValueError, "guided_channels=5: expected 0..4"),
    ("out-dtype", api(out=torch.empty(2, 4, 4, 4, dtype=torch.int32)), TypeError,
     r"out: expected dtype in \['float32'\], got int32"),
    ("out-bf16", api(out=torch.empty(2, 4, 4, 4, dtype=torch.bfloat16)), TypeError,
     r"out: expected dtype in \['float32'\], got bfloat16"),  # the op takes it: the public rule is x's dtype
    ("model_out-rows-without-cfg", api(cfg_scale=None), ValueError,
     r"model_out: expected shape \(2, 4 or 8, 4, 4\) for x \(2, 4, 4, 4\) without CFG, got \(4, 4, 4, 4\)"),
]
OP_ROWS = [
    ("op-model_out-batch", op(model_out=MODEL_OUT[:2]), ValueError,
     r"scheduler_step: model_out: expected shape \(4, 4 or 8, 4, 4\) with CFG"),
    ("op-model_out-rows-without-cfg", op(model_out=MODEL_OUT[:3], has_cfg=False), ValueError,
     r"model_out: expected shape \(2 or 4, 4 or 8, 4, 4\), got \(3, 4, 4, 4\)"),
    ("op-model_out-learned-channels", op(learned=True), ValueError, "learned needs 8 channels"),
    ("op-x-not-contiguous", op(x=X.transpose(2, 3)), ValueError, "x: expected a contiguous tensor"),
    ("op-x-3d", op(x=X[0]), ValueError, r"x: expected 4 dimensions \(B, C, H, W\)"),
    ("op-table-dtype", op(table=S.DDIM(5).table.double()), TypeError,
     r"table: expected dtype in \['float32'\], got float64"),
    ("op-table-columns", op(table=S.DDIM(5).table[:, :5].contiguous()), ValueError,
     rf"table: expected shape \(steps, {len(S.COLUMNS)}\)"),
    *((f"op-step_int={step}", op(step_int=step), IndexError, rf"step={step} out of range for a table of 5 steps")
      for step in (5, -1)),
    ("op-step_tensor=-1", op(step_tensor=torch.tensor([-1])), IndexError, "step=-1 out of range",
     {"python": "by design: a tensor step is not checked in Python (a device sync; see scheduler_step's docstring)"}),
    ("op-step_tensor-dtype", op(step_tensor=torch.tensor([1.0])), TypeError,
     r"step_tensor: expected dtype in \['int32', 'int64'\], got float32"),
    ("op-step_tensor-elements", op(step_tensor=torch.tensor([1, 2])), ValueError,
     r"step_tensor: expected a one-element tensor, got shape \(2,\)"),
    ("op-history-shape", op(history=rand(1, 4, 4, 4)), ValueError,
     r"history: expected shape \(2, 4, 4, 4\) like x, got \(1, 4, 4, 4\)"),
    ("op-history-dtype", op(history=rand(2, 4, 4, 4, dtype=torch.bfloat16)), TypeError,
     r"history: expected dtype in \['float32'\], got bfloat16"),
    ("op-history2-shape", op(history=rand(2, 4, 4, 4), history2=rand(1, 4, 4, 4)), ValueError,
     r"history2: expected shape \(2, 4, 4, 4\) like x, got \(1, 4, 4, 4\)"),
    ("op-history2-dtype", op(history=rand(2, 4, 4, 4), history2=rand(2, 4, 4, 4, dtype=torch.half)), TypeError,
     r"history2: expected dtype in \['float32'\], got float16"),
    ("op-history2-without-history", op(history2=rand(2, 4, 4, 4)), ValueError,
     r"scheduler_step: history2: needs history"),
    ("op-noise-dtype", op(noise=rand(2, 4, 4, 4, dtype=torch.half)), TypeError,
     r"noise: expected dtype in \['float32'\], got float16"),
    # A meta tensor among CPU ones: the dispatcher sends the call to the fake, which checks as the body does.
    ("op-noise-device", op(noise=torch.empty(2, 4, 4, 4, device="meta")), ValueError,
     "noise: on meta, expected cpu like the other inputs"),
    ("op-next_input-shape", op(next_input=torch.empty(3, 4, 4, 4)), ValueError,
     r"next_input: expected shape \(2 or 4, 4, 4, 4\)"),
    ("op-guided_channels", op(guided_channels=5), ValueError, "guided_channels=5: expected 0..4"),
    ("op-out-dtype", op(out=torch.empty(2, 4, 4, 4, dtype=torch.int32)), TypeError,
     r"out: expected dtype in \['float32', 'float16', 'bfloat16'\], got int32"),
]


@pytest.mark.parametrize("call, where, error, match",
                         bad_input_table(API_ROWS, BACKENDS) + bad_input_table(OP_ROWS, OP_IMPLS))
def test_bad_input_names_the_argument(call, where, error, match):
    """The public function on every backend, and the registered op called directly: its C++ kernel and its
    Python body must raise the same exception type, each naming the argument."""
    with pytest.raises(error, match=match):
        call(where)


def test_registered_op_passes_opcheck():
    sched = S.DPMSolverPP(4)
    x, out = torch.randn(1, 4, 2, 2), torch.randn(2, 8, 2, 2)
    args = (x, out, sched.table, torch.tensor([1]), 0, torch.empty_like(x), torch.zeros_like(x), torch.randn_like(x),
            torch.empty(2, 4, 2, 2), 2.0, True, 4, False, False)
    torch.library.opcheck(torch.ops.ditengine.scheduler_step, args)
    # UniPC's second history (the op's last argument)
    args = (x, out, S.UniPC(4).table, torch.tensor([2]), 0, torch.empty_like(x), torch.randn_like(x), None,
            torch.empty(2, 4, 2, 2), 2.0, True, 4, False, False, torch.randn_like(x))
    torch.library.opcheck(torch.ops.ditengine.scheduler_step, args)


# -- the native CPU kernel (csrc/scheduler_step.cpp) ---------------------------------------------------------
@requires_native
@pytest.mark.parametrize("B, C, H, W, guided, dtype", [
    (2, 4, 32, 32, 3, torch.bfloat16),  # DiT-XL/2 256 px latent: planes of 1024 (two chunks)
    (1, 3, 7, 5, None, torch.float16),  # odd plane, fp16 model output
    (2, 4, 23, 29, 0, torch.float32),   # no channel guided
])
def test_native_latent_shapes(B, C, H, W, guided, dtype):
    trajectory(S.DDPM(6, variance_type="learned_range"), dtype=dtype, guided_channels=guided, B=B, C=C, H=H, W=W,
               backend="native")
    trajectory(S.DPMSolverPP(5), dtype=dtype, guided_channels=guided, B=B, C=C, H=H, W=W, backend="native")
    trajectory(S.UniPC(5), dtype=dtype, guided_channels=guided, B=B, C=C, H=H, W=W, backend="native")


@requires_native
def test_native_without_cfg_and_with_bf16_state():
    sched = S.DDIM(5, eta=0.5)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 9, 9, generator=g)
    model_out, noise = torch.randn(2, 4, 9, 9, generator=g), torch.randn(2, 4, 9, 9, generator=g)
    for step in (0, 3, torch.tensor([2], dtype=torch.int32)):
        out = scheduler_step(x, model_out, sched.table, step, noise=noise, backend="native")
        ref = scheduler_step_ref(x, model_out, sched.table, step.reshape(()) if torch.is_tensor(step) else step,
                                 noise=noise)
        torch.testing.assert_close(out, ref)
    xb = x.bfloat16()
    out = scheduler_step(xb, model_out, sched.table, 1, noise=noise, backend="native")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, scheduler_step_ref(xb, model_out, sched.table, 1, noise=noise))


@requires_native
def test_native_is_what_cpu_calls_dispatch_to():
    import ditengine.kernels._backend as backend
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ditengine::scheduler_step", "CPU")
    assert backend.choose("scheduler_step", torch.device("cpu")) == "native"


@requires_native
def test_native_same_inputs_same_bits():
    sched = S.DPMSolverPP(10)
    g = torch.Generator().manual_seed(9)
    x, out = torch.randn(8, 4, 32, 32, generator=g), torch.randn(16, 8, 32, 32, generator=g).bfloat16()
    results = []
    for _ in range(2):
        history = torch.ones_like(x)
        next_input = torch.empty(16, 4, 32, 32, dtype=torch.bfloat16)
        x_next = scheduler_step(x, out, sched.table, torch.tensor(4), cfg_scale=4.0, history=history,
                                next_input=next_input, backend="native")
        results.append((x_next, history, next_input))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@requires_native
def test_native_op_passes_opcheck():
    sched = S.DDPM(4, variance_type="learned_range")
    x, out = torch.randn(1, 4, 3, 5), torch.randn(2, 8, 3, 5).bfloat16()
    args = (x, out, sched.table, torch.tensor([1]), 0, torch.empty_like(x), torch.zeros_like(x), torch.randn_like(x),
            torch.empty(2, 4, 3, 5, dtype=torch.bfloat16), 2.0, True, 3, True, True)
    torch.library.opcheck(torch.ops.ditengine.scheduler_step, args)
    args = (x, out[:1], sched.table, None, 2, torch.empty_like(x), None, None, None, 1.0, False, 4, False, False)
    torch.library.opcheck(torch.ops.ditengine.scheduler_step, args)
    args = (x, out[:1], S.UniPC(4).table, None, 3, torch.empty_like(x), torch.randn_like(x), None, None, 1.0, False,
            4, False, False, torch.randn_like(x))
    torch.library.opcheck(torch.ops.ditengine.scheduler_step, args)


@pytest.fixture(scope="module")
def isa_variant(tmp_path_factory):
    """isa -> the native outputs with DITENGINE_ISA=isa, computed once per ISA in a fresh interpreter, after
    checking that the extension ran that ISA (or, for one this CPU lacks, the best it has)."""
    code = """
        import torch, ditengine as de
        from ditengine.kernels import scheduler_step, _native
        g = torch.Generator().manual_seed(0)
        sched = de.schedulers.DDPM(6, variance_type="learned_range", clip_sample=True)
        # tanh in float64: torch's float32 tanh is not bitwise the same from process to process on every CPU, and
        # one ulp can flip the bf16 rounding of `out` below (the ISAs run in separate processes).
        x, out = torch.randn(2, 4, 23, 29, generator=g), torch.randn(4, 8, 23, 29, generator=g).double().tanh().float()
        noise, history = torch.randn(2, 4, 23, 29, generator=g), torch.randn(2, 4, 23, 29, generator=g)
        nxt = torch.empty(4, 4, 23, 29, dtype=torch.bfloat16)
        res = scheduler_step(x, out.bfloat16(), sched.table, 3, cfg_scale=2.0, guided_channels=3, history=history,
                             noise=noise, clip=True, learned_variance=True, next_input=nxt, backend="native")
        torch.save([_native.build_info()["isa"], res, history, nxt], "{path}")
    """
    return isa_runner(tmp_path_factory, code)


@requires_native
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_native_isa_variants_agree(isa, isa_variant):
    """Each vector variant against the scalar baseline: three different code paths on an AVX-512 CPU."""
    skip_unless_cpu_runs(isa)
    for a, b in zip(isa_variant(isa), isa_variant("baseline")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("make", SCHEDULERS, ids=IDS)
def test_gpu_matches_sched_step(make, dtype):
    trajectory(make(), dtype=dtype, step_as_tensor=True, device="cuda", B=8, H=32, W=32)


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param(None, id="auto")])
def test_one_dimensional_sequences(backend):
    """(B, C, T) latents (ACE-Step's, channels first) run the same step as (B, C, T, 1), every argument 3-D."""
    sched = S.FlowMatchEuler(sigmas=[1.0, 0.9, 0.6, 0.3], num_train_timesteps=1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 21, generator=g)
    for i in range(len(sched)):
        model_out = torch.randn(4, 8, 21, generator=g)
        next_input = torch.empty(4, 8, 21)
        out = scheduler_step(x, model_out, sched.table, i, cfg_scale=3.0, next_input=next_input, backend=backend)
        assert out.shape == x.shape
        ref, _ = reference_step(sched, i, x.unsqueeze(-1), model_out.unsqueeze(-1), 3.0, 8, None, 2)
        torch.testing.assert_close(out, ref.squeeze(-1), rtol=1e-6, atol=1e-6)
        assert torch.equal(next_input[:2], next_input[2:])
        x = out


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param(None, id="auto")])
def test_video_latents_of_any_rank(backend):
    """(B, C, F, H, W) latents (video) run the same step as their (B, C, F*H*W, 1) view, history, noise and
    learned variance included, every argument 5-D (a rank that differs from x's: the bad-input table)."""
    sched = S.DDPM(6, variance_type="learned_range", clip_sample=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, 5, 7, generator=g)
    history, noise = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    model_out = torch.randn(4, 8, 3, 5, 7, generator=g).tanh()
    flat = [t.reshape(*t.shape[:2], -1, 1) for t in (x, model_out, noise)]
    want_history = history.reshape(2, 4, -1, 1).clone()
    want = scheduler_step(*flat[:2], sched.table, 2, cfg_scale=2.0, guided_channels=3, history=want_history,
                          noise=flat[2], clip=True, learned_variance=True, backend="reference")
    got = scheduler_step(x, model_out, sched.table, 2, cfg_scale=2.0, guided_channels=3, history=history,
                         noise=noise, clip=True, learned_variance=True, backend=backend)
    assert got.shape == x.shape
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(history.reshape(want_history.shape), want_history, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param(None, id="auto")])
def test_unipc_trajectory_on_video_latents(backend):
    """UniPC's two histories on (B, C, F, H, W) latents (Wan's), over a whole trajectory: flattened after C like
    every other argument, and shifted (history2 <- history <- x0) at each step."""
    sched = S.UniPC(8, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    trajectory(sched, frames=3, H=4, W=5, backend=backend)
