"""The family conformance suite, in the style of diffusers' tester mixins: every registered family runs the same
tests from the registry. A family is a case below (a tiny model, its scheduler, noise and conditioning, from the
family's own test file); a registered family without a case fails `test_every_family_has_a_case`.

Per family: the fused fp32 loop against its reference loop under the fp32 rule, the bf16 loop within the bf16
rule, int8's SQNR, a static step cache in the three graph modes against the reference-ops run of the same cache,
and the bad inputs every family shares (NaN noise, noise of the wrong rank) named by argument."""
import pytest
import torch

import ditengine as de
from ditengine import families
from ditengine.bench.metrics import sqnr_db
from ditengine.cache import StaticCache

from support.tolerance import assert_fp32_run_within_tolerance


def dit_case():
    import test_fast

    model = test_fast.model_for("DiT-T/2")
    noise, labels = test_fast.draw()
    return model, de.schedulers.DDIM(4, timestep_spacing="trailing"), noise, (labels,), {}, 4.0


def pixart_case():
    import test_pixart

    model = test_pixart.pixart()
    return model, de.schedulers.DPMSolverPP(4), test_pixart.noise(), (), test_pixart.conditioning(model), 4.5


def ace_step_case():
    import test_ace_step

    model = test_ace_step.ace_step()
    return (model, test_ace_step.schedule(), test_ace_step.noise(), (), test_ace_step.conditioning(model), 1.0)


def flux_case():
    import test_flux

    model = test_flux.flux()
    return model, test_flux.schedule(), test_flux.noise(), (), test_flux.conditioning(model), 1.0


def sd3_case():
    import test_sd3

    model = test_sd3.sd3()
    return model, test_sd3.schedule(), test_sd3.noise(), (), test_sd3.conditioning(model), 3.0


CASES = {"dit": dit_case, "pixart": pixart_case, "ace_step": ace_step_case, "flux": flux_case, "sd3": sd3_case}
NAMES = [f.name for f in families.families()]


def run_reference(case):
    model, sched, noise, args, named, cfg = case
    return lambda m: de.sample(m, sched, noise, *args, cfg_scale=cfg, progress=False, **named)


def test_every_family_has_a_case():
    assert set(NAMES) <= set(CASES), f"registered families without a conformance case: {set(NAMES) - set(CASES)}"


@pytest.mark.parametrize("name", NAMES)
def test_fused_fp32_loop_matches_the_reference_loop(name):
    model, sched, noise, args, named, cfg = case = CASES[name]()
    got = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None)(noise, *args, **named)
    assert got.shape == noise.shape and families.of_model(model).name == name
    assert_fp32_run_within_tolerance(got, run_reference(case), model, f"{name} loop", steps=len(sched))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_loop_within_the_bf16_rule(name):
    """The fused bf16 loop is at most twice as far from the fp32 reference as the reference run in bf16 is."""
    model, sched, noise, args, named, cfg = case = CASES[name]()
    want32 = run_reference(case)(model)
    want_lp = run_reference(case)(model.to(torch.bfloat16))
    got = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.bfloat16, cuda_graph=None)(noise, *args, **named)
    err, err_lp = (got - want32).abs().max(), (want_lp - want32).abs().max()
    assert torch.isfinite(got).all() and err <= 2 * err_lp + 1e-3 * want32.abs().max(), (float(err), float(err_lp))


@pytest.mark.parametrize("name", NAMES)
def test_int8_keeps_the_signal(name):
    model, sched, noise, args, named, cfg = case = CASES[name]()
    want = run_reference(case)(model)
    got = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None,
                         quantize="int8")(noise, *args, **named)
    assert sqnr_db(got, want) >= 20, sqnr_db(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_static_cache_in_every_graph_mode(name):
    """A static step cache skips the same blocks in each graph mode, with the same answer; it skips work."""
    model, sched, noise, args, named, cfg = CASES[name]()
    if families.of_model(model).fast.reuse_block is None:
        pytest.skip(f"{name} offers no step caching")
    outs = []
    for mode in (None, "step", "loop"):
        sampler = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=mode,
                                 cache=StaticCache(interval=2, warmup=1))
        outs.append(sampler(noise, *args, **named))
        assert sampler.stats["block_evals"] < sampler.stats["block_evals_uncached"], sampler.stats
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bad_noise_is_named(name):
    model, sched, noise, args, named, cfg = CASES[name]()
    sampler = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None)
    bad = noise.clone()
    bad.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="noise"):
        sampler(bad, *args, **named)
    with pytest.raises(ValueError, match="noise"):
        sampler(noise[0], *args, **named)
