"""pytest fixtures for testing code against the fake ComfyUI.

Loaded automatically (the ``pytest11`` entry point ``comfytrio``) wherever comfytrio is
installed; the fixtures need the ``testing`` extra and pytest-trio, and work in trio tests
(``trio_mode = true``, or tests marked ``@pytest.mark.trio``):

- ``fake_comfyui``: one fake server with its root in ``tmp_path / "comfyui"``;
- ``fake_comfyui_factory``: ``await fake_comfyui_factory(**kwargs)`` starts another one
  (keywords of ``serve_fake_comfyui``; each gets its own root under ``tmp_path``);
- ``fake_comfyui_install``: a fake ComfyUI install directory (``main.py`` taking ComfyUI's
  flags) for code that starts ComfyUI as a child process.

Servers stop when the test ends (they run in pytest-trio's ``nursery`` fixture).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import trio

    from comfytrio.testing import FakeComfyUI

__all__ = ["fake_comfyui", "fake_comfyui_factory", "fake_comfyui_install"]

FakeFactory = Callable[..., Awaitable["FakeComfyUI"]]


@pytest.fixture
async def fake_comfyui(nursery: trio.Nursery, tmp_path: Path) -> FakeComfyUI:
    """A fake ComfyUI 0.3.64 on 127.0.0.1 (a free port), root ``tmp_path / "comfyui"``."""
    from comfytrio.testing import serve_fake_comfyui

    fake: FakeComfyUI = await nursery.start(serve_fake_comfyui, tmp_path / "comfyui")
    return fake


@pytest.fixture
async def fake_comfyui_factory(nursery: trio.Nursery, tmp_path: Path) -> FakeFactory:
    """``await factory(**kwargs)`` starts one more fake server (``serve_fake_comfyui``
    keywords, plus ``root``; by default ``tmp_path / "comfyui-N"``)."""
    from comfytrio.testing import serve_fake_comfyui

    counter = itertools.count(1)

    async def start(**kwargs: Any) -> FakeComfyUI:
        root = kwargs.pop("root", None) or tmp_path / f"comfyui-{next(counter)}"
        fake: FakeComfyUI = await nursery.start(
            functools.partial(serve_fake_comfyui, root, **kwargs)
        )
        return fake

    return start


@pytest.fixture
def fake_comfyui_install(tmp_path: Path) -> Path:
    """A fake ComfyUI install in ``tmp_path / "ComfyUI"`` (see
    ``lay_out_fake_comfyui_install``)."""
    from comfytrio.testing import lay_out_fake_comfyui_install

    return lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
