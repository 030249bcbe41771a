"""A job's outputs made assets: each output file once (whichever event brought it first), and
each non-file value (a ``PreviewAny`` text, say) as a text asset, so nothing a workflow
produced is dropped from the v2 job."""

from __future__ import annotations

import json
import mimetypes
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import attrs

from .._types import OutputFile, OutputValue
from ._assets import AssetStore
from ._records import AssetRecord
from ._wire import output_kind

__all__ = ["OutputRegistry"]


@attrs.define(eq=False)
class OutputRegistry:
    """The outputs of one job, as assets."""

    assets: AssetStore
    """Where they are kept."""
    job_id: str
    """The job."""
    expires_at: float
    """When they go (with the job)."""
    download_dir: Path | None = None
    """Where the api downloads outputs of remote servers: a file there is moved into the
    asset store, not copied (it is ours; a file in a local ComfyUI's output folder is not)."""
    seen: set[str] = attrs.field(factory=set)
    """Output files (paths) and values (prompt/node/key) already made assets."""
    paths: dict[str, str] = attrs.field(factory=dict)
    """The output file each asset was made of, by asset id."""

    def _ours(self, path: Path) -> bool:
        return self.download_dir is not None and path.resolve().is_relative_to(
            self.download_dir.resolve()
        )

    async def add(
        self, files: Sequence[OutputFile], values: Sequence[OutputValue]
    ) -> list[AssetRecord]:
        """Make the new ones assets (the blob copied in, the file left as it is); return
        them in order."""
        added: list[AssetRecord] = []
        for file in files:
            if file.path in self.seen:
                continue
            self.seen.add(file.path)
            content_type = mimetypes.guess_type(file.filename)[0] or "application/octet-stream"
            asset = await self.assets.add_file(
                Path(file.path),
                content_type=content_type,
                file_path=file.filename,
                job_id=self.job_id,
                node_id=file.node_id,
                kind=output_kind(file.filename),
                expires_at=self.expires_at,
                move=self._ours(Path(file.path)),
            )
            self.paths[asset.id] = file.path
            added.append(asset)
        for value in values:
            key = f"{value.prompt_id}/{value.node_id}/{value.key}"
            if key in self.seen:
                continue
            self.seen.add(key)
            text = all(isinstance(v, str) for v in value.values)
            data = ("\n".join(value.values) if text else json.dumps(value.values)).encode()

            async def chunks(data: bytes = data) -> AsyncIterator[bytes]:
                yield data

            asset, _ = await self.assets.add_stream(
                chunks(),
                content_type="text/plain" if text else "application/json",
                file_path=f"{value.node_id}_{value.key}_{value.shard}.{'txt' if text else 'json'}",
                job_id=self.job_id,
                node_id=value.node_id,
                kind="text",
                expires_at=self.expires_at,
            )
            added.append(asset)
        return added
