"""A finished prompt's outputs as files on this machine: read in place from a local instance's
folders, else downloaded (all of a shard's files at once, within the shard's timeout); the
images its output nodes sent over the websocket (``SaveImageWebsocket``) written next to the
downloads, type ``websocket``."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from ._concurrency import run_concurrently
from ._errors import ComfyUITimeoutError, ServerProtocolError, UnsafeNameError
from ._files import atomic_file, output_path
from ._instance import Instance
from ._results import OutputRef, PromptResult, StreamedImage
from ._types import OutputFile

__all__ = ["OutputCollector"]

_DOWNLOADS_PER_SHARD = 8
"""How many of one shard's outputs are downloaded at the same time."""


@attrs.frozen
class OutputCollector:
    """Collects outputs: those of remote servers into ``download_dir/<job>/<instance>/``,
    each file at most ``max_bytes``."""

    download_dir: Path
    """Where the outputs of remote servers go."""
    max_bytes: int
    """The size cap of one downloaded file."""

    async def collect(
        self, result: PromptResult, instance: Instance, job_id: str, timeout: float
    ) -> list[OutputFile]:
        """``result``'s outputs as files, in ``timeout`` seconds (the shard's): a server that
        sends its files too slowly fails the shard with ``ComfyUITimeoutError`` (no partial
        file is left). A name that would leave its folder is a ``ServerProtocolError``."""
        folder = self.download_dir / job_id / re.sub(r"[^A-Za-z0-9_.-]", "_", instance.name)
        files = result.files  # walked once: each access reads the outputs again
        try:
            paths: list[Path | None] = [instance.local_path(ref) for ref in files]
            dests = {
                i: output_path(folder, ref.subfolder, ref.filename)
                for i, ref in enumerate(files)
                if paths[i] is None
            }
        except UnsafeNameError as exc:  # the server's names, not the caller's
            raise ServerProtocolError(
                instance.name,
                f"an output name {exc.name!r} would leave its folder",
                prompt_id=result.prompt_id,
            ) from exc
        if not dests and not result.images:  # all read in place: nothing to wait for
            return _found(result, instance, files, paths)
        with trio.move_on_after(timeout):
            return await self._collect(result, instance, folder, files, paths, dests)
        raise ComfyUITimeoutError(
            f"ComfyUI {instance.name}: the outputs of prompt {result.prompt_id} were not "
            f"downloaded in {timeout:g} s (the shard's timeout)",
            instance=instance.name,
            prompt_id=result.prompt_id,
            timeout=timeout,
        )

    async def _collect(
        self,
        result: PromptResult,
        instance: Instance,
        folder: Path,
        files: list[OutputRef],
        paths: list[Path | None],
        dests: dict[int, Path],
    ) -> list[OutputFile]:
        """Download the files not read in place (``dests``: where each goes, by index in
        ``files``) and write the streamed images into ``folder``."""
        missing = list(dests)
        if missing:
            client = instance.client
            assert client is not None
            limit = trio.Semaphore(_DOWNLOADS_PER_SHARD)

            def fetching(index: int) -> Callable[[], Awaitable[None]]:
                ref = files[index]

                async def fetch() -> None:
                    async with limit:
                        paths[index] = await client.download(
                            ref, dests[index], max_bytes=self.max_bytes
                        )

                return fetch

            if len(missing) == 1:
                await fetching(missing[0])()
            else:
                await run_concurrently(fetching(i) for i in missing)
        found = _found(result, instance, files, paths)
        for image in result.images:
            found.append(await _write_streamed(image, folder, instance.name, result.prompt_id))
        return found


def _found(
    result: PromptResult, instance: Instance, files: list[OutputRef], paths: list[Path | None]
) -> list[OutputFile]:
    """The ``OutputFile`` of each of ``files``, at ``paths`` (each is known by now)."""
    name, prompt = instance.name, result.prompt_id
    return [
        OutputFile(str(path), name, prompt, ref.node_id, ref.filename, ref.subfolder, ref.type)
        for ref, path in zip(files, paths, strict=True)
    ]


async def _write_streamed(
    image: StreamedImage, folder: Path, instance: str, prompt_id: str
) -> OutputFile:
    """An image sent over the websocket, written atomically as
    ``ws_<prompt>_<node>_<index>.<png|jpg>`` into ``folder``."""
    node = re.sub(r"[^A-Za-z0-9_.-]", "_", image.node_id)
    filename = f"ws_{prompt_id}_{node}_{image.index:05}.{image.extension}"
    dest = output_path(folder, "", filename)
    async with atomic_file(dest) as out:
        await out.write(image.data)
        await out.commit()
    return OutputFile(str(dest), instance, prompt_id, image.node_id, filename, "", "websocket")
