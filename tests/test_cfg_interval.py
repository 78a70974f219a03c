"""Guidance in a limited interval of timesteps (`cfg_interval`): the conditional half alone outside it, on the
reference and the fused loops, for the DiT and PixArt, with every graph mode unrolling the static schedule."""
import math

import pytest
import torch

import ditengine as de
from ditengine.fast import FastSampler
from ditengine.inputs import guided_steps

from test_fast import draw, gpu_dit, model_for
from test_pixart import conditioning, noise as pixart_noise, pixart
from support.tolerance import assert_fp32_run_within_tolerance

S = de.schedulers


def ddim():
    return S.DDIM(10, timestep_spacing="trailing", clip_sample=False)  # t = 999, 899, ..., 99


def test_guided_steps():
    t = [999.0, 899.0, 499.0, 99.0, 0.0]
    assert guided_steps(t, None) == [True] * 5
    assert guided_steps(t, (0, math.inf)) == [True] * 5
    assert guided_steps(t, (99, 899)) == [False, True, True, True, False]  # both ends included
    for bad in [(5, 1), (1,), "0,1", (0, float("nan")), (True, 3)]:
        with pytest.raises(ValueError, match="cfg_interval: expected"):
            guided_steps(t, bad)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_the_whole_range_is_bitwise_the_run_without_it(backend):
    model = model_for("DiT-S/2", depth=2)
    x, y = draw()
    plain = de.sample(model, ddim(), x, y, backend=backend, progress=False)
    full = de.sample(model, ddim(), x, y, backend=backend, progress=False, cfg_interval=(0, math.inf))
    assert torch.equal(plain, full)


def test_reference_steps_outside_the_interval_are_unguided_steps():
    """A step outside the interval is exactly the step of an unguided run (cfg 1) from the same state."""
    model = model_for("DiT-S/2", depth=2)
    x, y = draw()
    sched = ddim()
    lo_only = de.sample(model, sched, x, y, progress=False, cfg_interval=(2000, 3000))  # guides no step
    unguided = de.sample(model, sched, x, y, progress=False, cfg_scale=1.0)
    assert torch.equal(lo_only, unguided)
    some = de.sample(model, sched, x, y, progress=False, cfg_interval=(300, 700))
    assert not torch.equal(some, unguided) and not torch.equal(some, de.sample(model, sched, x, y, progress=False))


@pytest.mark.parametrize("cuda_graph", [None, "step", "loop"])
def test_fused_dit_matches_the_reference(cuda_graph):
    model = model_for("DiT-S/2", depth=2)
    x, y = draw()
    sampler = FastSampler(model, ddim(), dtype=torch.float32, cuda_graph=cuda_graph, cfg_interval=(300, 700))
    assert_fp32_run_within_tolerance(
        sampler(x, y), lambda m: de.sample(m, ddim(), x, y, progress=False, cfg_interval=(300, 700)), model,
        "fused cfg_interval", len(ddim()))


def test_fused_pixart_matches_the_reference():
    model = pixart()
    cond = conditioning(model)
    sched = S.DPMSolverPP(6)
    assert 0 < sum(guided_steps(sched.timesteps.tolist(), (400, 1000))) < len(sched)  # some steps of each kind
    out = FastSampler(model, sched, dtype=torch.float32, cfg_interval=(400, 1000))(pixart_noise(), **cond)
    assert_fp32_run_within_tolerance(
        out, lambda m: de.sample(m, sched, pixart_noise(), progress=False, cfg_interval=(400, 1000), **cond), model,
        "fused PixArt cfg_interval", len(sched))


def test_not_with_a_step_cache():
    model = model_for("DiT-S/2", depth=2)
    with pytest.raises(ValueError, match="cfg_interval: not supported with a step cache"):
        FastSampler(model, ddim(), cache=de.cache.StaticCache(), cfg_interval=(0, 500))


@pytest.mark.gpu
def test_gpu_graph_modes_equal_eager_bitwise():
    model, x, y = gpu_dit()
    runs = {mode: FastSampler(model, ddim(), dtype=torch.bfloat16, cuda_graph=mode, cfg_interval=(300, 700))(x, y)
            for mode in (None, "step", "loop")}
    assert torch.equal(runs["step"], runs[None]) and torch.equal(runs["loop"], runs[None])
