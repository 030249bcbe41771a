"""Containment, by property: nothing one ComfyUI server sends can crash the api or cost the
other servers' shards.

Each test starts two fake servers once (``bad`` and ``good``) and then lets hypothesis try
many examples of garbage: for each, a fresh ``ComfyAPI([bad.url, good.url])`` is opened, the
garbage is switched on on ``bad`` (the fake's hostile mode: ``send_ws_after``,
``corrupt_answers``, ``corrupt_history``, raw frames), a job runs on both, and then:

- ``run_workflow`` returns (nothing escapes it, and certainly nothing that is not a
  ``ComfyAPIError``: no ``TypeError``, ``ValueError``, ``OverflowError``, ``RecursionError``,
  ``ExceptionGroup``...), and opening and closing the api raise nothing either;
- every failed shard failed on ``bad`` with a ``ComfyAPIError`` (and not with the scheduler's
  last resort, a plain ``ComfyAPIError`` wrapping a ``TypeError`` or such: that is a bug the
  firewall let through); every other shard made its image (the good server's shards all
  finish);
- every output path, of a result or of a failure, is inside the download folder and exists;
- the api closes its websockets, and a second, clean job afterwards is not harmed either;
- nothing leaks: pyproject's ``filterwarnings = error`` turns an unclosed socket's
  ``ResourceWarning`` into a failure.

How hypothesis meets trio here: ``@given`` cannot drive an async test, and the fakes must
live in one trio run for the whole test (starting them per example would be slow). So the
test is an ordinary pytest-trio test that starts the fakes (the plugin's factory) and hands
hypothesis a worker thread (``trio.to_thread.run_sync``); there, a sync ``@given`` function
runs each example back on the test's trio loop with ``trio.from_thread.run``. Examples run
one at a time, on real sockets and trio's ``MockClock`` (``autojump_clock``: the ``FAST``
fault timeouts and ``EXAMPLE_LIMIT`` are virtual seconds, which pass at once whenever every
task waits; while hypothesis makes the next example in its thread, no timer of the api is
left to jump to). An exception that escapes the api is re-raised as it is (with a note), so that
hypothesis tells distinct bugs apart by where they were raised and shrinks each one.

``COMFYTRIO_HOSTILE_EXAMPLES=2000`` raises the number of examples per test (25 by
default); CI runs are derandomized (the same examples every run) and do not shrink, a long
run explores and shrinks (``COMFYTRIO_HOSTILE_SHRINK=1`` shrinks a short run too).
"""

from __future__ import annotations

import copy
import json
import math
import os
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from test_fault_tolerance import FAST, JOB, params

from comfytrio import ComfyAPI, ComfyAPIError, GPUInfo, JobResult, RemoteComfyUI
from comfytrio.testing import FakeComfyUI, RawBytes, websocket_frame
from comfytrio.testing.pytest_plugin import FakeFactory

LONG_RUN = "COMFYTRIO_HOSTILE_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("COMFYTRIO_HOSTILE_EXAMPLES", "25"))
SHRINK = LONG_RUN or os.environ.get("COMFYTRIO_HOSTILE_SHRINK", "") not in ("", "0")
EXAMPLE_LIMIT = 10.0
"""Seconds one example may take (open, two jobs, close): with the ``FAST`` fault timeouts
every server, however bad, is given up long before; more is a hang, and a finding."""

HOSTILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG_RUN,
    database=None,
    print_blob=True,
    # Shrinking a hang costs EXAMPLE_LIMIT per try, up to minutes: CI reports the examples
    # as found (they are small: a few switches each), a long run shrinks them.
    phases=[p for p in Phase if SHRINK or p not in (Phase.shrink, Phase.explain)],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- JSON garbage

HOSTILE_STRINGS = [
    "",
    "\x00",
    "a\x00b.png",
    "../../../escape.png",
    "/etc/passwd",
    "..",
    ".",
    "x" * 300,
    "con.png",
    "C:\\Windows\\x.png",
    "sub/../../x.png",
    "\udcff",
    "😀" * 5,
    "NaN",
    "null",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, -1, 2**63, 10**30, -(10**30)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(HOSTILE_STRINGS)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=6), children, max_size=3
        )
    ),
    max_leaves=6,
)
"""Any JSON value, including what strict JSON forbids (NaN, Infinity)."""


class Huge(str):
    """A long text (deep nesting, thousands of digits) that shows itself as its recipe:
    hypothesis prints strategies and examples, and warns about reprs of many kB."""

    recipe: str

    def __new__(cls, head: str, unit: str, times: int, tail: str) -> Huge:
        text = super().__new__(cls, head + unit * times + tail)
        text.recipe = f"{head!r} + {unit!r} * {times} + {tail[:20]!r}..."
        return text

    def __repr__(self) -> str:
        return f"Huge({self.recipe})"


# --------------------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Replace:
    value: Any


@dataclass(frozen=True)
class Delete:
    pass


@dataclass(frozen=True)
class AddKey:
    key: str
    value: Any


Edit = Replace | Delete | AddKey


@dataclass(frozen=True)
class Mutation:
    """Edits of a JSON document: each ``pick`` chooses one node (0 is the whole document) of
    the document as it is then, whatever its shape, so one mutation fits every answer."""

    edits: tuple[tuple[int, Edit], ...]

    def apply(self, document: Any) -> Any:
        """A mutated copy of ``document``."""
        result = copy.deepcopy(document)
        for pick, edit in self.edits:
            paths: list[tuple[Any, ...]] = [(), *_paths(result)]
            result = _edit(result, paths[pick % len(paths)], edit)
        return result


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    items: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    paths: list[tuple[Any, ...]] = []
    for key, child in items:
        paths.append((*prefix, key))
        paths.extend(_paths(child, (*prefix, key)))
    return paths


def _edit(document: Any, path: tuple[Any, ...], edit: Edit) -> Any:
    if not path:
        parent: Any = None
        target = document
    else:
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        target = parent[path[-1]]
    if isinstance(edit, AddKey):
        if isinstance(target, dict):
            target[edit.key] = edit.value
        elif isinstance(target, list):
            target.append(edit.value)
        return document
    new = edit.value if isinstance(edit, Replace) else None
    if parent is None:
        return {} if isinstance(edit, Delete) else new
    if isinstance(edit, Delete):
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return document


edits = st.one_of(
    st.builds(Replace, json_values),
    st.just(Delete()),
    st.builds(
        AddKey, st.sampled_from(["prompt_id", "node", "output", "type", "data"]), json_values
    ),
)
mutations = st.builds(
    Mutation, st.lists(st.tuples(st.integers(0, 60), edits), min_size=1, max_size=3).map(tuple)
)


# --------------------------------------------------------------------------- websocket garbage

SAME = "@SAME-PROMPT@"
"""Stands for the prompt id of the real message that triggered the garbage (the prompt
running on ``bad``)."""
GOOD = "@GOOD-PROMPT@"
"""Stands for the id of a prompt of this job on ``good`` (running, queued or just done)."""

EVENTS = [
    "status",
    "execution_start",
    "execution_cached",
    "executing",
    "executed",
    "execution_success",
]
"""The messages the fake sends while it runs the job's prompt: the triggers."""

TEMPLATES: dict[str, dict[str, Any]] = {
    "status": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "x"},
    "execution_start": {"prompt_id": SAME, "timestamp": 1760000000000},
    "execution_cached": {"nodes": ["1", "2"], "prompt_id": SAME, "timestamp": 1760000000000},
    "executing": {"node": "3", "display_node": "3", "prompt_id": SAME},
    "progress": {"value": 1, "max": 20, "prompt_id": SAME, "node": "3"},
    "executed": {
        "node": "4",
        "display_node": "4",
        "output": {"images": [{"filename": "h_00001_.png", "subfolder": "", "type": "output"}]},
        "prompt_id": SAME,
    },
    "execution_success": {"prompt_id": SAME, "timestamp": 1760000000000},
    "execution_error": {
        "prompt_id": SAME,
        "node_id": "4",
        "node_type": "SaveImage",
        "executed": ["1", "2", "3"],
        "exception_message": "boom",
        "exception_type": "RuntimeError",
        "traceback": ["line 1\n"],
        "current_inputs": {},
        "current_outputs": {},
        "timestamp": 1760000000000,
    },
    "execution_interrupted": {
        "prompt_id": SAME,
        "node_id": "4",
        "node_type": "SaveImage",
        "executed": ["1"],
        "timestamp": 1760000000000,
    },
}
"""What ComfyUI sends, one of each type (``SAME`` for the prompt id)."""

image_entries = st.fixed_dictionaries(
    {
        "filename": st.sampled_from([*HOSTILE_STRINGS, "h_00001_.png"]) | json_scalars,
        "subfolder": st.sampled_from(["", "..", "../..", "/", "a/../../b", "\x00"]) | json_scalars,
        "type": st.sampled_from(["output", "temp", "input", "../", "x"]) | json_scalars,
    }
)
hostile_outputs = st.one_of(
    st.fixed_dictionaries({"images": st.lists(image_entries, min_size=1, max_size=3)}),
    st.dictionaries(st.sampled_from(["images", "gifs", "audio", "text"]), json_values, max_size=2),
    json_values,
)


@st.composite
def forged_messages(draw: st.DrawFn) -> Any:
    """A message of a real type with wrong data: fields of the wrong type, missing, extra;
    a prompt id that is the running prompt's, the good server's, or anything."""
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    data = copy.deepcopy(TEMPLATES[kind])
    if "prompt_id" in data:
        data["prompt_id"] = draw(st.sampled_from([SAME, GOOD]) | json_scalars)
    if kind == "executed" and draw(st.booleans()):
        data["output"] = draw(hostile_outputs)
    message: Any = {"type": kind, "data": data}
    if draw(st.booleans()):
        message = draw(mutations).apply(message)
    return message


RAW_TEXTS = [
    '{"type":"status","data":{"status":{"exec_info":{"queue_remaining":Infinity}}}}',
    '{"type":"progress","data":{"value":NaN,"max":1e999,"prompt_id":"@SAME-PROMPT@","node":"3"}}',
    Huge(
        '{"type":"progress","data":{"value":', "9", 5000, ',"max":1,"prompt_id":"@SAME-PROMPT@"}}'
    ),
    Huge("", "[", 50000, "]" * 50000),
    Huge('{"type":"executed","data":', '{"a":', 3000, "1" + "}" * 3001),
    '{"type":"executing","data":{"node":null,"prompt_id":"@SAME-PROMPT@"}',
    '{"type":"executing","data":{"node":null,"prompt_id":"@GOOD-PROMPT@"}}',
    "<html><body>502 Bad Gateway</body></html>",
    "",
    "null",
    '"executing"',
    '{"type":"executing","type":"status","data":{}}',
    '{"type":"\\ud800","data":{}}',
]

raw_frames = st.one_of(
    st.binary(min_size=126, max_size=255).map(lambda p: websocket_frame(0x9, p)),
    st.binary(max_size=8).map(lambda p: websocket_frame(0xA, p)),
    st.sampled_from(
        [
            websocket_frame(0x1, b"\xff\xfe not utf-8"),
            websocket_frame(0x1, b'{"type": "status"', fin=False),
            websocket_frame(0x0, b"lone continuation"),
            websocket_frame(0x3, b"unknown opcode"),
            websocket_frame(0xB, b""),
            websocket_frame(0x1, b"{}", rsv=4),
            websocket_frame(0x8, b"\x03"),
            websocket_frame(0x8, b"\x00\x00\xff"),
            websocket_frame(0x8, b"\x13\x88x"),
            websocket_frame(0x9, b"", fin=False),
            websocket_frame(0x1, b'{"type":"x"}', mask=b"abcd"),
            b"\x81\x7f" + (2**62).to_bytes(8, "big"),
            b"\x82\x7e\xff\xff",
        ]
    ),
    st.binary(min_size=1, max_size=24),
).map(RawBytes)

ws_payloads = st.one_of(
    forged_messages(),
    st.sampled_from(RAW_TEXTS),
    st.text(max_size=40),
    st.binary(max_size=40),
    json_values,
    raw_frames,
)


@dataclass(frozen=True)
class Inject:
    """Right after (or instead of) the ``nth`` real ``event`` message, send ``payload``."""

    event: str
    payload: Any
    replace: bool = False
    nth: int = 1


@dataclass(frozen=True)
class Mangle:
    """Instead of (or after) the ``nth`` real ``event`` message, send it mutated."""

    event: str
    mutation: Mutation
    replace: bool = True
    nth: int = 1


injections = st.one_of(
    st.builds(Inject, st.sampled_from(EVENTS), ws_payloads, st.booleans(), st.integers(1, 3)),
    st.builds(Mangle, st.sampled_from(EVENTS), mutations, st.booleans(), st.integers(1, 3)),
)


# --------------------------------------------------------------------------- HTTP garbage

ROUTES: list[tuple[str, str]] = [
    ("POST", "/prompt"),
    ("GET", "/history/{prompt_id}"),
    ("GET", "/history"),
    ("GET", "/queue"),
    ("POST", "/queue"),
    ("GET", "/system_stats"),
    ("GET", "/object_info"),
    ("GET", "/view"),
    ("POST", "/interrupt"),
    ("GET", "/ws"),
]

bodies = st.one_of(
    st.sampled_from(
        [
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
            "",
            "null",
            "[]",
            "{}",
            '{"prompt_id": "p", "number": "abc", "node_errors": "boom"}',
            '{"prompt_id": "@SAME-PROMPT@", "number": NaN, "node_errors": {}}',
            '{"queue_running": "boom", "queue_pending": NaN}',
            '{"queue_running": [[0, "x"]], "queue_pending": [[1]]}',
            '{"system": {"comfyui_version": 5}, "devices": "none"}',
            '{"prompt_id": "p", "number": 1, "node_errors": {}',
            Huge('{"a": ', "9", 5000, "}"),
            Huge("", "[", 50000, ""),
            "\x00\xff",
        ]
    ),
    json_values.map(json.dumps),
    st.text(max_size=30),
)


@dataclass(frozen=True)
class Answer:
    """The next ``times`` answers of ``route`` are ``body`` (None: every answer)."""

    method: str
    route: str
    body: str
    status: int
    content_type: str
    times: int | None


@dataclass(frozen=True)
class Rewrite:
    """The next ``times`` answers of ``route`` are the real one, mutated (JSON) or cut
    (anything else: ``/view``)."""

    method: str
    route: str
    mutation: Mutation
    status: int | None
    times: int | None


@dataclass(frozen=True)
class History:
    """Once the job's prompt ran on ``bad``, its history entry is mutated (the next two
    answers), or is ``entry`` when that is not None (every answer)."""

    mutation: Mutation
    entry: Any = None


statuses = st.sampled_from([200, 200, 200, 201, 204, 301, 400, 404, 413, 500, 502, 503])
content_types = st.sampled_from(
    ["application/json; charset=utf-8", "application/json", "text/html", "text/plain", ""]
)
times = st.sampled_from([1, 2, 5, None])

corruptions = st.one_of(
    st.builds(
        lambda route, body, status, ctype, n: Answer(route[0], route[1], body, status, ctype, n),
        st.sampled_from(ROUTES),
        bodies,
        statuses,
        content_types,
        times,
    ),
    st.builds(
        lambda route, mutation, status, n: Rewrite(route[0], route[1], mutation, status, n),
        st.sampled_from([r for r in ROUTES if r[1] != "/ws"]),
        mutations,
        st.none() | statuses,
        times,
    ),
    st.builds(History, mutations, st.none() | json_values),
)


@dataclass(frozen=True)
class Plan:
    """Everything ``bad`` does wrong in one example."""

    injections: Sequence[Inject | Mangle] = ()
    corruptions: Sequence[Answer | Rewrite | History] = ()
    from_the_start: bool = False
    """Switched on before the api opens (its first answers are garbage too)."""
    forget: str | None = None
    """Messages of this type ``bad`` never sends (``executing``: the end signal), so that the
    api must ask ``/queue`` and ``/history`` where its prompt is."""


ws_plans = st.builds(Plan, st.lists(injections, min_size=1, max_size=3))
forgotten = st.sampled_from([None, "executing", "execution_success", "execution_start"])
http_plans = st.builds(
    Plan, st.just(()), st.lists(corruptions, min_size=1, max_size=3), st.just(False), forgotten
)
start_plans = st.builds(
    Plan,
    st.lists(injections, max_size=2),
    st.lists(corruptions, min_size=1, max_size=3),
    st.just(True),
    forgotten,
)


# --------------------------------------------------------------------------- switching on


def _resolve(value: Any, same: str, good: str) -> Any:
    """``value`` with the ``SAME``/``GOOD`` placeholders replaced by real prompt ids."""
    if isinstance(value, str):
        return value.replace(SAME, same).replace(GOOD, good)
    if isinstance(value, RawBytes):
        return value
    if isinstance(value, dict):
        return {_resolve(k, same, good): _resolve(v, same, good) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, same, good) for v in value]
    return value


def _prompt_in_flight(fake: FakeComfyUI) -> str:
    """A prompt id of ``fake``'s: the running one, else the next queued, else the last run."""
    return (
        fake.running_id
        or next(iter(fake.queue_ids()), None)
        or next(reversed(list(fake.history())), "no-prompt")
    )


def _switch_on_ws(bad: FakeComfyUI, good: FakeComfyUI, item: Inject | Mangle) -> None:
    seen = count(1)

    def make(data: Any) -> Any:
        if next(seen) != item.nth:
            return None  # not this one: sent as it is
        if isinstance(item, Mangle):
            message = item.mutation.apply({"type": item.event, "data": data})
        else:
            real = data.get("prompt_id") if isinstance(data, dict) else None
            same = real if isinstance(real, str) else _prompt_in_flight(bad)
            message = _resolve(item.payload, same, _prompt_in_flight(good))
        return "null" if message is None else message  # (None would mean "leave it alone")

    bad.send_ws_after(item.event, make, replace=item.replace)


def _rewriter(mutation: Mutation) -> Callable[[bytes], bytes]:
    def rewrite(real: bytes) -> bytes:
        try:
            document = json.loads(real)
        except ValueError:
            pick = mutation.edits[0][0] if mutation.edits else 30
            return real[: (pick * len(real)) // 61]  # a cut body (an image)
        return json.dumps(mutation.apply(document)).encode()

    return rewrite


def _switch_on_http(bad: FakeComfyUI, item: Answer | Rewrite | History) -> None:
    if isinstance(item, History):
        entry = item.entry
        bad.corrupt_history(
            item.mutation.apply if entry is None else entry, times=2 if entry is None else None
        )
    elif isinstance(item, Rewrite):
        bad.corrupt_answers(
            item.route,
            method=item.method,
            body=_rewriter(item.mutation),
            status=item.status,
            times=item.times,
        )
    else:
        bad.corrupt_answers(
            item.route,
            method=item.method,
            body=item.body,
            status=item.status,
            content_type=item.content_type,
            times=item.times,
        )


def switch_on(plan: Plan, bad: FakeComfyUI, good: FakeComfyUI) -> None:
    """Make ``bad`` do everything ``plan`` says."""
    for injection in plan.injections:
        _switch_on_ws(bad, good, injection)
    for corruption in plan.corruptions:
        _switch_on_http(bad, corruption)
    if plan.forget is not None:
        bad.drop_ws_messages(plan.forget, times=None)


# --------------------------------------------------------------------------- the property


@dataclass
class Outcome:
    """What one example saw."""

    results: list[JobResult] = field(default_factory=list)
    bad_name: str = ""
    download_dir: Path = Path()
    delivered: int = 0
    """How many messages and answers the garbage changed during the hostile job."""


def _escaped(exc: BaseException, where: str) -> BaseException:
    kind = "a ComfyAPIError" if isinstance(exc, ComfyAPIError) else "NOT a ComfyAPIError"
    exc.add_note(f"comfytrio containment: {type(exc).__name__} ({kind}) escaped {where}")
    return exc


def check_result(outcome: Outcome, result: JobResult) -> None:
    """The property, for one job's result: ``bad``'s shards may fail (with a
    ``ComfyAPIError``) or succeed with whatever it reported; ``good``'s all make their
    images; every file is in the download folder."""
    assert sorted(s.index for s in result.shards) == list(range(len(result.shards)))
    for failure in result.failures:
        assert failure.instance == outcome.bad_name, (
            f"shard {failure.index} failed on the good server {failure.instance}: "
            + "".join(traceback.format_exception(failure.error))
        )
        assert isinstance(failure.error, ComfyAPIError), (
            f"shard {failure.index} failed with a {type(failure.error).__name__}, "
            "not a ComfyAPIError: " + "".join(traceback.format_exception(failure.error))
        )
        cause = failure.error.__cause__
        assert not (
            type(failure.error) is ComfyAPIError
            and cause is not None
            and not isinstance(cause, ComfyAPIError)
        ), (
            f"shard {failure.index}: a {type(cause).__name__} got past the firewall and was "
            "caught only by the scheduler's last resort (a bug): "
            + "".join(traceback.format_exception(failure.error))
        )
    failed = {f.index for f in result.failures}
    for shard in result.shards:
        assert shard.ok == (shard.index not in failed)
        if shard.instance != outcome.bad_name:
            made = [o for o in result.outputs if o.prompt_id == shard.prompt_id]
            assert len(made) == shard.scaled["batch"], (
                f"good shard {shard.index} made {len(made)} images, not {shard.scaled['batch']}"
            )
    root = outcome.download_dir.resolve()
    files = [*result.outputs, *(o for f in result.failures for o in f.outputs)]
    for output in files:
        path = Path(output.path)
        assert path.resolve().is_relative_to(root), f"{output.path!r} is outside {root}"
        assert path.is_file(), f"{output.path!r} does not exist"


async def _websockets_closed(*fakes: FakeComfyUI) -> None:
    with trio.move_on_after(5):
        for fake in fakes:
            await fake.wait_websocket_count(0)
    counts = [fake.websocket_count for fake in fakes]
    assert counts == [0] * len(fakes), f"websockets left open after the api closed: {counts}"


class Pair:
    """The two servers of a test, and one example after another on them."""

    def __init__(self, bad: FakeComfyUI, good: FakeComfyUI, tmp_path: Path) -> None:
        self.bad = bad
        self.good = good
        self.tmp_path = tmp_path
        self._numbers = count()
        self.outcomes: list[Outcome] = []

    async def reset(self) -> None:
        """Back to normal servers with nothing queued (after the last example)."""
        for fake in (self.bad, self.good):
            fake.clear_faults()
        with trio.fail_after(EXAMPLE_LIMIT):
            await self.bad.wait_idle()
            await self.good.wait_idle()
            await _websockets_closed(self.bad, self.good)

    async def example(self, plan: Plan) -> Outcome:
        """Run two jobs on a fresh api while ``bad`` follows ``plan``; check the property."""
        await self.reset()
        number = next(self._numbers)
        outcome = Outcome(download_dir=self.tmp_path / f"downloads-{number}")
        api = ComfyAPI(
            [RemoteComfyUI(self.bad.url), RemoteComfyUI(self.good.url)],
            self.tmp_path / "models",
            gpu=GPUInfo(False, 0),
            download_dir=outcome.download_dir,
            faults=FAST,
            prompts_per_instance=1,
            min_instances=1 if plan.from_the_start else 2,
            ready_timeout=10,
        )
        hits = self.bad.hostile_hits
        if plan.from_the_start:
            switch_on(plan, self.bad, self.good)
        where = "ComfyAPI.__aenter__"
        try:
            with trio.fail_after(EXAMPLE_LIMIT):
                async with api:
                    outcome.bad_name = api.instances[0].name
                    if not plan.from_the_start:
                        switch_on(plan, self.bad, self.good)
                    where = "run_workflow (hostile job)"
                    result = await api.run_workflow(JOB, params=params(f"h{number}", 2))
                    outcome.delivered = self.bad.hostile_hits - hits
                    check_result(outcome, result)
                    outcome.results.append(result)
                    self.bad.clear_faults()
                    where = "run_workflow (the clean job after it)"
                    result = await api.run_workflow(JOB, params=params(f"c{number}", 2))
                    check_result(outcome, result)
                    outcome.results.append(result)
                    where = "ComfyAPI.__aexit__"
        except AssertionError:
            raise
        except trio.TooSlowError as exc:
            exc.add_note(
                f"comfytrio containment: {where} did not end in {EXAMPLE_LIMIT:g} s (a hang)"
            )
            raise
        except BaseException as exc:
            raise _escaped(exc, where) from None
        finally:
            self.bad.clear_faults()
        await _websockets_closed(self.bad, self.good)
        return outcome


@pytest.fixture
async def pair(fake_comfyui_factory: FakeFactory, tmp_path: Path) -> Pair:
    """``bad`` (whose prompts take a little time, so garbage meets them running) and
    ``good``, started once per test."""
    bad = await fake_comfyui_factory(seconds_per_image=0.05)
    good = await fake_comfyui_factory()
    return Pair(bad, good, tmp_path)


async def run_examples(pair: Pair, strategy: st.SearchStrategy[Plan]) -> None:
    """Let hypothesis try ``strategy``'s plans, each as ``pair.example`` on this trio loop."""

    @HOSTILE
    @given(plan=strategy)
    def property_holds(plan: Plan) -> None:
        outcome = trio.from_thread.run(pair.example, plan)
        pair.outcomes.append(outcome)
        event(f"garbage delivered during the job: {outcome.delivered > 0}")
        event(f"shards failed on the bad server: {len(outcome.results[0].failures)}")

    await trio.to_thread.run_sync(property_holds)
    # The suite's own check: most examples did get garbage to the api during its job.
    delivered = sum(o.delivered > 0 for o in pair.outcomes)
    errors = Counter(
        type(f.error).__name__ for o in pair.outcomes for r in o.results for f in r.failures
    )
    print(  # seen with pytest -s: what the examples did
        f"\n{len(pair.outcomes)} examples, garbage delivered in {delivered}; "
        f"bad shards failed with {dict(errors)}"
    )
    assert delivered * 2 >= len(pair.outcomes), (
        f"garbage reached the api in only {delivered} of {len(pair.outcomes)} examples"
    )


# --------------------------------------------------------------------------- tests


async def test_a_server_that_sends_nothing_malformed_costs_nothing(pair: Pair) -> None:
    """The suite's own check: with no garbage, both servers make their image."""
    for _ in range(2):
        outcome = await pair.example(Plan())
        for result in outcome.results:
            assert result.ok
            assert len({o.instance for o in result.outputs}) == 2  # each server made one


async def test_harmless_hostile_switches_cost_nothing(pair: Pair) -> None:
    """Switches that change nothing ComfyUI would not send keep every job whole (so a
    failure of the properties below is the garbage's doing, not the tooling's)."""
    plan = Plan(
        injections=[
            Inject(
                "status",
                {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}},
            )
        ],
        corruptions=[Rewrite("GET", "/queue", Mutation(((10_000, AddKey("extra", 1)),)), None, 1)],
    )
    outcome = await pair.example(plan)
    assert all(result.ok for result in outcome.results)


async def test_garbage_on_the_websocket_costs_only_that_server(
    autojump_clock: trio.testing.MockClock, pair: Pair
) -> None:
    await run_examples(pair, ws_plans)


async def test_garbage_answers_cost_only_that_server(
    autojump_clock: trio.testing.MockClock, pair: Pair
) -> None:
    await run_examples(pair, http_plans)


async def test_garbage_from_the_first_answer_costs_only_that_server(
    autojump_clock: trio.testing.MockClock, pair: Pair
) -> None:
    await run_examples(pair, start_plans)


# The examples the search found first, pinned (each once a failure; see the module's top).


async def test_a_server_that_never_ends_its_prompt_and_breaks_queue(
    autojump_clock: trio.testing.MockClock, pair: Pair
) -> None:
    """No ``executing`` end signal, and ``/queue`` answers garbage whenever the api asks
    where the prompt is: the bad shard must end (on ``bad``, or elsewhere), not wait."""
    plan = Plan(
        corruptions=[Answer("GET", "/queue", "", 400, "application/json", None)],
        forget="executing",
    )
    await pair.example(plan)


async def test_a_server_that_never_ends_its_prompt_and_breaks_history(
    autojump_clock: trio.testing.MockClock, pair: Pair
) -> None:
    """The same, with ``/history/{id}`` giving ``{id: []}`` for the prompt once it ran."""
    plan = Plan(corruptions=[History(Mutation(()), entry=[])], forget="executing")
    await pair.example(plan)


async def test_a_refused_first_websocket_does_not_stop_the_api(
    autojump_clock: trio.testing.MockClock, pair: Pair
) -> None:
    """``bad`` answers its first websocket handshake with an HTML page: the api still opens
    on ``good`` (``min_instances=1``) and runs the job."""
    plan = Plan(
        corruptions=[Answer("GET", "/ws", "<html>502 Bad Gateway</html>", 502, "text/html", 1)],
        from_the_start=True,
    )
    await pair.example(plan)


def test_mutations_reach_every_node() -> None:
    """A mutation can touch any field of a message, however deep, and the whole of it."""
    message = {"type": "executed", "data": {"output": {"images": [{"filename": "a"}]}}}
    picked = [
        Mutation(((pick, Replace("X")),)).apply(message) for pick in range(len(_paths(message)) + 1)
    ]
    assert picked[0] == "X"
    assert {"type": "X", "data": message["data"]} in picked
    assert {"type": "executed", "data": {"output": {"images": [{"filename": "X"}]}}} in picked
    assert Mutation(((0, Delete()),)).apply(message) == {}
    assert Mutation(((2, Delete()),)).apply(message) == {"type": "executed"}
    assert math.isnan(Mutation(((1, Replace(math.nan)),)).apply(message)["type"])
    assert message == {"type": "executed", "data": {"output": {"images": [{"filename": "a"}]}}}
