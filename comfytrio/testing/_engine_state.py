"""What the engine of every generation works with besides its own queue: the state a fake
server keeps across crashes and restarts (``ServerState``: node types, folders, the knobs in
``Settings``, faults, the ``Tally`` a test inspects, the ComfyUI version it speaks as) and
the ``MessageSink`` its websocket messages go to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ._faults import Faults
from ._paths import FakePaths
from ._profiles import ComfyProfile

if TYPE_CHECKING:
    from ._nodes import NodeRegistry

__all__ = ["MessageSink", "ServerState", "Settings", "Tally"]


class MessageSink(Protocol):
    """Where the engine's websocket messages go (the server's socket registry)."""

    def send(self, event: str | int, data: Any, sid: str | None) -> None:
        """Queue a message for ``sid``, or for every socket when ``sid`` is None."""
        ...

    def supports_preview_metadata(self, sid: str | None) -> bool:
        """Whether ``sid`` negotiated ``supports_preview_metadata``."""
        ...


@dataclass
class Settings:
    """Knobs a test may change at any time."""

    seconds_per_image: float = 0.0
    seconds_per_step: float = 0.0
    node_seconds: dict[str, float] = field(default_factory=dict)
    disable_metadata: bool = False
    previews: bool = False
    """Latent previews from the samplers (``--preview-method``): a JPEG frame per step."""


@dataclass
class Tally:
    """What a test may inspect, kept across restarts of one fake server."""

    prompts_received: list[Any] = field(default_factory=list)
    executed_count: int = 0
    executed_nodes: list[tuple[str, str]] = field(default_factory=list)


class ServerState(Protocol):
    """What one fake server keeps across crashes and restarts (the ``FakeComfyUI`` handle
    holds it), read by the engine and the app of each generation."""

    registry: NodeRegistry
    paths: FakePaths
    settings: Settings
    faults: Faults
    tally: Tally
    profile: ComfyProfile
