import pytest
import torch

import ditengine as de
from ditengine.fast import FastDiT, FastSampler

from test_scheduler_step import IDS, SCHEDULERS
from support.tolerance import assert_fp32_run_within_tolerance, assert_within_tolerance


def model_for(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return de.DiT(de.DiTConfig.from_name(name, input_size=8, num_classes=10, **overrides)).eval()


def draw(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)


def gpu_dit(batch=2):
    """The GPU tests' DiT-S/2 (4 blocks, 16x16 latents) with seeded noise and labels on CUDA."""
    torch.manual_seed(0)
    model = de.DiT(de.DiTConfig.from_name("DiT-S/2", input_size=16, depth=4)).cuda().eval()
    g = torch.Generator("cuda").manual_seed(0)
    noise = torch.randn(batch, 4, 16, 16, device="cuda", generator=g)
    return model, noise, torch.randint(0, 1000, (batch,), device="cuda", generator=g)


@pytest.fixture
def reference_ops(monkeypatch):
    """Kernels run their native CPU kernels where the extension is built (CI builds it), else their PyTorch
    references; not the Triton interpreter, which has its own tests (and one sampler run below)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# DiT-S/2 (head dim 64), a /4 config and a head-dim-72 config; shallow and 8x8 latents for the interpreter.
@pytest.mark.parametrize("name, overrides", [("DiT-S/2", {"depth": 1}), ("DiT-T/4", {}), ("DiT-Tiny72/2", {})])
def test_fused_forward_matches_reference_in_fp32_through_the_kernels(name, overrides):
    model = model_for(name, **overrides)
    fast = FastDiT(model, torch.float32)
    x, y = draw(batch=2)
    t = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        expected, got = model(x, t, y), fast(x, t, y)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


def test_fused_forward_compiles_as_one_graph(reference_ops):
    """The kernels are torch.library ops: torch.compile traces the fused forward without a graph break."""
    model = model_for("DiT-T/2")
    fast = FastDiT(model, torch.float32)
    x, y = draw()
    mod = fast.modulate_all(fast.conditioning(torch.tensor([3.0, 500.0]), y))
    compiled = torch.compile(fast.forward, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, mod), fast.forward(x, mod))


def test_fp16_forward_within_tolerance_with_fp32_residual():
    model = model_for("DiT-T/2")
    fast = FastDiT(model, torch.float16)
    assert fast.residual_dtype == torch.float32
    x, y = draw()
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        ref32 = model(x, t, y)
        ref_lp = model.half()(x.half(), t, y).float()
        got = fast(x, t, y).float()
    assert_within_tolerance(got, ref32, ref_lp, 1e-3, "fp16 fused forward")


@pytest.mark.parametrize("make", SCHEDULERS, ids=IDS)
@pytest.mark.parametrize("cfg_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_fast_sampler_matches_reference_sampler(reference_ops, make, cfg_scale):
    model = model_for("DiT-T/2")
    sched = make()
    noise, labels = draw()
    runs = {}
    for mode in (None, "step", "loop"):
        sampler = FastSampler(model, sched, cfg_scale=cfg_scale, dtype=torch.float32, cuda_graph=mode)
        runs[mode] = sampler(noise, labels, generator=torch.Generator().manual_seed(1))
    assert_fp32_run_within_tolerance(runs[None], lambda m: de.sample(
        m, sched, noise, labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(1), progress=False),
        model, "fused sampler", steps=len(sched))
    assert torch.equal(runs["step"], runs[None]) and torch.equal(runs["loop"], runs[None])  # bitwise


def test_fast_sampler_through_the_interpreter(triton_launches):
    """The whole fused loop on the Triton kernels (backend="triton": the interpreter on a CPU), every one of
    them launched, against the reference sampler."""
    model = model_for("DiT-T/2")
    sched = de.schedulers.DPMSolverPP(3)
    noise, labels = draw(batch=1)
    sampler = FastSampler(model, sched, dtype=torch.float32, cuda_graph="step", backend="triton")
    got = sampler(noise, labels, generator=torch.Generator().manual_seed(2))
    assert_fp32_run_within_tolerance(got, lambda m: de.sample(
        m, sched, noise, labels, generator=torch.Generator().manual_seed(2), progress=False), model,
        "interpreted sampler")
    depth, steps = model.config.depth, len(sched)
    assert triton_launches["_attention_fwd_kernel"] == depth * steps
    assert triton_launches["_gated_residual_adaln_kernel"] == 2 * depth * steps
    assert triton_launches["_adaln_modulate_kernel"] == steps
    assert triton_launches["_scheduler_step_kernel"] == steps


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_fast_sampler_on_one_backend_runs_no_triton_kernel(triton_launches, backend):
    from ditengine.kernels import _native

    if backend == "native" and not _native.native_available():
        pytest.skip(f"native extension not loaded: {_native.unavailable_reason()}")
    model = model_for("DiT-T/2")
    sched = de.schedulers.DDIM(2)
    noise, labels = draw(batch=1)
    got = FastSampler(model, sched, dtype=torch.float32, cuda_graph=None, backend=backend)(noise, labels)
    assert_fp32_run_within_tolerance(got, lambda m: de.sample(m, sched, noise, labels, progress=False), model,
                                     f"{backend} sampler")
    assert sum(triton_launches.values()) == 0


def test_fast_sampler_backend_errors(monkeypatch):
    model = model_for("DiT-T/2")
    with pytest.raises(ValueError, match="backend='cuda': expected one of"):
        FastSampler(model, de.schedulers.DDIM(2), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read per call: Triton on CPU tensors is then unavailable
    with pytest.raises(ValueError, match="backend='triton' on CPU needs Triton's interpreter"):
        FastSampler(model, de.schedulers.DDIM(2), backend="triton")


def test_buffers_recapture_and_outputs_not_aliased(reference_ops):
    model = model_for("DiT-T/2")
    sampler = FastSampler(model, de.schedulers.DPMSolverPP(4), dtype=torch.float32, cuda_graph="loop")
    noise2, labels2 = draw(batch=2)
    first = sampler(noise2, labels2)
    kept = first.clone()
    second = sampler(*draw(batch=2, seed=5))
    assert sampler.captures == 1  # same shape: the cached plan is reused
    assert torch.equal(first, kept) and not torch.equal(first, second)  # returned tensors are copies
    noise3, labels3 = draw(batch=3)
    third = sampler(noise3, labels3)
    assert sampler.captures == 2 and third.shape == (3, 4, 8, 8)  # a new batch size: a new plan
    expected = de.sample(model, sampler.sched, noise3, labels3, progress=False)
    torch.testing.assert_close(third, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(sampler(noise2, labels2), first)  # the old plan still gives the same answer
    assert sampler.captures == 2


def test_conditioning_budget_switches_to_per_step(reference_ops):
    model = model_for("DiT-T/2")
    sched = de.schedulers.DDIM(4)
    noise, labels = draw()
    big = FastSampler(model, sched, dtype=torch.float32, cuda_graph="step")
    small = FastSampler(model, sched, dtype=torch.float32, cuda_graph="step", conditioning_budget=1024)
    a, b = big(noise, labels), small(noise, labels)
    assert big.conditioning_mode == "precomputed" and small.conditioning_mode == "per-step"
    # The same arithmetic but the modulation GEMM's row count (all steps at once, or one), so not bitwise: each
    # within the fp32 rule of a whole run against the float64 reference.
    for out, name in ((a, "precomputed"), (b, "per-step")):
        assert_fp32_run_within_tolerance(out, lambda m: de.sample(m, sched, noise, labels, progress=False), model,
                                         f"{name} conditioning", len(sched))


def test_bad_input(reference_ops):
    model = model_for("DiT-T/2")
    sampler = FastSampler(model, de.schedulers.DDIM(2), dtype=torch.float32, cuda_graph=None)
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, 4, 8, 8\)"):
        sampler(torch.randn(1, 4, 16, 16), torch.tensor([1]))
    with pytest.raises(TypeError, match="noise: expected a floating-point tensor"):
        sampler(torch.zeros(1, 4, 8, 8, dtype=torch.int32), torch.tensor([1]))
    with pytest.raises(ValueError, match="noise: on meta, expected the model's device cpu"):
        sampler(torch.randn(1, 4, 8, 8, device="meta"), torch.tensor([1], device="meta"))
    with pytest.raises(TypeError, match="dtype: expected one of"):
        FastSampler(model, de.schedulers.DDIM(2), dtype=torch.float64)
    with pytest.raises(ValueError, match="cuda_graph='always'"):
        FastSampler(model, de.schedulers.DDIM(2), cuda_graph="always")
    with pytest.raises(TypeError, match="sched: expected a ditengine scheduler"):
        FastSampler(model, object())


@pytest.mark.gpu
@pytest.mark.parametrize("name, overrides", [("DiT-S/2", {}), ("DiT-B/4", {}), ("DiT-XL/2", {"depth": 4})])
def test_gpu_bf16_forward_within_tolerance(name, overrides):
    torch.manual_seed(0)
    model = de.DiT(de.DiTConfig.from_name(name, input_size=32, **overrides)).cuda().eval()
    x = torch.randn(4, 4, 32, 32, device="cuda")
    t = torch.tensor([1.0, 250.0, 500.0, 999.0], device="cuda")
    y = torch.tensor([1, 2, 3, 1000], device="cuda")
    with torch.no_grad():
        ref32 = model(x, t, y)
        ref_lp = model.to(torch.bfloat16)(x.bfloat16(), t, y).float()
        got = FastDiT(model.float(), torch.bfloat16)(x, t, y).float()
    assert_within_tolerance(got, ref32, ref_lp, 1e-2, f"{name} bf16 fused forward")


@pytest.mark.gpu
@pytest.mark.parametrize("make", SCHEDULERS, ids=IDS)
def test_gpu_graph_paths_equal_eager_bitwise(make):
    model, noise, labels = gpu_dit(batch=4)
    sched = make()
    runs = {}
    for mode in (None, "step", "loop"):
        sampler = FastSampler(model, sched, dtype=torch.bfloat16, cuda_graph=mode)
        runs[mode] = sampler(noise, labels, generator=torch.Generator("cuda").manual_seed(3))
        plan = next(iter(sampler._plans.values()))
        # A graph was captured and replayed: with capture off, "graph == eager" would hold trivially.
        assert (plan.runner.graph is not None) if mode else plan.runner is None, mode
    assert torch.equal(runs["step"], runs[None]) and torch.equal(runs["loop"], runs[None])
    ref = de.sample(model, sched, noise, labels, generator=torch.Generator("cuda").manual_seed(3), progress=False)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (runs[None] - ref).pow(2).sum())
    assert sqnr >= 30, f"bf16 fused sampler vs fp32 reference: SQNR {sqnr:.1f} dB (target 30 dB)"


def test_accelerate_matches_the_diffusers_pipeline(reference_ops):
    diffusers = pytest.importorskip("diffusers")
    from support.diffusers_models import tied_diffusers_dit

    transformer = tied_diffusers_dit(num_classes=1000)  # DiTPipeline's null label is 1000
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  sample_size=8).eval()
    for scheduler in (diffusers.DDIMScheduler(), diffusers.DPMSolverMultistepScheduler()):
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe([3, 500], num_inference_steps=6, generator=torch.manual_seed(0), output_type="np").images
        fast = de.accelerate(pipe)
        got = fast([3, 500], num_inference_steps=6, generator=torch.manual_seed(0), output_type="np").images
        assert got.shape == expected.shape == (2, 8, 8, 3)
        assert abs(expected - 0.5).max() > 0.01  # a live image, not a constant
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected), rtol=1e-4, atol=1e-4)
