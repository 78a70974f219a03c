"""ACE-Step 1.5 through the fast path: FastSampler against ditengine's reference loop (turbo and APG-guided base
runs, windowed attention, odd lengths, plans per length), the kernel backends, int8, graphs and step caching."""
import pytest
import torch

import ditengine as de
from ditengine.bench.metrics import sqnr_db
from ditengine.fast import FastAceStep
from ditengine.models.ace_step import AceStep, AceStepConfig

from support.diffusers_models import randomize
from support.tolerance import assert_fp32_run_within_tolerance, assert_within_tolerance

S = de.schedulers
C, C_CTX, L = 8, 16, 7
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, in_channels=C + C_CTX, audio_acoustic_hidden_dim=C, sliding_window=4, encoder_hidden_size=24)


def ace_step(seed=0, **overrides) -> AceStep:
    return randomize(AceStep(AceStepConfig(**{**TINY, **overrides})), seed, std=0.2).eval()


def turbo_sigmas(steps=4, shift=3.0):
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t))[:-1].tolist()


def schedule(steps=4):
    return S.FlowMatchEuler(sigmas=turbo_sigmas(steps), num_train_timesteps=1)


def conditioning(model, B=2, T=23, seed=1, guided=False):
    g = torch.Generator().manual_seed(seed)
    enc = model.config.encoder_hidden_size
    cond = dict(encoder_hidden_states=torch.randn(B, L, enc, generator=g),
                context_latents=torch.randn(B, model.config.context_channels, T, generator=g))
    if guided:
        cond["null_encoder_hidden_states"] = torch.randn(1, 1, enc, generator=g).expand(B, L, enc)
    return cond


def noise(B=2, T=23, seed=2):
    return torch.randn(B, C, T, generator=torch.Generator().manual_seed(seed))


def reference(model, sched, z, cfg_scale=1.0, **kwargs):
    return lambda m: de.sample(m, sched, z, cfg_scale=cfg_scale, progress=False, **kwargs)


@pytest.mark.parametrize("T", [7, 20, 23, 40])
def test_turbo_run_matches_the_reference_in_fp32(T):
    """Window 4 over ceil(T / 2) >= 10 tokens cuts the band (over 4 tokens it does not); odd T pads the last
    patch."""
    model, sched = ace_step(), schedule()
    cond, z = conditioning(model, T=T), noise(T=T)
    got = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32, cuda_graph=None)(z, **cond)
    assert got.shape == z.shape
    assert_fp32_run_within_tolerance(got, reference(model, sched, z, **cond), model, f"ACE-Step turbo T={T}",
                                     steps=len(sched))


def test_base_run_with_apg_and_a_cfg_interval_matches_the_reference():
    model, sched = ace_step(seed=3), schedule(6)
    cond, z = conditioning(model, guided=True), noise()
    for interval in (None, (0.2, 0.8)):
        run = dict(cfg_scale=7.0, guider=de.APG(), cfg_interval=interval)
        got = de.FastSampler(model, sched, dtype=torch.float32, cuda_graph=None, **run)(z, **cond)
        assert_fp32_run_within_tolerance(got, reference(model, sched, z, **run, **cond), model,
                                         f"ACE-Step APG interval={interval}", steps=len(sched))
    plain = de.FastSampler(model, sched, cfg_scale=7.0, dtype=torch.float32)(z, **cond)
    assert (plain - got).abs().max() > 1e-3  # APG is not CFG


def test_bf16_forward_within_the_tolerance_rule():
    model = ace_step()
    cond, x = conditioning(model), noise()
    t = torch.tensor([0.9, 0.3])
    fast = FastAceStep(model, torch.bfloat16)
    inputs = fast.inputs(model, x, False, **cond)
    ctx = fast.context_buffers(2, tuple(x.shape[1:]), inputs)
    fast.write_context(ctx, inputs, False)
    mod = tuple(m[torch.arange(2), torch.arange(2)] for m in fast.modulation(t, ctx))  # row i at t[i]
    call = dict(encoder_hidden_states=cond["encoder_hidden_states"],
                context_latents=cond["context_latents"].transpose(1, 2), timestep=t)
    with torch.no_grad():
        got = fast.forward(x.bfloat16(), mod, ctx).float()
        ref32 = model(x.transpose(1, 2), **call).transpose(1, 2)
        ref_lp = ace_step().bfloat16()(x.transpose(1, 2).bfloat16(),
                                       **{k: v.bfloat16() for k, v in call.items()}).float().transpose(1, 2)
    assert ref32.abs().max() > 0.5
    assert_within_tolerance(got, ref32, ref_lp, 1e-2, "ACE-Step bf16 fused forward")


def test_lengths_and_conditions_get_their_plans():
    model, sched = ace_step(), schedule(3)
    sampler = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32)
    first = sampler(noise(T=21), **conditioning(model, T=21))
    again = sampler(noise(T=21), **conditioning(model, T=21, seed=5))
    assert sampler.captures == 1 and not torch.equal(first, again)
    longer = sampler(noise(T=30), **conditioning(model, T=30))
    assert longer.shape == (2, C, 30) and sampler.captures == 2
    assert torch.equal(again, de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32)(
        noise(T=21), **conditioning(model, T=21, seed=5)))


@pytest.mark.parametrize("backend", ["reference", "triton", "native"])
def test_every_kernel_backend_runs_the_same_loop(backend):
    from ditengine.kernels import interpreting, native_available

    if backend == "triton" and not interpreting():
        pytest.skip("Triton on a CPU needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    if backend == "native" and not native_available():
        pytest.skip("the native extension is not built")
    model, sched = ace_step(num_hidden_layers=1), schedule(2)
    cond, z = conditioning(model, T=21), noise(T=21)
    got = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32, backend=backend)(z, **cond)
    assert_fp32_run_within_tolerance(got, reference(model, sched, z, **cond), model, f"backend={backend}",
                                     steps=len(sched))


def test_diffusers_test_head_dim_runs_the_reference_attention():
    """diffusers' own test config has head dim 8, below the kernels' 16: the fast path still runs (logged once)."""
    model, sched = ace_step(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8), schedule(2)
    cond, z = conditioning(model), noise()
    got = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32)(z, **cond)
    assert FastAceStep(model, torch.float32).small_heads
    assert_fp32_run_within_tolerance(got, reference(model, sched, z, **cond), model, "head dim 8", steps=len(sched))


@pytest.mark.parametrize("quantize, backend", [("int8", None), ("fp8", "reference")])
def test_quantized_runs_close_to_fp32(quantize, backend):
    """int8 (the CPU form) and fp8 (Hopper's; its numerics emulated on the reference backend) on every block
    GEMM, the SwiGLU's stacked gate/up one included."""
    model, sched = ace_step(), schedule(4)
    cond, z = conditioning(model), noise()
    exact = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32)(z, **cond)
    got = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32, quantize=quantize, backend=backend)(
        z, **cond)
    assert (15 if quantize == "fp8" else 25) < sqnr_db(got, exact) < 200  # close, and really quantised


def test_bad_inputs_name_the_argument():
    model, sched = ace_step(), schedule(2)
    sampler = de.FastSampler(model, sched, cfg_scale=3.0, dtype=torch.float32, guider=de.APG())
    cond = conditioning(model, guided=True)
    with pytest.raises(ValueError, match=r"noise: expected a channels-first sequence \(B, 8, T\)"):
        sampler(noise().transpose(1, 2), **cond)
    with pytest.raises(ValueError, match=r"context_latents: expected a channels-first sequence \(2, 16, 23\)"):
        sampler(noise(), **{**cond, "context_latents": cond["context_latents"][..., :20]})
    with pytest.raises(ValueError, match="null_encoder_hidden_states: required with guidance"):
        sampler(noise(), **{k: v for k, v in cond.items() if not k.startswith("null")})
    with pytest.raises(ValueError, match=r"encoder_hidden_states: expected shape \(2, L, 24\)"):
        sampler(noise(), **{**cond, "encoder_hidden_states": torch.randn(2, L, 5)})
    with pytest.raises(ValueError, match="APG reduces over time"):
        de.FastSampler(de.DiT(de.DiTConfig(input_size=8, depth=1, hidden_size=32, num_heads=2, num_classes=4)), sched,
                       guider=de.APG())
    with pytest.raises(ValueError, match="APG norm_threshold: expected a finite number"):
        de.APG(norm_threshold=float("nan"))
