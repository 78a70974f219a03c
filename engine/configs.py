"""DiT configurations: the paper's S/B/L/XL x /2 /4 /8 grid, plus small ones for tests and CPU runs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# name -> (depth, hidden_size, num_heads); the paper's four sizes (DiT Table 1) and small test sizes.
_SIZES = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "T": (4, 128, 2),      # tiny: tests and CPU benchmarks
    "Tiny72": (2, 144, 2),  # head dim 72 like DiT-XL, at test scale
}


@dataclass(frozen=True)
class DiTConfig:
    """Shape and numerical conventions of a DiT.

    `timestep_freq_shift` and `mlp_norm_eps` carry the two places where diffusers' DiT differs numerically
    from facebookresearch/DiT: its timestep frequencies divide by (128 - 1) instead of 128, and the LayerNorm
    before the MLP uses eps 1e-5 instead of 1e-6.
    """

    input_size: int = 32          # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # training's label dropout; the null label (id = num_classes) always exists
    learn_sigma: bool = True
    timestep_freq_shift: int = 0     # 0: facebookresearch/DiT, 1: diffusers
    mlp_norm_eps: float = 1e-6       # 1e-6: facebookresearch/DiT, 1e-5: diffusers
    frequency_embedding_size: int = 256

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DiTConfig":
        """`"DiT-XL/2"` etc.; any field can be overridden, e.g. `from_name("DiT-S/2", depth=2)`."""
        size, _, patch = name.removeprefix("DiT-").partition("/")
        if size not in _SIZES or patch not in ("2", "4", "8"):
            raise ValueError(f"unknown DiT config {name!r}; expected one of {', '.join(available())}")
        depth, hidden, heads = _SIZES[size]
        fields = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown DiTConfig field(s): {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)


def available() -> list[str]:
    return [f"DiT-{s}/{p}" for s in _SIZES for p in (2, 4, 8)]


def heads_for(depth: int, hidden_size: int) -> int:
    """Best guess of the head count for a checkpoint (it is not in the tensor shapes)."""
    for d, h, heads in _SIZES.values():
        if (d, h) == (depth, hidden_size):
            return heads
    for head_dim in (64, 72, 128, 32):
        if hidden_size % head_dim == 0:
            return hidden_size // head_dim
    return 1
