"""The ``models`` resolver: every ``ModelRef`` must exist before anything runs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from comfytrio import ModelNotFoundError, ModelRef, UnsafeNameError
from comfytrio.hookspecs import (
    BaseAssetResolver,
    InstanceTarget,
    JobContext,
    run_concurrently,
    safe_join,
)

__all__ = ["ModelCheck", "find_missing", "listing_targets", "model_path"]

logger = logging.getLogger("comfytrio_std")


def model_path(root: Path, ref: ModelRef) -> Path:
    """``root/type/name``; raises ``UnsafeNameError`` when ``type`` is not one plain folder
    name or ``name`` could escape it (``..``, absolute, backslash)."""
    if "/" in ref.type:
        raise UnsafeNameError(ref.type, str(root))
    return safe_join(safe_join(root, ref.type), ref.name)


def listing_targets(job: JobContext) -> list[InstanceTarget]:
    """The targets whose models are checked through ``GET /models/{type}``: the remote ones
    (no ``input_dir``), or all of them when there is no local ``models_path``."""
    if job.models_path is None:
        return list(job.targets)
    return [t for t in job.targets if t.input_dir is None]


async def find_missing(
    refs: Sequence[ModelRef], *, root: Path | None, targets: Sequence[InstanceTarget]
) -> tuple[list[ModelRef], str]:
    """The refs missing on disk (under ``root``, unless None) or from the ``/models`` list of
    one of ``targets``, and where they were missing. Every check runs at once."""
    missing: dict[ModelRef, None] = {}
    places: dict[str, None] = {}
    checks: list[Callable[[], Awaitable[None]]] = []

    if root is not None:
        local = root

        def on_disk(ref: ModelRef) -> Callable[[], Awaitable[None]]:
            async def check() -> None:
                if not await trio.Path(model_path(local, ref)).is_file():
                    missing[ref] = None
                    places[str(local)] = None

            return check

        checks += [on_disk(ref) for ref in refs]

    def on_server(target: InstanceTarget, folder: str) -> Callable[[], Awaitable[None]]:
        async def check() -> None:
            # Windows servers list sub-folders with backslashes.
            listed = {n.replace("\\", "/") for n in await target.list_models(folder)}
            for ref in refs:
                if ref.type == folder and ref.name not in listed:
                    missing[ref] = None
                    places[f"ComfyUI {target.name}"] = None

        return check

    for target in targets:
        checks += [on_server(target, folder) for folder in dict.fromkeys(r.type for r in refs)]
    await run_concurrently(checks)
    ordered = [ref for ref in refs if ref in missing]
    return list(dict.fromkeys(ordered)), " and ".join(sorted(places))


class ModelCheck(BaseAssetResolver):
    """``models``: each ``ModelRef(type, name)`` must be a file under ``models_path/type/``
    and, for a remote server, be listed by its ``/models/{type}``."""

    name = "models"

    def check(self, job: JobContext) -> None:
        """Refuse a model type or name that could escape its folder (``UnsafeNameError``)."""
        for ref in job.models:
            model_path(job.models_path or Path("models"), ref)

    async def resolve(self, job: JobContext) -> None:
        """Raise ``ModelNotFoundError`` naming every missing model (not just the first)."""
        if not job.models:
            return
        missing, where = await find_missing(
            job.models, root=job.models_path, targets=listing_targets(job)
        )
        if missing:
            raise ModelNotFoundError(missing, where)
        logger.debug("all %d model(s) found", len(job.models))
