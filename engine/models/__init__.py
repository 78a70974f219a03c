"""The reference specs, one file a family, each a readable model in plain PyTorch that the fast path reads
its weights from: `dit.py` (class-conditional DiT, facebookresearch/DiT's names), `pixart.py` (PixArt-alpha
and PixArt-sigma, the original PixArt names, with their diffusers conversion)."""
from .dit import DiT
from .pixart import PixArt, PixArtConfig

__all__ = ["DiT", "PixArt", "PixArtConfig"]
