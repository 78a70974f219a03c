"""Moved to `ditengine.demo.generate` (the digits demo); its names stay importable from here."""
from .demo.generate import *  # noqa: F401,F403
