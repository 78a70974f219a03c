"""Moved to `ditengine.pipelines` (one file per family); these names stay importable from here."""
from .pipelines import *  # noqa: F401,F403
from .pipelines import __all__  # noqa: F401
