"""Moved to `ditengine.demo.train` (the digits demo); its names stay importable from here, and
`python -m ditengine.train` still runs it."""
from .demo.train import *  # noqa: F401,F403
from .demo.train import main

if __name__ == "__main__":
    raise SystemExit(main())
