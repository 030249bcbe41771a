"""A submitted job checked on the servers before it is accepted (the spec's synchronous
validation): what ComfyUI would refuse is refused now, with every problem named."""

from __future__ import annotations

from typing import Any

from .._api import ComfyAPI
from .._errors import ComfyAPIError
from ._problems import ApiProblem
from ._submit import Submission

__all__ = ["check_on_fleet"]


async def check_on_fleet(
    api: ComfyAPI,
    submission: Submission,
    workflow: dict[str, Any],
    params: dict[str, dict[str, Any]],
) -> None:
    """Check the job on the servers ready now (``ComfyAPI.check_workflow``: node classes,
    inputs, values, model names, params); raise ``ApiProblem`` 422 ``invalid_workflow``
    with ``details.node_errors`` (node id -> what is wrong with which input) and
    ``details.problems`` (every problem), 422 ``invalid_request`` for a bad seed, 429
    ``deployment_not_ready`` when no server is ready."""
    try:
        report = await api.check_workflow(workflow, **submission.options(params))
    except ValueError as exc:
        raise ApiProblem(422, "invalid_request", str(exc)) from exc
    except ComfyAPIError as exc:  # no server ready
        raise ApiProblem(
            429,
            "deployment_not_ready",
            f"no ComfyUI server is ready yet ({exc}); retry later",
            retry_after=5,
        ) from exc
    if not report.problems:
        return
    node_errors: dict[str, list[dict[str, Any]]] = {}
    for problem in report.problems:
        if problem.node_id is not None:
            node_errors.setdefault(problem.node_id, []).append(
                {
                    "field": problem.input_name,
                    "reason": problem.kind,
                    "message": problem.message,
                    "class_type": problem.class_type,
                    "title": problem.title,
                }
            )
    first = report.problems[0]
    raise ApiProblem(
        422,
        "invalid_workflow",
        first.message
        + (f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""),
        details={
            "node_errors": node_errors,
            "problems": [
                {"kind": p.kind, "message": p.message, "param": p.param, "node_id": p.node_id}
                for p in report.problems
            ],
        },
    )
