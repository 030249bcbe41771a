"""Every error comfytrio raises, in one place.

The tree::

    ComfyAPIError                      base of everything below
    ├── GPUDetectionError              NVML sees GPUs but CUDA does not work
    ├── NoInstanceReadyError           .states: no server can take a job now
    ├── ModelNotFoundError             .missing: the ModelRefs not found
    ├── DownloadError                  .url, .reason (a LoRA or an image could not be fetched)
    ├── UnsafeNameError                .name, .folder (a user name would escape its folder)
    ├── ParamError                     .param: a bad entry of the ``params`` dict
    │   ├── UnknownParamTypeError      .type_name, .known
    │   ├── NodeTitleNotFoundError     .title, .available
    │   ├── NodeInputNotFoundError     .title, .node_id, .input_name, .available
    │   └── NotReproducibleError       .node_id, .title, .sampler, .reason: a split that
    │                                  would not make one GPU's images (``same_images``)
    ├── PluginError                    a plugin is broken (duplicate name, bad hook)
    ├── BrokerError                    jobs over Redis (``comfytrio.broker``)
    │   ├── BrokerUnavailableError     .url, .reason: Redis did not answer in time
    │   ├── JobNotFoundError           .job_id: no such job (never, or expired)
    │   └── IdempotencyKeyReusedError  .key, .job_id: the key already named another job
    └── ServerError                    .instance, .prompt_id, .retryable: one server's error
        ├── ComfyUIStartupError        .log_tail: a ComfyUI process did not start
        │   └── PortInUseError         .port: someone else already listens there
        ├── ComfyUITimeoutError        .timeout: not ready, or a prompt ran too long
        ├── ServerLostError            the server went away mid-job (retryable)
        ├── ServerProtocolError        .detail: it sent what ComfyUI never sends (retryable)
        ├── PromptVanishedError        deleted/cleared by someone else (retryable)
        ├── WorkflowError              .error, .node_errors, .status_code: ComfyUI rejected it
        └── ExecutionError             .node_id, .node_type, .exception_type, .outputs
            │                          (files written before it failed), ...
            └── ExecutionInterruptedError  the prompt was interrupted while it ran

Errors carry data: every attribute named above is set, so callers can act on it without
parsing messages. ``ServerError.retryable`` says whether the same work may succeed on another
server (comfytrio itself runs such a shard again, up to ``FaultPolicy.max_shard_attempts``).
Causes are chained with ``raise ... from``. When every shard of a job fails, the first error
is raised and the others are in its ``other_errors`` list.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import OutputFile

__all__ = [
    "BrokerError",
    "BrokerUnavailableError",
    "ComfyAPIError",
    "ComfyUIStartupError",
    "ComfyUITimeoutError",
    "DownloadError",
    "ExecutionError",
    "ExecutionInterruptedError",
    "GPUDetectionError",
    "IdempotencyKeyReusedError",
    "JobNotFoundError",
    "ModelNotFoundError",
    "NoInstanceReadyError",
    "NodeInputNotFoundError",
    "NodeTitleNotFoundError",
    "NotReproducibleError",
    "ParamError",
    "PluginError",
    "PortInUseError",
    "PromptVanishedError",
    "ServerError",
    "ServerLostError",
    "ServerProtocolError",
    "UnknownParamTypeError",
    "UnsafeNameError",
    "WorkflowError",
]


class ComfyAPIError(Exception):
    """Base class of every error raised by comfytrio.

    ``other_errors`` holds the errors of the other shards when a whole job failed and this
    one, the first, was raised for all of them.
    """

    other_errors: list[BaseException]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.other_errors = []

    def __str__(self) -> str:
        return self.message


class GPUDetectionError(ComfyAPIError):
    """NVML reports GPUs, but the CUDA runtime cannot use them."""


class NoInstanceReadyError(ComfyAPIError):
    """No instance of the api is ready to take a job now (all starting, down or hung)."""

    def __init__(self, states: Mapping[str, str]) -> None:
        self.states = dict(states)
        """Each instance's state, by name."""
        listed = ", ".join(f"{name} {state}" for name, state in self.states.items())
        super().__init__(f"no ComfyUI instance is ready to run the job ({listed or 'none'})")


class ModelNotFoundError(ComfyAPIError):
    """One or more required models are missing.

    ``missing`` lists every missing model (not just the first), ``where`` says where they
    were looked for (a folder, or a server URL).
    """

    def __init__(self, missing: Sequence[Any], where: str) -> None:
        self.missing = list(missing)
        self.where = where
        names = ", ".join(f"{m.type}/{m.name}" for m in self.missing)
        super().__init__(f"model(s) not found in {where}: {names}")


class DownloadError(ComfyAPIError):
    """A download (LoRA, input image) failed: ``url`` says what, ``reason`` says why."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"download of {url} failed: {reason}")


class UnsafeNameError(ComfyAPIError):
    """A user-given file name would escape its folder (``../``, absolute path, ...)."""

    def __init__(self, name: str, folder: str) -> None:
        self.name = name
        self.folder = folder
        super().__init__(f"refusing file name {name!r}: it must stay inside {folder}")


class ParamError(ComfyAPIError):
    """An entry of the ``params`` dict is wrong; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(f"param {param!r}: {message}")


class UnknownParamTypeError(ParamError):
    """A param asks for a ``type`` no plugin provides; ``known`` lists those that exist."""

    def __init__(self, param: str, type_name: str, known: Sequence[str]) -> None:
        self.type_name = type_name
        self.known = sorted(known)
        super().__init__(param, f"unknown type {type_name!r}; known types: {', '.join(self.known)}")


class NodeTitleNotFoundError(ParamError):
    """A param's ``node_mappings`` title matches no node; ``available`` lists the titles."""

    def __init__(self, param: str, title: str, available: Sequence[str]) -> None:
        self.title = title
        self.available = sorted(available)
        super().__init__(
            param,
            f"no node titled {title!r} in the workflow; titles: {', '.join(self.available)}",
        )


class NodeInputNotFoundError(ParamError):
    """A node a param maps to has no input of the name it would write (``"KSampler.stpes"``,
    or an ``integer`` mapped by title to a node without ``value``); ``available`` lists the
    node's inputs, sorted."""

    def __init__(
        self,
        param: str,
        title: str,
        node_id: str,
        input_name: str,
        available: Sequence[str],
        *,
        hint: str = "",
    ) -> None:
        self.title = title
        self.node_id = node_id
        self.input_name = input_name
        self.available = sorted(available)
        inputs = ", ".join(self.available) or "none"
        super().__init__(
            param,
            f"node {title!r} (id {node_id!r}) has no input {input_name!r}{hint}; "
            f"its inputs: {inputs}",
        )


class NotReproducibleError(ParamError):
    """A job asked for the same images as one GPU (``same_images=True``) and its split
    cannot make them: a sampler that draws noise at every step (ancestral, SDE, LCM), a
    sampler the split batch does not feed, a batch over 64, a split of something other than
    an ``EmptyLatentImage`` batch. ``param`` is the split param (``"workflow"`` when none
    splits a batch), ``node_id``/``title`` the node at fault and ``sampler`` its sampler
    (None when not known or not at fault)."""

    def __init__(
        self,
        param: str,
        node_id: str | None,
        title: str | None,
        sampler: str | None,
        reason: str,
    ) -> None:
        self.node_id = node_id
        self.title = title
        self.sampler = sampler
        self.reason = reason
        where = ""
        if node_id is not None:
            where = f"node {title or node_id!r} (id {node_id!r})"
            where += f", sampler {sampler!r}" if sampler is not None else ""
            where += ": "
        super().__init__(
            param,
            f"cannot make the same images as one GPU: {where}{reason} (without same_images "
            "the split still makes distinct images)",
        )


class PluginError(ComfyAPIError):
    """A plugin is broken: a duplicate name, an unknown hook, a bad registration."""


class BrokerError(ComfyAPIError):
    """An error of the job broker (``comfytrio.broker``: jobs kept in Redis)."""


class BrokerUnavailableError(BrokerError):
    """Redis at ``url`` did not answer for the broker's ``reconnect_timeout`` seconds
    (every call is retried with backoff until then); ``reason`` says what the last try
    met."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"Redis at {url} is unavailable: {reason}")


class JobNotFoundError(BrokerError):
    """No job ``job_id`` in the broker: never submitted, or gone after its retention."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} in the broker (never submitted, or expired)")


class IdempotencyKeyReusedError(BrokerError):
    """A submit gave an idempotency ``key`` that already names another job, ``job_id``
    (keys are single-use for their TTL: look that job up instead of submitting again)."""

    def __init__(self, key: str, job_id: str) -> None:
        self.key = key
        self.job_id = job_id
        super().__init__(
            f"idempotency key {key!r} was already used for job {job_id!r}: keys are "
            "single-use; follow that job instead of submitting again"
        )


class ServerError(ComfyAPIError):
    """An error of one ComfyUI server: ``instance`` names it, ``prompt_id`` the prompt it
    ended (None when it ended none), ``retryable`` says whether the same work may succeed
    on another server."""

    instance: str
    prompt_id: str | None = None
    retryable: bool = False


class ComfyUIStartupError(ServerError):
    """A ComfyUI process we started exited or failed before it was ready.

    ``log_tail`` holds the last lines of its log, ``instance`` names it.
    """

    def __init__(self, instance: str, message: str, log_tail: str = "") -> None:
        self.instance = instance
        self.log_tail = log_tail
        text = f"ComfyUI {instance} did not start: {message}"
        if log_tail:
            text += "\n--- last lines of its log ---\n" + log_tail
        super().__init__(text)


class PortInUseError(ComfyUIStartupError):
    """The port of an instance we should start is already taken by another process."""

    def __init__(self, instance: str, port: int) -> None:
        self.port = port
        super().__init__(
            instance,
            f"port {port} on 127.0.0.1 is already in use by another process "
            "(pick another port, or attach to it with auto_start=False)",
        )


class ComfyUITimeoutError(ServerError):
    """A server was not ready in time, or a prompt did not finish in time."""

    def __init__(
        self,
        message: str,
        *,
        instance: str = "",
        prompt_id: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.instance = instance
        self.prompt_id = prompt_id
        self.timeout = timeout
        super().__init__(message)


class ServerLostError(ServerError):
    """The server went away (connection refused, socket closed, process exited)."""

    retryable = True

    def __init__(self, instance: str, message: str, *, prompt_id: str | None = None) -> None:
        self.instance = instance
        self.prompt_id = prompt_id
        super().__init__(f"ComfyUI {instance}: {message}")


class ServerProtocolError(ServerError):
    """A server sent a message or an answer that ComfyUI never sends (a wrong type, shape or
    range, not JSON, a reverse proxy's error page): ``detail`` says what was wrong. It costs
    only the prompt it belonged to (``prompt_id``, None for a message of no prompt), which
    runs again on another server."""

    retryable = True

    def __init__(self, instance: str, detail: str, *, prompt_id: str | None = None) -> None:
        self.instance = instance
        self.detail = detail
        self.prompt_id = prompt_id
        where = f"prompt {prompt_id}: " if prompt_id else ""
        super().__init__(f"ComfyUI {instance} sent something malformed: {where}{detail}")


class PromptVanishedError(ServerError):
    """A prompt left the server's queue without ever running or finishing.

    ComfyUI sends no event when a pending prompt is deleted or the queue is cleared by
    another client, and forgets everything on a restart.
    """

    retryable = True

    def __init__(self, instance: str, prompt_id: str) -> None:
        self.instance = instance
        self.prompt_id = prompt_id
        super().__init__(
            f"ComfyUI {instance}: prompt {prompt_id} vanished from the queue without running "
            "(deleted or cleared by another client, or the server restarted)"
        )


def _describe_node_errors(node_errors: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for node_id, entry in node_errors.items():
        class_type = entry.get("class_type", "?") if isinstance(entry, Mapping) else "?"
        errors = entry.get("errors", []) if isinstance(entry, Mapping) else []
        for err in errors if isinstance(errors, list) else ():
            if not isinstance(err, Mapping):
                continue
            extra = err.get("extra_info", {}) or {}
            input_name = extra.get("input_name") if isinstance(extra, Mapping) else None
            where = f"node {node_id} ({class_type})"
            if input_name:
                where += f", input {input_name!r}"
            detail = err.get("details") or ""
            msg = err.get("message", err.get("type", "error"))
            lines.append(f"{where}: {msg}" + (f": {detail}" if detail else ""))
    return lines


class WorkflowError(ServerError):
    """ComfyUI refused the workflow (``POST /prompt`` answered an error).

    ``error`` is ComfyUI's ``error`` object (``type``, ``message``, ``details``), ``node_errors``
    maps node ids to their ``errors`` list, and the message has one readable line per node
    and input. ``status_code`` is the HTTP status (400, or 200 when ComfyUI accepted the prompt
    but dropped some outputs: ``partial`` is then True).
    """

    def __init__(
        self,
        error: Mapping[str, Any],
        node_errors: Mapping[str, Any],
        *,
        status_code: int = 400,
        instance: str = "",
        prompt_id: str | None = None,
    ) -> None:
        self.error = dict(error)
        self.node_errors = dict(node_errors)
        self.status_code = status_code
        self.instance = instance
        self.prompt_id = prompt_id
        self.partial = status_code == 200
        head = self.error.get("message") or self.error.get("type") or "workflow rejected"
        details = self.error.get("details")
        text = (
            f"ComfyUI {instance} rejected the workflow: {head}"
            if instance
            else (f"ComfyUI rejected the workflow: {head}")
        )
        if details:
            text += f" ({details})"
        for line in _describe_node_errors(self.node_errors):
            text += "\n  - " + line
        super().__init__(text)


class ExecutionError(ServerError):
    """A node raised while ComfyUI ran the prompt (the ``execution_error`` event).

    ``node_outputs`` is what the prompt's output nodes reported before the failure (node id
    -> ComfyUI's ``output`` dict), and ``outputs`` the files among them as ``OutputFile``
    values, where ``ComfyAPI`` could reach them (read in place or downloaded): what a shard
    produced is kept, though it failed.
    """

    outputs: tuple[OutputFile, ...]

    def __init__(
        self,
        *,
        instance: str,
        prompt_id: str,
        node_id: str | None,
        node_type: str | None,
        exception_type: str = "",
        exception_message: str = "",
        traceback: Sequence[str] = (),
        node_outputs: Mapping[str, Any] | None = None,
    ) -> None:
        self.instance = instance
        self.node_outputs = dict(node_outputs or {})
        self.outputs = ()
        self.prompt_id = prompt_id
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = exception_message
        self.traceback = list(traceback)
        super().__init__(self._text())

    def _text(self) -> str:
        return (
            f"ComfyUI {self.instance}: prompt {self.prompt_id} failed in node {self.node_id} "
            f"({self.node_type}): {self.exception_type}: {self.exception_message.strip()}"
        )


class ExecutionInterruptedError(ExecutionError):
    """The prompt was interrupted while it ran (by us on cancel, or by someone else)."""

    def _text(self) -> str:
        return (
            f"ComfyUI {self.instance}: prompt {self.prompt_id} was interrupted at node "
            f"{self.node_id} ({self.node_type})"
        )


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message: cut to ``limit`` characters, and never raising
    (``repr`` of an int over 4300 digits raises ``ValueError``; a caller's ``__repr__`` may
    raise anything)."""
    try:
        text = repr(value)
    except Exception:
        if isinstance(value, int):
            return f"<an int of {value.bit_length()} bits>"
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def leaf_errors(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every exception inside a (nested) exception group, in order."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(leaf_errors(exc))
        else:
            leaves.append(exc)
    return leaves


def single_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside a (nested) exception group, or None when there are several.

    Nurseries wrap what their body raises; a context manager built on a nursery unwraps a
    lone error so callers can ``except ServerLostError`` as the docs say.
    """
    leaves = leaf_errors(group)
    return leaves[0] if len(leaves) == 1 else None


@contextmanager
def unwrapped(kind: type[BaseException] = BaseException) -> Iterator[None]:
    """Raise the one exception inside an exception group as itself (when it is a ``kind``).

    Nurseries wrap what their body and tasks raise, even a lone error; a caller of
    ``open_comfy_client`` or ``ComfyAPI`` catches ``ServerLostError`` as the docs say, not a
    group of one. Several errors stay a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        lone = single_error(group)
        if lone is None or not isinstance(lone, kind):
            raise
        raise lone from None
