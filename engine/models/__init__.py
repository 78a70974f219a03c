"""Reference specs of the DiT families other than the class-conditional DiT, one file a family, in plain PyTorch."""
from .pixart import PixArt, PixArtConfig

__all__ = ["PixArt", "PixArtConfig"]
