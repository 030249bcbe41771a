"""A fake ComfyUI server for tests, built from recordings of a real ComfyUI 0.3.64.

It speaks ComfyUI's HTTP and websocket API (routes, status codes, JSON shapes, message
order, binary frames, validation errors, the classic cache), really runs the model-free
nodes on Pillow images, simulates model nodes with a configurable GPU time, and can fail,
crash, hang or drop its websockets on demand, or turn hostile (answers and messages no
ComfyUI sends). It speaks as 0.3.64 by default, or as a later version with its jobs API
(``comfyui_version``, one of ``COMFYUI_VERSIONS``); ``decode_frame`` reads its binary
frames as a client does.
Three ways in:

- ``await nursery.start(serve_fake_comfyui, root)`` returns a ``FakeComfyUI`` handle;
- the pytest fixtures ``fake_comfyui`` and ``fake_comfyui_factory`` (this package's
  pytest plugin, loaded automatically), and ``comfy_api``: a ready ``ComfyAPI`` on N
  fakes (``comfy_fakes``), with ``fast_fault_policy()``'s short timeouts;
- ``comfytrio fake-server --port P --root DIR`` on the command line (``run_fake_server``
  from Python), or ``lay_out_fake_comfyui_install(dir)`` for a ``main.py`` that takes
  ComfyUI's flags.

Needs the ``comfytrio[testing]`` extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import attrs

from ._install import lay_out_fake_comfyui_install

if TYPE_CHECKING:
    from comfytrio import FaultPolicy

    from ._command import run_fake_server
    from ._fake import FakeComfyUI, serve_fake_comfyui
    from ._faults import RawBytes, websocket_frame
    from ._frames import DecodedFrame, decode_frame
    from ._profiles import COMFYUI_VERSIONS
    from ._server import COMFYUI_VERSION

__all__ = [
    "COMFYUI_VERSION",
    "COMFYUI_VERSIONS",
    "DecodedFrame",
    "FakeComfyUI",
    "RawBytes",
    "decode_frame",
    "fast_fault_policy",
    "lay_out_fake_comfyui_install",
    "run_fake_server",
    "serve_fake_comfyui",
    "websocket_frame",
]


def fast_fault_policy(**changes: Any) -> FaultPolicy:
    """A ``FaultPolicy`` for fault tests: what takes seconds to minutes by default takes a
    fraction of a second, so a crashed, hung or restarted fake is noticed at once (with
    ``autojump_clock`` none of it costs real time anyway). ``changes`` replace fields::

        ComfyAPI(urls, faults=fast_fault_policy(max_shard_attempts=1))

    Probes every 0.1 s (``health_interval``); hung after 0.5 s without a sign of life
    (``hang_timeout``; found about 1 s after the server went quiet, as a probe is always
    given 1 s); a websocket down 1 s fails the prompts in flight
    (``reconnect_timeout``); a prompt quiet for 0.3 s is looked up (``silence_timeout``);
    3 s with no instance able to take work fails what waits (``no_instance_timeout``);
    first restart of a process of ours after 0.2 s (``restart_backoff``). Retry counts
    (``max_shard_attempts``, ``max_restarts``) keep their defaults.
    """
    from comfytrio import FaultPolicy

    fast = FaultPolicy(
        restart_backoff=0.2,
        health_interval=0.1,
        hang_timeout=0.5,
        reconnect_timeout=1.0,
        silence_timeout=0.3,
        no_instance_timeout=3.0,
    )
    return attrs.evolve(fast, **changes)


# Imported on first use, so that loading the pytest plugin (this package's
# ``pytest_plugin``, registered for every pytest run) does not need the testing extra.
_LAZY = {
    "FakeComfyUI": "._fake",
    "serve_fake_comfyui": "._fake",
    "COMFYUI_VERSION": "._server",
    "COMFYUI_VERSIONS": "._profiles",
    "DecodedFrame": "._frames",
    "decode_frame": "._frames",
    "RawBytes": "._faults",
    "websocket_frame": "._faults",
    "run_fake_server": "._command",
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
