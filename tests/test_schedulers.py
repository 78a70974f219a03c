import numpy as np
import pytest
import torch

import ditengine as de
from ditengine.schedulers import COL

S = de.schedulers


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")

FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
# (ours, diffusers class, shared kwargs, diffusers-only step kwargs)
CASES = [
    ("DDPM", "DDPMScheduler", dict(), 50),
    ("DDPM", "DDPMScheduler", dict(variance_type="fixed_large", timestep_spacing="trailing", clip_sample=False), 50),
    ("DDPM", "DDPMScheduler", dict(variance_type="learned_range", timestep_spacing="linspace"), 25),
    ("DDPM", "DDPMScheduler", dict(prediction_type="v_prediction", beta_schedule="scaled_linear"), 20),
    ("DDPM", "DDPMScheduler", dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2"), 20),
    ("DDIM", "DDIMScheduler", dict(), 50),
    ("DDIM", "DDIMScheduler", dict(eta=0.5, prediction_type="v_prediction", clip_sample=False), 50),
    ("DDIM", "DDIMScheduler", dict(eta=1.0, steps_offset=1, set_alpha_to_one=False), 20),
    ("DDIM", "DDIMScheduler", dict(timestep_spacing="trailing", clip_sample=False), 25),
    ("Euler", "EulerDiscreteScheduler", dict(), 30),
    ("Euler", "EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="leading"), 30),
    ("Euler", "EulerDiscreteScheduler", dict(timestep_spacing="trailing", beta_schedule="scaled_linear",
                                             beta_start=0.00085, beta_end=0.012), 30),
    ("DPMSolverPP", "DPMSolverMultistepScheduler", dict(), 20),
    ("DPMSolverPP", "DPMSolverMultistepScheduler", dict(prediction_type="v_prediction",
                                                        timestep_spacing="leading"), 10),
    ("DPMSolverPP", "DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min",
                                                        timestep_spacing="trailing"), 25),
    ("DPMSolverPP", "DPMSolverMultistepScheduler", dict(solver_order=1), 15),
    ("FlowMatchEuler", "FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 28),
    ("FlowMatchEuler", "FlowMatchEulerDiscreteScheduler", dict(), 10),
    # DPM-Solver++ on the flow schedule (Wan's pipelines: flow_shift 3 at 480p, 5 at 720p)
    ("DPMSolverPP", "DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0,
                                                        prediction_type="flow_prediction"), 20),
    ("DPMSolverPP", "DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=5.0, solver_order=1,
                                                        prediction_type="flow_prediction"), 13),
    ("DPMSolverPP", "DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=1.0, lower_order_final=False,
                                                        prediction_type="v_prediction"), 16),
    ("DPMSolverPP", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), 20),
    ("DPMSolverPP", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                                        beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012), 12),
]


def diffusers_trajectory(theirs, ours, seed=0, C=4, learned=False, output_scale=1.0):
    """Run both schedulers over a whole trajectory on the same model outputs and noise."""
    theirs.set_timesteps(len(ours))
    g = torch.Generator().manual_seed(seed)
    x_ours = torch.randn(2, C, 8, 8, generator=g) * ours.init_noise_sigma
    x_theirs = x_ours.clone()
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        m = torch.randn(2, 2 * C if learned else C, 8, 8, generator=g) * output_scale
        m[:, C:] = m[:, C:].tanh()
        z = torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(1000 + i))
        kwargs = {}
        if type(theirs).__name__ == "DDPMScheduler":
            kwargs["generator"] = torch.Generator().manual_seed(1000 + i)  # draws exactly z
        elif type(theirs).__name__ == "DDIMScheduler":
            kwargs = dict(eta=ours.eta, variance_noise=z, use_clipped_model_output=ours.use_clipped_model_output)
        if type(theirs).__name__ == "EulerDiscreteScheduler":
            theirs.scale_model_input(x_theirs, t)
        x_theirs = theirs.step(m, t, x_theirs, **kwargs).prev_sample
        x_ours = ours.step(i, x_ours, m, noise=z)
        worst = max(worst, ((x_ours - x_theirs).abs().max() / x_theirs.abs().max()).item())
    return worst


@pytest.mark.parametrize("ours_name, theirs_name, kwargs, steps", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_diffusers_over_a_trajectory(diffusers, ours_name, theirs_name, kwargs, steps):
    theirs = getattr(diffusers, theirs_name)(**{k: v for k, v in kwargs.items() if k != "eta"})
    ours = getattr(S, ours_name)(steps, **kwargs)
    theirs.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps.double().numpy(), theirs.timesteps.double().numpy(), rtol=1e-6, atol=1e-3)
    assert ours.init_noise_sigma == pytest.approx(float(getattr(theirs, "init_noise_sigma", 1.0)), rel=1e-5)
    learned = kwargs.get("variance_type") == "learned_range"
    assert diffusers_trajectory(theirs, ours, learned=learned) <= 1e-5


@pytest.mark.parametrize("eta, spacing", [(0.0, "leading"), (0.0, "trailing"), (0.5, "leading"), (1.0, "trailing")])
def test_ddim_clipped_model_output_matches_diffusers(diffusers, eta, spacing):
    """The DDIM paper's clipping: the noise is re-derived from the clipped x0, as diffusers' step does with
    use_clipped_model_output=True. Model outputs of scale 3 push x0 far past the clip range."""
    kwargs = dict(clip_sample=True, timestep_spacing=spacing)
    ours = S.DDIM(50, eta=eta, use_clipped_model_output=True, **kwargs)
    assert diffusers_trajectory(diffusers.DDIMScheduler(**kwargs), ours, output_scale=3.0) <= 1e-5
    # Clipping acted, and the two clipping modes differ: otherwise the comparison above proves nothing.
    x, m = torch.randn(2, 4, 8, 8), 3 * torch.randn(2, 4, 8, 8)
    p, q = ours.table[0, COL["p"]], ours.table[0, COL["q"]]
    assert (p * x + q * m).abs().max() > 2 * ours.clip_sample_range
    unclipped_eps = S.DDIM(50, eta=eta, **kwargs)
    assert not torch.allclose(ours.step(0, x, m, noise=torch.zeros_like(x)),
                              unclipped_eps.step(0, x, m, noise=torch.zeros_like(x)))
    converted = S.from_diffusers(diffusers.DDIMScheduler(**kwargs), 50, eta=eta, use_clipped_model_output=True)
    assert torch.equal(converted.table, ours.table)


@pytest.mark.parametrize("ours_name, theirs_name, kwargs, steps", CASES[:3] + CASES[9:10] + CASES[12:13] + CASES[16:17],
                         ids=lambda v: str(v) if isinstance(v, str) else None)
def test_from_diffusers_builds_the_same_table(diffusers, ours_name, theirs_name, kwargs, steps):
    theirs = getattr(diffusers, theirs_name)(**kwargs)
    converted = S.from_diffusers(theirs, steps)
    direct = getattr(S, ours_name)(steps, **kwargs)
    assert type(converted) is type(direct)
    assert torch.equal(converted.table, direct.table) and torch.equal(converted.timesteps, direct.timesteps)


def test_from_diffusers_overrides_and_refusals(diffusers):
    ddim = S.from_diffusers(diffusers.DDIMScheduler(), 20, eta=0.5)
    assert ddim.eta == 0.5 and ddim.needs_noise[0]
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported"):
        S.from_diffusers(diffusers.EulerDiscreteScheduler(use_karras_sigmas=True), 20)
    with pytest.raises(ValueError, match="algorithm_type='dpmsolver' is not supported"):
        S.from_diffusers(diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver",
                                                               final_sigmas_type="sigma_min"), 20)
    with pytest.raises(ValueError, match="unsupported diffusers scheduler PNDMScheduler"):
        S.from_diffusers(diffusers.PNDMScheduler(), 20)


def test_ddim_nonuniform_spacing_follows_the_closed_form():
    """diffusers' DDIM steps to t - T//N, wrong for "linspace"; ours steps to the next scheduled timestep."""
    sched = S.DDIM(7, timestep_spacing="linspace", clip_sample=False)
    ts = sched.timesteps.long().tolist()
    assert ts == [999, 832, 666, 500, 333, 166, 0]
    a = sched.alphas_cumprod
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    for i, t in enumerate(ts):
        eps = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
        a_prev = a[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x0 = (x - (1 - a[t]) ** 0.5 * eps) / a[t] ** 0.5
        expected = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        got = sched.step(i, x.float(), eps.float())
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_ddim_nonuniform_spacing_converts_from_diffusers(diffusers):
    converted = S.from_diffusers(diffusers.DDIMScheduler(timestep_spacing="linspace"), 7)
    assert torch.equal(converted.timesteps, S.DDIM(7, timestep_spacing="linspace").timesteps)


def test_step_never_syncs_with_the_host():
    """On the meta device any .item(), bool() or host copy raises: the step must do none."""
    for sched in (S.DDPM(10, variance_type="learned_range"), S.DDIM(10, eta=0.3), S.DPMSolverPP(10),
                  S.Euler(10), S.FlowMatchEuler(10), S.UniPC(10)):
        sched.to("meta")
        x = torch.empty(2, 4, 8, 8, device="meta")
        out = torch.empty(2, 8, 8, 8, device="meta")
        for i in range(len(sched)):
            x = sched.step(i, x, out)
        assert x.device.type == "meta"


def test_history_reset_and_table_layout():
    sched = S.DPMSolverPP(10)
    assert sched.table.shape == (10, len(S.COLUMNS)) and sched.table.dtype == torch.float32
    assert sched.table[0, COL["h"]] == 0 and sched.table[1:-1, COL["h"]].ne(0).all()
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    first = sched.step(0, x, m)
    a = sched.step(1, first, m)
    sched.reset()
    sched.step(0, x, m * 2)
    b = sched.step(1, first, m)
    assert not torch.equal(a, b)  # the history is used ...
    sched.reset()
    sched.step(0, x, m)
    assert torch.equal(sched.step(1, first, m), a)  # ... and reset clears it


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        S.DDIM(0)
    with pytest.raises(ValueError, match="timestep_spacing='even'"):
        S.DDIM(10, timestep_spacing="even")
    with pytest.raises(ValueError, match="variance_type='learned'"):
        S.DDPM(10, variance_type="learned")
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        S.DDIM(10, prediction_type="flow")
    with pytest.raises(ValueError, match="model_output shape"):
        S.DDIM(10).step(0, torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="learned_range variance needs"):
        S.DDPM(10, variance_type="learned_range").step(0, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(IndexError, match="out of range"):
        S.DDIM(10).step(10, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, name", [
    (lambda: S.DDIM(10, eta=NAN), "eta=nan"),
    (lambda: S.DDIM(10, eta=-0.5), "eta=-0.5"),
    (lambda: S.DDIM(10, clip_sample_range=INF), "clip_sample_range=inf"),
    (lambda: S.DDPM(10, clip_sample_range=0.0), "clip_sample_range=0.0"),
    (lambda: S.FlowMatchEuler(10, shift=-1.0), "shift=-1.0"),
    (lambda: S.FlowMatchEuler(10, shift=NAN), "shift=nan"),
    (lambda: S.FlowMatchEuler(10, shift=0.0), "shift=0.0"),
    (lambda: S.DDPM(10, beta_start=NAN), "beta_start=nan"),
    (lambda: S.Euler(10, beta_end=1.5), "beta_end=1.5"),
    (lambda: S.DPMSolverPP(10, beta_start=0.0), "beta_start=0.0"),
    (lambda: S.UniPC(10, flow_shift=NAN, **FLOW), "flow_shift=nan"),
    (lambda: S.UniPC(10, use_karras_sigmas=True, sigma_min=-1.0), "sigma_min=-1.0"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_non_finite_or_out_of_range_arguments_are_refused_by_name(make, name):
    with pytest.raises(ValueError, match=f"^{name}: expected a finite number in"):
        make()


@pytest.mark.parametrize("make", [S.DDPM, S.DDIM, S.Euler, S.DPMSolverPP, S.UniPC])
def test_beta_start_above_beta_end_is_refused(make):
    with pytest.raises(ValueError, match=r"beta_start=0.02 > beta_end=0.0001"):
        make(10, beta_start=0.02, beta_end=0.0001)


@pytest.mark.parametrize("make", [S.DDPM, S.DDIM, S.Euler, S.DPMSolverPP, lambda n: S.FlowMatchEuler(n, shift=3.0),
                                  S.UniPC, lambda n: S.UniPC(n, solver_type="bh1", **FLOW)])
def test_every_table_is_finite_at_the_defaults(make):
    table = make(25).table
    finite = torch.isfinite(table)
    finite[:, COL["clip"]] = ~torch.isnan(table[:, COL["clip"]])  # +inf there means "no clipping"
    assert finite.all()


def ace_step_grid(steps: int, shift: float) -> list[float]:
    """ACE-Step's own shifted grid (`AceStepPipeline._get_timestep_schedule`)."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return list((shift * t / (1 + (shift - 1) * t))[:-1])


@pytest.mark.parametrize("steps, shift, sched_shift", [(8, 3.0, 1.0), (50, 3.0, 1.0), (6, 2.0, 1.5)])
def test_explicit_sigmas_match_diffusers(diffusers, steps, shift, sched_shift):
    """FlowMatchEuler(sigmas=...) equals `set_timesteps(sigmas=...)`, as ACE-Step configures it (one training
    timestep, shift 1) and with a scheduler shift of its own."""
    sigmas = ace_step_grid(steps, shift)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=sched_shift)
    theirs.set_timesteps(sigmas=sigmas)
    ours = S.FlowMatchEuler(sigmas=sigmas, num_train_timesteps=1, shift=sched_shift)
    assert len(ours) == steps
    np.testing.assert_allclose(ours.timesteps.double().numpy(), theirs.timesteps.double().numpy(), rtol=1e-6)
    theirs.set_timesteps(sigmas=sigmas)
    g = torch.Generator().manual_seed(0)
    x_ours = torch.randn(2, 8, 21, generator=g)
    x_theirs = x_ours.clone()
    for i, t in enumerate(theirs.timesteps):
        v = torch.randn(2, 8, 21, generator=g)
        x_theirs = theirs.step(v, t, x_theirs).prev_sample
        x_ours = ours.step(i, x_ours, v)
    assert float((x_ours - x_theirs).abs().max() / x_theirs.abs().max()) <= 1e-6
    built = S.from_diffusers(theirs, steps, sigmas=sigmas)
    np.testing.assert_array_equal(built.table_f64, ours.table_f64)


def test_explicit_sigmas_are_checked():
    with pytest.raises(ValueError, match=r"^sigmas: expected"):
        S.FlowMatchEuler(sigmas=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"^num_inference_steps=5: sigmas gives 2 steps"):
        S.FlowMatchEuler(5, sigmas=[1.0, 0.5])
    assert len(S.FlowMatchEuler(8, num_train_timesteps=1)) == 8  # continuous time: more steps than T


@pytest.mark.parametrize("explicit", [True, False], ids=["flux-sigmas", "default-grid"])
@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_dynamic_shifting_matches_diffusers(diffusers, explicit, shift_type):
    """Flux's resolution-dependent shift: `set_timesteps(sigmas=linspace(1, 1/n, n), mu=...)` as FluxPipeline
    calls it (its scheduler config: use_dynamic_shifting, exponential), and the default grid with mu."""
    steps, mu = 7, 1.15
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                       max_shift=1.15, time_shift_type=shift_type)
    sigmas = np.linspace(1.0, 1 / steps, steps) if explicit else None
    theirs.set_timesteps(steps, sigmas=sigmas, mu=mu)
    ours = S.from_diffusers(theirs, steps, mu=mu, **({"sigmas": tuple(sigmas)} if explicit else {}))
    np.testing.assert_allclose(ours.timesteps.double().numpy(), theirs.timesteps.double().numpy(), rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    x_ours = torch.randn(1, 16, 4, 4, generator=g)
    x_theirs = x_ours.clone()
    for i, t in enumerate(theirs.timesteps):
        v = torch.randn(1, 16, 4, 4, generator=g)
        x_theirs = theirs.step(v, t, x_theirs).prev_sample
        x_ours = ours.step(i, x_ours, v)
    assert float((x_ours - x_theirs).abs().max() / x_theirs.abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="^mu: required with use_dynamic_shifting"):
        S.FlowMatchEuler(steps, use_dynamic_shifting=True)


def test_flow_sigmas_convert_from_diffusers_with_a_dynamic_shift(diffusers):
    """mu = log(flow_shift): the dynamic form of the same shift; and flow_prediction refuses VP sigmas."""
    theirs = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                   prediction_type="flow_prediction")
    converted = S.from_diffusers(theirs, 12)
    assert torch.equal(converted.table, S.DPMSolverPP(12, use_flow_sigmas=True, flow_shift=3.0,
                                                      prediction_type="flow_prediction").table)
    by_mu = S.from_diffusers(theirs, 12, mu=float(np.log(3.0)))
    assert torch.allclose(by_mu.table, converted.table, rtol=1e-6, atol=1e-6)
    assert diffusers_trajectory(theirs, converted) <= 1e-5
    with pytest.raises(ValueError, match="flow_prediction' needs use_flow_sigmas=True"):
        S.DPMSolverPP(10, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="final_sigmas_type: flow sigmas end at 'zero'"):
        S.DPMSolverPP(10, use_flow_sigmas=True, final_sigmas_type="sigma_min")


# -- UniPC ----------------------------------------------------------------------------------------------------------
UNIPC_CASES = [  # (kwargs, steps)
    (dict(), 6),
    (dict(), 50),
    (dict(solver_type="bh1", final_sigmas_type="sigma_min"), 50),
    (dict(solver_order=1), 8),
    (dict(lower_order_final=False, final_sigmas_type="sigma_min"), 10),
    (dict(solver_type="bh1", lower_order_final=False, final_sigmas_type="sigma_min", disable_corrector=[0, 3, 4]), 9),
    (dict(disable_corrector=[0, 3, 4]), 10),
    (dict(prediction_type="v_prediction", timestep_spacing="trailing"), 12),
    (dict(prediction_type="sample", timestep_spacing="leading", steps_offset=1), 9),
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True), 15),
    # the flow schedule (Wan's pipelines: flow_shift 3 at 480p, 5 at 720p)
    (dict(FLOW, flow_shift=1.0), 8),
    (dict(FLOW, flow_shift=3.0), 50),
    (dict(FLOW, flow_shift=5.0), 20),
    (dict(FLOW, flow_shift=5.0, solver_type="bh1", final_sigmas_type="sigma_min"), 12),
    (dict(FLOW, flow_shift=3.0, lower_order_final=False, final_sigmas_type="sigma_min", solver_order=1), 7),
    (dict(FLOW, flow_shift=3.0, lower_order_final=False, final_sigmas_type="sigma_min"), 7),
    (dict(FLOW, use_karras_sigmas=True), 10),
]


def fake_model(x, t):
    """A fixed nonlinear function of the sample and the timestep: the solvers' history of x0 then differs from
    step to step as a model's would, and both loops see the model output of their own sample."""
    return 0.7 * torch.tanh(x) + 0.5 * torch.sin(x + 1e-3 * float(t))


def unipc_trajectory(theirs, ours, last=None):
    """Both schedulers from the same noise, each evaluating `fake_model` at its own samples; the worst relative
    difference of the samples over the trajectory (its first `last` steps)."""
    theirs.set_timesteps(len(ours))
    np.testing.assert_array_equal(ours.timesteps.numpy(), theirs.timesteps.numpy())
    x_ours = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_theirs, worst = x_ours.clone(), 0.0
    for i, t in enumerate(theirs.timesteps[:last]):
        x_theirs = theirs.step(fake_model(x_theirs, t), t, x_theirs).prev_sample
        x_ours = ours.step(i, x_ours, fake_model(x_ours, t))
        worst = max(worst, float((x_ours - x_theirs).abs().max() / x_theirs.abs().max()))
    return worst


@pytest.mark.parametrize("kwargs, steps", UNIPC_CASES, ids=[f"unipc-{i}" for i in range(len(UNIPC_CASES))])
def test_unipc_matches_diffusers_over_a_trajectory(diffusers, kwargs, steps):
    theirs = diffusers.UniPCMultistepScheduler(**kwargs)
    assert unipc_trajectory(theirs, S.UniPC(steps, **kwargs)) <= 1e-5
    assert torch.equal(S.from_diffusers(theirs, steps).table, S.UniPC(steps, **kwargs).table)


@pytest.mark.parametrize("kwargs", [dict(solver_type="bh1"), dict(lower_order_final=False),
                                    dict(FLOW, flow_shift=3.0, solver_type="bh1")], ids=["bh1", "order2", "flow-bh1"])
def test_unipc_final_zero_sigma_lands_on_x0(diffusers, kwargs):
    """diffusers' last step to sigma 0 is NaN here (B(h) = -h is infinite; the second-order ratio r1 is 0): this one
    equals it up to that step, then lands on the step's x0, first order as at every zero final sigma."""
    steps = 8
    theirs, ours = diffusers.UniPCMultistepScheduler(**kwargs), S.UniPC(steps, **kwargs)
    assert unipc_trajectory(theirs, ours, last=steps - 1) <= 1e-5
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    m = fake_model(x, ours.timesteps[-1])
    p, q = ours.table[-1, COL["p"]], ours.table[-1, COL["q"]]
    ours._history = ours._history2 = torch.randn_like(x)  # read with coefficient 0
    torch.testing.assert_close(ours.step(steps - 1, x, m), p * x + q * m)


def test_unipc_from_diffusers_with_a_dynamic_shift_and_refusals(diffusers):
    """mu = log(flow_shift), as for DPM-Solver++; what UniPC does not implement is refused by name."""
    wan = dict(FLOW, flow_shift=3.0)
    by_shift = S.from_diffusers(diffusers.UniPCMultistepScheduler(**wan), 12)
    dynamic = diffusers.UniPCMultistepScheduler(**wan, use_dynamic_shifting=True)
    by_mu = S.from_diffusers(dynamic, 12, mu=float(np.log(3.0)))
    assert type(by_mu) is S.UniPC and torch.allclose(by_mu.table, by_shift.table, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="^mu: required with use_dynamic_shifting"):
        S.from_diffusers(dynamic, 12)
    for config, match in [(dict(predict_x0=False), "^predict_x0=False: only UniPC's data-prediction form"),
                          (dict(solver_order=3), "^solver_order=3: expected 1 or 2"),
                          (dict(solver_p=diffusers.DDIMScheduler()), "^solver_p: another scheduler"),
                          (dict(thresholding=True), "thresholding=True is not supported"),
                          (dict(use_exponential_sigmas=True), "use_exponential_sigmas=True is not supported")]:
        with pytest.raises(ValueError, match=match):
            S.from_diffusers(diffusers.UniPCMultistepScheduler(**config), 12)
    with pytest.raises(ValueError, match="^solver_type='midpoint': expected 'bh1' or 'bh2'"):
        S.UniPC(12, solver_type="midpoint")
    with pytest.raises(ValueError, match=r"^disable_corrector=3: expected a list of step indices"):
        S.UniPC(12, disable_corrector=3)
    with pytest.raises(ValueError, match="flow_prediction' needs use_flow_sigmas=True"):
        S.UniPC(12, prediction_type="flow_prediction")


def test_unipc_history_layout_and_reset():
    """Two x0 histories: h from step 1 on, h2 from step 2 on (the order-2 corrector reads x0 two steps back), none
    on a zero final sigma; `reset` clears both."""
    sched = S.UniPC(10)
    assert sched.history_depth == 2 and sched.uses_history
    h, h2 = sched.table[:, COL["h"]], sched.table[:, COL["h2"]]
    assert h[0] == 0 and h[1:-1].ne(0).all() and h2[:2].eq(0).all() and h2[2:-1].ne(0).all()
    assert h[-1] == h2[-1] == 0 and sched.table[-1, COL["r"]] == 1 and sched.table[-1, COL["s"]] == 0
    # a corrector turned off after step 3 leaves step 4 with the predictor's history alone: no x0 from step 2
    assert S.UniPC(10, disable_corrector=[3]).table[4, COL["h2"]] == 0
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    states = [x]
    for i in range(3):
        states.append(sched.step(i, states[-1], m * (i + 1)))
    sched.reset()
    sched.step(0, x, m * 5)  # another x0 two steps back: only h2 carries it into step 2
    sched.step(1, states[1], m * 2)
    assert not torch.equal(sched.step(2, states[2], m * 3), states[3])
    sched.reset()
    for i in range(3):
        out = sched.step(i, states[i], m * (i + 1))
    assert torch.equal(out, states[3])
