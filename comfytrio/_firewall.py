"""What a ComfyUI server may send us, checked before anything acts on it.

Every websocket message and every JSON answer of a server passes through one of these
functions, which either return it in the types the client works with or raise ``Malformed``
saying what was wrong. The client turns ``Malformed`` into a ``ServerProtocolError`` on the
prompt it belongs to (or logs and counts it when it belongs to none): a server that lies, a
custom node that sends odd messages or a reverse proxy's error page costs at most that
server's prompts, never an exception in the api's nursery.

The shapes are those of ComfyUI 0.3.64 (``comfyui-protocol/``): node ids are strings (or
integers, from some custom nodes), counts are finite numbers, an output is an object whose
file entries carry ``filename``, ``subfolder`` and ``type`` strings. JSON is read strictly:
``NaN`` and ``Infinity`` are not JSON.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import attrs

__all__ = [
    "ErrorReport",
    "Malformed",
    "activities",
    "cached_nodes",
    "error_report",
    "history_answer",
    "history_entry",
    "loads",
    "message",
    "model_names",
    "node_id",
    "number",
    "object_info",
    "output",
    "outputs",
    "prompt_answer",
    "queue_answer",
    "queue_ids",
    "queue_remaining",
    "system_stats",
    "text_list",
    "upload_answer",
]

_FILE_TYPES = frozenset({"output", "temp", "input"})
_MAX_QUEUE = 2**31


class Malformed(ValueError):
    """Something a server sent is not what ComfyUI sends; the message says what."""


F = TypeVar("F", bound=Callable[..., Any])


def _guarded(check: F) -> F:
    """A check raises ``Malformed`` and nothing else: a shape its code did not foresee (an
    unhashable value, a recursion too deep) is malformed too, never an error of ours that
    would escape into the api."""

    @functools.wraps(check)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return check(*args, **kwargs)
        except Malformed:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
            raise Malformed(f"{check.__name__}: an unexpected shape ({exc!r})") from None

    return cast(F, guarded)


def _no_constant(name: str) -> Any:
    raise Malformed(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)
"""One strict decoder for every message (``json.loads`` with an argument makes a new one
each call)."""


@_guarded
def loads(text: str | bytes, what: str) -> Any:
    """Strict JSON (no ``NaN``/``Infinity``); ``Malformed`` naming ``what`` otherwise."""
    return _loads(text, what)


def _loads(text: str | bytes, what: str) -> Any:
    """``loads`` without its guard, for checks that are guarded themselves."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return _DECODER.decode(text)
    except Malformed as exc:
        raise Malformed(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        shown = text[:80] if isinstance(text, str) else text[:80].decode("utf-8", "replace")
        raise Malformed(f"{what} is not JSON ({exc.__class__.__name__}): {shown!r}") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Malformed(f"{what} is a {type(value).__name__}, not an object")
    return value


@_guarded
def message(text: str) -> tuple[str, dict[str, Any]]:
    """A websocket text message: its ``type`` and ``data`` (an object, ``{}`` when absent)."""
    msg = _object(_loads(text, "a websocket message"), "a websocket message")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise Malformed(f"a websocket message has no string 'type': {text[:80]!r}")
    data = msg.get("data")
    if data is None:
        return kind, {}
    return kind, _object(data, f"the data of a {kind!r} message")


@_guarded
def number(value: Any, what: str) -> float:
    """A finite number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Malformed(f"{what} is {value!r}, not a finite number")
    return value


@_guarded
def node_id(value: Any, what: str = "node") -> str:
    """A node id: a string, or an integer some custom nodes send."""
    return _node_id(value, what)


def _node_id(value: Any, what: str = "node") -> str:
    """``node_id`` without its guard, for checks that are guarded themselves."""
    if isinstance(value, str) and value and "\x00" not in value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise Malformed(f"{what} is {value!r}, not a node id")


@_guarded
def activities(data: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """Each node of a ``progress_state`` message with its ``activity`` (a string, or None
    when it has none: ComfyUI 0.3.x never sends one)."""
    nodes = data.get("nodes")
    if nodes is None:
        return []
    found: list[tuple[str, str | None]] = []
    for key, entry in _object(nodes, "progress_state.nodes").items():
        if not isinstance(entry, dict):  # the message is made only when it is needed
            _object(entry, f"the progress_state of node {key!r:.40}")
        activity = entry.get("activity")
        if activity is not None and not isinstance(activity, str):
            raise Malformed(f"the activity of node {key!r:.40} is {activity!r:.40}")
        if not (isinstance(key, str) and key and "\x00" not in key):  # JSON keys are strings
            key = _node_id(key, "a progress_state node")
        found.append((key, activity))
    return found


@_guarded
def queue_remaining(data: Mapping[str, Any]) -> int:
    """``status.exec_info.queue_remaining`` of a ``status`` message."""
    status = _object(data.get("status"), "status")
    info = _object(status.get("exec_info"), "status.exec_info")
    value = info.get("queue_remaining")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_QUEUE:
        raise Malformed(f"queue_remaining is {value!r}, not a queue length")
    return value


@_guarded
def cached_nodes(value: Any) -> tuple[str, ...]:
    """``execution_cached.nodes``: a list of node ids."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise Malformed(f"the cached nodes are {value!r}, not a list")
    return tuple(_node_id(n, "a cached node") for n in value)


@_guarded
def text_list(value: Any, what: str) -> list[str]:
    """A list of strings (a traceback)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Malformed(f"{what} is not a list of strings")
    return list(value)


def _name(value: Any, what: str, *, empty: bool) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise Malformed(f"{what} is {value!r}, not a name")
    if any(ord(c) < 32 for c in value):
        raise Malformed(f"{what} {value!r} holds a control character")
    return value


def _relative(value: Any, what: str, *, empty: bool) -> str:
    """A name inside a server's folder: no ``..``, not absolute (``/``, ``\\``, ``C:``)."""
    name = _name(value, what, empty=empty)
    parts = name.replace("\\", "/").split("/")
    if name[:1] in ("/", "\\") or name[1:2] == ":" or ".." in parts:
        raise Malformed(f"{what} {name!r} would leave its folder")
    return name


@_guarded
def output(value: Any, node: str) -> dict[str, Any]:
    """One output node's ``output`` (``ui``): an object; its file entries (objects with a
    ``filename``) must name a file as ComfyUI does. Other values (text, numbers) pass."""
    result = _object(value, f"the output of node {node}")
    for items in result.values():
        if not isinstance(items, list):
            continue
        for item in items:
            if isinstance(item, dict) and "filename" in item:
                _relative(item["filename"], f"a file name of node {node}", empty=False)
                _relative(item.get("subfolder", ""), f"a sub-folder of node {node}", empty=True)
                kind = item.get("type", "output")
                if not isinstance(kind, str) or kind not in _FILE_TYPES:
                    raise Malformed(f"a file of node {node} has the type {kind!r}")
    return result


@_guarded
def outputs(value: Any) -> dict[str, dict[str, Any]]:
    """A prompt's outputs (``/history`` entry): node id -> ``output``."""
    if value is None:
        return {}
    found = _object(value, "the outputs")
    return {_node_id(k): output(v, str(k)) for k, v in found.items()}


@attrs.frozen
class ErrorReport:
    """What ``execution_error`` / ``execution_interrupted`` say, checked."""

    node_id: str | None
    node_type: str | None
    exception_type: str
    exception_message: str
    traceback: list[str]


@_guarded
def error_report(data: Mapping[str, Any]) -> ErrorReport:
    """The data of an ``execution_error`` or ``execution_interrupted`` message."""
    node = data.get("node_id")
    node_type = data.get("node_type")
    if node_type is not None and not isinstance(node_type, str):
        raise Malformed(f"node_type is {node_type!r}, not a string")
    exception_type = data.get("exception_type", "")
    exception_message = data.get("exception_message", "")
    if not isinstance(exception_type, str) or not isinstance(exception_message, str):
        raise Malformed("exception_type and exception_message must be strings")
    return ErrorReport(
        node_id=None if node is None else node_id(node, "node_id"),
        node_type=node_type,
        exception_type=exception_type,
        exception_message=exception_message,
        traceback=text_list(data.get("traceback"), "traceback"),
    )


@_guarded
def history_entry(
    entry: Any,
) -> tuple[ErrorReport | None, ErrorReport | None, dict[str, dict[str, Any]], tuple[str, ...]]:
    """A ``/history/{id}`` entry: (error, interruption, outputs, cached nodes)."""
    found = _object(entry, "the history entry")
    status = found.get("status") or {}
    status = _object(status, "the history status")
    messages = status.get("messages") or []
    if not isinstance(messages, list):
        raise Malformed("the history messages are not a list")
    error = interrupted = None
    cached: tuple[str, ...] = ()
    for item in messages:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise Malformed(f"a history message is {item!r:.80}, not [name, data]")
        name, data = item
        if name == "execution_error":
            error = error_report(_object(data, name))
        elif name == "execution_interrupted":
            interrupted = error_report(_object(data, name))
        elif name == "execution_cached":
            cached = cached_nodes(_object(data, name).get("nodes"))
    if error is None and interrupted is None and status.get("status_str") == "error":
        error = ErrorReport(None, None, "", "ComfyUI reported an error without details", [])
    return error, interrupted, outputs(found.get("outputs")), cached


@_guarded
def prompt_answer(answer: Any) -> tuple[float, dict[str, Any]]:
    """A 200 answer of ``POST /prompt``: its queue number and ``node_errors``."""
    found = _object(answer, "the answer of POST /prompt")
    node_errors = found.get("node_errors") or {}
    return number(found.get("number", 0), "number"), _object(node_errors, "node_errors")


@_guarded
def queue_ids(answer: Any) -> tuple[set[str], set[str]]:
    """The prompt ids of a ``/queue`` answer: (running, pending)."""
    found = _object(answer, "the answer of /queue")
    ids: list[set[str]] = []
    for key in ("queue_running", "queue_pending"):
        items = found.get(key) or []
        if not isinstance(items, list):
            raise Malformed(f"{key} is not a list")
        for item in items:
            if not (isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)):
                raise Malformed(f"an item of {key} is {item!r:.80}, not [number, id, ...]")
        ids.append({item[1] for item in items})
    return ids[0], ids[1]


@_guarded
def queue_answer(answer: Any) -> dict[str, Any]:
    """A ``/queue`` answer, checked (``queue_ids`` reads it)."""
    queue_ids(answer)
    found: dict[str, Any] = answer
    return found


@_guarded
def history_answer(answer: Any) -> dict[str, dict[str, Any]]:
    """A ``/history/{id}`` answer: prompt id -> entry (an object; ``history_entry`` reads
    it)."""
    found = _object(answer, "the answer of /history")
    for key, entry in found.items():
        _object(entry, f"the history entry of {key}")
    return found


@_guarded
def model_names(answer: Any) -> list[str]:
    """``/models/{folder}``: a list of file names."""
    if not isinstance(answer, list) or not all(isinstance(n, str) for n in answer):
        raise Malformed("the model list is not a list of names")
    return list(answer)


@_guarded
def upload_answer(answer: Any) -> tuple[str, str]:
    """``POST /upload/image``: the stored ``name`` and ``subfolder``."""
    found = _object(answer, "the answer of the upload")
    name = _name(found.get("name"), "the uploaded name", empty=False)
    sub = _name(found.get("subfolder") or "", "the uploaded sub-folder", empty=True)
    return name, sub


@_guarded
def system_stats(answer: Any) -> dict[str, Any]:
    """``/system_stats``: an object (its ``system`` an object too, when present)."""
    found = _object(answer, "the answer of /system_stats")
    system = found.get("system")
    if system is not None:
        _object(system, "system_stats.system")
        argv = system.get("argv")
        if argv is not None and not isinstance(argv, list):
            raise Malformed("system_stats.system.argv is not a list")
    return found


@_guarded
def object_info(answer: Any) -> dict[str, Any]:
    """``/object_info``: node class -> its description (an object)."""
    return _object(answer, "the answer of /object_info")
