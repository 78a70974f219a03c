"""The Flux.1 reference spec against diffusers' `FluxTransformer2DModel`, and its checkpoint loading."""
import pytest
import torch

from ditengine.models.loading import read_state
from ditengine.models.flux import (Flux, FluxConfig, convert_original_state_dict, from_diffusers, infer_config,
                                   is_flux_state_dict, is_original_state_dict, load_state_dict)

from support.diffusers_models import randomize

diffusers = pytest.importorskip("diffusers")

# diffusers' unit-test config (head dim 16) as dev and schnell, and 1 + 1 block configs at the real head dims.
_TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
CONFIGS = {
    "diffusers-test-dev": dict(_TINY, guidance_embeds=True),
    "diffusers-test-schnell": dict(_TINY, guidance_embeds=False),
    "dh64-dev": dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                     num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                     axes_dims_rope=[8, 28, 28]),
    "dh128-schnell": dict(in_channels=16, out_channels=8, num_layers=1, num_single_layers=1,
                          attention_head_dim=128, num_attention_heads=2, joint_attention_dim=24,
                          pooled_projection_dim=20, guidance_embeds=False, axes_dims_rope=[16, 56, 56]),
}


def diffusers_pair(name: str, seed: int = 0):
    ref = randomize(diffusers.FluxTransformer2DModel(**CONFIGS[name]), seed).eval()
    return ref, from_diffusers(ref)


def pipeline_ids(h: int, w: int, L: int):
    """The ids `FluxPipeline` passes: zeros for the text, (0, row, col) over the packed latent grid."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    return torch.zeros(L, 3), FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)


def inputs(cfg: dict, B=2, grid=(3, 5), L=7, ids="random", seed=1):
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    if ids == "random":  # as diffusers' own test: non-integer ids on every axis, text rows too
        txt_ids, img_ids = 4 * torch.randn(L, 3, generator=g), 4 * torch.randn(N, 3, generator=g)
    else:
        txt_ids, img_ids = pipeline_ids(*grid, L)
    x = dict(hidden_states=torch.randn(B, N, cfg["in_channels"], generator=g),
             encoder_hidden_states=torch.randn(B, L, cfg["joint_attention_dim"], generator=g),
             pooled_projections=torch.randn(B, cfg["pooled_projection_dim"], generator=g),
             timestep=torch.rand(B, generator=g), img_ids=img_ids, txt_ids=txt_ids)
    if cfg.get("guidance_embeds"):
        x["guidance"] = torch.tensor([3.5]).expand(B)  # the pipeline's default guidance_scale, broadcast
    return x


def rel_err(out, ref):
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("ids,grid,L", [("random", (3, 5), 7), ("pipeline", (4, 3), 9), ("pipeline", (1, 1), 1)])
def test_matches_diffusers(name, ids, grid, L):
    ref, ours = diffusers_pair(name)
    x = inputs(CONFIGS[name], grid=grid, L=L, ids=ids)
    with torch.no_grad():
        want = ref(**x, return_dict=False)[0]
        got = ours(**x, return_dict=False)[0]
    assert got.shape == want.shape == x["hidden_states"].shape[:2] + (ours.config.out_channels,)
    assert rel_err(got, want) <= 1e-5


def test_batched_ids_guidance_and_ids_matter():
    """3-D ids (deprecated in diffusers, still accepted) give the same output; the checks above could not pass
    with the guidance embedding or the text ids' rotation dropped: each changes the output."""
    ref, ours = diffusers_pair("diffusers-test-dev")
    x = inputs(CONFIGS["diffusers-test-dev"])
    with torch.no_grad():
        base = ours(**x)
        assert torch.equal(ours(**{**x, "txt_ids": x["txt_ids"][None], "img_ids": x["img_ids"][None]}), base)
        assert rel_err(ours(**{**x, "guidance": torch.tensor([5.0, 1.0])}), base) > 1e-3
        assert rel_err(ours(**{**x, "txt_ids": torch.zeros_like(x["txt_ids"])}), base) > 1e-3


def test_norms_match_diffusers_module_for_module():
    """Random activations are too large for an eps of 1e-6 vs 1e-5 to show in the output, so the norms are
    compared as modules: same names, kinds, eps and affinity."""
    ref, ours = diffusers_pair("diffusers-test-dev")
    kinds = (torch.nn.LayerNorm, torch.nn.RMSNorm)
    theirs = {n: m for n, m in ref.named_modules() if isinstance(m, kinds)}
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, kinds)}
    assert sorted(mine) == sorted(theirs)
    for name, m in theirs.items():
        assert (type(mine[name]), mine[name].eps, mine[name].elementwise_affine) == \
            (type(m), m.eps, m.elementwise_affine), name


def test_decomposition_composes_to_forward():
    _, ours = diffusers_pair("dh64-dev")
    x = inputs(CONFIGS["dh64-dev"])
    with torch.no_grad():
        img, txt = ours.embed(x["hidden_states"], x["encoder_hidden_states"])
        temb = ours.timestep_conditioning(x["timestep"], x["guidance"], x["pooled_projections"])
        rope = ours.rope(x["txt_ids"], x["img_ids"])
        assert rope[0].dtype == torch.float32 and rope[0].shape == (7 + 15, 64)
        txt, img = ours.double_block(0, img, txt, temb, rope)
        s = ours.single_block(0, torch.cat([txt, img], dim=1), temb, rope)
        assert torch.equal(ours.unembed(s[:, 7:], temb), ours(**x))


def test_bf16_rounds_t_and_g_and_stays_close_to_diffusers_bf16():
    ref, ours = diffusers_pair("dh64-dev")
    x = inputs(CONFIGS["dh64-dev"], ids="pipeline")
    # as FluxPipeline in bf16: activations and ids bf16, t = sigma cast to bf16, guidance fp32
    lp = {k: (v if k == "guidance" else v.bfloat16()) for k, v in x.items()}
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    with torch.no_grad():
        want = ref(**lp, return_dict=False)[0]
        got = ours(**lp)
        t, g, pooled = torch.tensor([0.3337, 0.7771]), torch.tensor([3.33, 3.33]), lp["pooled_projections"]
        temb = ours.timestep_conditioning(t, g, pooled, torch.bfloat16)
        exact = ref.time_text_embed(t.bfloat16() * 1000, g.bfloat16() * 1000, pooled)
        unrounded = ref.time_text_embed(t * 1000, g * 1000, pooled)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want.float()) <= 0.02
    assert torch.equal(temb, exact)
    assert not torch.equal(temb, unrounded)


def test_refuses_what_it_does_not_implement():
    _, dev = diffusers_pair("diffusers-test-dev")
    _, schnell = diffusers_pair("diffusers-test-schnell")
    x = inputs(CONFIGS["diffusers-test-dev"])
    with pytest.raises(ValueError, match="controlnet_block_samples"):
        dev(**x, controlnet_block_samples=[torch.zeros(1)])
    with pytest.raises(ValueError, match="joint_attention_kwargs"):
        dev(**x, joint_attention_kwargs={"scale": 0.5})
    with pytest.raises(ValueError, match="guidance"):
        dev(**{**x, "guidance": None})
    with pytest.raises(ValueError, match="guidance"):
        schnell(**x)
    assert dev(**x, joint_attention_kwargs={}).shape == x["hidden_states"].shape  # what the pipeline passes


def test_config_round_trip_and_checks():
    ref, ours = diffusers_pair("dh128-schnell")
    assert ours.config == FluxConfig.from_diffusers(dict(ref.config))
    rebuilt = diffusers.FluxTransformer2DModel(**ours.config.to_diffusers())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert infer_config(ref.state_dict(), axes_dims_rope=[16, 56, 56]) == ours.config
    assert FluxConfig().hidden_size == 3072 and FluxConfig().out_channels == 64 and FluxConfig().mlp_hidden == 12288
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig(attention_head_dim=64)


def bfl_state_dict(state: dict) -> dict:
    """diffusers keys -> BFL's (the inverse of the map under test, written out): fused qkv and linear1 by rows,
    the final modulation as (shift, scale)."""
    out = {}
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
              "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
    double_norms = {"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm",
                    "norm_added_q": "txt_attn.norm.query_norm", "norm_added_k": "txt_attn.norm.key_norm"}
    n_double = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in state if k.startswith("single_transformer_blocks.")})
    for kind in ("weight", "bias"):
        for ours, theirs in top.items():
            if f"{ours}.{kind}" in state:
                out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
        scale, shift = state[f"norm_out.linear.{kind}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
        for i in range(n_double):
            p = f"transformer_blocks.{i}."
            for ours, theirs in double.items():
                out[f"double_blocks.{i}.{theirs}.{kind}"] = state[f"{p}{ours}.{kind}"]
            out[f"double_blocks.{i}.img_attn.qkv.{kind}"] = torch.cat([state[f"{p}attn.to_{c}.{kind}"] for c in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{kind}"] = torch.cat(
                [state[f"{p}attn.add_{c}_proj.{kind}"] for c in "qkv"])
        for i in range(n_single):
            p = f"single_transformer_blocks.{i}."
            out[f"single_blocks.{i}.modulation.lin.{kind}"] = state[f"{p}norm.linear.{kind}"]
            out[f"single_blocks.{i}.linear1.{kind}"] = torch.cat(
                [state[f"{p}attn.to_{c}.{kind}"] for c in "qkv"] + [state[f"{p}proj_mlp.{kind}"]])
            out[f"single_blocks.{i}.linear2.{kind}"] = state[f"{p}proj_out.{kind}"]
    for i in range(n_double):
        for ours, theirs in double_norms.items():
            out[f"double_blocks.{i}.{theirs}.scale"] = state[f"transformer_blocks.{i}.attn.{ours}.weight"]
    for i in range(n_single):
        for c, name in (("q", "query"), ("k", "key")):
            out[f"single_blocks.{i}.norm.{name}_norm.scale"] = \
                state[f"single_transformer_blocks.{i}.attn.norm_{c}.weight"]
    return out


def test_load_diffusers_folder_state_dict_and_bfl(tmp_path):
    ref, ours = diffusers_pair("dh64-dev")
    ref.save_pretrained(tmp_path / "transformer")
    folder = load_state_dict(*read_state(tmp_path)[:2])  # what load_checkpoint reads from a pipeline directory
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    with pytest.raises(ValueError, match="axes_dims_rope"):  # shapes do not give it; Flux.1's needs head dim 128
        load_state_dict(state)
    from_state = load_state_dict(state, {"axes_dims_rope": [8, 28, 28]})
    bfl = bfl_state_dict(state)
    original = load_state_dict(bfl, {"axes_dims_rope": [8, 28, 28]})
    comfy = load_state_dict({"model.diffusion_model." + k: v for k, v in bfl.items()}, ours.config)
    x = inputs(CONFIGS["dh64-dev"])
    with torch.no_grad():
        want = ours(**x)
        for model in (folder, from_state, original, comfy):
            assert isinstance(model, Flux) and model.config == ours.config
            assert torch.equal(model(**x), want)
    assert is_flux_state_dict(state) and is_flux_state_dict(bfl) and not is_flux_state_dict({"proj_out.weight": 0})
    assert is_original_state_dict(bfl) and not is_original_state_dict(state)
    converted = convert_original_state_dict(bfl)
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_bfl_map_matches_diffusers_single_file_converter(guidance_embeds):
    """diffusers' converter hard-codes Flux.1's D = 3072, so this runs at D = 3072 on thin tensors (the right rows,
    two columns): the split and swap act on rows only. Both converters must give back the diffusers state dict."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        shapes = Flux(FluxConfig(num_layers=2, num_single_layers=2, guidance_embeds=guidance_embeds)).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape[0], *((2,) if v.ndim == 2 else ()), generator=g) for k, v in shapes.items()}
    bfl = bfl_state_dict(state)
    leftover = dict(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(leftover)
    assert leftover == {}  # every BFL key the inverse wrote is one diffusers' converter reads
    ours = convert_original_state_dict(bfl)
    assert set(theirs) == set(ours) == set(state)
    for k in state:
        assert torch.equal(theirs[k], state[k]) and torch.equal(ours[k], state[k]), k


def test_bad_checkpoint_lists_missing_and_unexpected_keys():
    ref, _ = diffusers_pair("diffusers-test-dev")
    state = dict(ref.state_dict())
    state.pop("single_transformer_blocks.0.proj_mlp.weight")
    state["single_transformer_blocks.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        load_state_dict(state, dict(ref.config))
    assert "missing keys (1): single_transformer_blocks.0.proj_mlp.weight" in str(err.value)
    assert "unexpected keys (1): single_transformer_blocks.0.extra.weight" in str(err.value)
    bfl = bfl_state_dict(dict(ref.state_dict()))
    bfl.pop("double_blocks.0.txt_attn.qkv.bias")
    bfl["double_blocks.0.txt_attn.lora.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        load_state_dict(bfl, dict(ref.config))
    assert "missing keys (1): double_blocks.0.txt_attn.qkv.bias" in str(err.value)
    assert "unexpected keys (1): double_blocks.0.txt_attn.lora.weight" in str(err.value)


def test_from_diffusers_refuses_other_modules():
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        from_diffusers(torch.nn.Linear(2, 2))


def test_load_checkpoint_and_from_diffusers_dispatch_to_flux(tmp_path):
    """The package's front doors: `de.from_diffusers` and `de.load_checkpoint` (folder, state dict, BFL keys)."""
    import ditengine as de

    ref, ours = diffusers_pair(next(iter(CONFIGS)))
    assert isinstance(de.from_diffusers(ref), Flux)
    ref.save_pretrained(tmp_path / "transformer")
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    for source in (tmp_path, state):
        model = de.load_checkpoint(source,
                                   **({} if source is tmp_path else {"axes_dims_rope": ours.config.axes_dims_rope}))
        assert isinstance(model, Flux) and model.config == ours.config
