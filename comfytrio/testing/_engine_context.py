"""What a running node reports while it runs: the ``NodeContext`` the executor hands it
(simulated GPU time, progress, preview and text frames) and the ``progress_state``
messages of the prompt's nodes.

Binary frames are built in ``_frames``; they go out in the order ComfyUI's progress hook
sends them (``main.py`` ``hijack_progress``, ``comfy_execution/progress.py``): on every
progress tick ``progress_state``, then a ``PREVIEW_IMAGE_WITH_METADATA`` frame for a client
that negotiated ``supports_preview_metadata``, then ``progress``, then a ``PREVIEW_IMAGE``
frame for any other client. With the ``previews`` knob on (``--preview-method``), the
samplers' ticks carry a JPEG latent preview (``latent_preview.py``: Latent2RGB gives the
latent's size, which ``send_image`` scales to fit ``--preview-size``, 512).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image

from ._frames import (
    BINARY_PREVIEW_IMAGE,
    BINARY_PREVIEW_WITH_METADATA,
    BINARY_TEXT,
    ImageFormat,
    encode_image,
    encode_preview,
    preview_image_payload,
    preview_with_metadata_payload,
    text_payload,
)
from ._paths import FakePaths, disk_work

if TYPE_CHECKING:
    from ._engine_execution import Executor
    from ._engine_state import MessageSink, Settings

__all__ = [
    "BINARY_PREVIEW_IMAGE",
    "BINARY_PREVIEW_WITH_METADATA",
    "BINARY_TEXT",
    "LATENT_PREVIEW_NODES",
    "NodeRun",
    "Progress",
    "encode_preview",
    "latent_preview",
]

T = TypeVar("T")

LATENT_PREVIEW_NODES = frozenset({"KSampler", "KSamplerAdvanced"})
"""The node types whose progress carries a latent preview when previews are on."""

MAX_PREVIEW_RESOLUTION = 512
"""``--preview-size``'s default: previews are shrunk to fit in this square."""


def latent_preview(size: tuple[int, int], value: float, total: float) -> Image.Image:
    """A stand-in for a Latent2RGB preview at step ``value`` of ``total``: a frame of the
    latent's size whose colour moves from blue noise to the finished image's warmth."""
    part = 0.0 if total <= 0 else max(0.0, min(1.0, value / total))
    color = (int(40 + 200 * part), 96, int(220 - 180 * part))
    return Image.new("RGB", (max(size[0], 1), max(size[1], 1)), color)


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
                **({"activity": st["activity"]} if "activity" in st else {}),
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

    def set_activity(self, node_id: str, activity: str | None) -> None:
        """What a running node spends its time on (``"loading"``), or None when it stops
        (later ComfyUI versions; sends the state only when it changes)."""
        entry = self._entry(node_id)
        if entry.get("activity") == activity:
            return
        if activity is None:
            entry.pop("activity", None)
        else:
            entry["activity"] = activity
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
    class_type: str = ""
    preview_size: tuple[int, int] = (64, 64)
    """The size of a latent preview (the latent's, in latent pixels)."""

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
        """Report progress, with a preview frame before (metadata negotiated) or after.

        ``preview`` goes out as a PNG (SaveImageWebsocket); without one, a sampler sends a
        JPEG latent preview when the ``previews`` knob is on."""
        executor = self.executor
        executor.check_interrupt()
        await executor.state.faults.gate.wait_open()
        value = min(value, total)
        fmt: ImageFormat = "PNG"
        max_size: int | None = None
        if preview is None and self.settings.previews and self.class_type in LATENT_PREVIEW_NODES:
            preview = latent_preview(self.preview_size, value, total)
            fmt, max_size = "JPEG", MAX_PREVIEW_RESOLUTION
        self.progress_state.update(self.node_id, value, total)
        sid = executor.client_id
        sink = executor.sink
        flags = sink.supports_preview_metadata(sid)
        image = encode_image(preview, fmt, max_size) if preview is not None else None
        if image is not None and flags:
            ids = _node_ids(self.node_id, self.prompt_id)
            sink.send(
                BINARY_PREVIEW_WITH_METADATA, preview_with_metadata_payload(ids, fmt, image), sid
            )
        sink.send(
            "progress",
            {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id},
            sid,
        )
        if image is not None and not flags:
            sink.send(BINARY_PREVIEW_IMAGE, preview_image_payload(fmt, image), sid)

    def send_text(self, text: str) -> None:
        """A binary TEXT frame for this node, to every socket."""
        self.executor.sink.send(BINARY_TEXT, text_payload(self.node_id, text), None)

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run blocking work in a worker thread."""
        return await disk_work(fn)
