"""`ditengine.accelerate(FluxPipeline)`: the same latents as the pipeline called directly (fp32), dev (embedded
guidance), schnell and true CFG, on the fused and the reference loop; a tiny offline pipeline without text
encoders (the embeddings given)."""
import pytest
import torch

import ditengine as de

from support.diffusers_models import POOLED, TEXT, call_pipeline, randomize, rel_err, text_embeddings, tiny_vae

diffusers = pytest.importorskip("diffusers")


def tiny_flux_pipeline(dev: bool, seed: int = 0, in_channels: int = 16):
    """A tiny FluxPipeline without text encoders; `in_channels` beyond the 16 it predicts for a Fill or Control
    transformer."""
    transformer = randomize(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=16, num_layers=1, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT, pooled_projection_dim=POOLED,
        guidance_embeds=dev, axes_dims_rope=(4, 6, 6)), seed, std=0.2).eval()
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


# -- the image-conditioned pipelines ----------------------------------------------------------------------------
def image(B=1, seed=3):
    """An RGB image batch in [0, 1] at the tests' 8 x 12 pixels."""
    import torch

    return torch.rand(B, 3, 8, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_img2img_returns_the_pipelines_own_latents(strength, backend):
    pipe = diffusers.FluxImg2ImgPipeline(**tiny_flux_pipeline(True).components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=image(), strength=strength, num_inference_steps=5, **text_embeddings(B=2))
    want = call_pipeline(pipe, **kwargs)
    assert rel_err(call_pipeline(de.accelerate(pipe, backend=backend), **kwargs), want) <= 1e-4
    if strength < 1:  # the image shows through: not the text-to-image result from the same seed
        t2i = call_pipeline(tiny_flux_pipeline(True), num_inference_steps=5, **text_embeddings(B=2))
        assert rel_err(want, t2i) > 1e-2


def test_img2img_refuses_what_it_cannot_serve():
    pipe = diffusers.FluxImg2ImgPipeline(**tiny_flux_pipeline(True).components)
    fast = de.accelerate(pipe)
    with pytest.raises(ValueError, match="image: required"):
        call_pipeline(fast, strength=0.5, **text_embeddings())
    with pytest.raises(ValueError, match="strength=0.0: with num_inference_steps=4 it leaves 0 steps"):
        call_pipeline(fast, image=image(), strength=0.0, num_inference_steps=4, **text_embeddings())
    with pytest.raises(ValueError, match="strength"):  # the pipeline's own check of its range
        call_pipeline(fast, image=image(), strength=1.5, **text_embeddings())


def test_the_plan_pool_is_bounded_least_recently_used_first():
    import torch

    fast = de.accelerate(tiny_flux_pipeline(True), pool_size=2)

    def call(steps, height):
        return fast(height=height, width=12, num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **text_embeddings()).images

    first = call(2, 8)
    call(3, 8)
    call(2, 16)  # a third plan (another size: another shift mu, another sampler): the first one goes
    assert len(fast._pool) == 2 and sum(len(s._plans) for s in fast._samplers.values()) == 2
    assert sorted(k[0] for k in fast._samplers) == [2, 3]  # the first sampler went with its only plan
    again = call(2, 8)  # planned again; the 3-step plan is now the oldest and goes, with its sampler
    assert sorted(k[0] for k in fast._samplers) == [2, 2] and len(fast._pool) == 2
    assert rel_err(again, first) == 0
    with pytest.raises(ValueError, match="pool_size: expected an int >= 1"):
        de.accelerate(tiny_flux_pipeline(True), pool_size=0)


# -- step callbacks -------------------------------------------------------------------------------------------------
def recording_callback(edit_step=None):
    """A callback_on_step_end that records what it is given and, at `edit_step`, returns edited latents."""
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, float(t), kwargs["latents"].clone(), pipe.num_timesteps))
        if i == edit_step:
            return {"latents": kwargs["latents"] * 0.5 + 0.1}
        return {}

    return callback, seen


def assert_same_calls(ours, theirs) -> bool:
    """The same steps, timesteps (to fp32 rounding: ours are computed in fp64), step counts and latents."""
    assert [(i, n) for i, _, _, n in ours] == [(i, n) for i, _, _, n in theirs]
    for (_, t, a, _), (_, u, b, _) in zip(ours, theirs):
        assert t == pytest.approx(u, rel=1e-6) and a.shape == b.shape and rel_err(a, b) <= 1e-4
    return True


@pytest.mark.parametrize("cuda_graph", [None, "step", "loop"])
@pytest.mark.parametrize("edit_step", [None, 1])
def test_callbacks_see_and_edit_what_the_pipeline_does(cuda_graph, edit_step):
    pipe = tiny_flux_pipeline(True)
    kwargs = dict(num_inference_steps=3, **text_embeddings(B=2))
    theirs, seen_theirs = recording_callback(edit_step)
    want = call_pipeline(pipe, callback_on_step_end=theirs, **kwargs)
    ours, seen_ours = recording_callback(edit_step)
    got = call_pipeline(de.accelerate(pipe, cuda_graph=cuda_graph), callback_on_step_end=ours, **kwargs)
    assert rel_err(got, want) <= 1e-4
    assert_same_calls(seen_ours, seen_theirs)
    if edit_step is not None:  # the edit mattered
        assert rel_err(want, call_pipeline(pipe, **kwargs)) > 1e-2


def test_img2img_callbacks_count_the_truncated_steps():
    pipe = diffusers.FluxImg2ImgPipeline(**tiny_flux_pipeline(True).components)
    kwargs = dict(image=image(), strength=0.5, num_inference_steps=6, **text_embeddings())
    theirs, seen_theirs = recording_callback(0)
    want = call_pipeline(pipe, callback_on_step_end=theirs, **kwargs)
    ours, seen_ours = recording_callback(0)
    assert rel_err(call_pipeline(de.accelerate(pipe), callback_on_step_end=ours, **kwargs), want) <= 1e-4
    assert_same_calls(seen_ours, seen_theirs) and len(seen_ours) == 3


def test_a_callback_replacing_the_prompt_or_interrupting_is_refused():
    fast = de.accelerate(tiny_flux_pipeline(True))
    kwargs = dict(num_inference_steps=2, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                  **text_embeddings())
    with pytest.raises(ValueError, match="returned a new 'prompt_embeds'"):
        call_pipeline(fast, callback_on_step_end=lambda p, i, t, kw: {"prompt_embeds": kw["prompt_embeds"] * 2},
                      **kwargs)

    def interrupt(pipe, i, t, kw):
        pipe._interrupt = True
        return {}

    with pytest.raises(ValueError, match="interrupt flag"):
        call_pipeline(fast, callback_on_step_end=interrupt, **kwargs)


def test_the_whole_loop_graph_refuses_a_callback_in_fastsampler():
    import torch

    model = de.from_diffusers(tiny_flux_pipeline(True).transformer)
    sampler = de.FastSampler(model, de.schedulers.FlowMatchEuler(2), cfg_scale=1.0, cuda_graph="loop",
                             dtype=torch.float32)
    with pytest.raises(ValueError, match="callback: the whole-loop graph"):
        sampler(torch.randn(1, 16, 4, 4), callback=lambda i, t, x: None, guidance=3.5, **text_embeddings())


def test_the_pipelines_benchmark_times_each_pipelines_step():
    import torch

    from ditengine.bench.pipelines import flux_pipelines, measure_pipelines

    pipes = flux_pipelines(1, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=24,
                           pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
    rows = measure_pipelines(pipes, size=32, steps=5, repeats=1, dtype=torch.float32)
    assert rows["text to image"][0] == 5 and rows["image to image (strength 0.6)"][0] == 3  # the schedule's tail
    assert len(rows) == 5 and all(call_ms > 0 and step_ms > 0 for _, call_ms, step_ms in rows.values())


def tiny(cls, in_channels: int = 16, seed: int = 0):
    """A tiny pipeline of class `cls` from `tiny_flux_pipeline`'s components (those its constructor takes)."""
    import inspect

    parts = tiny_flux_pipeline(True, seed, in_channels).components
    pipe = cls(**{k: v for k, v in parts.items() if k in inspect.signature(cls.__init__).parameters})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask(seed=4):
    """A binary mask at the tests' 8 x 12 pixels: 1 where the image is repainted."""
    import torch

    return (torch.rand(1, 1, 8, 12, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


# Fill: 16 latent + 16 masked-image channels + 4 of the mask (the tiny VAE's 1x1 patches, packed 2x2) = 36 inputs.
@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_fill_returns_the_pipelines_own_latents(strength, backend):
    pipe = tiny(diffusers.FluxFillPipeline, in_channels=36)
    kwargs = dict(image=image(), mask_image=mask(), strength=strength, num_inference_steps=4, **text_embeddings(B=2))
    want = call_pipeline(pipe, **kwargs)
    assert rel_err(call_pipeline(de.accelerate(pipe, backend=backend), **kwargs), want) <= 1e-4
    other = call_pipeline(pipe, **{**kwargs, "mask_image": 1 - mask()})
    assert rel_err(want, other) > 1e-2  # the condition matters


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_control_returns_the_pipelines_own_latents(backend):
    pipe = tiny(diffusers.FluxControlPipeline, in_channels=32)
    kwargs = dict(control_image=image(), num_inference_steps=3, **text_embeddings(B=2))
    want = call_pipeline(pipe, **kwargs)
    assert rel_err(call_pipeline(de.accelerate(pipe, backend=backend), **kwargs), want) <= 1e-4
    assert rel_err(want, call_pipeline(pipe, **{**kwargs, "control_image": image(seed=9)})) > 1e-3  # 10x the bound


def test_a_condition_of_the_wrong_shape_is_named():
    import torch

    model = de.from_diffusers(tiny(diffusers.FluxFillPipeline, in_channels=36).transformer)
    sampler = de.FastSampler(model, de.schedulers.FlowMatchEuler(2), cfg_scale=1.0, dtype=torch.float32)
    noise = torch.randn(1, 4, 8, 12)
    with pytest.raises(ValueError, match=r"condition_latents: .* expected the packed condition \(1, 24, 20\)"):
        sampler(noise, guidance=3.5, condition_latents=torch.zeros(1, 24, 7), **text_embeddings())
    plain = de.from_diffusers(tiny_flux_pipeline(True).transformer)
    with pytest.raises(ValueError, match="condition_latents: this Flux takes no input channels beyond"):
        de.sample(plain, de.schedulers.FlowMatchEuler(2), noise, cfg_scale=1.0, guidance=3.5,
                  condition_latents=torch.zeros(1, 24, 20), progress=False, **text_embeddings())
    with pytest.raises(ValueError, match="control_image: required"):
        call_pipeline(de.accelerate(tiny(diffusers.FluxControlPipeline, in_channels=32)), **text_embeddings())


@pytest.mark.parametrize("cuda_graph", [None, "loop"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_inpaint_returns_the_pipelines_own_latents(backend, cuda_graph):
    pipe = tiny(diffusers.FluxInpaintPipeline)
    kwargs = dict(image=image(), mask_image=mask(), strength=0.8, num_inference_steps=5, **text_embeddings(B=2))
    want = call_pipeline(pipe, **kwargs)
    fast = de.accelerate(pipe, backend=backend, cuda_graph=cuda_graph if backend == "fused" else None)
    assert rel_err(call_pipeline(fast, **kwargs), want) <= 1e-4
    theirs, seen_theirs = recording_callback(edit_step=1)  # the callback sees the blended latents, and may edit them
    want = call_pipeline(pipe, callback_on_step_end=theirs, **kwargs)
    ours, seen_ours = recording_callback(edit_step=1)
    assert rel_err(call_pipeline(fast, callback_on_step_end=ours, **kwargs), want) <= 1e-4
    assert_same_calls(seen_ours, seen_theirs)
    with pytest.raises(ValueError, match="padding_mask_crop: not supported"):
        call_pipeline(fast, padding_mask_crop=4, **kwargs)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_kontext_returns_the_pipelines_own_latents_with_a_reference_of_another_size(backend):
    import torch

    pipe = tiny(diffusers.FluxKontextPipeline)
    reference = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))  # 16 tokens beside the 24
    # max_area keeps the tests' 8 x 12 output (Kontext fits the output to it); the reference keeps its own size
    kwargs = dict(image=reference, num_inference_steps=3, max_area=96, _auto_resize=False, **text_embeddings(B=2))
    want = call_pipeline(pipe, **kwargs)
    fast = de.accelerate(pipe, backend=backend)
    assert rel_err(call_pipeline(fast, **kwargs), want) <= 1e-4
    assert rel_err(want, call_pipeline(pipe, **{**kwargs, "image": None})) > 1e-2  # the reference matters
    no_image = {**kwargs, "image": None}
    assert rel_err(call_pipeline(fast, **no_image), call_pipeline(pipe, **no_image)) <= 1e-4


def test_inpaint_and_fill_refuse_a_mask_of_the_wrong_batch():
    import torch

    bad = torch.ones(3, 1, 8, 12)  # three masks for four images
    for cls, channels in ((diffusers.FluxInpaintPipeline, 16), (diffusers.FluxFillPipeline, 36)):
        fast = de.accelerate(tiny(cls, in_channels=channels))
        with pytest.raises(ValueError, match=r"mask_image: expected one mask or one per image \(4\), got 3"):
            call_pipeline(fast, image=image(B=4), mask_image=bad, num_inference_steps=2, **text_embeddings(B=4))
