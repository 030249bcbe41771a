"""The old home of the command line, kept for imports of ``comfytrio._cli``: it moved to the
``comfytrio.cli`` package (``comfytrio.cli.main`` is the ``comfytrio`` command)."""

from __future__ import annotations

from .cli import build_parser, main

__all__ = ["build_parser", "main"]
