"""``comfytrio plugins``: every installed param type and asset resolver, one line each (or
a JSON list with ``--json``)."""

from __future__ import annotations

import argparse
import json

import attrs

from .. import PluginError, make_plugin_manager
from ._common import EXIT_FAILED, EXIT_OK, err

__all__ = ["add_plugins_arguments", "plugins"]


def add_plugins_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json``."""
    parser.add_argument("--json", action="store_true", help="print the list as JSON")


def plugins(args: argparse.Namespace) -> int:
    """List every installed param type and asset resolver, one line each."""
    try:
        entries = make_plugin_manager().describe()
    except PluginError as exc:
        err(f"error: {exc}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps([attrs.asdict(e) for e in entries], indent=2), flush=True)
        return EXIT_OK
    width = max((len(e.name) for e in entries), default=0)
    for e in entries:
        print(f"{e.kind:<14}  {e.name:<{width}}  {e.plugin} ({e.distribution})  {e.summary}")
    return EXIT_OK
