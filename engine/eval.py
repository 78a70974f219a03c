"""Moved to `ditengine.demo.eval` (the digits demo); its names stay importable from here, and
`python -m ditengine.eval` still runs it."""
from .demo.eval import *  # noqa: F401,F403
from .demo.eval import main

if __name__ == "__main__":
    raise SystemExit(main())
