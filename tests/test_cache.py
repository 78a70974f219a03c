import json

import pytest
import torch

import ditengine as de
from ditengine import cache
from ditengine.cache import FirstBlockCache, StaticCache, parse_cache
from ditengine.fast import FastDiT, FastSampler, decision_mode
from ditengine.graphs import conditional_capture_supported

from test_fast import gpu_dit
from support.tolerance import assert_fp32_run_within_tolerance

S = de.schedulers
SCHEDULERS = [lambda: S.DDIM(6, eta=0.5), lambda: S.DDPM(6, variance_type="learned_range"),
              lambda: S.DPMSolverPP(6)]
IDS = ["ddim-eta", "ddpm-learned-range", "dpm-solver++"]


@pytest.fixture
def reference_ops(monkeypatch):
    """Kernels route to their PyTorch references: the caching logic is under test, not the kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def model_for(seed=0, **overrides):
    torch.manual_seed(seed)
    return de.DiT(de.DiTConfig.from_name("DiT-T/2", input_size=8, num_classes=10, **overrides)).eval()


def draw(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)


def fused(model, sched, policy, mode="loop", decision="auto", cfg_scale=4.0, seed=1, backend=None):
    sampler = FastSampler(model, sched, cfg_scale=cfg_scale, dtype=torch.float32, cuda_graph=mode, cache=policy,
                          cache_decision=decision, backend=backend)
    return sampler(*draw(), generator=torch.Generator().manual_seed(seed)), sampler


def reference(model, sched, policy, cfg_scale=4.0, seed=1, stats=None):
    stats = {} if stats is None else stats
    out = de.sample(model, sched, *draw(), cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(seed),
                    progress=False, cache=policy, stats=stats)
    return out, stats


@pytest.mark.parametrize("make", SCHEDULERS, ids=IDS)
def test_nothing_cached_gives_exactly_the_uncached_samples(reference_ops, make):
    model = model_for()
    sched = make()
    uncached, _ = fused(model, sched, None)
    runs = [(StaticCache(interval=1), mode, "auto") for mode in (None, "step")]
    runs += [(FirstBlockCache(threshold=0), "loop", decision) for decision in ("eager", "cond", "split")]
    for policy, mode, decision in runs:
        got, sampler = fused(model, sched, policy, mode, decision)
        assert torch.equal(got, uncached), (policy, mode, decision)  # bitwise
        assert sampler.stats["full_steps"] == len(sched) and sampler.stats["cached_steps"] == []
        assert sampler.stats["block_evals"] == sampler.stats["block_evals_uncached"] == len(sched) * 4


@pytest.mark.parametrize("make", SCHEDULERS, ids=IDS)
@pytest.mark.parametrize("policy", [FirstBlockCache(0.55), StaticCache(2, warmup=1, cooldown=1),
                                    StaticCache(3, warmup=1, cooldown=1, reuse="blocks")], ids=str)
def test_cached_fast_sampler_matches_the_cached_reference(reference_ops, make, policy):
    """The fused path and the plain-PyTorch form of the policy (ReferenceCachedForward) take the same
    decisions and give the same samples; only the transformer is approximated, so the stochastic and the
    multistep schedulers stay exact around it."""
    model = model_for()
    sched = make()
    expected, expected_stats = reference(model, sched, policy)
    uncached, _ = fused(model, sched, None)
    for mode, decision in ((None, "eager"), ("step", "split"), ("loop", "cond")):  # static: its graph modes
        got, sampler = fused(model, sched, policy, mode, decision)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item()))
        stats = sampler.stats
        assert stats["cached_steps"] == expected_stats["cached_steps"] and stats["cached_steps"]
        assert stats["block_evals"] == expected_stats["block_evals"] < stats["block_evals_uncached"]
    assert not torch.equal(got, uncached)  # something was skipped


@pytest.mark.parametrize("policy", [FirstBlockCache(threshold=10.0), StaticCache(2, warmup=1, cooldown=1,
                                                                            reuse="blocks")], ids=str)
def test_cached_run_through_the_triton_kernels_equals_the_reference_ops(triton_launches, policy):
    """The same cached run on the Triton kernels (the interpreter on a CPU) and on the ops' PyTorch
    references. The first-block threshold is far above any change seen, so both take the same decisions."""
    model = model_for(depth=2)  # the interpreter runs every launch in Python: two blocks suffice here
    sched = S.DDIM(4, eta=0.5)
    ref_stats = {}
    got, sampler = fused(model, sched, policy, mode="loop", backend="triton")
    assert_fp32_run_within_tolerance(got, lambda m: reference(m, sched, policy, stats=ref_stats)[0], model,
                                     "cached run")
    stats = {k: v for k, v in sampler.stats.items() if k != "decision"}  # the reference has no graph modes
    assert stats == ref_stats and stats["cached_steps"]
    # Cached steps still run the fused residual adds (per-block reuse) and always the scheduler step.
    assert triton_launches["_scheduler_step_kernel"] == len(sched)
    assert triton_launches["_attention_fwd_kernel"] == sampler.stats["block_evals"]
    assert triton_launches["_gated_residual_adaln_kernel"] >= 2 * sampler.stats["block_evals"]


def count_calls(modules):
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in modules]
    return calls, handles


@pytest.mark.parametrize("policy", [FirstBlockCache(0.55), StaticCache(2, warmup=1, cooldown=1),
                                    StaticCache(2, warmup=1, cooldown=1, reuse="blocks")], ids=str)
def test_stats_count_the_blocks_that_ran(reference_ops, monkeypatch, policy):
    model = model_for()
    sched = S.DDIM(8)
    # The reference path calls the model's modules: hooks count every block (its attention, when the
    # per-block reuse spells the block out) that actually ran.
    counted = [b.attn for b in model.blocks] if getattr(policy, "reuse", "") == "blocks" else list(model.blocks)
    calls, handles = count_calls(counted)
    try:
        _, ref_stats = reference(model, sched, policy)
    finally:
        for h in handles:
            h.remove()
    assert ref_stats["block_evals"] == len(calls)
    # The fast path reads the weights instead of calling the modules: count its own per-block calls.
    fast_calls = []
    block = FastDiT.block

    def counting_block(self, *args, **kwargs):
        fast_calls.append(1)
        return block(self, *args, **kwargs)

    monkeypatch.setattr(FastDiT, "block", counting_block)
    _, sampler = fused(model, sched, policy, mode=None)
    stats = sampler.stats
    assert stats["block_evals"] == len(fast_calls) == len(calls)
    assert stats["cached_steps"] == ref_stats["cached_steps"]
    full, cached = stats["full_steps"], len(stats["cached_steps"])
    first_block = 1 if isinstance(policy, FirstBlockCache) else 0
    assert full + cached == stats["steps"] == 8 and 0 < cached
    assert stats["block_evals"] == 4 * full + first_block * cached
    assert stats["block_evals_uncached"] == 32 and stats["block_share"] == stats["block_evals"] / 32


def test_first_and_last_steps_are_never_skipped(reference_ops):
    model = model_for()
    sched = S.DDIM(6)
    _, sampler = fused(model, sched, FirstBlockCache(threshold=1e9))  # skips wherever it may
    assert sampler.stats["cached_steps"] == [1, 2, 3, 4]
    _, sampler = fused(model, sched, StaticCache(interval=100, warmup=0, cooldown=0))
    assert sampler.stats["cached_steps"] == [1, 2, 3, 4]
    assert StaticCache(3, warmup=2, cooldown=2).schedule(12) == [
        True, True, False, False, True, False, False, True, False, False, True, True]


def test_cached_graph_runner_recaptures_on_batch_change_and_does_not_alias(reference_ops):
    model = model_for()
    for policy in (FirstBlockCache(0.55), StaticCache(2, warmup=1, cooldown=1)):
        sampler = FastSampler(model, S.DPMSolverPP(6), dtype=torch.float32, cuda_graph="loop", cache=policy)
        noise2, labels2 = draw(batch=2)
        first = sampler(noise2, labels2)
        kept = first.clone()
        second = sampler(*draw(batch=2, seed=5))
        assert sampler.captures == 1
        assert torch.equal(first, kept) and not torch.equal(first, second)
        noise3, labels3 = draw(batch=3)
        third = sampler(noise3, labels3)
        assert sampler.captures == 2 and third.shape == (3, 4, 8, 8)
        assert_fp32_run_within_tolerance(
            third, lambda m: de.sample(m, sampler.sched, noise3, labels3, progress=False, cache=policy), model,
            f"{policy} after recapture", len(sampler.sched))
        assert torch.equal(sampler(noise2, labels2), first)  # the old plan, and its cache state, still good
        assert sampler.captures == 2


def test_decision_mode_follows_the_capture_probe():
    def never():
        raise AssertionError("probed although the answer does not matter")

    assert decision_mode("cpu", "loop", True, never) == "eager"
    assert decision_mode("cuda", None, True, never) == "eager"
    assert decision_mode("cuda", "loop", False, never) == "eager"  # DITENGINE_CUDA_GRAPHS=0
    assert decision_mode("cuda", "loop", True, lambda: True) == "cond"
    assert decision_mode("cuda", "step", True, lambda: False) == "split"
    assert decision_mode("cpu", "loop", True, never, requested="split") == "split"
    with pytest.raises(ValueError, match="cache_decision='sometimes'"):
        decision_mode("cpu", "loop", True, never, requested="sometimes")


def test_split_decision_runs_loop_requests_as_step_graphs(reference_ops):
    model = model_for()
    sampler = FastSampler(model, S.DDIM(6), dtype=torch.float32, cuda_graph="loop", cache=FirstBlockCache(0.55),
                          cache_decision="split")
    sampler(*draw())
    plan = next(iter(sampler._plans.values()))
    assert plan.graph_mode == "step" and sampler.stats["decision"] == "split"
    assert plan.full_runner is not None and plan.cached_runner is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="threshold=-0.1: expected a finite number >= 0"):
        FirstBlockCache(threshold=-0.1)
    with pytest.raises(ValueError, match="interval=0: expected an int >= 1"):
        StaticCache(interval=0)
    with pytest.raises(ValueError, match="warmup=-1"):
        StaticCache(warmup=-1)
    with pytest.raises(ValueError, match="reuse='attention'"):
        StaticCache(reuse="attention")
    model = model_for()
    too_long = StaticCache(2, warmup=3, cooldown=3)
    with pytest.raises(ValueError, match=r"warmup \(3\) \+ cooldown \(3\) is longer than the run \(5 steps\)"):
        FastSampler(model, S.DDIM(5), cache=too_long)
    for backend in ("reference", "fused"):
        with pytest.raises(ValueError, match="is longer than the run"):
            de.sample(model, S.DDIM(5), *draw(), backend=backend, cache=too_long, progress=False)
    with pytest.raises(TypeError, match="cache: expected a ditengine.cache policy"):
        FastSampler(model, S.DDIM(5), cache="static")
    with pytest.raises(TypeError, match="cache: expected a ditengine.cache policy"):
        de.sample(model, S.DDIM(5), *draw(), cache="static", progress=False)


def test_parse_cache():
    assert parse_cache(None) is None and parse_cache("none") is None
    assert parse_cache("first-block") == FirstBlockCache()
    assert parse_cache("first-block:0.05") == FirstBlockCache(0.05)
    assert parse_cache("static") == StaticCache() and parse_cache("static:4") == StaticCache(4)
    with pytest.raises(ValueError, match="--cache 'static:0'.*interval=0"):
        parse_cache("static:0")
    with pytest.raises(ValueError, match="--cache 'taylor'"):
        parse_cache("taylor")


def test_relative_change_is_a_device_scalar():
    a, b = torch.ones(2, 3, 4), torch.full((2, 3, 4), 1.5)
    change = cache.relative_change(b, a)
    assert change.shape == () and change.item() == pytest.approx(0.5)
    skip = cache.skip_decision(b, a, 0.6, torch.tensor(True))
    assert skip.dtype == torch.bool and skip.item()
    assert not cache.skip_decision(b, a, 0.6, torch.tensor(False)).item()


def test_pixel_frechet_distance_and_score():
    from ditengine.demo.data import digits
    from ditengine.demo.eval import pixel_frechet_distance, score

    real = digits().images
    assert abs(pixel_frechet_distance(real)) < 1e-6
    assert pixel_frechet_distance(real[:300]) < pixel_frechet_distance(real[:300].flip(-1))
    labels = digits().labels[:50]
    assert score(real[:50], labels)["pixel_fd"] == pytest.approx(pixel_frechet_distance(real[:50]))


def test_eval_cache_sweep_writes_csv_and_png(tmp_path, capsys, reference_ops):
    from ditengine.demo.eval import main

    stem = tmp_path / "sweep"
    assert main(["--cache-sweep", "--sweep-grid", "defaults", "--schedulers", "ddim-noclip:6", "--per-class", "1",
                 "--device", "cpu", "--out", str(stem)]) == 0
    printed = capsys.readouterr().out
    assert "| ddim-noclip 6 | uncached | 100% |" in printed and "| first-block:0.1 |" in printed
    assert "| static:3 |" in printed
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("scheduler,steps,policy,block_share") and len(lines) == 4
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "sweep.png")  # decodes: a real PNG, not just bytes
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 300
    assert image[..., :3].std() > 0.05  # something drawn, not a blank canvas


def test_cli_cache_options(tmp_path, reference_ops):
    from ditengine.demo.images import main as sample_main

    out = tmp_path / "grid.png"
    assert sample_main(["--steps", "6", "--per-class", "1", "--labels", "1,2", "--backend", "fused",
                        "--cache", "static:2", "--device", "cpu", "--out", str(out)]) == 0
    assert out.exists()


def test_bench_cache_rows(tmp_path, capsys, reference_ops):
    from ditengine.bench.cli import main as bench_main

    assert bench_main(["--model", "DiT-T/2", "--input-size", "8", "--repeats", "3", "--warmup", "1", "--steps", "6",
                       "--dtype", "fp32",
                       "--variants", "fused+graph-loop,fused+graph-loop+cache-first-block,"
                       "fused+graph-loop+cache-static", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| fused+graph-loop+cache-static | 1 | fp32 |" in printed
    rows = {r["variant"]: r for r in json.loads(next(tmp_path.glob("bench-*.json")).read_text())["results"]}
    assert rows["fused+graph-loop"]["block_share"] == 1.0
    assert rows["fused+graph-loop+cache-static"]["block_share"] == pytest.approx(4 / 6)  # steps 2, 3 reuse step 1
    assert rows["fused+graph-loop+cache-first-block"]["cache_decision"] == "eager"
    assert rows["fused+graph-loop+cache-static"]["sqnr_db"] < rows["fused+graph-loop"]["sqnr_db"]


@pytest.mark.gpu
def test_gpu_static_cache_keeps_one_loop_graph_and_dynamic_reports_its_mode():
    model, noise, labels = gpu_dit()
    sched = S.DDIM(10)
    sampler = FastSampler(model, sched, dtype=torch.bfloat16, cuda_graph="loop", cache=StaticCache())
    sampler(noise, labels)
    plan = next(iter(sampler._plans.values()))
    assert plan.runner.graph is not None and plan.full_runner is None  # one captured loop graph
    eager = FastSampler(model, sched, dtype=torch.bfloat16, cuda_graph=None, cache=StaticCache())(noise, labels)
    assert torch.equal(sampler(noise, labels), eager)
    # At 0.8 this model's first-block cache skips steps 2, 3 and 5-8 of 10 (bf16 and fp32 alike, measured on
    # the CPU): decisions that change along the run, so a branch taken wrongly on the device changes the sample.
    policy = FirstBlockCache(threshold=0.8)
    auto = "cond" if conditional_capture_supported(torch.device("cuda")) else "split"
    runs = {}
    for decision, expected_mode in (("auto", auto), ("split", "split"), ("eager", "eager")):
        sampler = FastSampler(model, sched, dtype=torch.bfloat16, cuda_graph="loop", cache=policy,
                              cache_decision=decision)
        runs[decision] = sampler(noise, labels)
        stats = sampler.stats
        assert stats["decision"] == expected_mode, (decision, stats["decision"])
        assert 0 < len(stats["cached_steps"]) < sum(policy.skippable(len(sched))), stats["cached_steps"]
        plan = next(iter(sampler._plans.values()))
        runners = [r for r in (plan.runner, plan.full_runner, plan.cached_runner) if r is not None]
        if expected_mode == "eager":
            assert not runners  # one host read per step: nothing captured
        else:
            assert runners and all(r.graph is not None for r in runners)  # replayed graphs, not eager bodies
        runs[decision] = (runs[decision], stats["cached_steps"])
    assert runs["auto"][1] == runs["split"][1] == runs["eager"][1]
    assert torch.equal(runs["auto"][0], runs["eager"][0]) and torch.equal(runs["split"][0], runs["eager"][0])
