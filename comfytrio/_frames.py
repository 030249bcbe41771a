"""The binary websocket frames of a ComfyUI server, read and checked like every text message
(``_firewall.py`` style: bounded, and ``Malformed`` for what ComfyUI never sends).

Every frame is a 4-byte big-endian event type (ComfyUI's ``protocol.BinaryEventTypes``),
then its payload (``server.py``: ``send_image``, ``send_image_with_metadata``,
``send_progress_text``; recorded from ComfyUI 0.3.64, ``16_binary_ws_messages.json``):

* ``PREVIEW_IMAGE`` (1): a 4-byte image type (1 JPEG, 2 PNG), then the image. It names no
  node and no prompt: it belongs to the node the server last named in ``executing``.
* ``TEXT`` (3): the 4-byte length of a node id, the node id (UTF-8), then UTF-8 text.
* ``PREVIEW_IMAGE_WITH_METADATA`` (4): the 4-byte length of a JSON header (``node_id``,
  ``prompt_id``, ``display_node_id``, ``parent_node_id``, ``real_node_id``, ``image_type``:
  a MIME type), the header, then the image. Sent instead of type 1 to a client whose first
  message announced ``supports_preview_metadata`` (``FEATURE_FLAGS``).

Other event types (``UNENCODED_PREVIEW_IMAGE`` (2) is never sent over the wire) are
``Unknown``: counted and skipped by the session, never the end of a prompt.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import attrs

from . import _firewall as firewall
from ._results import StreamedImage

__all__ = [
    "FEATURE_FLAGS",
    "STREAMING_OUTPUT_CLASSES",
    "FrameSender",
    "ImageFrame",
    "Streams",
    "TextFrame",
    "Unknown",
    "decode",
]

FEATURE_FLAGS = json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
"""The first message of every websocket: images come as type 4 frames, with their node and
prompt, from servers that know the flag (older servers ignore it)."""

STREAMING_OUTPUT_CLASSES = frozenset({"SaveImageWebsocket"})
"""Output nodes that send one image frame per progress tick and write no file (ComfyUI's
bundled ``custom_nodes/websocket_image_save.py``): an output node of these classes that
sent fewer images than its progress counted fails its prompt, even when it sent none."""

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

_IMAGE_TYPES = {1: "image/jpeg", 2: "image/png"}
_MIME_TYPES = frozenset(_IMAGE_TYPES.values())
_MAX_HEADER = 64 * 1024
"""A metadata header is a few hundred bytes; more is not ComfyUI's."""
_MAX_NODE_ID = 1024


class Unknown(Exception):
    """A frame of an event type we do not read (``event``): harmless, skipped."""

    def __init__(self, event: int) -> None:
        self.event = event
        super().__init__(f"a binary frame of event type {event}")


@attrs.frozen
class FrameSender:
    """Who sent an image, as the metadata of a type 4 frame says."""

    node_id: str | None
    """The node that sent it."""
    prompt_id: str | None
    """Its prompt."""
    display_node_id: str | None = None
    """The node as the UI shows it (for nodes inside subgraphs)."""


@attrs.frozen
class ImageFrame:
    """An image frame: a SaveImageWebsocket output or a latent preview."""

    image_type: str
    """``image/png`` or ``image/jpeg``."""
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    """The encoded image."""
    sender: FrameSender | None = None
    """From a type 4 frame's metadata; None for a type 1 frame (the running node sent it)."""

    @property
    def node_id(self) -> str | None:
        """The node that sent it, when the frame says (type 4)."""
        return None if self.sender is None else self.sender.node_id

    @property
    def prompt_id(self) -> str | None:
        """Its prompt, when the frame says (type 4)."""
        return None if self.sender is None else self.sender.prompt_id


@attrs.frozen
class TextFrame:
    """A text frame a node sent while it ran (``send_progress_text``)."""

    node_id: str
    """The node."""
    text: str
    """What it said."""


def _u32(data: bytes, offset: int, what: str) -> int:
    if len(data) < offset + 4:
        raise firewall.Malformed(f"a binary frame of {len(data)} bytes has no {what}")
    value: int = struct.unpack_from(">I", data, offset)[0]
    return value


def _optional_id(value: object, what: str) -> str | None:
    return None if value is None else firewall.node_id(value, what)


def _image(data: bytes, what: str) -> bytes:
    if not data:
        raise firewall.Malformed(f"{what} carries no image")
    return data


def decode(data: bytes) -> ImageFrame | TextFrame:
    """One binary frame, checked. Raises ``Unknown`` for an event type we do not read and
    ``firewall.Malformed`` for a frame ComfyUI never sends (too short for its type, a header
    that is not a JSON object, an image type it does not use, text that is not UTF-8)."""
    event = _u32(data, 0, "event type")
    if event == PREVIEW_IMAGE:
        number = _u32(data, 4, "image type")
        image_type = _IMAGE_TYPES.get(number)
        if image_type is None:
            raise firewall.Malformed(f"a PREVIEW_IMAGE frame has the image type {number}")
        return ImageFrame(image_type, _image(data[8:], "a PREVIEW_IMAGE frame"))
    if event == PREVIEW_IMAGE_WITH_METADATA:
        size = _u32(data, 4, "header length")
        if size > _MAX_HEADER or len(data) < 8 + size:
            raise firewall.Malformed(
                f"a PREVIEW_IMAGE_WITH_METADATA frame of {len(data)} bytes has a header of "
                f"{size} bytes"
            )
        header = firewall.loads(data[8 : 8 + size], "the header of an image frame")
        if not isinstance(header, dict):
            raise firewall.Malformed("the header of an image frame is not an object")
        image_type = header.get("image_type")
        if image_type not in _MIME_TYPES:
            raise firewall.Malformed(f"an image frame has the image type {image_type!r:.40}")
        prompt_id = header.get("prompt_id")
        if prompt_id is not None and not isinstance(prompt_id, str):
            raise firewall.Malformed(f"an image frame's prompt_id is {prompt_id!r:.40}")
        return ImageFrame(
            str(image_type),
            _image(data[8 + size :], "a PREVIEW_IMAGE_WITH_METADATA frame"),
            FrameSender(
                firewall.node_id(header.get("node_id"), "an image frame's node_id"),
                prompt_id,
                _optional_id(header.get("display_node_id"), "an image frame's display_node_id"),
            ),
        )
    if event == TEXT:
        size = _u32(data, 4, "node id length")
        if size > _MAX_NODE_ID or len(data) < 8 + size:
            raise firewall.Malformed(f"a TEXT frame of {len(data)} bytes has a node id of {size}")
        try:
            node = data[8 : 8 + size].decode("utf-8")
            text = data[8 + size :].decode("utf-8")
        except UnicodeDecodeError:
            raise firewall.Malformed("a TEXT frame is not UTF-8") from None
        return TextFrame(firewall.node_id(node, "a TEXT frame's node id"), text)
    raise Unknown(event)


@attrs.define(eq=False)
class Streams:
    """What one prompt's nodes sent besides JSON: the images of its output nodes, held in
    memory until it ends, and the step counts of its nodes to check them against.

    The rule: an image frame from a node whose class is an output node (``output_node`` in
    ``/object_info``; ``SaveImageWebsocket`` always) is an output, any other image frame
    (a sampler's latent preview) is a preview, never an output.
    """

    classes: dict[str, str] = attrs.Factory(dict)
    """Node id -> ``class_type``, from the workflow as it was submitted."""
    images: list[StreamedImage] = attrs.Factory(list)
    """The output images so far, in the order they came."""
    held: int = 0
    """Their bytes in all."""
    counts: dict[str, int] = attrs.Factory(dict)
    """Node id -> how many output images it sent."""
    steps: dict[str, int] = attrs.Factory(dict)
    """Node id -> the largest ``max`` of its ``progress`` messages."""
    missed: bool = False
    """The websocket was down after the prompt was submitted and before its
    ``execution_start`` came: frames of it may be lost (cleared by ``execution_start``)."""

    @classmethod
    def of(cls, workflow: Mapping[str, Any]) -> Streams:
        """The streams of a prompt running ``workflow`` (API format)."""
        classes = {
            str(node): str(spec["class_type"])
            for node, spec in workflow.items()
            if isinstance(spec, Mapping) and isinstance(spec.get("class_type"), str)
        }
        return cls(classes)

    def node_class(self, frame: ImageFrame, node: str) -> str | None:
        """The class of the node that sent ``frame`` (``node``: its id, or the running one)."""
        found = self.classes.get(node)
        shown = None if frame.sender is None else frame.sender.display_node_id
        if found is None and shown is not None:
            found = self.classes.get(shown)
        return found

    def progress(self, node: str, top: int) -> None:
        """A ``progress`` message of ``node`` counted ``top`` steps."""
        if top > self.steps.get(node, 0):
            self.steps[node] = top

    def add(
        self, node: str, frame: ImageFrame, *, max_image: int | None, max_held: int | None
    ) -> StreamedImage:
        """Hold an output image; ``firewall.Malformed`` when it is over ``max_image`` bytes,
        or the prompt's images over ``max_held`` bytes together."""
        size = len(frame.data)
        if max_image is not None and size > max_image:
            raise firewall.Malformed(
                f"node {node} sent an image of {size} bytes, over the {max_image}-byte cap"
            )
        if max_held is not None and self.held + size > max_held:
            raise firewall.Malformed(
                f"node {node} sent images of more than {max_held} bytes in all (the cap)"
            )
        index = self.counts.get(node, 0)
        image = StreamedImage(node, index, frame.image_type, frame.data)
        self.images.append(image)
        self.counts[node] = index + 1
        self.held += size
        return image

    def _streaming(self, output_classes: frozenset[str]) -> list[str]:
        """The output nodes whose images come over the websocket: every node of a
        ``STREAMING_OUTPUT_CLASSES`` class, and other output nodes once they sent one."""
        return [
            node
            for node, kind in self.classes.items()
            if kind in STREAMING_OUTPUT_CLASSES or (kind in output_classes and node in self.counts)
        ]

    def lost(self, output_classes: frozenset[str]) -> bool:
        """Whether images may be missing because the websocket was down while it ran."""
        return self.missed and bool(self._streaming(output_classes))

    def shortfall(self, output_classes: frozenset[str]) -> str | None:
        """Why the images held are not all the prompt made (an output node sent fewer than
        its progress counted), or None when they are."""
        for node in self._streaming(output_classes):
            expected, got = self.steps.get(node, 0), self.counts.get(node, 0)
            if got < expected:
                return (
                    f"output node {node} ({self.classes[node]}) sent {got} image(s) but its "
                    f"progress counted {expected}"
                )
        return None
