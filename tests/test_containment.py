"""What a misbehaving server can do to a job: cost its own shard, never the other server's.

Each case runs a job split over two fake servers by URL. The bad one sends something ComfyUI
never sends (through the fake's hostile switches); the good one works. With one attempt per
shard, the bad server's shard fails with a typed error naming the server and what was wrong,
and the good server's shard brings its files; with the default attempts, the bad shard runs
again on the good server and the job comes back whole.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from test_fault_tolerance import JOB, params

from comfytrio import (
    ComfyAPI,
    ComfyAPIError,
    ComfyUIInstance,
    FaultPolicy,
    GPUInfo,
    JobResult,
    RemoteComfyUI,
    ServerProtocolError,
)
from comfytrio.testing import FakeComfyUI
from comfytrio.testing.pytest_plugin import FakeFactory

Hostile = Callable[[FakeComfyUI], None]


def for_the_prompt(kind: str, data: Callable[[str], dict[str, Any]]) -> Hostile:
    """After the bad server's ``execution_start``, a ``kind`` message for that prompt."""

    def switch(fake: FakeComfyUI) -> None:
        fake.send_ws_after(
            "execution_start",
            lambda real: {"type": kind, "data": {"prompt_id": real["prompt_id"], **data("x")}},
        )

    return switch


CASES: dict[str, tuple[Hostile, str]] = {
    "progress data a string": (
        lambda f: f.send_ws_after(
            "execution_start", lambda real: {"type": "progress", "data": "boom"}
        ),
        "",  # no prompt named: ignored and counted
    ),
    "execution_cached nodes an int": (
        for_the_prompt("execution_cached", lambda _: {"nodes": 5}),
        "the cached nodes are 5",
    ),
    "output a list": (
        for_the_prompt("executed", lambda _: {"node": "9", "output": []}),
        "the output of node 9 is a list",
    ),
    "a NUL in a file name": (
        for_the_prompt(
            "executed",
            lambda _: {
                "node": "9",
                "output": {
                    "images": [{"filename": "a\x00.png", "subfolder": "", "type": "output"}]
                },
            },
        ),
        "control character",
    ),
    "a progress value 'abc'": (
        for_the_prompt("progress", lambda _: {"node": "3", "value": "abc", "max": 4}),
        "progress value is 'abc'",
    ),
    "/prompt number 'abc'": (
        lambda f: f.corrupt_answers(
            "/prompt",
            method="POST",
            body=lambda real: json.dumps({**json.loads(real), "number": "abc"}).encode(),
        ),
        "number is 'abc'",
    ),
    "/prompt node_errors 'boom'": (
        lambda f: f.corrupt_answers(
            "/prompt",
            method="POST",
            body=lambda real: json.dumps({**json.loads(real), "node_errors": "boom"}).encode(),
        ),
        "node_errors is a str",
    ),
    "an output name leaving its folder": (
        for_the_prompt(
            "executed",
            lambda _: {
                "node": "9",
                "output": {
                    "images": [{"filename": "x.png", "subfolder": "../../../..", "type": "output"}]
                },
            },
        ),
        "would leave its folder",
    ),
}


@asynccontextmanager
async def api_on(
    fakes: list[FakeComfyUI], tmp_path: Path, attempts: int
) -> AsyncIterator[ComfyAPI]:
    faults = FaultPolicy(max_shard_attempts=attempts, silence_timeout=2.0)
    async with ComfyAPI(
        [RemoteComfyUI(f.url) for f in fakes],
        tmp_path / "models",
        gpu=GPUInfo(False, 0),
        download_dir=tmp_path / "downloads",
        faults=faults,
    ) as api:
        yield api


def inside(result: JobResult, folder: Path) -> bool:
    return all(Path(o.path).resolve().is_relative_to(folder.resolve()) for o in result.outputs)


@pytest.mark.parametrize("case", list(CASES))
async def test_a_bad_server_costs_only_its_own_shard(
    case: str, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    switch, detail = CASES[case]
    bad, good = await fake_comfyui_factory(), await fake_comfyui_factory()
    switch(bad)
    async with api_on([bad, good], tmp_path, attempts=1) as api:
        with trio.fail_after(30):
            result = await api.run_workflow(JOB, params=params("split", 2))
        stats = {i.name: i for i in api.statistics().instances}
    good_name, bad_name = good.url.removeprefix("http://"), bad.url.removeprefix("http://")
    assert stats[bad_name].malformed >= 1
    assert {o.instance for o in result.outputs} >= {good_name}
    assert inside(result, tmp_path / "downloads")
    assert all(Path(o.path).is_file() for o in result.outputs)
    if not detail:  # a message of no prompt: logged, counted, nothing lost
        assert len(result.outputs) == 2
        return
    assert [f.instance for f in result.failures] == [bad_name]
    error = result.failures[0].error
    assert isinstance(error, ServerProtocolError)
    assert error.instance == bad_name
    assert detail in str(error)


@pytest.mark.parametrize("case", ["output a list", "/prompt number 'abc'"])
async def test_with_retries_the_job_comes_back_whole(
    case: str, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    switch, _ = CASES[case]
    bad, good = await fake_comfyui_factory(), await fake_comfyui_factory()
    switch(bad)
    async with api_on([bad, good], tmp_path, attempts=3) as api:
        with trio.fail_after(30):
            result = await api.run_workflow(JOB, params=params("whole", 2))
        retried = sum(i.shards_retried for i in api.statistics().instances)
    assert len(result.outputs) == 2
    assert not result.failures
    assert retried >= 1


async def test_unsolicited_garbage_on_the_socket_is_counted_and_ignored(
    fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    bad, good = await fake_comfyui_factory(), await fake_comfyui_factory()
    async with api_on([bad, good], tmp_path, attempts=1) as api:
        garbage: list[Any] = [
            {"type": "progress", "data": "boom"},
            '{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": Infinity}}}}',
            "not json at all",
            {"data": {}},
            [1, 2, 3],
        ]
        for message in garbage:
            assert bad.send_ws(message) == 1
        assert bad.ping_ws(b"p" * 200) == 1  # a control frame RFC 6455 forbids: reconnect
        with trio.fail_after(30):
            result = await api.run_workflow(JOB, params=params("calm", 2))
        malformed = api.instances[0].malformed
    assert len(result.outputs) == 2
    assert malformed >= 5


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/system_stats", "<html><body>502 Bad Gateway</body></html>"),
        ("/queue", '{"queue_running": "boom"}'),
        ("/history/{prompt_id}", "[1, 2]"),
        ("/object_info", "NaN"),
    ],
)
async def test_garbage_answers_never_end_the_api(
    route: str, body: str, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    bad, good = await fake_comfyui_factory(), await fake_comfyui_factory()
    async with api_on([bad, good], tmp_path, attempts=3) as api:
        bad.corrupt_answers(route, body=body)
        with trio.fail_after(30):
            result = await api.run_workflow(JOB, params=params("answers", 4))
    assert len(result.outputs) + sum(1 for f in result.failures) >= 1
    assert all(isinstance(f.error, ComfyAPIError) for f in result.failures)
    assert inside(result, tmp_path / "downloads")


async def test_a_local_servers_output_name_never_leaves_its_folder(
    fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    for_the_prompt(
        "executed",
        lambda _: {
            "node": "4",
            "output": {"images": [{"filename": "x.png", "subfolder": "../../../../tmp"}]},
        },
    )(fake_comfyui)
    fake_comfyui.drop_ws_messages("executed")  # only the lying one arrives
    async with ComfyAPI(
        [ComfyUIInstance(fake_comfyui.root, fake_comfyui.port)],
        tmp_path / "models",
        gpu=GPUInfo(False, 0),
        auto_start=False,
        faults=FaultPolicy(max_shard_attempts=1),
    ) as api:
        assert api.instances[0].is_local
        with pytest.raises(ServerProtocolError, match="would leave its folder") as info:
            await api.run_workflow(JOB, params=params("local", 1))
    assert info.value.instance == api.instances[0].name


@pytest.mark.parametrize(
    "output",
    [
        {"images": [{"filename": "a.png", "subfolder": "", "type": []}]},  # found by hypothesis
        {"images": [{"filename": ["a.png"]}]},
        {"images": [{"filename": "a.png", "subfolder": {"x": 1}}]},
        [],
        "boom",
    ],
)
def test_the_firewall_raises_only_malformed(output: Any) -> None:
    from comfytrio import _firewall as firewall

    with pytest.raises(firewall.Malformed):
        firewall.output(output, "9")
    with pytest.raises(firewall.Malformed):
        firewall.history_entry({"outputs": {"9": output}, "status": {}})
