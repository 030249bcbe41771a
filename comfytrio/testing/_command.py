"""What ``comfytrio fake-server`` runs: one fake ComfyUI under a folder, until a signal.

The command line (``comfytrio.cli``) owns the flags and what is printed; this module owns
the fake. It is reached through ``comfytrio.testing.run_fake_server`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ._fake import FakeComfyUI, serve_fake_comfyui
from ._main import start_until_signal

__all__ = ["run_fake_server"]


def run_fake_server(
    root: Path, *, on_ready: Callable[[str], None] | None = None, **options: Any
) -> None:
    """Serve a fake ComfyUI under ``root`` until SIGINT or SIGTERM (``comfytrio
    fake-server``).

    ``options`` are those of ``serve_fake_comfyui`` (``host``, ``port``: 0 for any free
    one, ``seconds_per_image``, ``seconds_per_step``, ``startup_delay``, ``idle_timeout``,
    ``previews``, ``comfyui_version``...).
    ``on_ready(url)`` is called once it answers. Blocks (it runs its own trio loop) and
    returns once stopped. Raises ``OSError`` when it cannot listen; a ``KeyboardInterrupt``
    that comes before the signal handler is set propagates.
    """

    def ready(fake: FakeComfyUI) -> None:
        if on_ready is not None:
            on_ready(fake.url)

    trio.run(start_until_signal, partial(serve_fake_comfyui, root, **options), ready)
