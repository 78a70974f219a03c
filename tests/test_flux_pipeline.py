"""`ditengine.accelerate(FluxPipeline)`: the same latents as the pipeline called directly (fp32), dev (embedded
guidance), schnell and true CFG, on the fused and the reference loop; a tiny offline pipeline without text
encoders (the embeddings given)."""
import pytest
import torch

import ditengine as de

from support.diffusers_models import POOLED, TEXT, call_pipeline, randomize, rel_err, text_embeddings, tiny_vae

diffusers = pytest.importorskip("diffusers")


def tiny_flux_pipeline(dev: bool, seed: int = 0):
    transformer = randomize(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT, pooled_projection_dim=POOLED, guidance_embeds=dev, axes_dims_rope=(4, 6, 6)),
        seed, std=0.2).eval()
    vae = tiny_vae(seed, scaling_factor=0.3)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=256,
                                                          max_image_seq_len=4096)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_returns_the_pipelines_own_latents(dev, backend):
    pipe = tiny_flux_pipeline(dev)
    kwargs = dict(num_inference_steps=4, guidance_scale=3.5, **text_embeddings(B=2))
    want = call_pipeline(pipe, **kwargs)
    got = call_pipeline(de.accelerate(pipe, backend=backend), **kwargs)
    assert got.shape == want.shape == (2, 24, 16)
    assert rel_err(got, want) <= 1e-4


def test_true_cfg_with_a_negative_prompt():
    pipe = tiny_flux_pipeline(True, seed=2)
    kwargs = dict(num_inference_steps=3, true_cfg_scale=4.0, **text_embeddings(negative=True))
    want = call_pipeline(pipe, **kwargs)
    assert rel_err(call_pipeline(de.accelerate(pipe), **kwargs), want) <= 1e-4
    assert rel_err(call_pipeline(pipe, **{**kwargs, "true_cfg_scale": 1.0}), want) > 1e-3


def test_decoded_images_match_and_refusals():
    pipe = tiny_flux_pipeline(False)
    kwargs = dict(num_inference_steps=2, **text_embeddings(), output_type="pt")
    want, got = call_pipeline(pipe, **kwargs), call_pipeline(de.accelerate(pipe), **kwargs)
    assert got.shape == want.shape and rel_err(got, want) <= 1e-3
    with pytest.raises(ValueError, match="ip_adapter_image_embeds: not supported"):
        call_pipeline(de.accelerate(pipe), ip_adapter_image_embeds=[torch.zeros(1, 4)], **text_embeddings())


# -- memory: one fused denoiser, the pipeline's own dtype, released weights ----------------------------------------
def test_every_sampler_shares_one_fused_denoiser():
    pipe = tiny_flux_pipeline(True)
    fast = de.accelerate(pipe)
    for steps in (2, 3):
        call_pipeline(fast, num_inference_steps=steps, **text_embeddings())
    assert len(fast._samplers) == 2 and all(s.fast is fast.fast for s in fast._samplers.values())


def test_a_bf16_pipeline_runs_in_bf16_within_the_bf16_rule():
    import torch

    kwargs = dict(num_inference_steps=3, **text_embeddings())
    want32 = call_pipeline(tiny_flux_pipeline(True), **kwargs)
    pipe = tiny_flux_pipeline(True).to(torch.bfloat16)
    embeds = {k: v.bfloat16() for k, v in kwargs.items() if k != "num_inference_steps"}
    want_lp = call_pipeline(pipe, num_inference_steps=3, **embeds)
    fast = de.accelerate(pipe)
    assert fast.dtype == torch.bfloat16 and fast.model.x_embedder.weight.dtype == torch.bfloat16
    got = call_pipeline(fast, num_inference_steps=3, **embeds)
    assert rel_err(got, want32) <= 2 * rel_err(want_lp, want32) + 1e-3


def test_release_transformer_frees_the_pipelines_weights_and_refuses_the_pipeline():
    pipe = tiny_flux_pipeline(True)
    kwargs = dict(num_inference_steps=3, **text_embeddings())
    want = call_pipeline(pipe, **kwargs)
    with pytest.raises(ValueError, match="release_transformer=True needs backend='fused'"):
        de.accelerate(pipe, backend="reference", release_transformer=True)
    fast = de.accelerate(pipe, release_transformer=True)
    assert all(p.is_meta for p in pipe.transformer.parameters())
    assert all(p.is_meta for p in fast.model.parameters())
    assert rel_err(call_pipeline(fast, **kwargs), want) <= 1e-4
    with pytest.raises(RuntimeError, match="weights were released by ditengine.accelerate"):
        call_pipeline(pipe, **kwargs)
    with pytest.raises(ValueError, match="meta device"):
        de.from_diffusers(pipe.transformer)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype="bf16"), TypeError, "dtype: expected None or one of"),
    (dict(dtype=__import__("torch").int32), TypeError, "dtype: expected None or one of"),
    (dict(cuda_graph="always"), ValueError, "cuda_graph='always'"),
    (dict(quantize="int4"), ValueError, "quantize='int4'"),
    (dict(backend="onnx"), ValueError, "backend='onnx'"),
])
def test_accelerate_checks_its_arguments_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        de.accelerate(tiny_flux_pipeline(False), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=float("nan")), "guidance_scale: expected a finite number"),
    (dict(guidance_scale="3.5"), "guidance_scale: expected a finite number"),
    (dict(num_inference_steps=0), "num_inference_steps: expected an int >= 1"),
])
def test_a_call_checks_steps_and_guidance_first(kwargs, match):
    with pytest.raises(ValueError, match=match):
        call_pipeline(de.accelerate(tiny_flux_pipeline(True)), **text_embeddings(), **kwargs)
