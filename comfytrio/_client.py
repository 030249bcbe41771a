"""The client for one ComfyUI server: submit, wait, run and cancel prompts.

``ComfyClient`` puts together its REST calls (``_rest.py``, one HTTP client, and
``_dialect.py`` for the routes that depend on the server's version), its websocket session
(``_session.py``, one websocket) and its prompts' state (``_prompts.py``, a pure state
machine).

Protocol facts this module is built on (recorded from a real ComfyUI 0.3.64, see
``comfyui-protocol/README.md``):

* We choose every ``prompt_id`` and register it *before* ``POST /prompt``: the server may run a
  small prompt before the POST even returns, and a cancel that lands mid-submit can still
  delete it by id.
* A ``POST /prompt`` that failed after it may have reached the server is looked up by its
  id (``/queue``, then ``/history``) and sent again only when the server has never heard of
  it, so a prompt never runs twice. One whose fate stays unknown is abandoned: removed from
  the server (``cancel_abandoned``) once it answers again.
* ``wait()``'s timeout counts from the prompt's start on the server (its first event), not
  from its submission: time in the server's queue is not the prompt's own.
"""

from __future__ import annotations

import logging
import math
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import trio

from . import _firewall as firewall
from ._dialect import DialectCalls
from ._errors import (
    ComfyAPIError,
    ComfyUITimeoutError,
    ServerLostError,
    WorkflowError,
    unwrapped,
)
from ._events import ComfyEvent
from ._frames import STREAMING_OUTPUT_CLASSES, Streams
from ._http import HttpClient
from ._prompts import Prompts, Watch
from ._rest import SendFailed, instance_name, make_http, refused
from ._results import ClientStatistics, PromptResult, SubmittedPrompt
from ._session import Session

__all__ = ["ComfyClient", "connect_comfy_client", "open_comfy_client"]

logger = logging.getLogger("comfytrio.client")


def _share(client: ComfyClient, attribute: attrs.Attribute[Any], value: Any) -> Any:
    """Keep a setting the prompt machine or the session reads in step with the client's."""
    for part in (client._prompts, client._session):
        if attribute.name in attrs.fields_dict(type(part)):
            setattr(part, attribute.name, value)
    return value


@attrs.define(eq=False)
class ComfyClient(DialectCalls):
    """A connection to one ComfyUI server: HTTP calls plus one websocket for events.

    Make one with ``open_comfy_client()`` (or ``connect_comfy_client()`` to run it in your own
    nursery). Every prompt is submitted with this client's ``client_id`` so its events come
    to our socket.
    """

    url: str
    """Base URL of the server, e.g. ``http://127.0.0.1:8188``."""
    name: str = attrs.field(on_setattr=_share)
    """A short name for messages and events (``host:port`` by default)."""
    client_id: str
    """The websocket ``clientId`` every prompt of this client carries."""
    http: HttpClient
    """The one HTTP client for this server: every request goes through it."""
    silence_timeout: float = attrs.field(default=30.0, on_setattr=_share)
    """After this many seconds without news of a prompt, ask ``/queue`` and ``/history``."""
    reconnect_timeout: float = attrs.field(default=30.0, on_setattr=_share)
    """How long the websocket may stay down before in-flight prompts fail with
    ``ServerLostError``."""
    cancel_timeout: float = 5.0
    """At most this long is spent removing a cancelled or timed-out prompt from the server."""
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, on_setattr=_share)
    """Checks an https server's certificate (None: ``default_ssl_context()``)."""
    output_node_classes: frozenset[str] = attrs.field(
        default=STREAMING_OUTPUT_CLASSES, on_setattr=_share
    )
    """The node classes whose images sent over the websocket are outputs of the prompt
    (``PromptResult.images``); images of any other node are previews (``NodePreview``
    events). ``ComfyAPI`` sets it to the server's output nodes (``/object_info``)."""
    max_image_bytes: int | None = attrs.field(default=None, on_setattr=_share)
    """The largest image an output node may send over the websocket (None: no cap; the
    websocket's own cap is 64 MiB a message); a larger one fails its prompt."""
    max_held_bytes: int | None = attrs.field(default=2 * 1024**3, on_setattr=_share)
    """The most bytes of images one prompt's output nodes may send over the websocket in
    all (they are held in memory until it ends); more fails the prompt."""

    _prompts: Prompts = attrs.field(init=False, repr=False)
    _session: Session = attrs.field(init=False, repr=False)
    _malformed_count: int = attrs.field(default=0, init=False)
    _jobs_api: bool | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._prompts = Prompts(self.name, self.silence_timeout, self.reconnect_timeout)
        for name in ("output_node_classes", "max_image_bytes", "max_held_bytes"):
            setattr(self._prompts, name, getattr(self, name))
        self._session = Session(
            self.url,
            self.client_id,
            self.name,
            self._prompts,
            self._reconcile,
            self.cancel_abandoned,
            self.ssl_context,
        )
        self._session.add_connection_listener(self._forget_dialect)

    # ------------------------------------------------------------------ lifecycle

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the websocket session. Raises ``ServerLostError`` (itself, not in a group)
        when the first connection fails."""
        with unwrapped(ServerLostError):
            await self._session.run(task_status)

    async def aclose(self) -> None:
        """Stop the websocket task and close every subscription and the HTTP client."""
        self._session.close()
        await self.http.aclose()

    @property
    def connected(self) -> bool:
        """Whether the websocket is up now."""
        return self._session.connected

    async def wait_connected(self) -> None:
        """Block until the websocket is up."""
        await self._session.wait_connected()

    def add_connection_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time the websocket goes up or down (``connected``
        changes). It runs in the client's task, so it must return quickly and not block."""
        self._session.add_connection_listener(callback)

    def statistics(self) -> ClientStatistics:
        """A frozen snapshot of this client's state."""
        session = self._session
        return ClientStatistics(
            instance=self.name,
            connected=session.connected,
            queue_remaining=session.queue_remaining,
            in_flight=self._prompts.in_flight(),
            reconnects=session.reconnects,
            events_dropped=session.dropped,
            malformed=self._malformed_count + session.malformed_count,
            jobs_api=self._jobs_api,
            preview_metadata=session.preview_metadata,
            frames_skipped=session.frames_skipped,
        )

    def subscribe(
        self, *, buffer: int = 1000
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[ComfyEvent]]:
        """Receive every event of this server while the block runs::

            async with client.subscribe() as events:
                async for event in events:
                    ...

        Events for a subscriber whose buffer is full are dropped (and counted in
        ``statistics().events_dropped``); prompts never wait for a slow subscriber.
        """
        return self._session.subscribe(buffer)

    @property
    def last_message_at(self) -> float:
        """``trio.current_time()`` when the websocket last brought a message (-inf before
        the first): a server that sends progress is alive, however slowly it answers HTTP."""
        return self._session.last_message_at

    def mark_lost(self, why: str) -> None:
        """Fail every prompt in flight with ``ServerLostError`` (e.g. our process exited)."""
        self._prompts.fail_all(why)

    # ------------------------------------------------------------------ prompts

    async def submit(
        self,
        workflow: Mapping[str, Any],
        *,
        prompt_id: str | None = None,
        front: bool = False,
        extra_data: Mapping[str, Any] | None = None,
        allow_partial: bool = False,
    ) -> SubmittedPrompt:
        """Queue ``workflow`` (API format) on the server; return once it is accepted.

        The prompt id is ours (a new UUID unless given) and is watched before the request
        leaves, so no event can be missed. Raises ``WorkflowError`` when ComfyUI rejects the
        workflow, and also when it accepts it but drops some outputs (200 with
        ``node_errors``; the prompt is then removed again) unless ``allow_partial`` is True.
        Raises ``ServerLostError`` when the server cannot be reached.
        """
        prompt_id = prompt_id or str(uuid.uuid4())
        watch = self._prompts.watch(prompt_id, trio.current_time())
        watch.streams = Streams.of(workflow)
        body: dict[str, Any] = {
            "prompt": workflow,
            "client_id": self.client_id,
            "prompt_id": prompt_id,
        }
        if front:
            body["front"] = True
        if extra_data:
            body["extra_data"] = dict(extra_data)
        try:
            status, answer = await self._post_prompt(watch, body)
            if status != 200:
                raise refused(answer, status, self.name, prompt_id)
            try:
                number, node_errors = firewall.prompt_answer(answer)
            except firewall.Malformed as exc:
                self._prompts.abandoned.add(prompt_id)  # it may be queued there: removed in time
                raise self._protocol_error(str(exc), prompt_id) from None
            if node_errors and not allow_partial:
                await self._cancel_shielded(prompt_id)
                raise WorkflowError(
                    {
                        "type": "outputs_dropped",
                        "message": "ComfyUI accepted the prompt but dropped invalid outputs",
                    },
                    node_errors,
                    status_code=200,
                    instance=self.name,
                    prompt_id=prompt_id,
                )
        except BaseException:
            self._prompts.forget(prompt_id)
            raise
        self._prompts.accepted(watch, trio.current_time())
        logger.debug("%s: queued prompt %s (number %s)", self.name, prompt_id, number)
        return SubmittedPrompt(prompt_id, number, node_errors)

    async def _post_prompt(self, watch: Watch, body: Mapping[str, Any]) -> tuple[int, Any]:
        """``POST /prompt``: its status and answer. A POST that failed after it may have
        reached the server (the connection broke, or closed as an idle keep-alive one) is
        looked up by its id, and sent once more only when the server has never heard of it,
        so a prompt never runs twice. Raises ``ServerLostError`` when the server cannot be
        reached or the outcome stays unknown (then the id is removed from the server once it
        answers again)."""
        prompt_id = watch.prompt_id
        try:
            return await self._send_prompt(body)
        except SendFailed as exc:
            if not exc.maybe_sent:
                raise ServerLostError(
                    self.name, f"POST /prompt failed: {exc.cause!r}"
                ) from exc.cause
            first = exc
        logger.info(
            "%s: POST /prompt of %s failed (%r): looking it up", self.name, prompt_id, first.cause
        )
        try:
            known = watch.seen or await self._knows_prompt(prompt_id)
        except ServerLostError as exc:
            why = f"the server cannot say if it has the prompt ({exc.message})"
            why = f"failed ({first.cause!r}) and {why}"
            raise self._fate_unknown(prompt_id, why) from first.cause
        if known:
            return 200, {"prompt_id": prompt_id, "number": 0, "node_errors": {}}
        if first.timed_out:
            # It may still be validating our request: sending it again could run it twice.
            raise self._fate_unknown(prompt_id, f"got no answer: {first.cause!r}") from first.cause
        try:
            return await self._send_prompt(body)
        except SendFailed as exc:
            why = f"failed twice: {first.cause!r}, then {exc.cause!r}"
            raise self._fate_unknown(prompt_id, why) from exc.cause

    def _fate_unknown(self, prompt_id: str, why: str) -> ServerLostError:
        """``POST /prompt`` of ``prompt_id`` may have landed or not: the error to raise, and
        the id is removed from the server once it answers again."""
        self._prompts.abandoned.add(prompt_id)
        return ServerLostError(self.name, f"POST /prompt {why}", prompt_id=prompt_id)

    async def wait(self, prompt_id: str, *, timeout: float = math.inf) -> PromptResult:
        """Wait for a submitted prompt to end and return its outputs.

        ``timeout`` counts from the moment the prompt starts to run on the server (its first
        event): time spent waiting in the server's queue, behind other prompts, is not the
        prompt's own.

        Raises ``ExecutionError`` (a node failed), ``ExecutionInterruptedError``,
        ``PromptVanishedError`` (it left the queue without running), ``ServerLostError``, or
        ``ComfyUITimeoutError`` when it ran for ``timeout`` seconds (the prompt is then
        removed from the server: deleted if pending, interrupted if running).
        """
        watch = self._prompts.get(prompt_id)
        if watch is None:
            raise KeyError(f"prompt {prompt_id} is not in flight on {self.name}")
        try:
            await watch.running.wait()
            with trio.move_on_at((watch.started_at or trio.current_time()) + timeout):
                await watch.done.wait()
            if not watch.done.is_set():
                await self._cancel_shielded(prompt_id)
                raise ComfyUITimeoutError(
                    f"ComfyUI {self.name}: prompt {prompt_id} ran for {timeout:g} s without "
                    "finishing (it was interrupted)",
                    instance=self.name,
                    prompt_id=prompt_id,
                    timeout=timeout,
                )
        finally:
            self._prompts.forget(prompt_id)
        outcome = watch.outcome
        if isinstance(outcome, PromptResult):
            return outcome
        assert outcome is not None
        raise outcome

    async def run(
        self,
        workflow: Mapping[str, Any],
        *,
        prompt_id: str | None = None,
        timeout: float = math.inf,
        front: bool = False,
        extra_data: Mapping[str, Any] | None = None,
    ) -> PromptResult:
        """Submit ``workflow`` and wait for its outputs (``submit`` then ``wait``). ``timeout``
        bounds the submission, then the prompt's run, counted from when it starts to run
        (time in the server's queue is not counted: see ``wait``).

        If the caller is cancelled, the prompt is deleted from the queue or interrupted on
        the server before the cancellation goes on, so it keeps no GPU busy.
        """
        prompt_id = prompt_id or str(uuid.uuid4())
        deadline = trio.current_time() + timeout
        finished = False
        try:
            with trio.move_on_at(deadline) as submitting:
                await self.submit(workflow, prompt_id=prompt_id, front=front, extra_data=extra_data)
            if submitting.cancelled_caught:
                await self._cancel_shielded(prompt_id)  # the POST may have landed
                raise ComfyUITimeoutError(
                    f"ComfyUI {self.name}: prompt {prompt_id} could not be submitted in "
                    f"{timeout:g} s",
                    instance=self.name,
                    prompt_id=prompt_id,
                    timeout=timeout,
                )
            result = await self.wait(prompt_id, timeout=timeout)
            finished = True
            return result
        except ComfyAPIError:
            finished = True
            raise
        finally:
            if not finished:
                await self._cancel_shielded(prompt_id)


async def connect_comfy_client(
    nursery: trio.Nursery,
    url: str,
    *,
    name: str | None = None,
    client_id: str | None = None,
    http: HttpClient | None = None,
    silence_timeout: float = 30.0,
    reconnect_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> ComfyClient:
    """Connect to the server at ``url`` with its websocket task running in ``nursery``.

    The advanced form of ``open_comfy_client()``: the caller owns the nursery and must call
    ``await client.aclose()``. ``ssl_context`` checks an https server's certificate (for the
    websocket, and for HTTP unless ``http`` is given); default: ``default_ssl_context()``.
    ``http``: the ``HttpClient`` every request goes through (default: one made here, 60 s
    per read or write, 10 s to connect); the client closes it. HTTP and the websocket go
    through the proxy of the environment. Raises ``ServerLostError`` when the websocket
    cannot be opened.
    """
    base = url.rstrip("/")
    if http is None:
        http = make_http(base, ssl_context)
    client = ComfyClient(
        url=base,
        name=name or instance_name(base),
        client_id=client_id or uuid.uuid4().hex,
        http=http,
        silence_timeout=silence_timeout,
        reconnect_timeout=reconnect_timeout,
        ssl_context=ssl_context,
    )
    try:
        await nursery.start(client._serve)
    except BaseException:
        await client.http.aclose()
        raise
    return client


@asynccontextmanager
async def open_comfy_client(
    url: str,
    *,
    name: str | None = None,
    client_id: str | None = None,
    silence_timeout: float = 30.0,
    reconnect_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ComfyClient]:
    """Open a client for the ComfyUI server at ``url`` (its websocket is up on entry)::

        async with open_comfy_client("http://127.0.0.1:8188") as client:
            result = await client.run(workflow)

    ``ssl_context`` checks an https server's certificate (default: ``default_ssl_context()``).
    Raises ``ServerLostError`` when the server cannot be reached.
    """
    with unwrapped():
        async with trio.open_nursery() as nursery:
            client = await connect_comfy_client(
                nursery,
                url,
                name=name,
                client_id=client_id,
                silence_timeout=silence_timeout,
                reconnect_timeout=reconnect_timeout,
                ssl_context=ssl_context,
            )
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
