"""The tiny offline ACE-Step 1.5 pipeline of tests/support/ace_step_pipeline.py runs end to end, turbo and base."""
import pytest
import torch

from support.ace_step_pipeline import (END_OF_TEXT, duration_for, latents_per_second, tiny_ace_step_pipeline,
                                       tiny_tokenizer)

PROMPT = "A calm piano piece with soft strings and a slow build"
LYRICS = "[verse]\nSoft notes in the morning light\n[chorus]\nMusic fills the air tonight"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models multiply 64-wide matrices: handing such work to a second thread costs more than the work, and
    on a loaded machine the OpenMP hand-off makes a run ~50x slower (8 s instead of 0.15 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def turbo():
    return tiny_ace_step_pipeline(turbo=True)


@pytest.fixture(scope="module")
def base():
    return tiny_ace_step_pipeline(turbo=False)


def generate(pipe, prompt=PROMPT, lyrics=LYRICS, frames=21, seed=0, **kwargs):
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("guidance_scale", 1.0)
    return pipe(prompt=prompt, lyrics=lyrics, audio_duration=duration_for(frames), generator=generator,
                **kwargs).audios


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


def test_tokenizer_matches_what_encode_prompt_needs():
    tok = tiny_tokenizer()
    ids = tok([f"# Lyric\nla la{END_OF_TEXT}", "x"], padding="longest", return_tensors="pt")
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    assert tok.pad_token_id == eot and tok.padding_side == "right"
    assert ids.input_ids[0, -1] == eot and (ids.input_ids[0] == eot).sum() == 1  # one special token, no EOS added
    assert ids.attention_mask[1].tolist() == [1] + [0] * (ids.input_ids.shape[1] - 1)
    assert tok.decode(ids.input_ids[0]) == f"# Lyric\nla la{END_OF_TEXT}"


def test_turbo_latents_depend_on_prompt_and_seed(turbo):
    assert turbo.is_turbo and latents_per_second() == turbo.latents_per_second == 4.0
    lat = generate(turbo, num_inference_steps=8)
    assert lat.shape == (1, 21, 8) and lat.dtype == torch.float32
    assert torch.isfinite(lat).all() and lat.std() > 0.1
    assert torch.equal(generate(turbo, num_inference_steps=8), lat)
    assert rel_diff(generate(turbo, prompt="Energetic rock with electric guitar", num_inference_steps=8), lat) > 1e-3
    assert rel_diff(generate(turbo, lyrics="[verse]\nHello", num_inference_steps=8), lat) > 1e-3
    assert rel_diff(generate(turbo, seed=1, num_inference_steps=8), lat) > 1e-2
    # Turbo ignores guidance: the pipeline coerces guidance_scale to 1.
    assert torch.equal(generate(turbo, num_inference_steps=8, guidance_scale=7.0), lat)


def test_base_runs_apg_inside_the_cfg_interval(base):
    """6 steps at shift 3 give t = 1, .94, .86, .75, .6, .375: 1 - t lies in [0.2, 0.8] on the last three only,
    where the DiT sees the batch twice (cond, null)."""
    assert not base.is_turbo
    batches = []
    hook = base.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        lat = generate(base, frames=23, num_inference_steps=6, guidance_scale=7.0, cfg_interval_start=0.2,
                       cfg_interval_end=0.8)
    finally:
        hook.remove()
    assert batches == [1, 1, 1, 2, 2, 2]
    assert lat.shape == (1, 23, 8) and torch.isfinite(lat).all()
    unguided = generate(base, frames=23, num_inference_steps=6, guidance_scale=1.0)
    assert rel_diff(lat, unguided) > 1e-2
    assert rel_diff(generate(base, prompt="Energetic rock with electric guitar", frames=23, num_inference_steps=6,
                             guidance_scale=7.0, cfg_interval_start=0.2, cfg_interval_end=0.8), lat) > 1e-3


def test_decoded_audio_length_and_level(turbo):
    audio = generate(turbo, num_inference_steps=8, output_type="pt")
    hop = turbo.sample_rate / turbo.latents_per_second
    assert audio.shape == (1, 2, 21 * hop) and torch.isfinite(audio).all()
    # The pipeline normalises every clip to a -1 dBFS peak.
    assert audio.abs().max().item() == pytest.approx(10 ** (-1 / 20), rel=1e-5)


def test_batch_of_two_prompts(turbo):
    """The first prompt and lyric are the longest, so they carry no padding: its row is its single-prompt run.
    The second row is right-padded, and the DiT's cross-attention attends the padded tail of the packed condition
    (no mask), so that row is not its single-prompt run."""
    prompts, lyrics = [PROMPT, "Rock"], [LYRICS, "[verse]\nHey"]
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    lat = generate(turbo, prompt=prompts, lyrics=lyrics, generator=gens, num_inference_steps=8)
    assert lat.shape == (2, 21, 8) and torch.isfinite(lat).all()
    torch.testing.assert_close(lat[:1], generate(turbo, num_inference_steps=8), rtol=1e-4, atol=1e-4)
    assert rel_diff(lat[1], lat[0]) > 1e-2
    alone = generate(turbo, prompt=prompts[1], lyrics=lyrics[1], seed=1, num_inference_steps=8)
    assert rel_diff(lat[1:], alone) > 1e-2
