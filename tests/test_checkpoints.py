import pytest
import torch

import ditengine as de

from support.diffusers_models import inputs, tied_diffusers_dit


@pytest.fixture
def fb_state(tiny_model):
    state = dict(tiny_model.state_dict())
    state["pos_embed"] = tiny_model.pos_embed.clone()
    return state


def test_truncated_checkpoint(tmp_path, fb_state):
    path = tmp_path / "model.pt"
    torch.save(fb_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not read checkpoint .*model.pt"):
        de.load_checkpoint(path)


def test_missing_unexpected_and_misshaped_keys_are_listed(fb_state):
    del fb_state["blocks.1.mlp.fc2.weight"]
    del fb_state["final_layer.linear.bias"]
    fb_state["blocks.0.extra.weight"] = torch.zeros(1)
    fb_state["blocks.0.attn.proj.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        de.load_checkpoint(fb_state)
    message = str(err.value)
    assert "missing keys (2): blocks.1.mlp.fc2.weight, final_layer.linear.bias" in message
    assert "unexpected keys (1): blocks.0.extra.weight" in message
    assert "blocks.0.attn.proj.bias: checkpoint (7,) vs model (128,)" in message


def test_wrong_pos_embed_is_rejected(fb_state):
    fb_state["pos_embed"] = fb_state["pos_embed"] + 0.1
    with pytest.raises(ValueError, match="pos_embed"):
        de.load_checkpoint(fb_state)


def test_missing_file_and_non_tensor_payload(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        de.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        de.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="state dict of tensors"):
        de.load_checkpoint({"args": "hello"})


def test_config_inferred_from_shapes(fb_state, tiny_cfg):
    model = de.load_checkpoint(fb_state)
    assert model.config == tiny_cfg


def test_diffusers_directory_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    theirs = tied_diffusers_dit(sample_size=8)
    theirs.save_pretrained(tmp_path / "pipe" / "transformer")
    x, t, y = inputs()
    with torch.no_grad():
        expected = theirs(x, t, y).sample
    for source in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        with torch.no_grad():
            torch.testing.assert_close(de.load_checkpoint(source)(x, t, y), expected)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "w.safetensors")
    model = de.load_checkpoint(tmp_path / "w.safetensors", input_size=8, num_heads=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), expected)


def test_untied_diffusers_embedders_are_refused():
    theirs = tied_diffusers_dit()
    with torch.no_grad():
        theirs.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias differs"):
        de.from_diffusers(theirs)


def test_non_finite_weights_are_refused_by_key(fb_state, tmp_path):
    fb_state["blocks.1.mlp.fc2.weight"][3, 4] = float("nan")
    fb_state["final_layer.linear.bias"][0] = float("inf")
    with pytest.raises(ValueError, match=r"2 tensors hold NaN or Inf values: blocks.1.mlp.fc2.weight, "
                                         r"final_layer.linear.bias \(pass allow_nonfinite=True"):
        de.load_checkpoint(fb_state)
    model = de.load_checkpoint(fb_state, allow_nonfinite=True)  # on request, loaded as it is
    assert model.blocks[1].mlp.fc2.weight.isnan().any()


def test_a_malformed_config_json_names_its_path(tmp_path, fb_state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in fb_state.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text('{"sample_size": 8,')
    with pytest.raises(ValueError, match=f"could not read {tmp_path / 'config.json'}: not valid JSON"):
        de.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object of config fields, got list"):
        de.load_checkpoint(tmp_path)


def test_from_diffusers_of_an_unsupported_module_names_the_supported_ones():
    with pytest.raises(TypeError, match="from_diffusers: expected a diffusers DiTTransformer2DModel or ") as err:
        de.from_diffusers(torch.nn.Linear(2, 2))
    for name in ("PixArtTransformer2DModel", "AceStepTransformer1DModel",
                 "FluxTransformer2DModel", "SD3Transformer2DModel",
                 "got Linear"):
        assert name in str(err.value)


def test_an_incomplete_sd3_state_dict_is_read_as_sd3_and_says_what_is_missing():
    state = {"context_embedder.weight": torch.randn(12, 2), "pos_embed.proj.weight": torch.randn(2, 4, 2, 2)}
    with pytest.raises(ValueError, match="SD3 state dict: cannot infer the config"):
        de.load_checkpoint(state)


def test_a_pixart_state_dict_without_its_config_says_so():
    state = {"adaln_single.linear.weight": torch.randn(12, 2), "pos_embed.proj.weight": torch.randn(2, 4, 2, 2)}
    with pytest.raises(ValueError, match="diffusers PixArtTransformer2DModel state dict needs its config"):
        de.load_checkpoint(state)
