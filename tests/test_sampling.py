import pytest
import torch

import ditengine as de

S = de.schedulers


def run(model, sched, seed=0, batch=2, cfg_scale=4.0, **kwargs):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return de.sample(model, sched, noise, labels, cfg_scale=cfg_scale, generator=g, progress=False, **kwargs)


@pytest.mark.parametrize("sched", [S.DDPM(8, variance_type="learned_range"), S.DDIM(8, eta=1.0)], ids=repr)
def test_same_seed_same_latents_bitwise(tiny_model, sched):
    a, b = run(tiny_model, sched), run(tiny_model, sched)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(tiny_model, sched, seed=1))  # and the seed matters
    assert torch.isfinite(a).all()


def test_progress_bar_on_by_default_and_silent_when_off(tiny_model, capsys):
    run(tiny_model, S.DDIM(3))
    assert capsys.readouterr().err == ""
    de.sample(tiny_model, S.DDIM(3), torch.randn(1, 4, 8, 8), torch.tensor([1]), progress=True)
    assert "sampling" in capsys.readouterr().err


def test_matches_a_diffusers_scheduler_loop(tiny_model):
    """The reference sampler equals the textbook loop around diffusers' Euler (input scaling, init sigma)."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.EulerDiscreteScheduler()
    theirs.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    labels = torch.tensor([3, 7])
    x = noise * theirs.init_noise_sigma
    with torch.no_grad():
        for t in theirs.timesteps:
            x_in = theirs.scale_model_input(torch.cat([x, x]), t)
            out = tiny_model(x_in, t.expand(4), torch.tensor([3, 7, 10, 10]))[:, :4]
            cond, uncond = out.chunk(2)
            x = theirs.step(uncond + 1.5 * (cond - uncond), t, x).prev_sample
    ours = de.sample(tiny_model, S.Euler(6), noise, labels, cfg_scale=1.5, progress=False)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_without_guidance_the_batch_is_not_doubled(tiny_model):
    calls = []
    handle = tiny_model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    try:
        run(tiny_model, S.DDIM(2), batch=3, cfg_scale=1.0)
        run(tiny_model, S.DDIM(2), batch=3, cfg_scale=2.0)
    finally:
        handle.remove()
    assert calls == [3, 3, 6, 6]


def test_input_errors(tiny_model):
    sched = S.DDIM(2)
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, 4, 8, 8\).*\(2, 4, 16, 16\)"):
        de.sample(tiny_model, sched, torch.randn(2, 4, 16, 16), labels, progress=False)
    with pytest.raises(TypeError, match="noise: expected a floating-point tensor, got torch.int64"):
        de.sample(tiny_model, sched, torch.zeros(2, 4, 8, 8, dtype=torch.long), labels, progress=False)
    with pytest.raises(ValueError, match=r"class_labels: values must lie in \[0, 10\), got \[1, 10\]"):
        de.sample(tiny_model, sched, torch.randn(2, 4, 8, 8), torch.tensor([1, 10]), progress=False)
    with pytest.raises(ValueError, match=r"class_labels: expected shape \(2,\)"):
        de.sample(tiny_model, sched, torch.randn(2, 4, 8, 8), torch.tensor([1]), progress=False)
    with pytest.raises(TypeError, match="class_labels: expected an int64 or int32 tensor, got torch.float32"):
        de.sample(tiny_model, sched, torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), progress=False)
    with pytest.raises(ValueError, match="backend='fast'"):
        de.sample(tiny_model, sched, torch.randn(2, 4, 8, 8), labels, backend="fast")


def test_reference_forward_takes_a_compiled_model(tiny_model):
    """The ladder's compile row hands torch.compile's wrapper to the reference loop's forward."""
    from ditengine.sampling import reference_forward

    compiled = torch.compile(tiny_model)  # lazy: nothing compiles until it is called
    forward = reference_forward(compiled, torch.randn(2, 4, 8, 8), True, torch.tensor([1, 2]))
    assert callable(forward)
    with pytest.raises(TypeError, match="expected a ditengine reference model"):
        reference_forward(torch.compile(torch.nn.Linear(2, 2)), torch.randn(2, 4, 8, 8), True, torch.tensor([1, 2]))


@pytest.mark.parametrize("sched", [S.DDIM(4), S.DPMSolverPP(4), S.UniPC(4)], ids=["ddim", "dpm++", "unipc"])
def test_a_step_callback_edits_the_state_alike_on_both_loops(tiny_model, sched):
    """After step 1 the state is halved: the fused loop (which wrote the next model input from the old state) and
    the reference loop continue from the edited state alike; the edit changes the result."""
    noise, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 5])

    def run_with(backend, callback):
        return de.sample(tiny_model, sched, noise, labels, backend=backend, progress=False, callback=callback)

    seen = []

    def halve(i, t, x):
        seen.append((i, float(t)))
        return x * 0.5 if i == 1 else None

    ref, fused = run_with("reference", halve), run_with("fused", halve)
    assert seen[:4] == seen[4:] == [(i, float(t)) for i, t in enumerate(sched.timesteps)]
    assert (fused - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (ref - run_with("reference", None)).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"callback: expected the state back as a tensor \(2, 4, 8, 8\)"):
        run_with("fused", lambda i, t, x: x[:1])
