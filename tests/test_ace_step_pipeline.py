"""`ditengine.accelerate(AceStepPipeline)`: the same latents as the pipeline called directly (fp32), turbo and
base with APG and a guidance interval, on the fused and the reference loop."""
import pytest
import torch

import ditengine as de

from support.ace_step_pipeline import duration_for, tiny_ace_step_pipeline

PROMPT = "A calm piano piece with soft strings"
LYRICS = "[verse]\nSoft notes in the morning light\n[chorus]\nMusic fills the air"


@pytest.fixture(scope="module")
def turbo():
    return tiny_ace_step_pipeline(turbo=True)


@pytest.fixture(scope="module")
def base():
    return tiny_ace_step_pipeline(turbo=False, seed=4)


def call(pipe, frames=23, seed=0, **kwargs):
    kwargs.setdefault("output_type", "latent")
    prompt = kwargs.pop("prompt", PROMPT)
    lyrics = LYRICS if isinstance(prompt, str) else [LYRICS, "[chorus]\nHey"][:len(prompt)]
    return pipe(prompt=prompt, lyrics=lyrics, audio_duration=duration_for(frames),
                generator=torch.Generator().manual_seed(seed), **kwargs).audios


def rel_err(got, expected):
    return float((got.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_turbo_returns_the_pipelines_own_latents(turbo, backend):
    fast = de.accelerate(turbo, backend=backend)
    for frames, steps in ((23, 8), (20, 4)):
        want = call(turbo, frames, num_inference_steps=steps)
        got = call(fast, frames, num_inference_steps=steps)
        assert got.shape == want.shape == (1, frames, 8)
        assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.2, 0.8)])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_base_with_apg_and_a_cfg_interval(base, interval, backend):
    kwargs = dict(num_inference_steps=6, guidance_scale=7.0, cfg_interval_start=interval[0],
                  cfg_interval_end=interval[1], prompt=[PROMPT, "Energetic rock with drums"])
    want = call(base, **kwargs)
    got = call(de.accelerate(base, backend=backend), **kwargs)
    assert got.shape == want.shape == (2, 23, 8)
    assert rel_err(got, want) <= 1e-4
    unguided = call(base, **{**kwargs, "guidance_scale": 1.0})
    assert rel_err(unguided, want) > 1e-3  # the guidance did something the test would notice


def test_audio_output_matches_too(turbo):
    want = call(turbo, num_inference_steps=4, output_type="pt")
    got = call(de.accelerate(turbo), num_inference_steps=4, output_type="pt")
    assert got.shape == want.shape and rel_err(got, want) <= 1e-3


def test_refuses_what_it_does_not_run(turbo):
    fast = de.accelerate(turbo)
    with pytest.raises(ValueError, match="callback_on_step_end: not supported"):
        call(fast, callback_on_step_end=lambda *a: {})
    with pytest.raises(ValueError, match="audio_codes: not supported"):
        call(fast, audio_codes="<|audio_code_1|>")
    with pytest.raises(ValueError, match="prompt: expected a string or a list"):
        fast(prompt=None)
