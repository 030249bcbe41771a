"""What a client hands back: the answer to a submission, a prompt's result and its files, and
a snapshot of the client's state. Frozen values; nothing here does I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "ClientStatistics",
    "OutputRef",
    "PromptResult",
    "StreamedImage",
    "SubmittedPrompt",
    "output_files",
    "output_values",
]


@attrs.frozen
class SubmittedPrompt:
    """What ``POST /prompt`` answered for an accepted prompt."""

    prompt_id: str
    """The id we chose for it."""
    number: float
    """Its place in the server's queue (negative for ``front=True``)."""
    node_errors: Mapping[str, Any]
    """Outputs ComfyUI dropped (only non-empty with ``allow_partial=True``)."""


@attrs.frozen
class OutputRef:
    """One file a prompt produced, as the server names it."""

    node_id: str
    """The output node that reported it."""
    filename: str
    """File name."""
    subfolder: str
    """Sub-folder inside the server's output or temp folder."""
    type: str
    """``output``, ``temp`` or ``input``."""


@attrs.frozen
class StreamedImage:
    """One image an output node sent over the websocket (``SaveImageWebsocket``) instead of
    writing a file: held in memory until the prompt ends, then written by the caller."""

    node_id: str
    """The output node that sent it."""
    index: int
    """Its place among that node's images (0, 1, ...), in the order they came."""
    image_type: str
    """``image/png`` or ``image/jpeg``."""
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    """The encoded image, as the server sent it."""

    @property
    def extension(self) -> str:
        """``png`` or ``jpg``."""
        return "jpg" if self.image_type == "image/jpeg" else "png"


@attrs.frozen
class PromptResult:
    """A prompt that finished successfully."""

    instance: str
    """The server that ran it."""
    prompt_id: str
    """The prompt."""
    outputs: Mapping[str, Mapping[str, Any]]
    """Output node id -> what it produced, as ComfyUI reports it."""
    cached_nodes: tuple[str, ...] = ()
    """Nodes ComfyUI did not run because their result was cached."""
    images: tuple[StreamedImage, ...] = ()
    """The images output nodes sent over the websocket (``SaveImageWebsocket``), node by
    node in the order they came; latent previews are never here."""

    @property
    def files(self) -> list[OutputRef]:
        """Every file in ``outputs`` (images, and any other list of files a node reports)."""
        return output_files(self.outputs)

    @property
    def values(self) -> dict[str, dict[str, list[Any]]]:
        """What the output nodes reported that is not a file (``PreviewAny``'s
        ``{"text": [...]}``, numbers): node id -> key -> values."""
        return output_values(self.outputs)

    @property
    def fully_cached(self) -> bool:
        """True when every output node was served from ComfyUI's cache (no new file)."""
        return bool(self.outputs) and all(node in self.cached_nodes for node in self.outputs)


def output_files(outputs: Mapping[str, Mapping[str, Any]]) -> list[OutputRef]:
    """Every file in a prompt's outputs (node id -> ComfyUI's ``output`` dict): images, and
    any other list of files a node reports."""
    found: list[OutputRef] = []
    for node_id, output in outputs.items():
        for items in output.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, Mapping) and "filename" in item:
                    found.append(
                        OutputRef(
                            node_id=str(node_id),
                            filename=str(item["filename"]),
                            subfolder=str(item.get("subfolder", "")),
                            type=str(item.get("type", "output")),
                        )
                    )
    return found


def output_values(outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """What a prompt's output nodes reported that is not a file: node id -> key -> values
    (files and empty lists are left out; ComfyUI's ``ui`` values are lists, any other value
    becomes a list of one)."""
    found: dict[str, dict[str, list[Any]]] = {}
    for node_id, output in outputs.items():
        for key, items in output.items():
            listed = items if isinstance(items, list) else [items]
            kept = [i for i in listed if not (isinstance(i, Mapping) and "filename" in i)]
            if kept:
                found.setdefault(str(node_id), {})[str(key)] = kept
    return found


@attrs.frozen
class ClientStatistics:
    """A snapshot of one client's state."""

    instance: str
    """The server."""
    connected: bool
    """Whether the websocket is up now."""
    queue_remaining: int
    """The server's last reported queue length (all clients)."""
    in_flight: int
    """Our prompts submitted and not yet finished."""
    reconnects: int
    """How often the websocket was re-established."""
    events_dropped: int
    """Events not delivered to a subscriber whose buffer was full."""
    malformed: int = 0
    """Messages and answers the server sent that ComfyUI never sends."""
    jobs_api: bool | None = None
    """The server's dialect: True when it has ``/api/jobs`` (later ComfyUI versions: jobs
    are looked up and cancelled there), False when it has not (ComfyUI 0.3.x: ``/queue``,
    ``/history``, ``/interrupt``), None before it was asked (on the first look-up or
    cancel)."""
    preview_metadata: bool = False
    """The server answered our ``feature_flags`` with ``supports_preview_metadata``: its
    image frames name their node and prompt (type 4)."""
    frames_skipped: int = 0
    """Binary frames of an event type the client does not read (skipped, harmless)."""
