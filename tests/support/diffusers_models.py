"""Small diffusers models and inputs shared by the interoperability tests.

Only the tests that call these need diffusers: each call skips its own test when diffusers is missing,
so a test module that imports this one never skips as a whole.
"""
import pytest
import torch


def tied_diffusers_dit(sample_size=8, heads=2, head_dim=16, layers=2, learn_sigma=True, seed=0, num_classes=10):
    """A random diffusers DiT whose per-block embedders are tied, as in every converted DiT checkpoint."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8 if learn_sigma else 4,
        num_layers=layers, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=num_classes).eval()
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


def inputs(batch=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([3.0, 500.0, 999.0])[:batch],
            torch.tensor([1, 5, 10])[:batch])


def randomize(module: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random (norm weights near 1, tables and biases too), so that a wrong formula shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("norm.weight") or ".norm_" in name or name.startswith("norm_out") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return module


# The MMDiT pipelines' tests (SD3, Flux): text and pooled widths, and the text length.
TEXT, POOLED, L = 24, 12, 7


def tiny_vae(seed: int, scaling_factor: float, latent_channels: int = 4):
    """A one-level AutoencoderKL (4 latent channels unless told), for decoding in the pipelines' tests."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                                   latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
                                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                   shift_factor=0.06, scaling_factor=scaling_factor).eval()


def text_embeddings(B=1, seed=1, negative=False):
    """The embeddings an MMDiT pipeline takes in place of its text encoders, the negative ones if asked."""
    g = torch.Generator().manual_seed(seed)
    out = dict(prompt_embeds=torch.randn(B, L, TEXT, generator=g),
               pooled_prompt_embeds=torch.randn(B, POOLED, generator=g))
    if negative:
        out.update(negative_prompt_embeds=torch.randn(B, L, TEXT, generator=g),
                   negative_pooled_prompt_embeds=torch.randn(B, POOLED, generator=g))
    return out


def call_pipeline(pipe, seed=0, **kwargs):
    """The pipeline's images (latents unless `output_type` says otherwise) at 8 x 12 from a seeded generator."""
    kwargs.setdefault("output_type", "latent")
    return pipe(height=8, width=12, generator=torch.Generator().manual_seed(seed), **kwargs).images


def rel_err(got, expected):
    return float((got.float() - expected.float()).norm() / expected.float().norm())
