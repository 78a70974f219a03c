import pytest
import torch

import ditengine as de
from ditengine.models.dit import sincos_pos_embed, timestep_embedding

from support.diffusers_models import inputs, tied_diffusers_dit


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_from_diffusers_matches_diffusers_output(learn_sigma):
    theirs = tied_diffusers_dit(learn_sigma=learn_sigma)
    ours = de.from_diffusers(theirs)
    assert ours.config.timestep_freq_shift == 1 and ours.config.mlp_norm_eps == 1e-5
    assert ours.config.learn_sigma == learn_sigma and ours.config.num_classes == 10
    x, t, y = inputs()
    with torch.no_grad():
        expected = theirs(x, t, y).sample
        got = ours(x, t, y)
    assert expected.abs().max() > 0.1  # a live output, not a degenerate zero
    torch.testing.assert_close(got, expected)


def test_numerical_conventions_matter():
    """The two diffusers conventions are real differences: flipping either changes the output."""
    theirs = tied_diffusers_dit()
    state = theirs.state_dict()
    x, t, y = inputs()
    with torch.no_grad():
        expected = theirs(x, t, y).sample
        for wrong in ({"timestep_freq_shift": 0}, {"mlp_norm_eps": 1e-6}):
            model = de.load_checkpoint(state, input_size=8, num_heads=2, **wrong)
            assert (model(x, t, y) - expected).abs().max() > 1e-6, wrong


def test_facebook_checkpoint_roundtrip(tmp_path):
    ours = de.from_diffusers(tied_diffusers_dit(head_dim=72))
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    state["pos_embed"] = ours.pos_embed.clone()  # facebookresearch checkpoints carry the fixed table
    x, t, y = inputs()
    with torch.no_grad():
        expected = ours(x, t, y)
    for i, payload in enumerate([state, {"ema": state, "model": {}, "opt": {}}, {"model": state}]):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(payload, path)
        loaded = de.load_checkpoint(path, timestep_freq_shift=1, mlp_norm_eps=1e-5)
        assert loaded.config.input_size == 8 and loaded.config.head_dim == 72
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y), expected)


def test_pos_embed_matches_diffusers_table():
    get_2d_sincos_pos_embed = pytest.importorskip("diffusers.models.embeddings").get_2d_sincos_pos_embed
    for dim, grid in ((32, 4), (1152, 16)):
        theirs = torch.as_tensor(get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="pt")).float()
        torch.testing.assert_close(sincos_pos_embed(dim, grid), theirs)


def test_timestep_embedding_layout():
    t = torch.tensor([0.0, 10.0])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (2, 256)
    torch.testing.assert_close(emb[0, :128], torch.ones(128))  # cos(0)
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(10.0)))
    torch.testing.assert_close(emb[1, 128], torch.sin(torch.tensor(10.0)))


def test_forward_with_cfg_guides_the_chosen_channels(tiny_model):
    cfg = tiny_model.config
    torch.manual_seed(2)
    x = torch.randn(2, cfg.in_channels, 8, 8)
    x = torch.cat([x, x])
    t = torch.full((4,), 400.0)
    y = torch.tensor([1, 2, cfg.num_classes, cfg.num_classes])
    with torch.no_grad():
        raw = tiny_model(x, t, y)
        guided_all = tiny_model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        guided_3 = tiny_model.forward_with_cfg(x, t, y, cfg_scale=4.0, guided_channels=3)
    cond, uncond = raw.chunk(2)
    expected = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(guided_all[:2, :4], expected)
    torch.testing.assert_close(guided_all[2:, :4], expected)
    torch.testing.assert_close(guided_all[:, 4:], raw[:, 4:])  # variance passes through
    torch.testing.assert_close(guided_3[:2, :3], expected[:, :3])
    torch.testing.assert_close(guided_3[:2, 3], cond[:, 3])


def test_config_registry():
    xl = de.DiTConfig.from_name("DiT-XL/2")
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.head_dim, xl.num_tokens) == (28, 1152, 16, 72, 256)
    assert de.DiTConfig.from_name("DiT-S/8", depth=2).depth == 2
    assert de.DiTConfig.from_name("DiT-B/4").patch_size == 4
    with pytest.raises(ValueError, match="unknown DiT config 'DiT-M/2'.*DiT-XL/2"):
        de.DiTConfig.from_name("DiT-M/2")
    with pytest.raises(TypeError, match="unknown DiTConfig field"):
        de.DiTConfig.from_name("DiT-S/2", width=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        de.DiTConfig.from_name("DiT-S/2", num_heads=5)
