"""The ComfyUI versions the fake can speak as (``serve_fake_comfyui(comfyui_version=...)``).

``0.3.64`` is the recorded server (``tests/recordings``), the default. ``0.38.1`` adds what
later servers changed, read from Comfy-Org/ComfyUI's merged code (``server.py`` at
``002c3fb9``, ``comfy_execution/jobs.py`` at ``172be438``, ``comfy_execution/progress.py``
at ``1b71f275``; ``comfyui_version.py`` of that line says 0.38.1) and from section 7 of the
protocol notes: the jobs API (``GET /api/jobs``, ``GET /api/jobs/{id}``, ``POST
/api/jobs/{id}/cancel``, ``POST /api/jobs/cancel``), a canonical-UUID check on a
client-chosen ``prompt_id``, ``extra_data.create_time``, API keys kept out of ``/queue``,
and ``activity`` in ``progress_state``. Everything else answers as 0.3.64 does.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COMFYUI_VERSIONS", "DEFAULT_COMFYUI_VERSION", "ComfyProfile", "profile_for"]


@dataclass(frozen=True)
class ComfyProfile:
    """What one ComfyUI version does differently from another, as the fake needs it."""

    version: str
    """``comfyui_version`` in ``/system_stats``."""
    jobs_api: bool = False
    """``/api/jobs`` routes (list, one job, cancel one, cancel many)."""
    canonical_prompt_ids: bool = False
    """A client-chosen ``prompt_id`` must be a canonical UUID (else 400 ``invalid_prompt_id``);
    ``"prompt_id": null`` means "mint one" (0.3.64 took any value, ``null`` as ``"None"``)."""
    create_time: bool = False
    """``extra_data.create_time`` (ms) on every queued prompt."""
    queue_hides_api_keys: bool = False
    """The API keys of ``extra_data`` are held apart at ``POST /prompt`` (the queue item's
    6th element), so ``/queue`` and ``/api/jobs`` never show them (0.3.64 shows them in
    ``/queue`` until the prompt ran)."""
    progress_activity: bool = False
    """Samplers report ``activity: "loading"`` in ``progress_state`` before their steps."""


DEFAULT_COMFYUI_VERSION = "0.3.64"
"""The version the fake speaks unless told otherwise (the recorded one)."""

_PROFILES = {
    "0.3.64": ComfyProfile("0.3.64"),
    "0.38.1": ComfyProfile(
        "0.38.1",
        jobs_api=True,
        canonical_prompt_ids=True,
        create_time=True,
        queue_hides_api_keys=True,
        progress_activity=True,
    ),
}

COMFYUI_VERSIONS: tuple[str, ...] = tuple(_PROFILES)
"""Every version ``comfyui_version`` accepts, oldest first."""


def profile_for(version: str) -> ComfyProfile:
    """The profile of ``version``; ``ValueError`` naming the known ones otherwise."""
    profile = _PROFILES.get(str(version).strip().removeprefix("v"))
    if profile is None:
        known = ", ".join(COMFYUI_VERSIONS)
        raise ValueError(f"the fake ComfyUI speaks as {known}; not as {version!r}")
    return profile
