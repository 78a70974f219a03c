import pytest
import torch

import ditengine as de
from ditengine.kernels import scheduler_step, scheduler_step_ref

from tolerance import assert_within_tolerance

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
]
IDS = ["ddpm", "ddpm-large-v", "ddpm-learned", "ddim-eta", "ddim-clip", "euler", "dpm++2m", "flow"]


def reference_step(sched, i, x, model_out, cfg_scale, k, noise, B):
    """Guidance in the model output's dtype, then `sched.step`; the history is restored for the next call."""
    history = sched._history
    guided = model_out[:B].clone()
    cond, uncond = model_out[:B, :k], model_out[B:, :k]
    guided[:, :k] = uncond + cfg_scale * (cond - uncond)
    out = sched.step(i, x, guided.float(), noise=noise)
    sched._history, new_history = history, sched._history
    return out, new_history


def trajectory(sched, dtype=torch.float32, cfg_scale=2.5, guided_channels=None, step_as_tensor=False,
               device="cpu", B=2, C=4, H=6, W=6):
    """Step through the whole schedule with the kernel and `sched.step` side by side; at each step both start
    from the reference state, and the kernel is checked under the tolerance rule."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g, device=device) * sched.init_noise_sigma
    history = torch.zeros_like(x) if sched.uses_history else None
    sched.to(device).reset()
    k = C if guided_channels is None else guided_channels
    for i in range(len(sched)):
        model_out = torch.randn(2 * B, 2 * C, H, W, generator=g, device=device)
        model_out[:, C:] = model_out[:, C:].tanh()  # learned-variance channels live in [-1, 1]
        noise = torch.randn(B, C, H, W, generator=g, device=device) if sched.needs_noise[i] else None
        next_input = torch.empty(2 * B, C, H, W, device=device, dtype=dtype)
        step = torch.tensor(i, device=device) if step_as_tensor else i
        out = scheduler_step(x, model_out.to(dtype), sched.table, step, cfg_scale=cfg_scale, guided_channels=k,
                             history=history, noise=noise, clip=sched.clip_sample,
                             learned_variance=sched.learned_variance, next_input=next_input)
        # As in flash-attention's rule, both references see the kernel's (rounded) inputs: ref32 upcasts
        # them, ref_lp also guides in the low precision.
        ref_lp, _ = reference_step(sched, i, x, model_out.to(dtype), cfg_scale, k, noise, B)
        ref32, new_history = reference_step(sched, i, x, model_out.to(dtype).float(), cfg_scale, k, noise, B)
        assert_within_tolerance(out, ref32, ref_lp, 1e-5 * (1 + ref32.abs().max().item()), f"step {i}")
        scale = sched.table[i, S.COL["c_in_next"]]
        torch.testing.assert_close(next_input[:B].float(), (out * scale).to(dtype).float())
        assert torch.equal(next_input[:B], next_input[B:])
        x = ref32
        if history is not None:
            sched._history = new_history
            history.copy_(new_history)
    return x


@pytest.mark.parametrize("make", SCHEDULERS, ids=IDS)
def test_matches_sched_step_over_a_trajectory(make):
    trajectory(make())


@pytest.mark.parametrize("make", SCHEDULERS[2:4] + SCHEDULERS[6:7], ids=["ddpm-learned", "ddim-eta", "dpm++2m"])
def test_half_precision_model_output_and_device_step_index(make):
    trajectory(make(), dtype=torch.float16, step_as_tensor=True, guided_channels=3)


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
def test_nan_stays_in_its_element():
    sched = S.DDIM(5, clip_sample=True)
    x = torch.randn(1, 4, 4, 4)
    model_out = torch.randn(2, 4, 4, 4)
    model_out[0, 1, 2, 3] = float("nan")
    out = scheduler_step(x, model_out, sched.table, 2, cfg_scale=3.0)
    assert torch.isnan(out[0, 1, 2, 3]) and torch.isnan(out).sum() == 1


def test_errors_name_the_argument():
    sched = S.DDIM(5)
    x = torch.randn(2, 4, 4, 4)
    out = torch.randn(4, 4, 4, 4)
    with pytest.raises(ValueError, match=r"model_out: expected shape \(4, 4 or 8, 4, 4\).*CFG.*got \(2, 4, 4, 4\)"):
        scheduler_step(x, out[:2], sched.table, 0, cfg_scale=2.0)
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        scheduler_step(x.transpose(2, 3), out, sched.table, 0, cfg_scale=2.0)
    with pytest.raises(TypeError, match=r"table: expected dtype in \['float32'\], got float64"):
        scheduler_step(x, out, sched.table.double(), 0, cfg_scale=2.0)
    with pytest.raises(IndexError, match="step=5 out of range for a table of 5 steps"):
        scheduler_step(x, out, sched.table, 5, cfg_scale=2.0)
    with pytest.raises(TypeError, match=r"step: expected dtype in \['int32', 'int64'\], got float32"):
        scheduler_step(x, out, sched.table, torch.tensor(1.0), cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"history: expected shape \(2, 4, 4, 4\) like x"):
        scheduler_step(x, out, sched.table, 0, cfg_scale=2.0, history=torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="learned_variance needs 8 channels"):
        scheduler_step(x, out, sched.table, 0, cfg_scale=2.0, learned_variance=True)
    with pytest.raises(ValueError, match=r"next_input: expected shape \(2 or 4, 4, 4, 4\)"):
        scheduler_step(x, out, sched.table, 0, cfg_scale=2.0, next_input=torch.empty(3, 4, 4, 4))
    with pytest.raises(ValueError, match="noise: on meta, expected cpu"):
        scheduler_step(x, out, sched.table, 0, cfg_scale=2.0, noise=torch.empty(2, 4, 4, 4, device="meta"))


def test_registered_op_passes_opcheck():
    sched = S.DPMSolverPP(4)
    x, out = torch.randn(1, 4, 2, 2), torch.randn(2, 8, 2, 2)
    args = (x, out, sched.table, torch.tensor([1]), 0, torch.empty_like(x), torch.zeros_like(x), torch.randn_like(x),
            torch.empty(2, 4, 2, 2), 2.0, True, 4, False, False)
    torch.library.opcheck(torch.ops.ditengine.scheduler_step, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("make", SCHEDULERS, ids=IDS)
def test_gpu_matches_sched_step(make, dtype):
    trajectory(make(), dtype=dtype, step_as_tensor=True, device="cuda", B=8, H=32, W=32)
