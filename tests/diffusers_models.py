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
