"""Binary websocket frames, byte for byte as ComfyUI sends them.

Every frame is a 4-byte big-endian event type (``protocol.py``'s ``BinaryEventTypes``),
then a payload (``server.py``: ``encode_bytes``, ``send_image``,
``send_image_with_metadata``, ``send_progress_text``; checked against
``16_binary_ws_messages.json``):

- ``PREVIEW_IMAGE`` (1): a 4-byte image type (1 JPEG, 2 PNG), then the image;
- ``TEXT`` (3): the 4-byte length of the node id, the node id (UTF-8), the text (UTF-8);
- ``PREVIEW_IMAGE_WITH_METADATA`` (4): the 4-byte length of a JSON header, the header
  (``json.dumps`` of ``node_id``, ``prompt_id``, ``display_node_id``, ``parent_node_id``,
  ``real_node_id``, ``image_type``: a MIME type), then the image.

Images are saved as ComfyUI saves them (``quality=95, compress_level=1``), so a PNG of the
same pixels has the same bytes as the real server's.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Literal

from PIL import Image, ImageOps

__all__ = [
    "BINARY_PREVIEW_IMAGE",
    "BINARY_PREVIEW_WITH_METADATA",
    "BINARY_TEXT",
    "DecodedFrame",
    "ImageFormat",
    "decode_frame",
    "encode_image",
    "encode_preview",
    "frame",
    "preview_image_payload",
    "preview_with_metadata_payload",
    "text_payload",
]

BINARY_PREVIEW_IMAGE = 1
"""``BinaryEventTypes.PREVIEW_IMAGE``."""
BINARY_TEXT = 3
"""``BinaryEventTypes.TEXT``."""
BINARY_PREVIEW_WITH_METADATA = 4
"""``BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA``."""

ImageFormat = Literal["JPEG", "PNG"]
"""The formats ComfyUI sends previews in."""

_IMAGE_TYPE_NUMBER = {"JPEG": 1, "PNG": 2}
_MIME_TYPE = {"JPEG": "image/jpeg", "PNG": "image/png"}


def encode_image(
    image: Image.Image, fmt: ImageFormat = "PNG", max_size: int | None = None
) -> bytes:
    """``image`` as ComfyUI encodes a preview (shrunk to fit ``max_size`` first, if given)."""
    if max_size is not None:
        image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    buffer = BytesIO()
    image.save(buffer, format=fmt, quality=95, compress_level=1)
    return buffer.getvalue()


def encode_preview(frame: Image.Image) -> bytes:
    """A PNG of ``frame``, as SaveImageWebsocket's frames carry it."""
    return encode_image(frame, "PNG")


def frame(event: int, payload: bytes) -> bytes:
    """A whole binary frame: the 4-byte event type, then ``payload``."""
    return struct.pack(">I", event) + payload


def preview_image_payload(fmt: ImageFormat, image: bytes) -> bytes:
    """The payload of a ``PREVIEW_IMAGE`` frame."""
    return struct.pack(">I", _IMAGE_TYPE_NUMBER[fmt]) + image


def preview_with_metadata_payload(
    metadata: dict[str, Any], fmt: ImageFormat, image: bytes
) -> bytes:
    """The payload of a ``PREVIEW_IMAGE_WITH_METADATA`` frame (``image_type`` is added to
    ``metadata`` last, as ComfyUI does)."""
    header = json.dumps({**metadata, "image_type": _MIME_TYPE[fmt]}).encode("utf-8")
    return struct.pack(">I", len(header)) + header + image


def text_payload(node_id: str, text: str) -> bytes:
    """The payload of a ``TEXT`` frame (``send_progress_text``)."""
    node = str(node_id).encode("utf-8")
    return struct.pack(">I", len(node)) + node + text.encode("utf-8")


@dataclass(frozen=True)
class DecodedFrame:
    """A binary frame read back: its event type and what its payload holds."""

    event: int
    image_type: str | None = None
    """``"image/png"`` or ``"image/jpeg"`` for the image frames."""
    image: bytes = b""
    metadata: dict[str, Any] | None = None
    """The JSON header of a ``PREVIEW_IMAGE_WITH_METADATA`` frame."""
    node_id: str | None = None
    """The node of a ``TEXT`` frame (or of a frame with metadata)."""
    text: str | None = None


def decode_frame(data: bytes) -> DecodedFrame:
    """Read a binary frame the way a client of ComfyUI does (raises ``ValueError`` on a
    frame too short for its type)."""
    if len(data) < 4:
        raise ValueError(f"a binary frame of {len(data)} bytes has no event type")
    event = struct.unpack(">I", data[:4])[0]
    body = data[4:]
    if event == BINARY_PREVIEW_IMAGE:
        if len(body) < 4:
            raise ValueError("a PREVIEW_IMAGE frame without its image type")
        number = struct.unpack(">I", body[:4])[0]
        mime = {1: "image/jpeg", 2: "image/png"}.get(number, f"unknown/{number}")
        return DecodedFrame(event, mime, body[4:])
    if event == BINARY_PREVIEW_WITH_METADATA:
        size = struct.unpack(">I", body[:4])[0] if len(body) >= 4 else -1
        if size < 0 or len(body) < 4 + size:
            raise ValueError("a PREVIEW_IMAGE_WITH_METADATA frame shorter than its header")
        metadata = json.loads(body[4 : 4 + size])
        return DecodedFrame(
            event,
            metadata.get("image_type"),
            body[4 + size :],
            metadata,
            metadata.get("node_id"),
        )
    if event == BINARY_TEXT:
        size = struct.unpack(">I", body[:4])[0] if len(body) >= 4 else -1
        if size < 0 or len(body) < 4 + size:
            raise ValueError("a TEXT frame shorter than its node id")
        node = body[4 : 4 + size].decode("utf-8")
        return DecodedFrame(event, node_id=node, text=body[4 + size :].decode("utf-8"))
    return DecodedFrame(event, image=body)
