"""A fake ComfyUI server for tests, built from recordings of a real ComfyUI 0.3.64.

It speaks ComfyUI's HTTP and websocket API (routes, status codes, JSON shapes, message
order, validation errors, the classic cache), really runs the model-free nodes on Pillow
images, simulates model nodes with a configurable GPU time, and can fail, crash, hang or
drop its websockets on demand, or turn hostile (answers and messages no ComfyUI sends).
Three ways in:

- ``await nursery.start(serve_fake_comfyui, root)`` returns a ``FakeComfyUI`` handle;
- the pytest fixtures ``fake_comfyui`` and ``fake_comfyui_factory`` (this package's
  pytest plugin, loaded automatically);
- ``comfytrio fake-server --port P --root DIR`` on the command line, or
  ``lay_out_fake_comfyui_install(dir)`` for a ``main.py`` that takes ComfyUI's flags.

Needs the ``comfytrio[testing]`` extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._install import lay_out_fake_comfyui_install

if TYPE_CHECKING:
    from ._fake import FakeComfyUI, serve_fake_comfyui
    from ._faults import RawBytes, websocket_frame
    from ._server import COMFYUI_VERSION

__all__ = [
    "COMFYUI_VERSION",
    "FakeComfyUI",
    "RawBytes",
    "lay_out_fake_comfyui_install",
    "serve_fake_comfyui",
    "websocket_frame",
]

# Imported on first use, so that loading the pytest plugin (this package's
# ``pytest_plugin``, registered for every pytest run) does not need the testing extra.
_LAZY = {
    "FakeComfyUI": "._fake",
    "serve_fake_comfyui": "._fake",
    "COMFYUI_VERSION": "._server",
    "RawBytes": "._faults",
    "websocket_frame": "._faults",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
