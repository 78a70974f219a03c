"""The ACE-Step 1.5 reference spec against diffusers' `AceStepTransformer1DModel`, and its checkpoint loading."""
import pytest
import torch

import ditengine as de
from ditengine.models.ace_step import AceStep, AceStepConfig, convert_original_state_dict, load_state_dict

from support.diffusers_models import randomize

diffusers = pytest.importorskip("diffusers")

# diffusers' unit-test config (head dim 8) and configs the kernels serve (head dims 16 and 32, GQA 2 and 1).
CONFIGS = {
    "diffusers-test": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8,
                           sliding_window=4),
    "gqa2-dh16": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, in_channels=24, audio_acoustic_hidden_dim=8,
                      sliding_window=4),
    "mha-dh32-xl-encoder": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=32, in_channels=24, audio_acoustic_hidden_dim=8,
                                sliding_window=6, encoder_hidden_size=48),
}


def diffusers_pair(name: str, seed: int = 0):
    ref = randomize(diffusers.AceStepTransformer1DModel(**CONFIGS[name]), seed).eval()
    return ref, de.from_diffusers(ref)


def inputs(cfg: dict, B=2, T=23, L=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    C = cfg["audio_acoustic_hidden_dim"]
    return dict(hidden_states=torch.randn(B, T, C, generator=g),
                timestep=torch.rand(B, generator=g),
                encoder_hidden_states=torch.randn(B, L, cfg.get("encoder_hidden_size") or cfg["hidden_size"],
                                                  generator=g),
                context_latents=torch.randn(B, T, cfg["in_channels"] - C, generator=g))


def rel_err(out, ref):
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("T", [20, 23, 40])
def test_matches_diffusers(name, T):
    ref, ours = diffusers_pair(name)
    x = inputs(CONFIGS[name], T=T, L=T // 2 + 3)
    with torch.no_grad():
        want = ref(**x, timestep_r=x["timestep"], return_dict=False)[0]
        got = ours(**x, timestep_r=x["timestep"], return_dict=False)[0]
    assert got.shape == want.shape == x["hidden_states"].shape
    assert rel_err(got, want) <= 1e-5


def test_window_and_r_path_matter():
    """The checks above could not pass with the window dropped or t - r ignored: each changes the output."""
    ref, ours = diffusers_pair("gqa2-dh16")
    x = inputs(CONFIGS["gqa2-dh16"], T=40)
    with torch.no_grad():
        base = ours(**x)
        ours.layers[0].window = None
        assert rel_err(ours(**x), base) > 1e-3
        ours.layers[0].window = CONFIGS["gqa2-dh16"]["sliding_window"]
        want = ref(**x, timestep_r=x["timestep"] * 0.5, return_dict=False)[0]
        assert rel_err(ours(**x, timestep_r=x["timestep"] * 0.5), want) <= 1e-5
        assert rel_err(want, base) > 1e-3


def test_bf16_close_to_diffusers_bf16():
    ref, ours = diffusers_pair("gqa2-dh16")
    x = inputs(CONFIGS["gqa2-dh16"])
    with torch.no_grad():
        want = ref.to(torch.bfloat16)(**{k: v.bfloat16() for k, v in x.items()}, timestep_r=x["timestep"].bfloat16(),
                                      return_dict=False)[0]
        got = ours.to(torch.bfloat16)(**{k: v.bfloat16() for k, v in x.items()})
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want.float()) <= 0.05


def test_config_round_trip_and_checks():
    ref, ours = diffusers_pair("mha-dh32-xl-encoder")
    assert ours.config == AceStepConfig.from_diffusers(dict(ref.config))
    assert diffusers.AceStepTransformer1DModel(**ours.config.to_diffusers()).config.encoder_hidden_size == 48
    assert ours.config.window(0) == 6 and ours.config.window(1) is None
    with pytest.raises(ValueError, match="num_key_value_heads"):
        AceStepConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="layer_types"):
        AceStepConfig(num_hidden_layers=2, layer_types=["full_attention"])


def original_keys(state: dict) -> dict:
    """diffusers keys -> the original checkpoint's (`decoder.`-prefixed, Qwen3 attention names), plus the rest of
    the original model (condition encoder), which the DiT loader must leave out."""
    renames = [(".to_q.", ".q_proj."), (".to_k.", ".k_proj."), (".to_v.", ".v_proj."), (".to_out.0.", ".o_proj."),
               (".norm_q.", ".q_norm."), (".norm_k.", ".k_norm.")]
    out = {}
    for key, value in state.items():
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        key = key.replace("proj_in_conv.", "proj_in.1.").replace("proj_out_conv.", "proj_out.1.")
        out["decoder." + key] = value
    out["encoder.text_projector.weight"] = torch.zeros(3, 3)
    out["null_condition_emb"] = torch.zeros(1, 1, 3)
    return out


def test_load_checkpoint_diffusers_folder_and_original(tmp_path):
    ref, ours = diffusers_pair("gqa2-dh16")
    ref.save_pretrained(tmp_path / "transformer")
    folder = de.load_checkpoint(tmp_path)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    assert de.load_checkpoint(state).config.sliding_window == 128  # shapes do not give it: the published value
    from_state = de.load_checkpoint(state, sliding_window=4)
    original = de.load_checkpoint(original_keys(state), sliding_window=4)
    x = inputs(CONFIGS["gqa2-dh16"])
    with torch.no_grad():
        want = ours(**x)
        for model in (folder, from_state, original):
            assert isinstance(model, AceStep)
            assert torch.equal(model(**x), want)
    assert set(convert_original_state_dict(original_keys(state))) == set(state)


def test_bad_checkpoint_lists_missing_and_unexpected_keys():
    ref, _ = diffusers_pair("gqa2-dh16")
    state = dict(ref.state_dict())
    state.pop("layers.1.mlp.up_proj.weight")
    state["layers.1.mlp.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        load_state_dict(state, dict(ref.config))
    assert "missing keys (1): layers.1.mlp.up_proj.weight" in str(err.value)
    assert "unexpected keys (1): layers.1.mlp.extra.weight" in str(err.value)


def test_from_diffusers_refuses_other_modules():
    with pytest.raises(TypeError, match="AceStepTransformer1DModel"):
        from ditengine.models.ace_step import from_diffusers

        from_diffusers(torch.nn.Linear(2, 2))
