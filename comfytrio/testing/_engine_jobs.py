"""Jobs, as later ComfyUI versions' ``/api/jobs`` report them: one shape for a prompt that is
pending, running or finished.

Read from Comfy-Org/ComfyUI ``comfy_execution/jobs.py`` (commit ``172be438``, the 0.38
line): a job is ``{id, status, priority, create_time, execution_start_time,
execution_end_time, execution_error, outputs_count, previewable_outputs_count,
preview_output, workflow_id}`` with the keys whose value is None left out; one job looked
up alone adds ``outputs``, ``execution_status`` and ``workflow {prompt, extra_data}`` (a
queued one only ``workflow``). ``status`` is ``pending``, ``in_progress``, ``completed``,
``failed`` or ``cancelled`` (an interrupted prompt).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["JOB_STATUSES", "job_of", "list_jobs"]

JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
"""``JobStatus.ALL``."""

_PREVIEWABLE = frozenset({"images", "video", "audio", "3d", "text"})
_THREE_D = (".obj", ".fbx", ".gltf", ".glb", ".usdz")
_TEXT_FILES = (".txt", ".md", ".json")
_TEXT_PREVIEW_MAX = 1024


def _pruned(job: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in job.items() if value is not None}


def _metadata(extra_data: Mapping[str, Any]) -> tuple[Any, Any]:
    pnginfo = extra_data.get("extra_pnginfo") or {}
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, Mapping) else None
    workflow_id = workflow.get("id") if isinstance(workflow, Mapping) else None
    return extra_data.get("create_time"), workflow_id


def _file_item(item: Any) -> dict[str, Any] | None:
    if isinstance(item, dict):
        return item
    if isinstance(item, str) and item.lower().endswith(_THREE_D):
        return {"filename": item, "type": "output", "subfolder": "", "mediaType": "3d"}
    return None


def _previewable(media_type: str, item: Mapping[str, Any]) -> bool:
    if media_type in _PREVIEWABLE:
        return True
    fmt = str(item.get("format", ""))
    if fmt.startswith(("video/", "audio/")):
        return True
    return str(item.get("filename", "")).lower().endswith(_THREE_D + _TEXT_FILES)


def _media_items(outputs: Mapping[str, Any]) -> Iterable[tuple[str, str, list[Any]]]:
    for node_id, node_outputs in outputs.items():
        if isinstance(node_outputs, Mapping):
            for media_type, items in node_outputs.items():
                if media_type != "animated" and isinstance(items, list):
                    yield node_id, media_type, items


def _summary(outputs: Mapping[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    """(outputs_count, previewable_outputs_count, preview_output), as ``jobs.py`` counts."""
    count = previewable = 0
    best: dict[str, Any] | None = None
    fallback = text_file = text = None
    for node_id, media_type, items in _media_items(outputs):
        for raw in items:
            item = _file_item(raw)
            if item is None:
                if raw is not None and media_type == "text" and text is None:
                    value = str(raw[0] if isinstance(raw, (list, tuple)) and raw else raw)
                    preview: dict[str, Any] = {"content": value[:_TEXT_PREVIEW_MAX]}
                    if len(value) > _TEXT_PREVIEW_MAX:
                        preview["truncated"] = True
                    text = {**preview, "nodeId": node_id, "mediaType": media_type}
                continue
            count += 1
            if not _previewable(media_type, item):
                continue
            previewable += 1
            enriched = {**item, "nodeId": node_id}
            enriched.setdefault("mediaType", media_type)
            is_text = media_type == "text" or str(item.get("filename", "")).lower().endswith(
                _TEXT_FILES
            )
            if best is not None:
                continue
            if is_text:
                text_file = text_file or enriched
            elif item.get("type") == "output":
                best = enriched
            else:
                fallback = fallback or enriched
    return count, previewable, best or fallback or text_file or text


def _normalized_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, Mapping):
            result[node_id] = node_outputs
            continue
        result[node_id] = {
            media_type: (
                [_file_item(i) or i for i in items if i is not None]
                if media_type != "animated" and isinstance(items, list)
                else items
            )
            for media_type, items in node_outputs.items()
        }
    return result


def _queued_job(item: list[Any], status: str, detail: bool) -> dict[str, Any]:
    number, prompt_id, prompt, extra_data, _ = item
    create_time, workflow_id = _metadata(extra_data)
    job = _pruned(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            "create_time": create_time,
            "outputs_count": 0,
            "previewable_outputs_count": 0,
            "workflow_id": workflow_id,
        }
    )
    if detail:
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _finished_job(prompt_id: str, entry: Mapping[str, Any], detail: bool) -> dict[str, Any]:
    number, _, prompt, extra_data, _ = entry["prompt"]
    create_time, workflow_id = _metadata(extra_data)
    status_info = entry.get("status") or {}
    outputs = entry.get("outputs", {})
    count, previewable, preview = _summary(outputs)
    start = end = error = None
    interrupted = False
    for event, data in status_info.get("messages", []):
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = data if event == "execution_error" else error
            interrupted = interrupted or event == "execution_interrupted"
    status = "completed"
    if status_info.get("status_str") == "error":
        status = "cancelled" if interrupted else "failed"
    job = _pruned(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            "create_time": create_time,
            "execution_start_time": start,
            "execution_end_time": end,
            "execution_error": error,
            "outputs_count": count,
            "previewable_outputs_count": previewable,
            "preview_output": preview,
            "workflow_id": workflow_id,
        }
    )
    if detail:
        job["outputs"] = _normalized_outputs(outputs)
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def job_of(
    prompt_id: str,
    running: list[list[Any]],
    pending: list[list[Any]],
    history: Mapping[str, Any],
) -> dict[str, Any] | None:
    """``GET /api/jobs/{id}``: the job with its details, or None when nobody knows it.
    ``running``/``pending`` are ``/queue`` items, ``history`` the history by id."""
    if prompt_id in history:
        return _finished_job(prompt_id, history[prompt_id], True)
    for items, status in ((running, "in_progress"), (pending, "pending")):
        for item in items:
            if item[1] == prompt_id:
                return _queued_job(item, status, True)
    return None


def list_jobs(
    running: list[list[Any]],
    pending: list[list[Any]],
    history: Mapping[str, Any],
    *,
    statuses: Iterable[str] = JOB_STATUSES,
    workflow_id: str | None = None,
    sort_by: str = "created_at",
    descending: bool = True,
    limit: int | None = None,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """``GET /api/jobs``: one page of jobs and how many matched in all."""
    wanted = set(statuses)
    jobs: list[dict[str, Any]] = []
    if "in_progress" in wanted:
        jobs += [_queued_job(item, "in_progress", False) for item in running]
    if "pending" in wanted:
        jobs += [_queued_job(item, "pending", False) for item in pending]
    if wanted & {"completed", "failed", "cancelled"}:
        for prompt_id, entry in history.items():
            job = _finished_job(prompt_id, entry, False)
            if job["status"] in wanted:
                jobs.append(job)
    if workflow_id:
        jobs = [job for job in jobs if job.get("workflow_id") == workflow_id]

    def key(job: dict[str, Any]) -> Any:
        if sort_by == "execution_duration":
            start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
            return end - start if end and start else 0
        return job.get("create_time", 0)

    jobs.sort(key=key, reverse=descending)
    total = len(jobs)
    if offset > 0:
        jobs = jobs[offset:]
    if limit is not None:
        jobs = jobs[:limit]
    return jobs, total
