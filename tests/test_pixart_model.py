"""The PixArt-α/Σ reference spec (ditengine.models.pixart) against diffusers' PixArtTransformer2DModel, in fp32.

Every diffusers model here has all its parameters redrawn (randn * 0.1, the zero-initialised ones included), so
no branch is dead. Parity is max|ours - diffusers| / max|diffusers| <= 1e-5. Only the tests that build a diffusers
model need diffusers; they skip on their own when it is missing.
"""
import pytest
import torch

from ditengine.models.pixart import (PixArt, PixArtConfig, convert_diffusers_state_dict, encoder_mask_bias,
                                     from_diffusers, load_diffusers_state_dict, load_original_state_dict, load_state,
                                     pixart_pos_embed, to_diffusers_state_dict)

# diffusers' own tiny config (tests/models/transformers/test_models_pixart_transformer2d.py): Dh = 2, and without
# caption_channels the raw 8-wide text feeds to_k / to_v.
DIFFUSERS_TEST = dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=2, num_attention_heads=2,
                      in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
                      activation_fn="gelu-approximate", num_embeds_ada_norm=8, norm_type="ada_norm_single",
                      norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
                      caption_channels=None)
TINY = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
# name: (diffusers config, latent (H, W) fed to it)
CONFIGS = {
    "diffusers-test": (DIFFUSERS_TEST, (8, 8)),
    "tiny": (TINY, (8, 8)),
    # head dim 16, no q/k/v bias, exact GELU, another LN eps
    "head16": (dict(sample_size=16, num_layers=2, attention_head_dim=16, num_attention_heads=3, caption_channels=40,
                    cross_attention_dim=48, attention_bias=False, activation_fn="gelu", norm_eps=1e-5), (16, 16)),
    # α-1024 as on the hub: no use_additional_conditions / interpolation_scale keys, so sample_size 128 gives
    # micro-conditions and interpolation 2; a non-square latent recomputes the position table over base 64
    "alpha-1024": (dict(sample_size=128, num_layers=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
                        cross_attention_dim=24), (12, 16)),
    # Σ-1024: interpolation 2 given, micro-conditions off
    "sigma-1024": (dict(sample_size=128, interpolation_scale=2, use_additional_conditions=False, num_layers=2,
                        attention_head_dim=8, num_attention_heads=4, caption_channels=32, cross_attention_dim=32),
                   (16, 10)),
    # interpolation 2 at the training grid (the stored table)
    "sigma-interp2-native": (dict(sample_size=16, interpolation_scale=2, use_additional_conditions=False, num_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, caption_channels=24,
                                  cross_attention_dim=16), (16, 16)),
}
B, L = 4, 7
MASKS = {"none": None, "full": [L] * B, "partial": [L, 3, 1, 5], "one-token": [1] * B}
_PAIRS = {}


def diffusers_pair(name: str, seed: int = 0):
    """(diffusers model with every parameter redrawn, our PixArt converted from it), cached per config."""
    diffusers = pytest.importorskip("diffusers")
    if name not in _PAIRS:
        ref = diffusers.PixArtTransformer2DModel(**CONFIGS[name][0]).eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        _PAIRS[name] = ref, from_diffusers(ref)
    return _PAIRS[name]


def lengths_mask(lengths, dtype=torch.long):
    mask = torch.zeros(len(lengths), L, dtype=dtype)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return mask  # right padding, as the T5 tokenizer pads


def inputs(cfg: PixArtConfig, hw, mask_lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    H, W = hw
    text_width = cfg.caption_channels or cfg.cross_attention_dim
    kwargs = dict(encoder_hidden_states=torch.randn(B, L, text_width, generator=g),
                  timestep=torch.tensor([0.0, 1.5, 500.0, 999.0]),
                  encoder_attention_mask=None if mask_lengths is None else lengths_mask(mask_lengths),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if cfg.use_additional_conditions:  # per-row image sizes in pixels (8x the latent), [h, w] and h / w
        res = torch.tensor([[8.0 * H, 8.0 * W], [8.0 * W, 8.0 * H], [512.0, 512.0], [1024.0, 768.0]])
        kwargs["added_cond_kwargs"] = {"resolution": res, "aspect_ratio": res[:, :1] / res[:, 1:]}
    return torch.randn(B, cfg.in_channels, H, W, generator=g), kwargs


def rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers(name, mask):
    ref_model, model = diffusers_pair(name)
    x, kwargs = inputs(model.config, CONFIGS[name][1], MASKS[mask])
    with torch.no_grad():
        ref = ref_model(x, return_dict=False, **kwargs)[0]
        out = model(x, return_dict=False, **kwargs)[0]
    assert out.shape == ref.shape == (B, model.config.out_channels, *x.shape[-2:])
    err = rel_err(out, ref)
    print(f"{name} mask={mask}: max rel err {err:.2e} (max|ref| {ref.abs().max().item():.3g})")
    assert err <= 1e-5, f"{name} mask={mask}: relative error {err:.3e}"


def test_resolved_config_matches_diffusers():
    for name in CONFIGS:
        ref, model = diffusers_pair(name)
        cfg = model.config
        assert cfg.use_additional_conditions == ref.use_additional_conditions, name
        assert cfg.interpolation_scale == ref.pos_embed.interpolation_scale, name
        assert (cfg.hidden_size, cfg.out_channels) == (ref.inner_dim, ref.out_channels), name
        assert torch.equal(model.pos_embed, ref.pos_embed.pos_embed), name  # the stored table, bit for bit
    assert CONFIGS["alpha-1024"][0].get("use_additional_conditions") is None
    assert diffusers_pair("alpha-1024")[1].config.use_additional_conditions
    assert diffusers_pair("alpha-1024")[1].config.interpolation_scale == 2


@pytest.mark.parametrize("h, w, base, scale", [(4, 4, 4, 1), (6, 8, 64, 2), (8, 5, 16, 1), (3, 7, 32, 4),
                                               (4, 6, 16, 0.5)])  # 0.5: PixArt-Σ 256 px
def test_pos_embed_matches_diffusers(h, w, base, scale):
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    ref = embeddings.get_2d_sincos_pos_embed(24, (h, w), base_size=base, interpolation_scale=scale).float()
    assert torch.equal(pixart_pos_embed(24, h, w, base, scale), ref)


def test_padded_text_is_ignored():
    """With a partial mask, what sits in the padded text positions does not reach the output."""
    torch.manual_seed(0)
    model = PixArt(PixArtConfig.from_diffusers(TINY)).eval()
    x, kwargs = inputs(model.config, (8, 8), MASKS["partial"])
    other = dict(kwargs, encoder_hidden_states=kwargs["encoder_hidden_states"].clone())
    other["encoder_hidden_states"][kwargs["encoder_attention_mask"] == 0] = 123.0
    with torch.no_grad():
        torch.testing.assert_close(model(x, **other), model(x, **kwargs), atol=1e-6, rtol=0)


def test_mask_bias():
    mask = lengths_mask([7, 3, 1, 5])
    bias = encoder_mask_bias(mask, torch.float32)
    assert bias.shape == (B, 1, 1, L)
    assert torch.equal(bias[:, 0, 0], (1 - mask.float()) * -10000.0)
    assert torch.equal(encoder_mask_bias(mask.bool(), torch.float32), bias)
    assert torch.equal(encoder_mask_bias(bias[:, 0], torch.float32), bias)  # a (B, 1, L) bias passes through
    assert encoder_mask_bias(None, torch.float32) is None
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        encoder_mask_bias(mask[:, None, None], torch.float32)


def _own_alpha_model():
    torch.manual_seed(0)
    return PixArt(PixArtConfig(sample_size=128, num_layers=1, attention_head_dim=8, num_attention_heads=3,
                               caption_channels=32, cross_attention_dim=24)).eval()


def test_forward_takes_the_pipelines_call():
    """The exact call of pipeline_pixart_alpha.py / _sigma.py: int64 timestep expanded to the batch, a long mask,
    micro-conditions doubled for CFG, return_dict=False and [0]."""
    model = _own_alpha_model()
    latents = torch.randn(1, 4, 12, 16)
    latent_model_input = torch.cat([latents] * 2)
    prompt_embeds = torch.randn(2, L, 32)
    prompt_attention_mask = torch.cat([lengths_mask([1]), lengths_mask([5])])  # [negative "", prompt]
    current_timestep = torch.tensor(999)[None].expand(latent_model_input.shape[0])
    resolution = torch.tensor([96.0, 128.0]).repeat(1, 1)
    aspect_ratio = torch.tensor([96 / 128]).repeat(1, 1)
    added_cond_kwargs = {"resolution": torch.cat([resolution] * 2), "aspect_ratio": torch.cat([aspect_ratio] * 2)}
    with torch.no_grad():
        noise_pred = model(latent_model_input, encoder_hidden_states=prompt_embeds,
                           encoder_attention_mask=prompt_attention_mask, timestep=current_timestep,
                           added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        plain = model(latent_model_input, encoder_hidden_states=prompt_embeds, timestep=current_timestep,
                      encoder_attention_mask=prompt_attention_mask, added_cond_kwargs=added_cond_kwargs)
        scalar_t = model(latent_model_input, prompt_embeds, 999, added_cond_kwargs,
                         encoder_attention_mask=prompt_attention_mask)
    assert noise_pred.shape == (2, 8, 12, 16)
    assert torch.equal(plain, noise_pred)  # return_dict=True: the tensor itself
    assert torch.equal(scalar_t, noise_pred)  # a scalar timestep broadcasts; positional order is diffusers'
    assert model.config.sample_size == 128 and model.config.in_channels == 4 and model.config.out_channels == 8
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_forward_refusals():
    model = _own_alpha_model()
    x, text, t = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32), torch.tensor([1])
    with pytest.raises(ValueError, match="micro-conditions"):
        model(x, text, t)
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, text, t, attention_mask=torch.ones(1, 16))
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        model(x, text, t, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(ValueError, match="required"):
        model(x, timestep=t)


def test_pipeline_drop_in():
    """A tiny PixArtAlphaPipeline (no tokenizer, text encoder or VAE) gives the same latents with our model."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    ref, model = diffusers_pair("alpha-1024")
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                                         scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    call = dict(prompt_embeds=torch.randn(2, 6, 32, generator=g), negative_prompt=None,
                negative_prompt_embeds=torch.randn(2, 6, 32, generator=g),
                prompt_attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]),
                negative_prompt_attention_mask=torch.tensor([[1, 0, 0, 0, 0, 0]] * 2),
                num_inference_steps=2, height=96, width=128, use_resolution_binning=False, output_type="latent")
    expected = pipe(generator=torch.Generator().manual_seed(3), **call).images
    pipe.transformer = model
    got = pipe(generator=torch.Generator().manual_seed(3), **call).images
    assert got.shape == (2, 4, 12, 16)
    assert rel_err(got, expected) <= 1e-5


def test_weights_round_trip():
    """diffusers -> ours -> diffusers is the identity, and an exported model (config.to_diffusers() and
    to_diffusers_state_dict) loads strictly into a fresh PixArtTransformer2DModel."""
    diffusers = pytest.importorskip("diffusers")
    for name in CONFIGS:
        ref, model = diffusers_pair(name)
        theirs, back = ref.state_dict(), to_diffusers_state_dict(model)
        assert set(back) == set(theirs), name
        for key, value in theirs.items():
            assert torch.equal(back[key], value), f"{name}: {key}"
        again = load_diffusers_state_dict(back, PixArtConfig.from_diffusers(dict(ref.config)))
        for key, value in model.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), f"{name}: {key}"
        exported = diffusers.PixArtTransformer2DModel(**model.config.to_diffusers())
        exported.load_state_dict(back, strict=True)
        assert PixArtConfig.from_diffusers(dict(exported.config)) == model.config, name


def test_fused_projections_load():
    """fuse_qkv_projections() adds to_qkv / to_kv copies to the state dict; they are skipped, not reported."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.PixArtTransformer2DModel(**TINY).eval()
    ref.fuse_qkv_projections()
    assert any(".to_qkv." in k for k in ref.state_dict()) and any(".to_kv." in k for k in ref.state_dict())
    x, kwargs = inputs(from_diffusers(ref).config, (8, 8), MASKS["partial"])
    with torch.no_grad():
        assert rel_err(from_diffusers(ref)(x, **kwargs), ref(x, return_dict=False, **kwargs)[0]) <= 1e-5


def test_broken_state_dict_is_reported():
    ref, model = diffusers_pair("tiny")
    config = dict(ref.config)
    state = dict(ref.state_dict())
    del state["transformer_blocks.1.attn2.to_k.weight"]
    state["transformer_blocks.0.attn3.to_q.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_diffusers_state_dict(state, config)
    message = str(err.value)
    assert "missing keys (1): transformer_blocks.1.attn2.to_k.weight" in message
    assert "unexpected keys (1): transformer_blocks.0.attn3.to_q.weight" in message
    # our keys, wrongly shaped (a config with other caption channels)
    ours = convert_diffusers_state_dict(ref.state_dict(), model.config)
    with pytest.raises(ValueError, match=r"mis-shaped \(1\): y_embedder.y_proj.fc1.weight"):
        load_state(PixArt(PixArtConfig.from_diffusers({**config, "caption_channels": 16})), ours)
    with pytest.raises(ValueError, match=r"missing keys \(2\): blocks.0.mlp.fc1.bias, blocks.0.mlp.fc1.weight"):
        load_state(PixArt(model.config), {k: v for k, v in ours.items() if "blocks.0.mlp.fc1" not in k})
    with pytest.raises(TypeError, match="PixArtTransformer2DModel"):
        from_diffusers(torch.nn.Linear(2, 2))


def test_config_from_diffusers():
    alpha = PixArtConfig.from_diffusers({"_class_name": "PixArtTransformer2DModel", "sample_size": 128,
                                         "caption_channels": 4096, "out_channels": None, "only_cross_attention": False})
    assert alpha.use_additional_conditions and alpha.interpolation_scale == 2 and alpha.out_channels == 4
    assert (alpha.hidden_size, alpha.head_dim, alpha.grid_size, alpha.num_tokens) == (1152, 72, 64, 4096)
    sigma = PixArtConfig.from_diffusers({"sample_size": 128, "interpolation_scale": 2,
                                         "use_additional_conditions": False, "caption_channels": 4096})
    assert not sigma.use_additional_conditions and sigma.interpolation_scale == 2
    px512 = PixArtConfig.from_diffusers({"sample_size": 64, "caption_channels": 4096})
    assert not px512.use_additional_conditions and px512.interpolation_scale == 1
    for option, value in [("norm_type", "ada_norm_zero"), ("norm_elementwise_affine", True),
                          ("attention_type", "gated"), ("activation_fn", "geglu"), ("cross_attention_dim", None)]:
        with pytest.raises(ValueError, match=f"{option}={value!r}"):
            PixArtConfig.from_diffusers({"caption_channels": 4096, option: value})
    with pytest.raises(ValueError, match="cross_attention_dim=24 must equal the hidden size 48"):
        PixArtConfig(num_attention_heads=3, attention_head_dim=16, cross_attention_dim=24, caption_channels=8)


# PixArt-alpha tools/convert_pixart_alpha_to_diffusers.py, transcribed: original key -> diffusers key(s), the
# self-attention qkv and cross-attention kv split into equal row blocks.
def _original_to_diffusers(state, num_layers, micro):
    renames = {"x_embedder.proj": "pos_embed.proj", "y_embedder.y_proj.fc1": "caption_projection.linear_1",
               "y_embedder.y_proj.fc2": "caption_projection.linear_2",
               "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
               "t_block.1": "adaln_single.linear", "final_layer.linear": "proj_out"}
    if micro:
        renames.update({"csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
                        "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
                        "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
                        "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2"})
    out = {"scale_shift_table": state["final_layer.scale_shift_table"]}
    for old, new in renames.items():
        for kind in ("weight", "bias"):
            out[f"{new}.{kind}"] = state[f"{old}.{kind}"]
    for d in range(num_layers):
        b, t = f"blocks.{d}.", f"transformer_blocks.{d}."
        out[t + "scale_shift_table"] = state[b + "scale_shift_table"]
        for kind in ("weight", "bias"):
            q, k, v = torch.chunk(state[f"{b}attn.qkv.{kind}"], 3, dim=0)
            out.update({f"{t}attn1.to_q.{kind}": q, f"{t}attn1.to_k.{kind}": k, f"{t}attn1.to_v.{kind}": v})
            out[f"{t}attn1.to_out.0.{kind}"] = state[f"{b}attn.proj.{kind}"]
            out[f"{t}ff.net.0.proj.{kind}"] = state[f"{b}mlp.fc1.{kind}"]
            out[f"{t}ff.net.2.{kind}"] = state[f"{b}mlp.fc2.{kind}"]
            out[f"{t}attn2.to_q.{kind}"] = state[f"{b}cross_attn.q_linear.{kind}"]
            k, v = torch.chunk(state[f"{b}cross_attn.kv_linear.{kind}"], 2, dim=0)
            out.update({f"{t}attn2.to_k.{kind}": k, f"{t}attn2.to_v.{kind}": v})
            out[f"{t}attn2.to_out.0.{kind}"] = state[f"{b}cross_attn.proj.{kind}"]
    return out


@pytest.mark.parametrize("name", ["alpha-1024", "sigma-1024"])
def test_original_checkpoint_both_ways(name):
    ref, model = diffusers_pair(name)
    cfg = model.config
    # ours -> original: our state dict is the original's, less its two non-parameter entries
    original = {**model.state_dict(), "pos_embed": model.pos_embed.clone(),
                "y_embedder.y_embedding": torch.randn(L, cfg.caption_channels)}
    # original -> diffusers by the repo's converter gives the diffusers weights back, bit for bit
    converted = _original_to_diffusers(original, cfg.num_layers, cfg.use_additional_conditions)
    assert set(converted) == set(ref.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in ref.state_dict().items())
    # original -> ours: loads as it is (also under "state_dict") and computes what diffusers computes
    loaded = load_original_state_dict({"state_dict": original}, cfg)
    x, kwargs = inputs(cfg, CONFIGS[name][1], MASKS["partial"])
    with torch.no_grad():
        assert rel_err(loaded(x, **kwargs), ref(x, return_dict=False, **kwargs)[0]) <= 1e-5
    # a config with the wrong interpolation scale is caught by the stored position table
    wrong = PixArtConfig(**{**vars(cfg), "interpolation_scale": 1})
    with pytest.raises(ValueError, match="pos_embed .* interpolation_scale=1"):
        load_original_state_dict(original, wrong)
    with pytest.raises(ValueError, match=r"missing keys \(1\): final_layer.scale_shift_table"):
        load_original_state_dict({k: v for k, v in original.items() if k != "final_layer.scale_shift_table"}, cfg)
