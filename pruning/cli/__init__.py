"""The command line: ``main`` dispatches; ``parser``, ``prune``, ``check``, ``demo`` and ``outputs`` do the work."""

from pruning.cli.main import main

__all__ = ["main"]
