"""The file rules behind ``GET /view`` and ``POST /upload/image``, after ComfyUI 0.3.64:
which folder a ``type`` names, the traversal checks, previews and channels, and the
``name (1).png`` renaming of an upload that would overwrite a different file.

They block (Pillow, the disk): the routes run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from io import BytesIO
from pathlib import Path

from PIL import Image

from ._paths import FakePaths

__all__ = ["store_upload", "view_file"]

_FORCE_DOWNLOAD = {
    "text/html",
    "text/html-sandboxed",
    "application/xhtml+xml",
    "text/javascript",
    "text/css",
}


def view_file(paths: FakePaths, query: dict[str, str]) -> int | tuple[bytes, str, str]:
    """``GET /view``: (body, content type, file name) or an error status."""
    filename, folder = paths.annotated(query["filename"])
    if not filename or filename[0] == "/" or ".." in filename:
        return 400
    if folder is None:
        folder = paths.directory_by_type(query.get("type", "output"))
    if folder is None:
        return 400
    root = Path(os.path.abspath(folder))
    if "subfolder" in query:
        full = root / query["subfolder"]
        if not paths.inside(root, full):
            return 403
        root = full
    name = os.path.basename(filename)
    file = root / name
    if not file.is_file():
        return 404
    channel = query.get("channel")
    if "preview" in query:
        info = query["preview"].split(";")
        fmt = info[0]
        if fmt not in ("webp", "jpeg") or "a" in (channel or ""):
            fmt = "webp"
        quality = int(info[-1]) if info[-1].isdigit() else 90
        with Image.open(file) as img:
            out = img.convert("RGB") if fmt == "jpeg" or channel == "rgb" else img
            buffer = BytesIO()
            out.save(buffer, format=fmt, quality=quality)
        return buffer.getvalue(), f"image/{fmt}", name
    if channel in ("rgb", "a"):
        with Image.open(file) as img:
            if channel == "rgb":
                out = img.convert("RGB")
            else:
                alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
                out = Image.new("RGBA", img.size)
                out.putalpha(alpha)
            buffer = BytesIO()
            out.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png", name
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type in _FORCE_DOWNLOAD:
        content_type = "application/octet-stream"
    return file.read_bytes(), content_type, name


def store_upload(
    paths: FakePaths, filename: str, data: bytes, fields: dict[str, str]
) -> int | dict[str, str]:
    """``POST /upload/image``: the answer, or 400 (traversal, no file name)."""
    kind = fields.get("type") or "input"
    folder = paths.directory_by_type(kind)
    if folder is None:
        raise UnboundLocalError("cannot access local variable 'type_dir'")
    if not filename:
        return 400
    root = os.path.abspath(folder)
    subfolder = fields.get("subfolder", "")
    target_dir = os.path.join(root, os.path.normpath(subfolder))
    target = os.path.abspath(os.path.join(target_dir, filename))
    if os.path.commonpath((root, target)) != root:
        return 400
    os.makedirs(target_dir, exist_ok=True)
    overwrite = fields.get("overwrite")
    if overwrite not in ("true", "1"):
        stem, ext = os.path.splitext(filename)
        counter = 1
        while os.path.exists(target):
            if _same_bytes(target, data):
                return {"name": filename, "subfolder": subfolder, "type": kind}
            filename = f"{stem} ({counter}){ext}"
            target = os.path.join(target_dir, filename)
            counter += 1
    Path(target).write_bytes(data)
    return {"name": filename, "subfolder": subfolder, "type": kind}


def _same_bytes(path: str, data: bytes) -> bool:
    existing = Path(path).read_bytes()
    return hashlib.sha256(existing).digest() == hashlib.sha256(data).digest()
