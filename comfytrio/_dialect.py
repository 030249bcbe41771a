"""How a client speaks to the server it has: ComfyUI 0.3.x, or a later version with the jobs
API. Detected, never assumed.

``GET /api/jobs?limit=1`` is asked once (on the first look-up or cancel, again after the
websocket came back: the server may have been upgraded): a 200 with ``{"jobs": [...]}`` is
the later dialect, anything else (ComfyUI 0.3.64 answers 404) the classic one. The later
routes, read from ComfyUI's ``server.py`` and ``comfy_execution/jobs.py`` of the 0.38 line
(``comfytrio.testing``'s ``0.38.1`` profile serves them):

* ``GET /api/jobs/{id}``: the job, whose ``status`` is ``pending``, ``in_progress``,
  ``completed``, ``failed`` or ``cancelled``; 404 ``{"error": "Job not found"}`` for an id
  the server never heard of (or forgot). One request tells "queued or running" from "never
  heard of it", where the classic dialect asks ``/queue`` and then ``/history/{id}``.
* ``POST /api/jobs/{id}/cancel``: interrupts the prompt if it runs, drops it if it waits;
  ``{"cancelled": bool}``. The classic dialect posts ``/queue {"delete": [id]}`` then a
  targeted ``/interrupt``.

A finished prompt's outputs are read from ``/history/{id}`` in both dialects.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import trio

from . import _firewall as firewall
from ._errors import ServerLostError, ServerProtocolError
from ._prompts import Watch
from ._rest import RestCalls
from ._session import Session

__all__ = ["JOB_STATUSES", "DialectCalls"]

logger = logging.getLogger("comfytrio.client")

JOB_STATUSES = frozenset({"pending", "in_progress", "completed", "failed", "cancelled"})
"""The ``status`` values of a job of ``/api/jobs``."""


def _job_status(answer: Any) -> str:
    """The ``status`` of a ``GET /api/jobs/{id}`` answer; ``firewall.Malformed`` when it is
    not a job."""
    if not isinstance(answer, dict):
        raise firewall.Malformed("the answer of GET /api/jobs/{id} is not an object")
    status = answer.get("status")
    if status not in JOB_STATUSES:
        raise firewall.Malformed(f"a job has the status {status!r:.40}")
    return str(status)


def _is_jobs_list(answer: Any) -> bool:
    return isinstance(answer, dict) and isinstance(answer.get("jobs"), list)


class DialectCalls(RestCalls):
    """The calls of ``ComfyClient`` whose route depends on the server's dialect (a mixin:
    the client holds the fields below)."""

    _jobs_api: bool | None
    _session: Session

    @property
    def jobs_api(self) -> bool | None:
        """True when the server has ``/api/jobs`` (later ComfyUI versions), False when it
        has not (ComfyUI 0.3.x), None before it was asked."""
        return self._jobs_api

    async def detect_jobs_api(self) -> bool:
        """Ask the server once whether it has ``/api/jobs`` (``GET /api/jobs?limit=1``)
        and remember the answer (``jobs_api``). Raises ``ServerLostError`` when it cannot
        say (unreachable, a 5xx): asked again next time."""
        if self._jobs_api is not None:
            return self._jobs_api
        status, content = await self._get("/api/jobs?limit=1")
        if status >= 500:
            raise ServerLostError(self.name, f"GET /api/jobs answered HTTP {status}")
        found = False
        if status == 200:
            try:
                found = _is_jobs_list(firewall.loads(content, "GET /api/jobs"))
            except firewall.Malformed:
                found = False
        self._jobs_api = found
        logger.info("%s: %s", self.name, "has /api/jobs" if found else "has no /api/jobs")
        return found

    def _forget_dialect(self) -> None:
        """The server may have changed (the websocket dropped): ask again next time."""
        if not self._session.connected:
            self._jobs_api = None

    async def job_status(self, prompt_id: str) -> str | None:
        """``GET /api/jobs/{id}``: the prompt's status, None when the server does not know
        it (404). Only on a server with ``/api/jobs``."""
        path = f"/api/jobs/{quote(prompt_id, safe='')}"
        status, content = await self._get(path)
        if status == 404:
            return None
        if status != 200:
            raise ServerLostError(self.name, f"GET {path} answered HTTP {status}")
        return self._checked(content, f"the answer of GET {path}", _job_status)

    async def _knows_prompt(self, prompt_id: str) -> bool:
        """Whether the server has the prompt: queued, running or finished."""
        if await self._has_jobs_api():
            return await self.job_status(prompt_id) is not None
        return await super()._knows_prompt(prompt_id)

    async def _has_jobs_api(self) -> bool:
        """``detect_jobs_api``, the classic dialect when the server cannot say."""
        try:
            return await self.detect_jobs_api()
        except ServerLostError:
            return False

    async def cancel_prompt(self, prompt_id: str) -> None:
        """Remove a prompt from the server: ``POST /api/jobs/{id}/cancel`` where the server
        has it, else delete it if pending and interrupt it if running (see
        ``RestCalls.cancel_prompt``). Never raises for a server that is gone."""
        if not self._is_closed() and await self._has_jobs_api():
            path = f"/api/jobs/{quote(prompt_id, safe='')}/cancel"
            try:
                status = await self._post_status(path, {})
            except ServerLostError as exc:
                logger.warning("%s: could not cancel prompt %s: %s", self.name, prompt_id, exc)
                self._prompts.cancelled(prompt_id)
                return
            if status == 200:
                self._prompts.cancelled(prompt_id)
                logger.debug("%s: cancelled prompt %s (%s)", self.name, prompt_id, path)
                return
            logger.info("%s: %s answered HTTP %d: cancelling as 0.3.x", self.name, path, status)
            self._jobs_api = None
        await super().cancel_prompt(prompt_id)

    async def _reconcile(self, watches: list[Watch]) -> None:
        """Settle prompts whose events we may have missed: from ``/api/jobs/{id}`` where the
        server has it, else from ``/queue`` and ``/history`` (``/queue`` first: see
        ``_prompts.py``)."""
        prompts = self._prompts
        watches = prompts.unsettled(watches)
        if not watches:
            return
        if await self._has_jobs_api():
            await self._reconcile_jobs(watches)
            return
        try:
            running, pending = firewall.queue_ids(await self.queue())
        except (ServerLostError, ServerProtocolError) as exc:
            prompts.unplaceable(watches, exc, trio.current_time())
            return
        for watch in watches:
            if watch.done.is_set() or prompts.queued(watch, running, pending, trio.current_time()):
                continue
            await self._settle_from_history(watch)

    async def _reconcile_jobs(self, watches: list[Watch]) -> None:
        """Reconcile with one ``GET /api/jobs/{id}`` per prompt: pending or running stays,
        unknown has vanished, finished is read from ``/history``."""
        prompts = self._prompts
        for watch in watches:
            if watch.done.is_set():
                continue
            try:
                status = await self.job_status(watch.prompt_id)
            except (ServerLostError, ServerProtocolError) as exc:
                prompts.unplaceable([watch], exc, trio.current_time())
                continue
            if status in ("pending", "in_progress"):
                where = {watch.prompt_id}
                running, pending = (where, set()) if status == "in_progress" else (set(), where)
                prompts.queued(watch, running, pending, trio.current_time())
            elif status is None:
                prompts.history(watch, None)
            else:
                await self._settle_from_history(watch)

    async def _settle_from_history(self, watch: Watch) -> None:
        """Settle a prompt the server no longer runs from its ``/history`` entry."""
        prompts = self._prompts
        try:
            entry = await self.history(watch.prompt_id)
        except ServerProtocolError as exc:  # this prompt's own history is malformed
            prompts.history_malformed(watch, exc)
            return
        except ServerLostError as exc:
            prompts.unplaceable([watch], exc, trio.current_time())
            return
        try:
            prompts.history(watch, entry)
        except firewall.Malformed as exc:
            self._session.malformed(f"/history: {exc}", watch.prompt_id)
