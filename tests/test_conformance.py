"""The family conformance suite, in the style of diffusers' tester mixins: every registered family runs the same
tests from the registry. A family is a case below (a tiny model, its scheduler, noise and conditioning, from the
family's own test file); a registered family without a case fails `test_every_family_has_a_case`.

Per family: the fused fp32 loop against its reference loop under the fp32 rule, the bf16 loop within the bf16
rule, int8's SQNR, every step-cache policy in the three graph modes against the reference form of the same cache
(`cache.ReferenceCachedForward` on the family's own blocks), the fused contract's cache pieces (`reuse_block` equals
`block` on unchanged inputs, `final_norm` equals the last block's output norm), and the bad inputs every family
shares (NaN noise, noise of the wrong rank) named by argument."""
import pytest
import torch

import ditengine as de
from ditengine import families
from ditengine.bench.metrics import sqnr_db
from ditengine.cache import FirstBlockCache, StaticCache

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


def wan_case():
    import test_wan

    model = test_wan.wan()
    return model, test_wan.schedule(), test_wan.noise(), (), test_wan.conditioning(model), 5.0


CASES = {"dit": dit_case, "pixart": pixart_case, "ace_step": ace_step_case, "flux": flux_case, "sd3": sd3_case,
         "wan": wan_case}
NAMES = [f.name for f in families.families()]


def run_reference(case, **options):
    model, sched, noise, args, named, cfg = case
    return lambda m: de.sample(m, sched, noise, *args, cfg_scale=cfg, progress=False, **options, **named)


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
    """The fused bf16 loop is at most twice as far from the fp32 reference as the reference run in bf16 is, in
    root-mean-square: the rule of a kernel, over a whole loop. Not in the max over elements: a loop's largest
    error is the one element that a rounding tipped the other way, a different one for each draw and each
    equally valid order of bf16 roundings (over five draws of the DiT case the bf16 reference's own max error
    ranged 0.35-1.01 at 19-23 dB)."""
    model, sched, noise, args, named, cfg = case = CASES[name]()
    want32 = run_reference(case)(model)
    want_lp = run_reference(case)(model.to(torch.bfloat16))
    got = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.bfloat16, cuda_graph=None)(noise, *args, **named)
    rms = lambda t: t.pow(2).mean().sqrt()  # noqa: E731
    err, err_lp = rms(got - want32), rms(want_lp - want32)
    assert torch.isfinite(got).all() and err <= 2 * err_lp + 1e-3 * rms(want32), (float(err), float(err_lp))


@pytest.mark.parametrize("name", NAMES)
def test_int8_keeps_the_signal(name):
    """Close to the reference loop, and really quantised (not the fp32 run under another name)."""
    model, sched, noise, args, named, cfg = case = CASES[name]()
    want = run_reference(case)(model)
    got = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None,
                         quantize="int8")(noise, *args, **named)
    exact = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None)(noise, *args, **named)
    assert sqnr_db(got, want) >= 20, sqnr_db(got, want)
    assert sqnr_db(got, exact) < 200, sqnr_db(got, exact)


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


# A first-block threshold far above any relative change seen: every step that may skip does, in both loops, so the
# comparison does not hang on a decision near the threshold.
POLICIES = [FirstBlockCache(threshold=10.0), StaticCache(2, warmup=1, cooldown=1),
            StaticCache(2, warmup=1, cooldown=1, reuse="blocks")]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p}-{getattr(p, 'reuse', '')}".rstrip("-"))
@pytest.mark.parametrize("name", NAMES)
def test_cached_fused_loop_matches_the_cached_reference_loop(name, policy):
    """The same policy object drives the fused loop (in each graph mode) and the reference loop: the same steps
    skipped, the same blocks computed, the same latents under the fp32 rule."""
    model, sched, noise, args, named, cfg = case = CASES[name]()
    want_stats = {}
    run_reference(case, cache=policy, stats=want_stats)(model)
    assert want_stats["cached_steps"] and want_stats["block_evals"] < want_stats["block_evals_uncached"], want_stats
    uncached = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32)(noise, *args, **named)
    outs = []
    for mode in (None, "step", "loop"):
        sampler = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=mode, cache=policy)
        got = sampler(noise, *args, **named)
        outs.append(got)
        stats = {k: v for k, v in sampler.stats.items() if k != "decision"}  # the reference has no graph modes
        assert stats == want_stats, (mode, stats, want_stats)
        assert not torch.equal(got, uncached)
        # A cached step adds what an earlier step computed: its roundings count twice in the floor.
        assert_fp32_run_within_tolerance(got, run_reference(case, cache=policy), model, f"{name} {policy} {mode}",
                                         steps=2 * len(sched))
    assert all(torch.equal(out, outs[0]) for out in outs[1:])  # the graph modes take the same decisions, bitwise


@pytest.mark.parametrize("name", NAMES)
def test_a_cache_that_skips_nothing_is_the_uncached_run(name):
    model, sched, noise, args, named, cfg = CASES[name]()
    uncached = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32)(noise, *args, **named)
    for nothing in (StaticCache(interval=1), FirstBlockCache(threshold=0)):
        sampler = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cache=nothing)
        assert torch.equal(sampler(noise, *args, **named), uncached), nothing
        assert sampler.stats["block_evals"] == sampler.stats["block_evals_uncached"]


def contract_pieces(name):
    """A family's fused denoiser in fp32 with one step's context and modulation, and a fresh random model input."""
    model, sched, noise, args, named, cfg = CASES[name]()
    fast = families.of_model(model).fast(model, torch.float32)
    use_cfg = cfg != 1.0
    cond = fast.inputs(model, noise, use_cfg, *args, **named)
    rows = 2 * len(noise) if use_cfg else len(noise)
    ctx = fast.context_buffers(rows, tuple(noise.shape[1:]), cond)
    fast.write_context(ctx, cond, use_cfg)
    mod = tuple(m[0] for m in fast.modulation(sched.timesteps[1:2], ctx))
    g = torch.Generator().manual_seed(7)
    x = torch.randn((rows, *noise.shape[1:]), generator=g)
    return fast, ctx, mod, x


def assert_same(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item()), msg=what)


@pytest.mark.parametrize("name", NAMES)
def test_reuse_block_equals_block_on_unchanged_inputs(name):
    """Block i computed in full, keeping its branch outputs, and block i again from those outputs on the same
    residual and modulation give the same residual and the same next norm (gates, adds and norms all checked)."""
    fast, ctx, mod, x = contract_pieces(name)
    if fast.reuse_block is None:
        pytest.skip(f"{name} offers no step caching")
    resid = fast.embed(x, ctx).clone()
    h = fast.first_norm(resid, mod, ctx)
    for i in range(fast.depth):
        # NaN where the block writes nothing (a Flux single block keeps one branch): a reuse reading it fails.
        kept = torch.full((fast.branches, *resid.shape), float("nan"), dtype=fast.dtype)
        before = resid.clone()
        resid, h = fast.block(i, resid, h, mod, ctx, keep=kept)
        resid, h = resid.clone(), h.clone()
        context = {k: v.clone() for k, v in ctx.items() if isinstance(v, torch.Tensor)}
        reused_resid, reused_h = fast.reuse_block(i, before, mod, ctx, kept)
        for key, value in context.items():  # per-call state, scratch buffers (SD3.5's second norm) included
            assert torch.equal(ctx[key], value), f"{name} block {i}: reuse_block changed ctx[{key!r}]"
        assert_same(reused_resid, resid, f"{name} block {i}: residual")
        assert_same(reused_h, h, f"{name} block {i}: next norm")


@pytest.mark.parametrize("name", NAMES)
def test_final_norm_equals_the_last_blocks_output_norm(name):
    """What a cached step applies after adding the kept residual (`final_norm`) is the norm the last block applies
    to its own output."""
    fast, ctx, mod, x = contract_pieces(name)
    resid = fast.embed(x, ctx).clone()
    h = fast.first_norm(resid, mod, ctx)
    for i in range(fast.depth):
        resid, h = fast.block(i, resid, h, mod, ctx)
    assert_same(fast.final_norm(resid.clone(), mod), h, f"{name}: final norm")
