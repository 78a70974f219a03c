"""`ditengine.models.wan.Wan` (the reference spec) equals diffusers' `WanTransformer3DModel` in fp32: text to video,
image to video (CLIP image tokens with their own K/V), Wan 2.2 TI2V's per-token timesteps, at head dims 16 and 32,
odd frame counts, non-square latents and a batch of two."""
import pytest
import torch

from ditengine.models.wan import Wan, WanConfig, video_rope

diffusers = pytest.importorskip("diffusers")

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, in_channels=4, out_channels=4, text_dim=24, freq_dim=32,
            ffn_dim=40, num_layers=2, rope_max_seq_len=32)


def twins(head_dim: int, seed: int = 0, **overrides):
    """diffusers' model with random weights everywhere (tables, norms and biases too), and the spec holding them."""
    cfg = WanConfig(**{**TINY, "attention_head_dim": head_dim, **overrides})
    torch.manual_seed(seed)
    theirs = diffusers.WanTransformer3DModel(**cfg.to_diffusers()).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
    ours = Wan(cfg).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("frames, height, width", [(3, 4, 6), (1, 6, 4)])
def test_text_to_video_equals_diffusers(head_dim, frames, height, width):
    ours, theirs = twins(head_dim)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, frames, height, width, generator=g)
    t, text = torch.tensor([999.0, 412.5]), torch.randn(2, 512, 24, generator=g)
    with torch.no_grad():
        want = theirs(x, t, text, return_dict=False)[0]
        got = ours(x, t, text, return_dict=False)[0]
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_image_to_video_equals_diffusers():
    ours, theirs = twins(16, image_dim=20, added_kv_proj_dim=32)  # the image tokens enter at the model width
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 3, 4, 4, generator=g), torch.tensor([800.0, 10.0])
    text, image = torch.randn(2, 512, 24, generator=g), torch.randn(2, 5, 20, generator=g)
    with torch.no_grad():
        want = theirs(x, t, text, encoder_hidden_states_image=image, return_dict=False)[0]
        got = ours(x, t, text, encoder_hidden_states_image=image)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with torch.no_grad():  # the image matters (another image, not its tokens reordered: attention ignores order)
        assert rel_err(ours(x, t, text, encoder_hidden_states_image=torch.randn_like(image)), got) > 1e-3


def test_per_token_timesteps_equal_diffusers():
    """Wan 2.2 TI2V: one timestep per token, the first frame's tokens at t = 0 (its conditioning frame)."""
    ours, theirs = twins(16, in_channels=6, out_channels=6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, 4, 6, generator=g)
    tokens_per_frame = 2 * 3
    t = torch.tensor([700.0, 250.0])[:, None].repeat(1, 3 * tokens_per_frame)
    t[:, :tokens_per_frame] = 0
    text = torch.randn(2, 512, 24, generator=g)
    with torch.no_grad():
        want = theirs(x, t, text, return_dict=False)[0]
        got = ours(x, t, text, return_dict=False)[0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_rope_splits_the_head_dim_as_wan_does():
    cfg = WanConfig(attention_head_dim=128)
    assert cfg.rope_axes == (44, 42, 42)
    cos, sin = video_rope((2, 3, 4), cfg)
    assert cos.shape == sin.shape == (24, 128) and cos.dtype == torch.float32
    # token (frame 1, row 2, column 3) is row-major index 1 * 12 + 2 * 4 + 3; its frame channels rotate by angle 1
    assert torch.allclose(cos[23, :2], torch.cos(torch.tensor(1.0)).expand(2))


def test_a_config_with_image_tokens_needs_both_fields():
    with pytest.raises(ValueError, match="image_dim and added_kv_proj_dim go together"):
        WanConfig(image_dim=1280)


# -- loading -----------------------------------------------------------------------------------------------------------
# The Wan repository's block names (wan/modules/model.py), written out here apart from the converter's own table:
# its norm3 is the cross-attention's affine norm, its norm2 the FFN's (no parameters).
ORIGINAL_BLOCK_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                        "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q",
                        "attn1.norm_k": "self_attn.norm_k", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                        "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
                        "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
                        "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
                        "attn2.norm_added_k": "cross_attn.norm_k_img", "norm2": "norm3",
                        "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "scale_shift_table": "modulation"}
ORIGINAL_TOP_NAMES = {"condition_embedder.text_embedder.linear_1": "text_embedding.0",
                      "condition_embedder.text_embedder.linear_2": "text_embedding.2",
                      "condition_embedder.time_embedder.linear_1": "time_embedding.0",
                      "condition_embedder.time_embedder.linear_2": "time_embedding.2",
                      "condition_embedder.time_proj": "time_projection.1",
                      "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
                      "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
                      "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
                      "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
                      "proj_out": "head.head", "scale_shift_table": "head.modulation"}


def original_names(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            stem, dot, kind = rest.rpartition(".") if not rest.endswith("scale_shift_table") else (rest, "", "")
            out[f"blocks.{i}.{ORIGINAL_BLOCK_NAMES.get(stem, stem)}{dot}{kind}"] = value
        else:
            stem, dot, kind = key.rpartition(".") if key != "scale_shift_table" else (key, "", "")
            out[f"{ORIGINAL_TOP_NAMES.get(stem, stem)}{dot}{kind}"] = value
    return out


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_diffusers_and_original_checkpoints_load_to_the_same_model(image):
    from ditengine.models import wan_checkpoints

    extra = dict(image_dim=20, added_kv_proj_dim=32) if image else {}
    _, theirs = twins(16, **extra)
    shared = wan_checkpoints.from_diffusers(theirs)
    pointers = {t.untyped_storage().data_ptr() for t in theirs.state_dict().values()}
    assert all(p.untyped_storage().data_ptr() in pointers for p in shared.parameters())  # nothing copied
    original = original_names(theirs.state_dict())
    assert "blocks.0.norm3.weight" in original and "head.modulation" in original
    loaded = wan_checkpoints.load_state_dict(original, {"attention_head_dim": 16, "rope_max_seq_len": 32})
    assert loaded.config == shared.config
    g = torch.Generator().manual_seed(4)
    x, t, text = torch.randn(1, 4, 2, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 512, 24, generator=g)
    image_tokens = torch.randn(1, 3, 20, generator=g) if image else None
    with torch.no_grad():
        want = theirs(x, t, text, encoder_hidden_states_image=image_tokens, return_dict=False)[0]
        for model in (shared, loaded):
            assert torch.equal(model(x, t, text, encoder_hidden_states_image=image_tokens), want)


def test_a_checkpoint_of_another_shape_lists_its_differences():
    from ditengine.models import wan_checkpoints

    _, theirs = twins(16)
    state = dict(theirs.state_dict())
    state["blocks.0.attn1.extra.weight"] = state.pop("blocks.0.attn1.to_q.weight")
    with pytest.raises(ValueError, match=r"(?s)missing keys.*blocks\.0\.attn1\.to_q\.weight.*unexpected keys.*extra"):
        wan_checkpoints.load_state_dict(state, {"attention_head_dim": 16})
