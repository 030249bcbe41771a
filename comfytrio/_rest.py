"""The REST calls of one ComfyUI server: every HTTP request a client makes, and how a failed
one becomes a comfytrio error.

Every request goes through the private methods of ``RestCalls`` (``_get``, ``_post``,
``_upload``, ``_send_prompt`` and, for downloads, ``HttpClient.stream``), all on one
``HttpClient`` (``_http.py``) per server, and every transport failure (an ``HTTPError``)
through ``_transport_errors`` (or, for ``POST /prompt``, ``SendFailed``). Removing a prompt
from the server (``cancel_prompt``, and ``cancel_abandoned`` for those given up on) is here
too. ``make_http`` builds the HTTP client of a server, ``wait_server_ready`` polls one that
is starting.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import trio

from . import _firewall as firewall
from ._errors import (
    ComfyAPIError,
    ComfyUITimeoutError,
    DownloadError,
    ServerLostError,
    ServerProtocolError,
    WorkflowError,
)
from ._files import atomic_file
from ._http import ConnectError, HttpClient, HTTPError, HTTPTimeout, encode_multipart
from ._prompts import Prompts
from ._results import OutputRef

__all__ = [
    "RestCalls",
    "SendFailed",
    "instance_name",
    "make_http",
    "refused",
    "wait_server_ready",
]

logger = logging.getLogger("comfytrio.client")

T = TypeVar("T")


def instance_name(base_url: str) -> str:
    """A server's short name: ``host:port`` and any path of its URL."""
    parts = urlsplit(base_url)
    return parts.netloc + parts.path.rstrip("/")


@contextmanager
def _transport_errors(instance: str, what: str) -> Iterator[None]:
    """Turn transport failures into ServerLostError naming the server and the call."""
    try:
        yield
    except HTTPError as exc:
        raise ServerLostError(instance, f"{what} failed: {exc!r}") from exc


class SendFailed(Exception):
    """``POST /prompt`` failed on the way (``cause``, the transport's error): ``maybe_sent``
    when the request may have reached the server, ``timed_out`` when no answer came in time
    (the server may still be validating it)."""

    def __init__(self, cause: Exception, *, maybe_sent: bool, timed_out: bool) -> None:
        self.cause = cause
        self.maybe_sent = maybe_sent
        self.timed_out = timed_out
        super().__init__(repr(cause))


def make_http(base: str, ssl_context: ssl.SSLContext | None) -> HttpClient:
    """The HTTP client of the server at ``base``: 60 s per read or write, 10 s to connect,
    the proxy of the environment."""
    return HttpClient(base, ssl_context=ssl_context, timeout=60.0, connect_timeout=10.0)


async def wait_server_ready(
    url: str,
    *,
    timeout: float = 120.0,
    http: HttpClient | None = None,
    interval: float = 0.1,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Poll ``GET /system_stats`` until it answers 200; return its JSON. Without ``http``,
    each poll has 5 s, and ``ssl_context`` checks an https server's certificate (default:
    ``default_ssl_context()``).

    Raises ``ComfyUITimeoutError`` when it did not answer in ``timeout`` seconds.
    """
    owned = http is None
    client = http or HttpClient(url, ssl_context=ssl_context, timeout=5.0, connect_timeout=5.0)
    last: str = "no answer"
    try:
        with trio.move_on_after(timeout):
            while True:
                try:
                    r = await client.request("GET", url.rstrip("/") + "/system_stats")
                    if r.status_code == 200:
                        return firewall.system_stats(firewall.loads(r.content, "/system_stats"))
                    last = f"HTTP {r.status_code}"
                except firewall.Malformed as exc:  # not ComfyUI (yet): a proxy's page, say
                    last = str(exc)
                except HTTPError as exc:
                    last = repr(exc)
                await trio.sleep(interval)
                interval = min(interval * 1.5, 1.0)
    finally:
        if owned:
            await client.aclose()
    raise ComfyUITimeoutError(
        f"ComfyUI at {url} was not ready after {timeout:g} s (last: {last})",
        instance=instance_name(url),
        timeout=timeout,
    )


class RestCalls:
    """The REST calls of ``ComfyClient`` (a mixin: the client holds the fields below)."""

    url: str
    """Base URL of the server."""
    name: str
    """The server's name, for errors."""
    http: HttpClient
    """The one HTTP client for this server."""
    cancel_timeout: float
    """At most this long is spent removing a cancelled or timed-out prompt from the server."""
    _prompts: Prompts
    _malformed_count: int

    # ------------------------------------------------------------------ the HTTP primitives

    async def _get(self, path: str, *, new_connection: bool = False) -> tuple[int, bytes]:
        """``GET path`` (on a new connection when ``new_connection``): its status and body."""
        with _transport_errors(self.name, f"GET {path}"):
            r = await self.http.request("GET", path, new_connection=new_connection)
        return r.status_code, r.content

    async def _post(self, path: str, body: Any) -> None:
        """``POST path`` with a JSON ``body`` that may be sent twice (a delete, an
        interrupt); its answer does not matter."""
        await self._post_status(path, body)

    async def _post_status(self, path: str, body: Any) -> int:
        """``POST path`` with a JSON ``body`` that may be sent twice: its status."""
        with _transport_errors(self.name, f"POST {path}"):
            r = await self.http.request("POST", path, json=body, idempotent=True)
        return r.status_code

    async def _upload(
        self, path: str, fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes]]
    ) -> tuple[int, bytes]:
        """``POST path`` as ``multipart/form-data``: its status and body."""
        parts = {
            key: (name, data, "application/octet-stream") for key, (name, data) in files.items()
        }
        body, content_type = encode_multipart(fields, parts)
        with _transport_errors(self.name, f"POST {path}"):
            r = await self.http.request(
                "POST", path, content=body, headers={"Content-Type": content_type}
            )
        return r.status_code, r.content

    async def _send_prompt(self, body: Mapping[str, Any]) -> tuple[int, Any]:
        """``POST /prompt`` once: its status and answer (JSON, or text when it is none).
        Raises ``SendFailed``: ``maybe_sent`` unless no connection was made (``ConnectError``:
        nothing left), ``timed_out`` when no answer came in time (``HTTPTimeout``)."""
        try:
            r = await self.http.request("POST", "/prompt", json=body)
        except ConnectError as exc:  # nothing was sent (a ConnectTimeout too)
            raise SendFailed(exc, maybe_sent=False, timed_out=False) from exc
        except HTTPError as exc:
            timed_out = isinstance(exc, HTTPTimeout)
            raise SendFailed(exc, maybe_sent=True, timed_out=timed_out) from exc
        try:
            return r.status_code, firewall.loads(r.content, "the answer")
        except firewall.Malformed:
            return r.status_code, r.content.decode("utf-8", "replace")

    def _is_closed(self) -> bool:
        """Whether the HTTP client was closed (no request can go out)."""
        return self.http.is_closed

    # ------------------------------------------------------------------ checked answers

    async def _get_json(
        self, path: str, check: Callable[[Any], T], new_connection: bool = False
    ) -> T:
        """``GET path``, its JSON answer passed through ``check`` (a firewall function).
        ``ServerLostError`` for an HTTP error (a proxy's 502, say), ``ServerProtocolError``
        for an answer ComfyUI never gives."""
        status, content = await self._get(path, new_connection=new_connection)
        if status != 200:
            raise ServerLostError(self.name, f"GET {path} answered HTTP {status}")
        return self._checked(content, f"the answer of GET {path}", check)

    def _checked(self, content: bytes, what: str, check: Callable[[Any], T]) -> T:
        """The JSON ``content`` passed through ``check``; ``ServerProtocolError`` when it
        is not what ComfyUI answers."""
        try:
            return check(firewall.loads(content, what))
        except firewall.Malformed as exc:
            raise self._protocol_error(str(exc)) from None

    def _protocol_error(self, detail: str, prompt_id: str | None = None) -> ServerProtocolError:
        """An answer ComfyUI never gives: counted, and the error for the call that got it."""
        self._malformed_count += 1
        logger.warning("%s: malformed answer: %s", self.name, detail)
        return ServerProtocolError(self.name, detail, prompt_id=prompt_id)

    # ------------------------------------------------------------------ the calls

    async def system_stats(self, *, new_connection: bool = False) -> dict[str, Any]:
        """``GET /system_stats``: versions, devices, memory (on a new connection when
        ``new_connection``: a health probe's second try)."""
        return await self._get_json("/system_stats", firewall.system_stats, new_connection)

    async def object_info(self) -> dict[str, Any]:
        """``GET /object_info``: every node class the server knows, with its inputs."""
        return await self._get_json("/object_info", firewall.object_info)

    async def list_models(self, folder: str) -> list[str]:
        """``GET /models/{folder}``: the model files the server sees (empty for an unknown
        folder)."""
        status, content = await self._get(f"/models/{folder}")
        if status == 404:
            return []
        if status != 200:
            raise ServerLostError(self.name, f"GET /models/{folder} answered HTTP {status}")
        return self._checked(content, f"GET /models/{folder}", firewall.model_names)

    async def queue(self) -> dict[str, Any]:
        """``GET /queue``: ``queue_running`` and ``queue_pending``."""
        return await self._get_json("/queue", firewall.queue_answer)

    async def queued_prompt_ids(self) -> set[str]:
        """The ids of every prompt running or pending on the server."""
        running, pending = firewall.queue_ids(await self.queue())
        return running | pending

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """``GET /history/{id}``: the entry of a finished prompt, or None."""
        answer = await self._get_json(f"/history/{prompt_id}", firewall.history_answer)
        return answer.get(prompt_id)

    async def _knows_prompt(self, prompt_id: str) -> bool:
        """Whether the server has the prompt: queued, running or finished."""
        if prompt_id in await self.queued_prompt_ids():
            return True
        return await self.history(prompt_id) is not None

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stop the running prompt (only if it is ``prompt_id``, when
        given)."""
        await self._post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    async def delete_from_queue(self, prompt_ids: list[str]) -> None:
        """``POST /queue {"delete": ids}``: remove pending prompts."""
        await self._post("/queue", {"delete": prompt_ids})

    async def free(self, *, unload_models: bool = False, free_memory: bool = True) -> None:
        """``POST /free``: drop cached results (and models), so the next prompt runs anew."""
        await self._post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    # ------------------------------------------------------------------ removing prompts

    async def cancel_abandoned(self) -> None:
        """Remove from the server the prompts we gave up on while it was unreachable (they
        were sent again elsewhere), so a server that comes back does not run them too."""
        abandoned = self._prompts.take_abandoned()
        for prompt_id in abandoned:
            await self._cancel_shielded(prompt_id)
        if abandoned:
            logger.info("%s: removed %d abandoned prompt(s)", self.name, len(abandoned))

    async def _cancel_shielded(self, prompt_id: str) -> None:
        """``cancel_prompt`` even while our caller is being cancelled, bounded in time so a
        hung server cannot hold the caller forever."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + self.cancel_timeout):
            await self.cancel_prompt(prompt_id)

    async def cancel_prompt(self, prompt_id: str) -> None:
        """Remove a prompt from the server: delete it if pending, interrupt it if running.

        Deleting first and interrupting second leaves no gap: a prompt that was pending is
        gone, one that already ran is hit by the targeted interrupt (a no-op for an id that
        is not running). Never raises for a server that is gone.
        """
        try:
            if self._is_closed():
                raise ServerLostError(self.name, "the client is closed")
            await self._post("/queue", {"delete": [prompt_id]})
            await self._post("/interrupt", {"prompt_id": prompt_id})
        except ServerLostError as exc:
            logger.warning("%s: could not cancel prompt %s: %s", self.name, prompt_id, exc)
        self._prompts.cancelled(prompt_id)
        logger.debug("%s: cancelled prompt %s", self.name, prompt_id)

    # ------------------------------------------------------------------ files

    async def upload_image(
        self,
        filename: str,
        data: bytes,
        *,
        subfolder: str = "",
        overwrite: bool = True,
        type: str = "input",
    ) -> str:
        """``POST /upload/image``; return the name to put into ``LoadImage.inputs.image``
        (``subfolder/name`` when a sub-folder is used)."""
        fields = {
            "overwrite": "true" if overwrite else "false",
            "type": type,
            "subfolder": subfolder,
        }
        status, content = await self._upload("/upload/image", fields, {"image": (filename, data)})
        if status != 200:
            raise ComfyAPIError(
                f"ComfyUI {self.name}: upload of {filename!r} refused (HTTP {status})"
            )
        name, sub = self._checked(content, "POST /upload/image", firewall.upload_answer)
        return f"{sub}/{name}" if sub else name

    async def download(self, ref: OutputRef, dest: Path, *, max_bytes: int | None = None) -> Path:
        """``GET /view`` an output into ``dest``, atomically (a partial file never stays).

        The body is kept in memory up to ``_files.SPILL_BYTES`` bytes, so a usual image costs
        one worker-thread call (folder, write, fsync, rename) instead of one per step and
        chunk. A body over ``max_bytes`` (None: no cap) is refused. Bound it in time with a
        cancel scope. Raises ``ServerLostError`` when the server fails mid-body,
        ``DownloadError`` when the file cannot be written (disk full, no permission) or is
        over the cap, ``ComfyAPIError`` for an HTTP error.
        """
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        url = f"{self.url}/view?{urlencode(params)}"
        async with atomic_file(dest, url) as out:
            with _transport_errors(self.name, "GET /view"):
                async with self.http.stream("GET", "/view", params=params) as r:
                    if r.status_code != 200:
                        raise ComfyAPIError(
                            f"ComfyUI {self.name}: GET /view of {ref.subfolder}/{ref.filename} "
                            f"answered HTTP {r.status_code}"
                        )
                    async for chunk in r.aiter_bytes():
                        if max_bytes is not None and out.size + len(chunk) > max_bytes:
                            raise DownloadError(url, f"the output is over the {max_bytes}-byte cap")
                        await out.write(chunk)
            await out.commit()
        return dest


def refused(
    answer: Any, status: int, instance: str, prompt_id: str
) -> WorkflowError | ServerLostError:
    """The error for a ``POST /prompt`` that was not accepted: ComfyUI's own refusal
    (``WorkflowError``), or a gateway's error page (``ServerLostError``: try elsewhere)."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        node_errors = answer.get("node_errors")
        return WorkflowError(
            answer["error"],
            node_errors if isinstance(node_errors, dict) else {},
            status_code=status,
            instance=instance,
            prompt_id=prompt_id,
        )
    text = str(answer).strip()[:500] if answer else ""
    if status >= 500:
        return ServerLostError(
            instance, f"POST /prompt answered HTTP {status}: {text[:120]}", prompt_id=prompt_id
        )
    return WorkflowError(
        {"type": "http_error", "message": f"HTTP {status}", "details": text},
        {},
        status_code=status,
        instance=instance,
        prompt_id=prompt_id,
    )
