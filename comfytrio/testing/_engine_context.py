"""What a running node reports while it runs: the ``NodeContext`` the executor hands it
(simulated GPU time, progress, preview and text frames) and the ``progress_state``
messages of the prompt's nodes.

Binary websocket frames are a 4-byte big-endian event type and a payload, as ComfyUI sends
them: ``PREVIEW_IMAGE`` (4-byte image type, then the PNG), ``TEXT`` (4-byte length of the
node id, the node id, the text) and ``PREVIEW_IMAGE_WITH_METADATA`` (4-byte length of a JSON
header, the header, the PNG) for clients that negotiated ``supports_preview_metadata``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image

from ._paths import FakePaths, disk_work

if TYPE_CHECKING:
    from ._engine_execution import Executor
    from ._engine_state import MessageSink, Settings

__all__ = [
    "BINARY_PREVIEW_IMAGE",
    "BINARY_PREVIEW_WITH_METADATA",
    "BINARY_TEXT",
    "NodeRun",
    "Progress",
    "encode_preview",
]

T = TypeVar("T")

BINARY_PREVIEW_IMAGE = 1
BINARY_TEXT = 3
BINARY_PREVIEW_WITH_METADATA = 4


def encode_preview(frame: Image.Image) -> bytes:
    """A PNG of ``frame`` (for binary preview frames)."""
    buffer = BytesIO()
    frame.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _node_ids(node_id: str, prompt_id: str) -> dict[str, Any]:
    """How ComfyUI names a node (of a prompt, in no subgraph) in progress messages."""
    return {
        "node_id": node_id,
        "prompt_id": prompt_id,
        "display_node_id": node_id,
        "parent_node_id": None,
        "real_node_id": node_id,
    }


class Progress:
    """ComfyUI's progress registry: every change sends the state of all started nodes."""

    def __init__(self, sink: MessageSink, sid: str | None, prompt_id: str) -> None:
        self.sink = sink
        self.sid = sid
        self.prompt_id = prompt_id
        self.nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str) -> dict[str, Any]:
        return self.nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})

    def _send(self) -> None:
        nodes = {
            node_id: {
                "value": st["value"],
                "max": st["max"],
                "state": st["state"],
                **_node_ids(node_id, self.prompt_id),
            }
            for node_id, st in self.nodes.items()
            if st["state"] != "pending"
        }
        self.sink.send("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, self.sid)

    def start(self, node_id: str) -> None:
        """``node_id`` starts running."""
        self.nodes[node_id] = {"state": "running", "value": 0.0, "max": 1.0}
        self._send()

    def update(self, node_id: str, value: float, total: float) -> None:
        """``node_id`` reports progress."""
        entry = self._entry(node_id)
        entry.update(state="running", value=value, max=total)
        self._send()

    def finish(self, node_id: str) -> None:
        """``node_id`` is done (ran, or came from the cache)."""
        entry = self._entry(node_id)
        entry["state"] = "finished"
        entry["value"] = entry["max"]
        self._send()


@dataclass
class NodeRun:
    """The ``NodeContext`` of one node run."""

    executor: Executor
    node_id: str
    prompt_id: str
    progress_state: Progress

    @property
    def paths(self) -> FakePaths:
        """The server's folders."""
        return self.executor.state.paths

    @property
    def settings(self) -> Settings:
        """The server's knobs."""
        return self.executor.state.settings

    async def gpu_sleep(self, seconds: float) -> None:
        """Spend simulated GPU time; an interrupt ends it early."""
        await self.executor.simulated_sleep(seconds)

    async def progress(
        self, value: float, total: float, preview: Image.Image | None = None
    ) -> None:
        """Report progress, with a preview frame before (metadata negotiated) or after."""
        executor = self.executor
        executor.check_interrupt()
        await executor.state.faults.gate.wait_open()
        value = min(value, total)
        self.progress_state.update(self.node_id, value, total)
        sid = executor.client_id
        sink = executor.sink
        flags = sink.supports_preview_metadata(sid)
        if preview is not None and flags:
            header = {**_node_ids(self.node_id, self.prompt_id), "image_type": "image/png"}
            meta = json.dumps(header).encode()
            payload = struct.pack(">I", len(meta)) + meta + encode_preview(preview)
            sink.send(BINARY_PREVIEW_WITH_METADATA, payload, sid)
        sink.send(
            "progress",
            {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id},
            sid,
        )
        if preview is not None and not flags:
            sink.send(BINARY_PREVIEW_IMAGE, struct.pack(">I", 2) + encode_preview(preview), sid)

    def send_text(self, text: str) -> None:
        """A binary TEXT frame for this node, to every socket."""
        node = self.node_id.encode()
        self.executor.sink.send(
            BINARY_TEXT, struct.pack(">I", len(node)) + node + text.encode(), None
        )

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run blocking work in a worker thread."""
        return await disk_work(fn)
