"""Replay every recorded exchange of the real ComfyUI 0.3.64 against the fake.

Each recording in ``tests/recordings/`` is replayed on a fresh fake server: same requests,
same order. The answers must have the same status, content type, JSON keys and value types
(recursively; ids recorded by the real server are mapped to the fake's), and the websocket
messages must come in the same order. Where the outcome is deterministic (validation
errors, file names, cached node lists) the values must be equal too.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import RECORDINGS, Child, Comfy, WsListener, free_port, load_recording, png_bytes

from comfytrio.testing import FakeComfyUI, lay_out_fake_comfyui_install

NOT_CLAIMED = {
    "12_latency.json": "latency measurements, not an exchange (see test_fake_execution)",
    "12b_latency_cpu213_stub_8190.json": "latency measurements of a second venv",
    "13_gc_stall_after_idle.json": "the gc.collect() stall after 10 s idle is not simulated",
}
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR\x00\x00"

# -- comparing -----------------------------------------------------------------------------


def remap(value: Any, ids: dict[str, str]) -> Any:
    """``value`` with the real server's prompt ids replaced by the fake's."""
    if isinstance(value, dict):
        return {ids.get(k, k): remap(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [remap(v, ids) for v in value]
    if isinstance(value, str):
        return ids.get(value, value)
    return value


def assert_shape(recorded: Any, actual: Any, path: str = "$") -> None:
    """Same keys and value types, recursively. Lists of scalars may differ in length."""
    if isinstance(recorded, dict):
        assert isinstance(actual, dict), f"{path}: {actual!r} is not an object"
        assert set(actual) == set(recorded), (
            f"{path}: keys {sorted(actual)} != recorded {sorted(recorded)}"
        )
        for key in recorded:
            assert_shape(recorded[key], actual[key], f"{path}.{key}")
    elif isinstance(recorded, list):
        assert isinstance(actual, list), f"{path}: {actual!r} is not a list"
        scalars = all(not isinstance(x, (dict, list)) for x in [*recorded, *actual])
        if scalars and recorded:
            kinds = {type(x) for x in recorded}
            for item in actual:
                assert type(item) in kinds, f"{path}: {item!r} not of {kinds}"
        elif not scalars:
            assert len(actual) == len(recorded), f"{path}: {len(actual)} != {len(recorded)} items"
            for index, (r, a) in enumerate(zip(recorded, actual, strict=True)):
                assert_shape(r, a, f"{path}[{index}]")
    else:
        assert type(actual) is type(recorded), (
            f"{path}: {actual!r} ({type(actual).__name__}) vs recorded {recorded!r}"
        )


def assert_response(
    recorded: dict[str, Any], response: httpx.Response, ids: dict[str, str]
) -> None:
    """Status, content type and body shape like the recorded answer."""
    assert response.status_code == recorded["status"], response.text
    assert response.headers.get("content-type", "") == recorded["content_type"]
    body = recorded["body"]
    if isinstance(body, dict) and "_bytes" in body:
        if body["_bytes"] == 0:
            assert response.content == b""
        else:
            assert response.content[:4].hex() == body["_first_16_hex"][:8]
    elif isinstance(body, str):
        assert response.text == body
    else:
        assert_shape(remap(body, ids), response.json())


def without_tracebacks(value: Any) -> Any:
    """``value`` minus ``traceback`` entries (they name the fake's own frames)."""
    if isinstance(value, dict):
        return {k: without_tracebacks(v) for k, v in value.items() if k != "traceback"}
    if isinstance(value, list):
        return [without_tracebacks(v) for v in value]
    return value


def kinds(messages: list[Any]) -> list[str]:
    """Message types of a recording's ws list or of a listener's messages."""
    result = []
    for m in messages:
        if isinstance(m, dict) and "kind" in m:  # recorded
            if m["kind"] == "binary":
                result.append(f"binary:{m['event_type_be_u32']}")
            else:
                result.append(m["msg"]["type"])
        elif isinstance(m, dict):
            result.append(m["type"])
        else:
            result.append(f"binary:{int.from_bytes(m[:4], 'big')}")
    return result


def assert_messages(recorded: list[Any], actual: list[Any], ids: dict[str, str]) -> None:
    """Same message types in the same order, and each text message of the same shape."""
    assert kinds(actual) == kinds(recorded)
    for r, a in zip(recorded, actual, strict=True):
        if r["kind"] == "text":
            assert_shape(remap(r["msg"], ids), a)


def assert_history(recorded: dict[str, Any], actual: dict[str, Any], ids: dict[str, str]) -> None:
    assert_shape(remap(recorded, ids), actual)


# -- replay helpers ------------------------------------------------------------------------


async def fresh(
    start: Callable[..., Awaitable[FakeComfyUI]],
    comfy_for: Callable[[FakeComfyUI], Comfy],
    **kwargs: Any,
) -> Comfy:
    return comfy_for(await start(**kwargs))


async def replay_prompt(
    comfy: Comfy, case: dict[str, Any], ids: dict[str, str], *, listener: WsListener | None = None
) -> tuple[str, list[Any]]:
    """Replay one recorded ``{request, response, ws_messages, history}`` case."""
    body = case["request"]
    if "method" in body:
        body = body["body"]
    client_id = body.get("client_id")
    recorded_ws = case.get("ws_messages")
    if listener is None:
        listener = await comfy.listen(client_id)
        start = 0
    else:
        start = len(listener.messages)
        if recorded_ws and "sid" in recorded_ws[0]["msg"]["data"]:
            recorded_ws = recorded_ws[1:]  # recorded on a new socket: skip its first status
    response = await comfy.http.post("/prompt", json=body)
    recorded_id = case["response"]["body"].get("prompt_id")
    if response.status_code == 200 and recorded_id:
        ids[recorded_id] = response.json()["prompt_id"]
    assert_response(case["response"], response, ids)
    if response.status_code != 200:
        return "", []
    prompt_id = response.json()["prompt_id"]
    await listener.wait_done(prompt_id, start=start)
    messages = listener.messages[start:]
    if recorded_ws is not None:
        assert_messages(recorded_ws, messages, ids)
    if "history" in case:
        history = await comfy.http.get(f"/history/{prompt_id}")
        assert_response(case["history"], history, ids)
    return prompt_id, messages


def outputs_of(case: dict[str, Any]) -> Any:
    return next(iter(case["history"]["body"].values()))["outputs"]


async def replay_02_to_05(comfy: Comfy, upto: str) -> dict[str, str]:
    ids: dict[str, str] = {}
    first = load_recording("02_prompt_success.json")
    listener = await comfy.listen(first["request"]["body"]["client_id"])
    prompt_id, _ = await replay_prompt(comfy, first, ids, listener=listener)
    queue = await comfy.http.get("/queue")
    assert_response(first["queue_after"], queue, ids)
    files = sorted(p.name for p in comfy.fake.output_dir.iterdir())
    assert files == ["api_capture_00001_.png", "api_capture_00002_.png"]
    if upto == "02":
        return ids
    if upto == "03":
        for url, recorded in load_recording("03_view_output.json").items():
            response = await comfy.http.get(url)
            assert_response(recorded, response, ids)
            if "Content-Disposition" in recorded["headers"]:
                expected = recorded["headers"]["Content-Disposition"]
                assert response.headers["content-disposition"] == expected
        return ids
    cache = load_recording("04_cache_behaviour.json")
    for step in ("identical_resubmit", "batch_size_changed_to_1"):
        new_id, _ = await replay_prompt(comfy, cache[step], ids, listener=listener)
        history = (await comfy.http.get(f"/history/{new_id}")).json()[new_id]
        assert history["outputs"] == outputs_of(cache[step])
    free = await comfy.http.post("/free", json=cache["free"]["request"])
    assert_response(cache["free"]["response"], free, ids)
    for step in ("identical_resubmit_after_free", "only_meta_title_changed"):
        new_id, _ = await replay_prompt(comfy, cache[step], ids, listener=listener)
        history = (await comfy.http.get(f"/history/{new_id}")).json()[new_id]
        assert history["outputs"] == outputs_of(cache[step])
        cached = history["status"]["messages"][1][1]["nodes"]
        assert (
            cached
            == cache[step]["history"]["body"][next(iter(cache[step]["history"]["body"]))]["status"][
                "messages"
            ][1][1]["nodes"]
        )
    assert prompt_id
    if upto == "05":
        listing = load_recording("05_history_list.json")
        for request, recorded in listing.items():
            response = await comfy.http.get(request.split(" ", 1)[1])
            assert list(response.json()) == [ids[k] for k in recorded["body"]]
            assert_response(recorded, response, ids)
    return ids


# -- the cases -----------------------------------------------------------------------------


async def case_01(start: Any, comfy_for: Any) -> None:
    comfy = await fresh(start, comfy_for)
    for url, recorded in load_recording("01_idle_gets.json").items():
        response = await comfy.http.get(url)
        assert_response(recorded, response, {})
        if url.startswith("/object_info/"):
            assert response.json() == recorded["body"]


async def case_02(start: Any, comfy_for: Any) -> None:
    await replay_02_to_05(await fresh(start, comfy_for), "02")


async def case_03(start: Any, comfy_for: Any) -> None:
    await replay_02_to_05(await fresh(start, comfy_for), "03")


async def case_04(start: Any, comfy_for: Any) -> None:
    await replay_02_to_05(await fresh(start, comfy_for), "04")


async def case_05(start: Any, comfy_for: Any) -> None:
    await replay_02_to_05(await fresh(start, comfy_for), "05")


async def case_06(start: Any, comfy_for: Any) -> None:
    comfy = await fresh(start, comfy_for)
    recording = load_recording("06_validation_errors.json")
    for name, case in recording.items():
        if name.startswith("_"):
            continue
        if "request_raw" in case:
            response = await comfy.http.post(
                "/prompt",
                content=case["request_raw"].encode(),
                headers={"content-type": "application/json"},
            )
        else:
            response = await comfy.http.post("/prompt", json=case["request"])
        assert_response(case["response"], response, {})
        recorded = case["response"]["body"]
        if case["response"]["status"] == 400:
            assert without_tracebacks(response.json()) == without_tracebacks(recorded), name
        elif isinstance(recorded, dict):
            assert response.json()["node_errors"] == recorded["node_errors"], name
    await comfy.fake.wait_idle()
    queue = await comfy.http.get("/queue")
    assert_response(recording["_queue_after"], queue, {})


async def case_07(start: Any, comfy_for: Any) -> None:
    comfy = await fresh(start, comfy_for)
    (comfy.fake.input_dir / "corrupt.png").write_bytes(CORRUPT_PNG)
    ids: dict[str, str] = {}
    recording = load_recording("07_execution_error.json")
    for name, case in recording.items():
        _, messages = await replay_prompt(comfy, case, ids)
        error = next(m for m in messages if m["type"] == "execution_error")["data"]
        recorded = next(
            m["msg"]["data"] for m in case["ws_messages"] if m["msg"]["type"] == "execution_error"
        )
        for key in ("node_id", "node_type", "executed", "exception_message", "exception_type"):
            assert error[key] == recorded[key], (name, key)
        assert set(error["current_inputs"]) == set(recorded["current_inputs"])
        assert sorted(error["current_outputs"]) == sorted(recorded["current_outputs"])


async def replay_08(comfy: Comfy) -> None:
    recording = load_recording("08_upload_image.json")
    first, second = png_bytes(color=(1, 2, 3)), png_bytes(color=(9, 9, 9))
    files = {
        "new_file_overwrite_true_subfolder": ("upl.png", first),
        "same_name_same_bytes_no_overwrite": ("upl.png", first),
        "same_name_different_bytes_no_overwrite": ("upl.png", second),
        "same_name_different_bytes_overwrite_true": ("upl.png", second),
        "top_level_no_fields": ("top.png", first),
        "path_traversal_subfolder": ("evil.png", first),
    }
    (comfy.fake.input_dir / "corrupt.png").write_bytes(CORRUPT_PNG)
    for name, case in recording.items():
        if name.startswith("_"):
            continue
        upload = {"image": (files[name][0], files[name][1], "image/png")} if name in files else None
        response = await comfy.http.post("/upload/image", data=case["fields"], files=upload)
        assert_response(case["response"], response, {})
        if case["response"]["status"] == 200:
            assert response.json() == case["response"]["body"]
    listing = sorted(
        str(p.relative_to(comfy.fake.input_dir))
        for p in comfy.fake.input_dir.rglob("*")
        if p.is_file()
    )
    assert listing == recording["_input_dir_listing"]
    info = (await comfy.http.get("/object_info/LoadImage")).json()
    assert (
        info["LoadImage"]["input"]["required"]["image"]
        == recording["_LoadImage_combo_after_upload"]
    )


async def case_08(start: Any, comfy_for: Any) -> None:
    await replay_08(await fresh(start, comfy_for))


async def case_09(start: Any, comfy_for: Any) -> None:
    comfy = await fresh(start, comfy_for)
    await replay_08(comfy)
    recording = load_recording("09_loadimage_from_upload_and_view.json")
    ids: dict[str, str] = {}
    for case in recording["runs"].values():
        await replay_prompt(comfy, case, ids)
        if case["response"]["status"] == 200:
            entry = next(iter(case["history"]["body"].values()))
            history = (
                await comfy.http.get(f"/history/{ids[case['response']['body']['prompt_id']]}")
            ).json()
            assert next(iter(history.values()))["outputs"] == entry["outputs"]
        else:
            response = await comfy.http.post("/prompt", json=case["request"])
            assert response.json() == case["response"]["body"]
    _, messages = await replay_prompt(comfy, recording["preview_image_run"], ids)
    executed = next(m for m in messages if m["type"] == "executed")
    temp_name = executed["data"]["output"]["images"][0]["filename"]
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", temp_name)
    recorded_temp = "ComfyUI_temp_oxikf_00001_.png"
    for url, case in recording["views"].items():
        response = await comfy.http.get(url.replace(recorded_temp, temp_name))
        assert_response(case, response, ids)


async def case_10(start: Any, comfy_for: Any) -> None:
    comfy = await fresh(start, comfy_for)
    comfy.fake.set_node_seconds("ImageBlur", 0.25)
    recording = load_recording("10_queue_interrupt_delete.json")
    recorded_ids = recording["ids"]
    client_id = recording["steps"][0]["body"]["client_id"]
    submitter = await comfy.listen(client_id)
    other = await comfy.listen("unrelated-client")
    ids: dict[str, str] = {}
    names = {v: k for k, v in recorded_ids.items()}

    async def wait_running(recorded_id: str) -> None:
        await submitter.wait_for(
            lambda m: m["type"] == "execution_start" and m["data"]["prompt_id"] == ids[recorded_id]
        )
        assert comfy.fake.running_id == ids[recorded_id]

    for step in recording["steps"]:
        label: str = step["step"]
        if label.startswith("queue after clear"):
            await wait_running(recorded_ids["F_slow_interrupted_after_clear"])
        if label == "queue clear":
            await wait_running(recorded_ids["F_slow_interrupted_after_clear"])
        if label == "queue while A running":
            await wait_running(recorded_ids["A_slow_interrupted"])
        path = step["path"]
        for recorded_id, actual_id in ids.items():
            path = path.replace(recorded_id, actual_id)
        if path.startswith("/history/") and step["response"]["body"]:
            await comfy.wait_history(path.rsplit("/", 1)[1])
        if step["method"] == "GET":
            response = await comfy.http.get(path)
        elif step["body"] is None:
            response = await comfy.http.post(path)
        else:
            response = await comfy.http.post(path, json=remap(step["body"], ids))
        if path == "/prompt" and step["method"] == "POST":
            ids[step["response"]["body"]["prompt_id"]] = response.json()["prompt_id"]
        if label == "queue idle":
            await comfy.fake.wait_idle()
            response = await comfy.http.get(path)
        assert_response(step["response"], response, ids)
        if label.startswith("prompt while"):
            assert response.json() == step["response"]["body"]
    await comfy.fake.wait_idle()
    for recorded_id, actual in ids.items():
        history = (await comfy.http.get(f"/history/{actual}")).json()
        name = names[recorded_id]
        if name.endswith(("_deleted", "_cleared")):
            assert history == {}, name
        else:
            status = history[actual]["status"]
            assert status["status_str"] == ("error" if "interrupted" in name else "success"), name

    def per_prompt(messages: list[Any], prompt_id: str) -> list[str]:
        seq: list[str] = []
        for m in messages:
            msg = m["msg"] if "kind" in m else m
            if not isinstance(msg, dict) or msg["type"] in ("status", "progress_state"):
                continue
            if msg["data"].get("prompt_id") == prompt_id and (not seq or seq[-1] != msg["type"]):
                seq.append(msg["type"])
        return seq

    recorded_ws = [m for m in recording["ws_messages_submitter"] if m["kind"] == "text"]
    for recorded_id, actual in ids.items():
        assert per_prompt(submitter.messages, actual) == per_prompt(recorded_ws, recorded_id)
    assert set(kinds(other.messages)) == set(kinds(recording["ws_messages_other_client"]))


async def case_11(start: Any, comfy_for: Any) -> None:
    comfy = await fresh(start, comfy_for)
    recording = load_recording("11_ws_clients_prompt_ids_cache.json")
    ids: dict[str, str] = {}

    # A prompt without client_id: only status and progress_state reach anyone.
    case = recording["prompt_without_client_id"]
    recorded_prompt = next(iter(case["history"]["body"].values()))["prompt"]
    with_id = await comfy.listen("listener-with-id")
    without_id = await comfy.listen(None)
    response = await comfy.submit(recorded_prompt[2], client_id=None)
    assert_response(case["response"], response, ids)
    prompt_id = response.json()["prompt_id"]
    ids[case["response"]["body"]["prompt_id"]] = prompt_id
    entry = await comfy.wait_history(prompt_id)
    assert entry["prompt"][3] == {}
    assert_history(next(iter(case["history"]["body"].values())), entry, ids)
    await with_id.wait_for(
        lambda m: (
            m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0
        ),
        start=3,
    )
    await without_id.wait_for(
        lambda m: (
            m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0
        ),
        start=3,
    )
    assert kinds(with_id.messages) == kinds(case["ws_listener_with_clientId"])
    assert kinds(without_id.messages) == kinds(case["ws_listener_without_clientId"])
    assert without_id.messages[0]["data"]["sid"] != ""

    # Two sockets with one clientId: the newer takes over, the older hears nothing more.
    case = recording["same_clientId_two_sockets"]
    first = await comfy.listen("shared-id")
    second = await comfy.listen("shared-id")
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 102},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "dupcid"},
        },
    }
    response = await comfy.submit(prompt, client_id="shared-id")
    await second.wait_done(response.json()["prompt_id"])
    assert kinds(second.messages) == kinds(case["second_socket"])
    assert kinds(first.messages) == kinds(case["first_socket"])

    # feature_flags handshake.
    case = recording["feature_flags_negotiation"]
    flags = await comfy.listen("flags-client")
    await flags.send(case["sent_first"])
    answer = await flags.wait_for(lambda m: m["type"] == "feature_flags")
    assert answer == case["received"][1]["msg"]

    # A client-chosen prompt id, reused.
    case = recording["client_chosen_prompt_id"]
    chosen = await comfy.listen("chooser")
    for key, history_key in (("first", "history"), ("reused_same_id", "history_after")):
        recorded_entry = next(iter(case[key][history_key]["body"].values()))
        start = len(chosen.messages)
        response = await comfy.submit(
            recorded_entry["prompt"][2],
            client_id="chooser",
            prompt_id="orchestrator-chosen-id-0001",
        )
        assert response.json()["prompt_id"] == "orchestrator-chosen-id-0001"
        await chosen.wait_done("orchestrator-chosen-id-0001", start=start)
        history = await comfy.http.get("/history/orchestrator-chosen-id-0001")
        assert_response(case[key][history_key], history, ids)
        assert history.json()["orchestrator-chosen-id-0001"]["outputs"] == recorded_entry["outputs"]
    assert kinds(chosen.messages) == kinds(case["ws"])

    # extra_data and an explicit number.
    case = recording["extra_data_and_number"]
    response = await comfy.http.post("/prompt", json=case["request"])
    assert response.json()["number"] == 12.5
    ids[case["response"]["body"]["prompt_id"]] = response.json()["prompt_id"]
    entry = await comfy.wait_history(response.json()["prompt_id"])
    recorded_entry = next(iter(case["history"]["body"].values()))
    assert entry["prompt"][0] == 12.5
    assert entry["prompt"][3] == recorded_entry["prompt"][3]

    # Classic cache: A, B, A re-executes; A, A is cached.
    listener = await comfy.listen("abab")
    for index, step in enumerate(recording["cache_sequence_A_B_A_A"]):
        color = 201 if step["label"] == "A" else 202
        prompt = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "ab" + step["label"]},
            },
        }
        _, _, entry = await comfy.run(prompt, listener, client_id="abab")
        assert entry["status"]["messages"][1][1]["nodes"] == step["execution_cached_nodes"], index
        assert entry["outputs"] == step["outputs"], index

    # POST /history {"delete": [...]}.
    case = recording["history_delete"]
    before = len((await comfy.http.get("/history")).json())
    response = await comfy.http.post("/history", json={"delete": [prompt_id]})
    assert_response(case["response"], response, ids)
    assert len((await comfy.http.get("/history")).json()) == before - 1
    gone = await comfy.http.get(f"/history/{prompt_id}")
    assert_response(case["history_of_deleted"], gone, ids)


async def case_kill(
    signal_name: str, tmp_path: Path, spawn: Callable[..., Awaitable[Child]]
) -> None:
    recording = load_recording(f"14_kill_{signal_name}.json")
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    state = tmp_path / "instance"
    (state / "user").mkdir(parents=True)
    child = await spawn(
        [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--disable-auto-launch",
            "--user-directory",
            str(state / "user"),
            "--output-directory",
            str(state / "output"),
            "--temp-directory",
            str(state / "temp"),
        ],
        cwd=install,
        env={"COMFYTRIO_FAKE_SECONDS_PER_IMAGE": "3"},
    )
    url = await child.wait_ready()
    port = int(url.rsplit(":", 1)[1])
    preview = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 1},
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    slow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 2},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "slow"}},
    }
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        async with trio.open_nursery() as nursery:
            listener: WsListener = await nursery.start(
                WsListener(url.replace("http", "ws") + "/ws?clientId=killer").run
            )
            # A PreviewImage file as left by an earlier prompt (a real preview would cost
            # seconds_per_image, which is long here to keep the next prompt busy).
            leftover = state / "temp" / "temp" / recording["temp_files_before"][0]
            leftover.write_bytes(png_bytes())
            await http.post("/prompt", json={"prompt": slow, "client_id": "killer"})
            await http.post("/prompt", json={"prompt": preview, "client_id": "killer"})
            await listener.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == "2")
            with socket.create_connection(("127.0.0.1", port)) as half_sent:
                half_sent.sendall(
                    b"POST /prompt HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
                )
                child.process.send_signal(getattr(signal, signal_name))
                assert (
                    await listener.wait_closed() == recording["ws_end"]["close_info"]["close_code"]
                )
                await child.wait_exit(5)
                half_sent.settimeout(2)
                try:
                    data = half_sent.recv(1000)
                except OSError:
                    data = b""
            assert data == b"" == recording["raw_inflight_http_request"]["data"].encode()
            nursery.cancel_scope.cancel()
        with pytest.raises(httpx.ConnectError):
            await http.get("/system_stats")
    temp_dir = state / "temp" / "temp"
    if recording["temp_files_after"] == "temp dir removed":
        assert not temp_dir.exists()
    else:
        assert sorted(p.name for p in temp_dir.iterdir()) == [leftover.name]


async def case_15(start: Any, comfy_for: Any) -> None:
    recording = load_recording("15_two_instances_concurrently.json")
    a = await fresh(start, comfy_for)
    b = await fresh(start, comfy_for)
    a.fake.set_seconds_per_image(0.05)
    b.fake.set_seconds_per_image(0.05)

    def prompt(prefix: str) -> dict[str, Any]:
        return {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 5},
            },
            "99": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": prefix},
            },
        }

    listener_a = await a.listen("both")
    listener_b = await b.listen("both")
    _, _, solo = await a.run(prompt("both_solo"), listener_a, client_id="both")
    assert solo["outputs"] == recording["solo_8188"]["outputs"]
    results: dict[str, Any] = {}

    async def run(comfy: Comfy, listener: WsListener, prefix: str) -> None:
        _, _, entry = await comfy.run(prompt(prefix), listener, client_id="both")
        results[prefix] = entry["outputs"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, a, listener_a, "both_a")
        nursery.start_soon(run, b, listener_b, "both_b")
    assert results["both_a"] == recording["concurrent"][0]["outputs"]
    assert results["both_b"] == recording["concurrent"][1]["outputs"]
    assert sorted(p.name for p in a.fake.output_dir.iterdir()) == recording["output_dirs"]["8188"]
    assert sorted(p.name for p in b.fake.output_dir.iterdir()) == recording["output_dirs"]["8189"]


async def case_16(start: Any, comfy_for: Any) -> None:
    comfy = await fresh(start, comfy_for)  # SaveImageWebsocket: there, as in a stock install
    recording = load_recording("16_binary_ws_messages.json")
    ids: dict[str, str] = {}
    for name in ("without_feature_flags", "with_supports_preview_metadata"):
        case = recording[name]
        listener = await comfy.listen(case["request"]["client_id"])
        if case["feature_flags_sent"]:
            await listener.send({"type": "feature_flags", "data": case["feature_flags_sent"]})
            await listener.wait_for(lambda m: isinstance(m, dict) and m["type"] == "feature_flags")
        await replay_prompt(
            comfy, {k: v for k, v in case.items() if k != "ws_messages"}, ids, listener=listener
        )
        assert kinds(listener.messages) == kinds(case["ws_messages"])
        for recorded, actual in zip(case["ws_messages"], listener.messages, strict=True):
            if recorded["kind"] == "binary":
                # Same length and same first 16 bytes: the PNGs are byte-identical (Pillow,
                # compress_level=1, as ComfyUI), the metadata JSON is as long.
                assert len(actual) == recorded["len"]
                assert actual[:16].hex() == recorded["first_16_bytes_hex"]
                if recorded["event_type_be_u32"] == 3:
                    assert actual[9:] == b"width: 24, height: 16\n batch size: 2"
                    assert len(actual) == recorded["len"]
                if recorded["event_type_be_u32"] == 4:
                    size = int.from_bytes(actual[4:8], "big")
                    meta = json.loads(actual[8 : 8 + size])
                    assert set(meta) == {
                        "node_id",
                        "prompt_id",
                        "display_node_id",
                        "parent_node_id",
                        "real_node_id",
                        "image_type",
                    }
            else:
                assert_shape(remap(recorded["msg"], ids), actual)


async def case_17(start: Any, comfy_for: Any) -> None:
    comfy = await fresh(start, comfy_for)
    recording = load_recording("17_partial_execution_targets.json")
    ids: dict[str, str] = {}
    prompt_id, _ = await replay_prompt(comfy, recording, ids)
    entry = (await comfy.http.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert entry["outputs"] == next(iter(recording["history"]["body"].values()))["outputs"]
    case = recording["targets_not_an_output_node"]
    body = {**recording["request"], "partial_execution_targets": case["request_targets"]}
    response = await comfy.http.post("/prompt", json=body)
    assert_response(case["response"], response, ids)
    assert response.json() == case["response"]["body"]


async def case_18(start: Any, comfy_for: Any) -> None:
    comfy = await fresh(start, comfy_for)
    comfy.fake.add_model("checkpoints", "juggernaut_xl.safetensors")
    comfy.fake.add_model("loras", "detail_enhancer.safetensors")
    recording = load_recording("18_missing_models_value_not_in_list.json")
    response = await comfy.http.post("/prompt", json=recording["request"])
    assert response.status_code == recording["response"]["status"]
    body = response.json()
    recorded = recording["response"]["body"]
    for node_errors in (body["node_errors"], recorded["node_errors"]):
        for error in node_errors.values():
            for item in error["errors"]:
                config = item["extra_info"].pop("input_config")
                item["extra_info"]["input_config"] = (
                    config if isinstance(config, str) else repr(config)
                )
    for node_id, error in recorded["node_errors"].items():
        ours = body["node_errors"][node_id]["errors"][0]["extra_info"]
        # The recorder kept only the start of input_config's repr.
        assert ours["input_config"].startswith(error["errors"][0]["extra_info"]["input_config"])
        ours["input_config"] = error["errors"][0]["extra_info"]["input_config"]
    assert body == recorded


CASES: dict[str, Callable[[Any, Any], Awaitable[None]]] = {
    "01_idle_gets.json": case_01,
    "02_prompt_success.json": case_02,
    "03_view_output.json": case_03,
    "04_cache_behaviour.json": case_04,
    "05_history_list.json": case_05,
    "06_validation_errors.json": case_06,
    "07_execution_error.json": case_07,
    "08_upload_image.json": case_08,
    "09_loadimage_from_upload_and_view.json": case_09,
    "10_queue_interrupt_delete.json": case_10,
    "11_ws_clients_prompt_ids_cache.json": case_11,
    "15_two_instances_concurrently.json": case_15,
    "16_binary_ws_messages.json": case_16,
    "17_partial_execution_targets.json": case_17,
    "18_missing_models_value_not_in_list.json": case_18,
}
KILL_CASES = ["SIGTERM", "SIGKILL", "SIGINT"]


def test_every_recording_is_replayed_or_explained() -> None:
    recorded = {p.name for p in RECORDINGS.glob("[0-9]*.json")}
    covered = set(CASES) | {f"14_kill_{s}.json" for s in KILL_CASES} | set(NOT_CLAIMED)
    assert recorded == covered


@pytest.mark.parametrize("name", sorted(CASES))
async def test_replay(
    name: str, fake_comfyui_factory: Any, comfy_for: Callable[[FakeComfyUI], Comfy]
) -> None:
    await CASES[name](fake_comfyui_factory, comfy_for)


@pytest.mark.parametrize("signal_name", KILL_CASES)
async def test_replay_kill(
    signal_name: str, tmp_path: Path, spawn: Callable[..., Awaitable[Child]]
) -> None:
    await case_kill(signal_name, tmp_path, spawn)


def test_object_info_entries_are_the_recorded_ones() -> None:
    from comfytrio.testing._nodes import NodeRegistry

    recorded = load_recording("object_info.json")
    registry = NodeRegistry()
    for name in registry.names():
        ours = registry.get(name)
        assert ours is not None
        if name == "SaveImageWebsocket":
            # custom_nodes/websocket_image_save.py: every stock install loads it, the
            # recorder's --base-directory instance did not; built by 0.3.64's node_info().
            assert set(ours.info) == set(recorded["SaveImage"])
            assert ours.info["python_module"] == "custom_nodes.websocket_image_save"
            assert ours.info["input"] == {"required": {"images": ["IMAGE"]}}
            continue
        assert ours.info == recorded[name], name
    assert registry.names()[-1] == "SaveImageWebsocket"  # custom nodes load last
