"""The SD3 / SD3.5 reference spec (ditengine.models.sd3) against diffusers' `SD3Transformer2DModel`, and its
checkpoint loading (diffusers folders and state dicts, SAI's original key names)."""
import json

import pytest
import torch

from ditengine.models.sd3 import (SD3, SD3Config, convert_original_state_dict, from_diffusers, infer_config,
                                  is_sd3_state_dict, load_state_dict)

from support.diffusers_models import randomize

diffusers = pytest.importorskip("diffusers")

# diffusers' own unit-test configs (tests/models/transformers/test_models_transformer_sd3.py), then head dims 64
# and 128 with patch 2 as the released models have, SD3 and SD3.5 flavours.
_DIFFUSERS_TEST = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                       num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                       pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96)
CONFIGS = {
    "sd3-diffusers-test": dict(_DIFFUSERS_TEST, dual_attention_layers=(), qk_norm=None),
    "sd35-diffusers-test": dict(_DIFFUSERS_TEST, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "sd3-dh64": dict(sample_size=16, patch_size=2, in_channels=8, num_layers=3, attention_head_dim=64,
                     num_attention_heads=2, caption_projection_dim=128, joint_attention_dim=48,
                     pooled_projection_dim=40, out_channels=8, pos_embed_max_size=16),
    "sd35-dh64": dict(sample_size=16, patch_size=2, in_channels=8, num_layers=3, attention_head_dim=64,
                      num_attention_heads=2, caption_projection_dim=128, joint_attention_dim=48,
                      pooled_projection_dim=40, out_channels=8, pos_embed_max_size=15, dual_attention_layers=(0, 1),
                      qk_norm="rms_norm"),
    "sd35-dh128": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=128,
                       num_attention_heads=2, caption_projection_dim=256, joint_attention_dim=32,
                       pooled_projection_dim=32, out_channels=4, pos_embed_max_size=12, dual_attention_layers=(0,),
                       qk_norm="rms_norm"),
}
# name: (config, latent (H, W), text length): diffusers' test inputs, then non-square latents off the table's
# centre (odd margins) and short odd text lengths.
CASES = {
    "sd3-diffusers-test": ("sd3-diffusers-test", (32, 32), 154),
    "sd35-diffusers-test": ("sd35-diffusers-test", (32, 32), 154),
    "sd3-dh64-12x20-L13": ("sd3-dh64", (12, 20), 13),
    "sd35-dh64-18x10-L7": ("sd35-dh64", (18, 10), 7),
    "sd35-dh64-max-L13": ("sd35-dh64", (30, 30), 13),
    "sd35-dh128-10x14-L13": ("sd35-dh128", (10, 14), 13),
}
_PAIRS = {}


def diffusers_pair(name: str, seed: int = 0):
    """(a diffusers model with every parameter random, our SD3 from it), cached per config."""
    if name not in _PAIRS:
        ref = randomize(diffusers.SD3Transformer2DModel(**CONFIGS[name]), seed).eval()
        _PAIRS[name] = ref, from_diffusers(ref)
    return _PAIRS[name]


def inputs(cfg: dict, hw, L, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, cfg["in_channels"], *hw, generator=g),
                encoder_hidden_states=torch.randn(B, L, cfg["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(B, cfg["pooled_projection_dim"], generator=g),
                timestep=torch.tensor([1000.0, 287.5])[:B])  # 1000 sigma, as the pipeline passes it


def rel_err(out, ref):
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers(case):
    name, hw, L = CASES[case]
    ref, ours = diffusers_pair(name)
    x = inputs(CONFIGS[name], hw, L)
    with torch.no_grad():
        want = ref(**x, joint_attention_kwargs=None, return_dict=False)[0]
        got = ours(**x, joint_attention_kwargs=None, return_dict=False)
    assert isinstance(got, tuple) and len(got) == 1
    assert got[0].shape == want.shape == (2, CONFIGS[name]["out_channels"], *hw)
    assert rel_err(got[0], want) <= 1e-5


def test_integer_and_scalar_timesteps_and_return_dict():
    ref, ours = diffusers_pair("sd3-dh64")
    x = inputs(CONFIGS["sd3-dh64"], (8, 8), 7)
    x["timestep"] = torch.tensor([999, 3])  # diffusers' own tests pass integer timesteps
    with torch.no_grad():
        assert rel_err(ours(**x), ref(**x).sample) <= 1e-5
        one = dict(x, timestep=torch.tensor(500.0))
        assert rel_err(ours(**one), ref(**dict(one, timestep=torch.tensor([500.0, 500.0]))).sample) <= 1e-5


def test_decomposition_is_the_forward():
    """timestep_conditioning / context / embed / block / unembed, called one by one, give forward's output."""
    _, ours = diffusers_pair("sd35-dh64")
    x = inputs(CONFIGS["sd35-dh64"], (12, 6), 7)
    with torch.no_grad():
        temb = ours.timestep_conditioning(x["timestep"], x["pooled_projections"])
        h, c = ours.embed(x["hidden_states"]), ours.context(x["encoder_hidden_states"])
        for i, blk in enumerate(ours.transformer_blocks):
            h, c = blk(h, c, blk.modulation(temb))
            assert (c is None) == (i == len(ours.transformer_blocks) - 1)
        assert torch.equal(ours.unembed(h, temb, (6, 3)), ours(**x))


def test_bf16_close_to_diffusers_bf16():
    ref = randomize(diffusers.SD3Transformer2DModel(**CONFIGS["sd35-dh64"]), 0).eval()  # not the cached pair
    ours = from_diffusers(ref).to(torch.bfloat16)
    x = inputs(CONFIGS["sd35-dh64"], (12, 20), 13)
    x16 = {k: v.bfloat16() for k, v in x.items()}
    with torch.no_grad():
        want32 = ref(**x, return_dict=False)[0]
        want = ref.to(torch.bfloat16)(**x16, return_dict=False)[0]
        got = ours(**x16)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want.float()) <= 0.05
    assert rel_err(got.float(), want32) <= 1.5 * rel_err(want.float(), want32)  # no worse than diffusers' bf16


def test_refuses_what_it_does_not_compute():
    _, ours = diffusers_pair("sd3-dh64")
    x = inputs(CONFIGS["sd3-dh64"], (8, 8), 7)
    for kwargs, name in ((dict(block_controlnet_hidden_states=[torch.zeros(2, 16, 128)]),
                          "block_controlnet_hidden_states"),
                         (dict(skip_layers=[1]), "skip_layers"),
                         (dict(joint_attention_kwargs={"scale": 0.5}), "joint_attention_kwargs")):
        with pytest.raises(ValueError, match=name):
            ours(**x, **kwargs)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours(**dict(x, hidden_states=torch.zeros(2, 8, 34, 8)))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ours(**dict(x, hidden_states=torch.zeros(2, 8, 9, 8)))


def test_config_round_trip_and_checks():
    for name in ("sd3-diffusers-test", "sd35-dh64"):
        ref, ours = diffusers_pair(name)
        assert ours.config == SD3Config.from_diffusers(dict(ref.config))
        rebuilt = diffusers.SD3Transformer2DModel(**ours.config.to_diffusers())
        assert SD3Config.from_diffusers(dict(rebuilt.config)) == ours.config
        assert set(rebuilt.state_dict()) == set(ours.state_dict())
    assert SD3Config.from_diffusers({"dual_attention_layers": [0, 2], "num_layers": 4}).dual_attention_layers == (0, 2)
    assert SD3Config(out_channels=None, in_channels=8).out_channels == 8
    for bad, match in ((dict(qk_norm="layer_norm"), "qk_norm"), (dict(caption_projection_dim=1536), "hidden size"),
                       (dict(num_layers=2, dual_attention_layers=(2,)), "dual_attention_layers")):
        with pytest.raises(ValueError, match=match):
            SD3Config(**bad)


def test_load_from_diffusers_folder_and_state_dict(tmp_path):
    from safetensors.torch import load_file

    ref, ours = diffusers_pair("sd35-dh64")
    ref.save_pretrained(tmp_path / "transformer")
    folder = load_state_dict(load_file(str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")),
                             json.loads((tmp_path / "transformer" / "config.json").read_text()))
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    inferred = load_state_dict(state)  # every size from the shapes (q/k norm gives the head width)
    assert inferred.config == SD3Config(**{**CONFIGS["sd35-dh64"], "sample_size": 128})
    assert infer_config({k: v for k, v in state.items() if ".norm_" not in k}).attention_head_dim == 64
    assert is_sd3_state_dict(state)
    x = inputs(CONFIGS["sd35-dh64"], (12, 20), 13)
    with torch.no_grad():
        want = ours(**x)
        for model in (folder, inferred):
            assert isinstance(model, SD3) and not model.training
            assert torch.equal(model(**x), want)
        fused = randomize(diffusers.SD3Transformer2DModel(**CONFIGS["sd35-dh64"]), 0).eval()
        fused.fuse_qkv_projections()  # adds concatenated copies of the projections to the state dict
        assert any(".to_qkv." in k for k in fused.state_dict())
        assert torch.equal(from_diffusers(fused)(**x), want)


_TO_SAI = [  # diffusers key part -> SAI's, block keys after transformer_blocks.{i}.
    ("pos_embed.proj.", "x_embedder.proj."), ("time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("time_text_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.0."),
    ("time_text_embed.text_embedder.linear_2.", "y_embedder.mlp.2."),
    ("proj_out.", "final_layer.linear."), ("norm_out.linear.", "final_layer.adaLN_modulation.1."),
]
_BLOCK_TO_SAI = [
    ("attn.norm_q.", "x_block.attn.ln_q."), ("attn.norm_k.", "x_block.attn.ln_k."),
    ("attn.norm_added_q.", "context_block.attn.ln_q."), ("attn.norm_added_k.", "context_block.attn.ln_k."),
    ("attn.to_out.0.", "x_block.attn.proj."), ("attn.to_add_out.", "context_block.attn.proj."),
    ("attn2.norm_q.", "x_block.attn2.ln_q."), ("attn2.norm_k.", "x_block.attn2.ln_k."),
    ("attn2.to_out.0.", "x_block.attn2.proj."), ("norm1.linear.", "x_block.adaLN_modulation.1."),
    ("norm1_context.linear.", "context_block.adaLN_modulation.1."), ("ff.net.0.proj.", "x_block.mlp.fc1."),
    ("ff.net.2.", "x_block.mlp.fc2."), ("ff_context.net.0.proj.", "context_block.mlp.fc1."),
    ("ff_context.net.2.", "context_block.mlp.fc2."),
]
_FUSED = {"attn.to_": "x_block.attn.qkv.", "attn.add_": "context_block.attn.qkv.", "attn2.to_": "x_block.attn2.qkv."}


def sai_keys(state: dict, num_layers: int) -> dict:
    """A diffusers SD3 state dict under SAI's names: the inverse of the conversion, written out independently."""
    def swap(t):
        scale, shift = t.chunk(2)
        return torch.cat([shift, scale])

    out = {"pos_embed": state["pos_embed.pos_embed"]}
    for key, value in state.items():
        if key.startswith("transformer_blocks."):
            _, i, rest = key.split(".", 2)
            for ours, theirs in _BLOCK_TO_SAI:
                if rest.startswith(ours):
                    last_norm = int(i) == num_layers - 1 and ours == "norm1_context.linear."
                    out[f"joint_blocks.{i}.{theirs}{rest[len(ours):]}"] = swap(value) if last_norm else value
        else:
            for ours, theirs in _TO_SAI:
                if key.startswith(ours):
                    out[theirs + key[len(ours):]] = swap(value) if ours == "norm_out.linear." else value
            if key.startswith("context_embedder."):
                out[key] = value
    for i in range(num_layers):
        for ours, theirs in _FUSED.items():
            for kind in ("weight", "bias"):
                parts = [state.get(f"transformer_blocks.{i}.{ours}{c}.{kind}") for c in
                         (("q_proj", "k_proj", "v_proj") if ours == "attn.add_" else "qkv")]
                if parts[0] is not None:
                    out[f"joint_blocks.{i}.{theirs}{kind}"] = torch.cat(parts)
    return out


@pytest.mark.parametrize("name", ["sd3-diffusers-test", "sd35-diffusers-test"])
def test_original_sai_keys(name):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    ref, ours = diffusers_pair(name)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    sai = sai_keys(state, CONFIGS[name]["num_layers"])
    assert sum(v.numel() for v in sai.values()) == sum(v.numel() for v in state.values())
    converted = convert_original_state_dict(sai)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))  # diffusers' own single-file map
    assert set(converted) == set(theirs) == set(state)
    assert all(torch.equal(converted[k], theirs[k]) and torch.equal(converted[k], state[k]) for k in state)
    # a single-file checkpoint: the MMDiT under model.diffusion_model., beside text encoders and the VAE
    single_file = {f"model.diffusion_model.{k}": v for k, v in sai.items()}
    single_file["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(3)
    single_file["first_stage_model.decoder.conv_in.weight"] = torch.ones(3)
    assert is_sd3_state_dict(single_file)
    model = load_state_dict(single_file, {"sample_size": 32, "attention_head_dim": 8})
    assert model.config == ours.config
    x = inputs(CONFIGS[name], (16, 12), 13)
    with torch.no_grad():
        assert torch.equal(model(**x), ours(**x))


def test_bad_checkpoint_lists_missing_and_unexpected_keys():
    ref, _ = diffusers_pair("sd3-dh64")
    state = dict(ref.state_dict())
    state.pop("transformer_blocks.1.attn.add_k_proj.weight")
    state["transformer_blocks.1.attn.extra.weight"] = torch.zeros(2)
    state["proj_out.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_state_dict(state, dict(ref.config))
    message = str(err.value)
    assert "missing keys (1): transformer_blocks.1.attn.add_k_proj.weight" in message
    assert "unexpected keys (1): transformer_blocks.1.attn.extra.weight" in message
    assert "mis-shaped (1): proj_out.bias: checkpoint (3,) vs model (32,)" in message
    with pytest.raises(ValueError, match="cannot infer"):
        load_state_dict({"pos_embed.proj.weight": torch.zeros(8, 4, 2, 2)})


def test_from_diffusers_refuses_other_modules():
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        from_diffusers(torch.nn.Linear(2, 2))
