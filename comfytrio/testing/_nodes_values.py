"""The values that flow along the links between simulated nodes.

An IMAGE is a batch of Pillow RGB frames, a MASK a batch of ``L`` frames, a LATENT a list
of content keys (what a decoder turns into pixels), and everything model-side (MODEL, CLIP,
VAE, CONDITIONING...) a label that remembers what was applied to it. Their ``str`` is what
a real ComfyUI prints for the tensor or object, as it shows in ``current_inputs`` of an
``execution_error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

__all__ = ["Images", "Latent", "Masks", "SimObject"]


class Images:
    """An IMAGE batch: Pillow RGB frames, with the shape kept even for an empty batch."""

    def __init__(
        self,
        frames: Sequence[Image.Image],
        width: int = 0,
        height: int = 0,
        *,
        charged: bool = False,
    ) -> None:
        self.frames = list(frames)
        if self.frames:
            width, height = self.frames[0].size
        self.width = width
        self.height = height
        self.charged = charged
        """True once the simulated GPU time for these images was spent (by a decoder)."""

    def __len__(self) -> int:
        return len(self.frames)

    def first(self) -> Image.Image:
        """The first frame; the IndexError torch raises for an empty batch otherwise."""
        if not self.frames:
            raise IndexError("index 0 is out of bounds for dimension 0 with size 0")
        return self.frames[0]

    def __str__(self) -> str:
        body = "[]" if not self.frames else "[...]"
        return f"tensor({body}, size=({len(self.frames)}, {self.height}, {self.width}, 3))"


class Masks:
    """A MASK batch: Pillow ``L`` frames (255 = masked)."""

    def __init__(self, frames: Sequence[Image.Image]) -> None:
        self.frames = list(frames)

    def __str__(self) -> str:
        w, h = self.frames[0].size if self.frames else (0, 0)
        return f"tensor([...], size=({len(self.frames)}, {h}, {w}))"


@dataclass
class Latent:
    """A LATENT batch: one content key per item and the size in latent pixels (1/8).

    ``batch_index`` is ComfyUI's ``batch_index`` key: set by ``LatentFromBatch`` (the
    indices its items had in the batch it was cut from), it makes a sampler draw each item's
    noise as that item of the whole batch (``comfy.sample.prepare_noise``)."""

    items: list[str]
    width: int
    height: int
    batch_index: list[int] | None = None

    def __str__(self) -> str:
        size = f"({len(self.items)}, 4, {self.height}, {self.width})"
        return f"{{'samples': tensor([...], size={size})}}"


@dataclass(frozen=True)
class SimObject:
    """A simulated model-side object (MODEL, CLIP, VAE, CONDITIONING, ...)."""

    kind: str
    label: str
    parts: tuple[str, ...] = ()

    def with_part(self, part: str) -> SimObject:
        """A copy with one more modification (a LoRA, a clip layer)."""
        return SimObject(self.kind, self.label, (*self.parts, part))

    def __str__(self) -> str:
        extra = "".join(f" + {p}" for p in self.parts)
        return f"<fake {self.kind}: {self.label}{extra}>"
