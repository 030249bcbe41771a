"""What every node simulation is written against: the context a running node gets, the
``NodeDef`` of a node type, and the ``Family`` a node-family module registers its
simulations in (``@NODES.node("KSampler")``).

A simulation is ``async def run(ctx, inputs) -> (outputs, ui)``: ``inputs`` holds the
node's input values by name (linked ones already resolved), ``outputs`` one value per
output slot, ``ui`` what goes into ``executed`` and the history (or None).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, TypeVar, Unpack

from PIL import Image

from ._engine_state import Settings
from ._paths import FakePaths

__all__ = [
    "ComboFn",
    "Family",
    "IsChangedFn",
    "NodeContext",
    "NodeDef",
    "NodeOptions",
    "NodeResult",
    "RunFn",
    "ValidateFn",
]

T = TypeVar("T")

NodeResult = tuple[tuple[Any, ...], dict[str, Any] | None]
"""What a node returns: its outputs (one per output slot) and its UI output (or None)."""


class NodeContext(Protocol):
    """What the engine gives a running node."""

    @property
    def paths(self) -> FakePaths:
        """The server's folders."""
        ...

    @property
    def settings(self) -> Settings:
        """The knobs: simulated GPU time, ``disable_metadata`` (read when used)."""
        ...

    async def gpu_sleep(self, seconds: float) -> None:
        """Spend simulated GPU time; an interrupt ends it early."""
        ...

    async def progress(
        self, value: float, total: float, preview: Image.Image | None = None
    ) -> None:
        """Report ProgressBar progress (checks for an interrupt first)."""
        ...

    def send_text(self, text: str) -> None:
        """Send a binary TEXT frame for this node (to every socket, like ComfyUI)."""
        ...

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run blocking work (Pillow, files) in a worker thread."""
        ...


RunFn = Callable[[NodeContext, dict[str, Any]], Awaitable[NodeResult]]
"""A node's simulation."""
ComboFn = Callable[[FakePaths], list[str]]
"""The options of a combo input now (the files a loader lists)."""
ValidateFn = Callable[[FakePaths, dict[str, Any]], "bool | str"]
"""``VALIDATE_INPUTS``: True, or False or the reason when the inputs are invalid."""
IsChangedFn = Callable[[FakePaths, dict[str, Any]], Any]
"""``IS_CHANGED``: a value that differs when the node must run again (a file's hash)."""


class NodeOptions(TypedDict, total=False):
    """How a node type departs from a plain run of its inputs (all optional)."""

    combos: dict[str, ComboFn]
    """Combo inputs whose options are listed live (model files, input images)."""
    validate: ValidateFn
    """Custom validation of the inputs named in ``validate_inputs``."""
    validate_inputs: tuple[str, ...]
    """The inputs ``validate`` checks (their ordinary checks are skipped)."""
    is_changed: IsChangedFn
    """Part of the node's cache key besides its inputs."""


@dataclass
class NodeDef:
    """One node type: its ``object_info`` entry and how the fake runs it."""

    class_type: str
    info: dict[str, Any]
    run: RunFn
    combos: dict[str, ComboFn] = field(default_factory=dict)
    validate: ValidateFn | None = None
    validate_inputs: tuple[str, ...] = ()
    is_changed: IsChangedFn | None = None
    wildcard: bool = False

    @property
    def output_node(self) -> bool:
        """Whether ComfyUI runs it as an output (``OUTPUT_NODE``)."""
        return bool(self.info.get("output_node"))

    @property
    def return_types(self) -> tuple[Any, ...]:
        """``RETURN_TYPES``."""
        return tuple(self.info.get("output", ()))

    @property
    def hidden(self) -> dict[str, str]:
        """Hidden inputs (``prompt``, ``extra_pnginfo``, ``unique_id``)."""
        hidden = self.info.get("input", {}).get("hidden", {})
        return dict(hidden) if isinstance(hidden, dict) else {}

    def input_types(self, paths: FakePaths) -> dict[str, dict[str, Any]]:
        """``INPUT_TYPES()`` now, with combos listing the files that exist at this moment."""
        result: dict[str, dict[str, Any]] = {}
        for category, inputs in self.info.get("input", {}).items():
            result[category] = dict(inputs)
        for name, combo in self.combos.items():
            for inputs in result.values():
                if name in inputs:
                    spec = list(inputs[name])
                    spec[0] = combo(paths)
                    inputs[name] = spec
        return result

    def object_info(self, paths: FakePaths) -> dict[str, Any]:
        """The ``GET /object_info`` entry."""
        entry = dict(self.info)
        entry["input"] = self.input_types(paths)
        return entry


class Family:
    """The built-in node types one family module simulates, by class_type.

    Their ``object_info`` entries are the recorded ones (``object_info.json``); a family
    only says how each runs::

        NODES = Family()

        @NODES.node("StringLength")
        async def _string_length(ctx, inputs):
            return (len(str(inputs["string"])),), None
    """

    def __init__(self) -> None:
        self.simulations: dict[str, tuple[RunFn, NodeOptions]] = {}

    def node(self, *class_types: str, **options: Unpack[NodeOptions]) -> Callable[[RunFn], RunFn]:
        """Register the decorated function as the simulation of ``class_types``."""

        def register(run: RunFn) -> RunFn:
            for class_type in class_types:
                self.simulations[class_type] = (run, options)
            return run

        return register

    def build(self, class_type: str, info: dict[str, Any]) -> NodeDef:
        """The node type ``class_type`` with its recorded ``object_info`` entry ``info``."""
        run, options = self.simulations[class_type]
        return NodeDef(class_type, info, run, **options)
