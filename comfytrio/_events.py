"""What a ComfyUI server tells us while it works, as frozen values.

The client turns the server's websocket messages into these and sends them through memory
channels (``ComfyClient.subscribe()``); nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

__all__ = [
    "ComfyEvent",
    "NodeActivity",
    "NodeOutput",
    "NodePreview",
    "NodeProgress",
    "NodeStarted",
    "NodeText",
    "NodesCached",
    "PromptFinished",
    "PromptStarted",
    "QueueStatus",
]

PromptStatus = Literal["success", "error", "interrupted", "vanished", "lost", "cancelled"]


@attrs.frozen
class ComfyEvent:
    """Base of every event."""

    instance: str
    """The server that sent it."""


@attrs.frozen
class QueueStatus(ComfyEvent):
    """The server's queue length changed (the broadcast ``status`` message)."""

    queue_remaining: int
    """Prompts running plus pending on that server."""


@attrs.frozen
class PromptStarted(ComfyEvent):
    """A prompt began to run (``execution_start``)."""

    prompt_id: str
    """The prompt."""


@attrs.frozen
class NodesCached(ComfyEvent):
    """Nodes that will not run because their result is cached (``execution_cached``)."""

    prompt_id: str
    """The prompt."""
    nodes: tuple[str, ...]
    """The cached node ids."""


@attrs.frozen
class NodeStarted(ComfyEvent):
    """A node began to run (``executing`` with a node id)."""

    prompt_id: str
    """The prompt."""
    node_id: str
    """The node."""


@attrs.frozen
class NodeProgress(ComfyEvent):
    """A node reported progress, e.g. a sampler step (``progress``)."""

    prompt_id: str
    """The prompt."""
    node_id: str
    """The node."""
    value: int
    """Steps done."""
    max: int
    """Steps in all."""


@attrs.frozen
class NodeActivity(ComfyEvent):
    """What a running node spends its time on changed (``activity`` in the
    ``progress_state`` of later ComfyUI versions, e.g. ``"loading"`` before a sampler's
    steps; None once it stopped)."""

    prompt_id: str
    """The prompt."""
    node_id: str
    """The node."""
    activity: str | None
    """What it does now (None: only its steps)."""


@attrs.frozen
class NodePreview(ComfyEvent):
    """A latent preview: an image a node that is not an output node (a sampler) sent over
    the websocket while it ran. Never an output of the prompt."""

    prompt_id: str
    """The prompt."""
    node_id: str
    """The node (the one running, for a server that sends previews without metadata)."""
    image: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    """The encoded image."""
    image_type: str
    """``image/jpeg`` or ``image/png``."""


@attrs.frozen
class NodeText(ComfyEvent):
    """Text a running node sent (a binary ``TEXT`` frame, ``send_progress_text``)."""

    prompt_id: str
    """The prompt running that node."""
    node_id: str
    """The node."""
    text: str
    """What it said."""


@attrs.frozen
class NodeOutput(ComfyEvent):
    """An output node finished (``executed``); also replayed for cached outputs."""

    prompt_id: str
    """The prompt."""
    node_id: str
    """The output node."""
    output: Mapping[str, Any]
    """What it produced, as ComfyUI reports it (``{"images": [{filename, subfolder, type}]}``)."""


@attrs.frozen
class PromptFinished(ComfyEvent):
    """A prompt ended, however it ended."""

    prompt_id: str
    """The prompt."""
    status: PromptStatus
    """``success``, ``error``, ``interrupted``, ``vanished`` (left the queue without running),
    ``lost`` (the server went away) or ``cancelled`` (we removed it)."""
