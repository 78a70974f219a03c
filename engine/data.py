"""Moved to `ditengine.demo.data` (the digits demo); its names stay importable from here."""
from .demo.data import *  # noqa: F401,F403
