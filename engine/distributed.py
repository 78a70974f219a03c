"""Moved to `ditengine.demo.distributed` (the digits demo); its names stay importable from here."""
from .demo.distributed import *  # noqa: F401,F403
