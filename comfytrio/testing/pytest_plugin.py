"""pytest fixtures for testing code against the fake ComfyUI.

Loaded automatically (the ``pytest11`` entry point ``comfytrio``) wherever comfytrio is
installed; the fixtures need the ``testing`` extra and pytest-trio, and work in trio tests
(``trio_mode = true``, or tests marked ``@pytest.mark.trio``):

- ``fake_comfyui``: one fake server with its root in ``tmp_path / "comfyui"``;
- ``fake_comfyui_factory``: ``await fake_comfyui_factory(**kwargs)`` starts another one
  (keywords of ``serve_fake_comfyui``; each gets its own root under ``tmp_path``);
- ``fake_comfyui_install``: a fake ComfyUI install directory (``main.py`` taking ComfyUI's
  flags) for code that starts ComfyUI as a child process;
- ``comfy_fakes``: N fake servers (2 unless ``@pytest.mark.comfy_api(fakes=N)`` or an
  indirect parametrization says otherwise; ``comfyui_version=``/``previews=`` in the marker
  go to each);
- ``comfy_api``: a ready ``ComfyAPI`` wired to the ``comfy_fakes``, with short timeouts
  (``fast_fault_policy()``); the marker's other keywords go to ``ComfyAPI``.

Servers stop when the test ends (they run in pytest-trio's ``nursery`` fixture). Add
pytest-trio's ``autojump_clock`` fixture to a test and all of them run on its virtual clock.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import trio

    from comfytrio import ComfyAPI
    from comfytrio.testing import FakeComfyUI

__all__ = [
    "DEFAULT_FAKES",
    "comfy_api",
    "comfy_fakes",
    "fake_comfyui",
    "fake_comfyui_factory",
    "fake_comfyui_install",
]

FakeFactory = Callable[..., Awaitable["FakeComfyUI"]]

DEFAULT_FAKES = 2
"""How many fake servers ``comfy_fakes`` (and so ``comfy_api``) starts by default."""

_MARKER = "comfy_api"

_FAKE_OPTIONS = ("comfyui_version", "previews")
"""Keywords of the ``comfy_api`` marker that go to the fakes, not to ``ComfyAPI``."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(fakes={DEFAULT_FAKES}, **kwargs): how many fake servers the comfy_fakes "
        "and comfy_api fixtures start (comfyui_version=, previews= for each), and keyword "
        "arguments for the ComfyAPI of comfy_api",
    )


@pytest.fixture
async def fake_comfyui(nursery: trio.Nursery, tmp_path: Path) -> FakeComfyUI:
    """A fake ComfyUI 0.3.64 on 127.0.0.1 (a free port), root ``tmp_path / "comfyui"``
    (``fake_comfyui_factory(comfyui_version=...)`` for another version)."""
    from comfytrio.testing import serve_fake_comfyui

    fake: FakeComfyUI = await nursery.start(serve_fake_comfyui, tmp_path / "comfyui")
    return fake


@pytest.fixture
async def fake_comfyui_factory(nursery: trio.Nursery, tmp_path: Path) -> FakeFactory:
    """``await factory(**kwargs)`` starts one more fake server (``serve_fake_comfyui``
    keywords, plus ``root``; by default ``tmp_path / "comfyui-N"``), e.g.
    ``await fake_comfyui_factory(comfyui_version="0.38.1", previews=True)``."""
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


def _marker_kwargs(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker(_MARKER)
    if marker is None:
        return {}
    if marker.args:
        raise TypeError(f"@pytest.mark.{_MARKER} takes keywords only, got {marker.args!r}")
    return dict(marker.kwargs)


@pytest.fixture
async def comfy_fakes(
    request: pytest.FixtureRequest, fake_comfyui_factory: FakeFactory
) -> list[FakeComfyUI]:
    """N fake servers, ``tmp_path / "comfyui-1"`` ... (the ``fake_comfyui_factory``'s).

    N is the fixture's indirect parameter
    (``@pytest.mark.parametrize("comfy_fakes", [1, 3], indirect=True)``), else the
    ``fakes`` keyword of ``@pytest.mark.comfy_api(fakes=N)``, else 2. The marker's
    ``comfyui_version`` and ``previews`` keywords go to every fake
    (``@pytest.mark.comfy_api(comfyui_version="0.38.1")``).
    """
    marker = _marker_kwargs(request)
    count = getattr(request, "param", None)
    if count is None:
        count = marker.get("fakes", DEFAULT_FAKES)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"comfy_fakes needs a number of servers of at least 1, got {count!r}")
    options = {key: marker[key] for key in _FAKE_OPTIONS if key in marker}
    return [await fake_comfyui_factory(**options) for _ in range(count)]


@pytest.fixture
async def comfy_api(
    request: pytest.FixtureRequest, comfy_fakes: list[FakeComfyUI], tmp_path: Path
) -> AsyncIterator[ComfyAPI]:
    """A ``ComfyAPI`` on the ``comfy_fakes`` servers, entered (every one of them ready) and
    closed after the test.

    Defaults made for tests: no GPU detection (``GPUInfo(False, 0)``), no models folder
    (the fakes' ``/models`` routes are asked), outputs downloaded into
    ``tmp_path / "comfy_api-downloads"``, ``faults=fast_fault_policy()``,
    ``ready_timeout=10``, ``execution_timeout=60`` and ``min_instances`` = every fake. The
    keywords of ``@pytest.mark.comfy_api(...)`` other than ``fakes`` replace them (any
    ``ComfyAPI`` keyword).
    """
    from comfytrio import ComfyAPI, GPUInfo
    from comfytrio.testing import fast_fault_policy

    options: dict[str, Any] = {
        "gpu": GPUInfo(False, 0),
        "download_dir": tmp_path / "comfy_api-downloads",
        "faults": fast_fault_policy(),
        "ready_timeout": 10.0,
        "execution_timeout": 60.0,
        "min_instances": len(comfy_fakes),
    }
    options.update(_marker_kwargs(request))
    for key in ("fakes", *_FAKE_OPTIONS):
        options.pop(key, None)
    async with ComfyAPI([fake.url for fake in comfy_fakes], **options) as api:
        yield api
