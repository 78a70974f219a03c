"""Bad input to both sampling backends: the same clear error from each, or the same answer, never a silently
wrong sample."""
import pytest
import torch

import ditengine as de

NAN = float("nan")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return de.DiT(de.DiTConfig.from_name("DiT-T/2", input_size=8, num_classes=10)).eval()


def run(model, backend, noise, labels, **kwargs):
    return de.sample(model, kwargs.pop("sched", de.schedulers.DDIM(3)), noise, labels, backend=backend,
                     progress=False, **kwargs)


BACKENDS = ["reference", "fused"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_gives_an_empty_sample(model, backend):
    out = run(model, backend, torch.randn(0, 4, 8, 8), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 4, 8, 8) and out.dtype == torch.float32


def test_an_empty_batch_through_the_fast_sampler_keeps_later_calls_right(model):
    sampler = de.FastSampler(model, de.schedulers.DDIM(3), dtype=torch.float32, cuda_graph=None)
    assert sampler(torch.randn(0, 4, 8, 8), torch.zeros(0, dtype=torch.long)).shape == (0, 4, 8, 8)
    noise, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    torch.testing.assert_close(sampler(noise, labels), run(model, "reference", noise, labels), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guided_channels", [5, 8, 0, 2.5])
def test_guided_channels_beyond_the_input_channels_is_refused(model, backend, guided_channels):
    # The model predicts 8 channels (eps, then the variance): only the first 4 may be guided.
    with pytest.raises(ValueError, match=r"guided_channels: expected an int in \[1, 4\]"):
        run(model, backend, torch.randn(1, 4, 8, 8), torch.tensor([1]), guided_channels=guided_channels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg_scale", [NAN, float("inf"), "4"])
def test_a_non_finite_cfg_scale_is_refused(model, backend, cfg_scale):
    with pytest.raises(ValueError, match="cfg_scale: expected a finite number"):
        run(model, backend, torch.randn(1, 4, 8, 8), torch.tensor([1]), cfg_scale=cfg_scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, float("-inf")])
def test_non_finite_noise_is_refused(model, backend, bad):
    noise = torch.randn(2, 4, 8, 8)
    noise[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="noise: contains 1 NaN or Inf values"):
        run(model, backend, noise, torch.tensor([1, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scheduler_that_is_not_ours_is_a_type_error(model, backend):
    with pytest.raises(TypeError, match="sched: expected a ditengine scheduler, got object"):
        run(model, backend, torch.randn(1, 4, 8, 8), torch.tensor([1]), sched=object())
