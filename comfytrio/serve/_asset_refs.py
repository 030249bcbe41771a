"""``core/ASSET`` references in a submitted workflow, turned into comfytrio ``image`` params.

The spec puts ``{"__type": "core/ASSET", "info": {"id": ...}}`` where a file name goes (a
``LoadImage``'s ``image``). Each becomes an ``image`` param whose value is the asset's blob
here, mapped to that node's input (``"TITLE.INPUT"``): the standard image type uploads it to
the servers that run the job, whichever they are, under a name made of its hash.

A node with no title, or one it shares with other nodes, gets a title of its own
(``core/ASSET node <id>``): ComfyUI ignores titles, and the mapping must reach that node
only. Only images pass this way (``image/*`` assets).
"""

from __future__ import annotations

import json
from typing import Any

from ._assets import AssetStore
from ._problems import ApiProblem
from ._records import AssetRecord
from ._submit import Submission

__all__ = ["resolve_asset_refs"]


def _title(node: Any) -> str | None:
    meta = node.get("_meta") if isinstance(node, dict) else None
    title = meta.get("title") if isinstance(meta, dict) else None
    return title if isinstance(title, str) else None


def _mapped_titles(params: dict[str, dict[str, Any]]) -> set[str]:
    """Every title the params' ``node_mappings`` may name (``"T.input"`` counts as ``T``)."""
    found: set[str] = set()
    for param in params.values():
        mappings = param.get("node_mappings")
        for mapping in [mappings] if isinstance(mappings, str) else mappings or []:
            if isinstance(mapping, str):
                found.update({mapping, mapping.rsplit(".", 1)[0]})
    return found


async def resolve_asset_refs(
    submission: Submission, assets: AssetStore
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The workflow to run and its params. Raises ``ApiProblem``: 422 ``missing_asset``
    (an id no upload has; ``details.missing_ids``), 422 ``invalid_workflow`` (an asset that
    is not an image), 422 ``invalid_request`` (a node whose shared title the params map)."""
    workflow: dict[str, Any] = json.loads(json.dumps(submission.workflow))
    params = dict(submission.params)
    missing: list[str] = []
    found: dict[str, AssetRecord] = {}
    for use in submission.assets:
        try:
            found[use.asset_id] = await assets.get(use.asset_id)
        except ApiProblem:
            missing.append(use.asset_id)
    if missing:
        ids = sorted(set(missing))
        raise ApiProblem(
            422,
            "missing_asset",
            f"no asset {', '.join(ids)}: upload it with POST /api/v2/assets first",
            details={"missing_ids": ids},
        )
    titles = [_title(node) for node in workflow.values()]
    mapped = _mapped_titles(params)
    for use in submission.assets:
        asset = found[use.asset_id]
        if not asset.content_type.startswith("image/"):
            raise ApiProblem(
                422,
                "invalid_workflow",
                f"node {use.node_id} input {use.input_name!r}: asset {asset.id} is "
                f"{asset.content_type}; comfytrio serve passes image assets only",
                details={"node_errors": {use.node_id: [{"field": use.input_name}]}},
            )
        node = workflow[use.node_id]
        title = _title(node)
        if title is None or titles.count(title) > 1:
            if title is not None and title in mapped:
                raise ApiProblem(
                    422,
                    "invalid_request",
                    f"node {use.node_id} holds a core/ASSET but shares its title {title!r} "
                    "with other nodes that comfytrio.params map: give it a title of its own",
                )
            title = f"core/ASSET node {use.node_id}"
            node.setdefault("_meta", {})["title"] = title
        node["inputs"][use.input_name] = asset.file_path or f"{asset.id}.png"
        params[f"core/ASSET {use.node_id}.{use.input_name}"] = {
            "type": "image",
            "value": str(assets.blob_path(asset)),
            "node_mappings": f"{title}.{use.input_name}",
        }
    return workflow, params
