"""``comfytrio fake-server`` as a child process, reached with httpx and a websocket."""

from __future__ import annotations

import ast
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio_websocket
from conftest import Child

from comfytrio.cli import build_parser, main

ROOT = Path(__file__).parent.parent


def cli() -> list[str]:
    script = Path(sys.executable).with_name("comfytrio")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from comfytrio.cli import main; sys.exit(main())"]


async def test_fake_server_answers_http_and_websocket(
    spawn: Callable[..., Awaitable[Child]], tmp_path: Path
) -> None:
    root = tmp_path / "base"
    child = await spawn(
        [*cli(), "fake-server", "--port", "0", "--root", str(root), "--seconds-per-image", "0.01"]
    )
    url = await child.wait_ready()
    assert url.startswith("http://127.0.0.1:")
    for folder in ("input", "output", "temp", "models/checkpoints", "models/loras"):
        assert (root / folder).is_dir()
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/system_stats")).json()["system"]["comfyui_version"] == "0.3.64"
        async with trio_websocket.open_websocket_url(
            url.replace("http", "ws") + "/ws?clientId=cli"
        ) as ws:
            first = json.loads(await ws.get_message())
            assert first["data"]["sid"] == "cli"
            prompt = {
                "1": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0},
                },
                "2": {
                    "class_type": "SaveImage",
                    "inputs": {"images": ["1", 0], "filename_prefix": "cli"},
                },
            }
            await http.post("/prompt", json={"prompt": prompt, "client_id": "cli"})
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] == "executing" and message["data"]["node"] is None:
                    break
    assert sorted(p.name for p in (root / "output").iterdir()) == [
        "cli_00001_.png",
        "cli_00002_.png",
    ]
    assert await child.stop(signal.SIGINT) == 0
    assert "Stopped" in child.output


async def test_fake_server_stops_on_sigterm(
    spawn: Callable[..., Awaitable[Child]], tmp_path: Path
) -> None:
    child = await spawn([*cli(), "fake-server", "--port", "0", "--root", str(tmp_path)])
    await child.wait_ready()
    assert await child.stop(signal.SIGTERM) == 0


def test_parser_has_sub_commands(capsys: object) -> None:
    parser = build_parser()
    args = parser.parse_args(["fake-server", "--root", "/tmp/x", "--port", "9"])
    assert args.port == 9
    assert args.host == "127.0.0.1"
    assert main([]) == 2


def test_the_command_line_reaches_the_fake_only_through_its_public_function() -> None:
    for source in (ROOT / "comfytrio" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and "testing" in (node.module or ""):
                assert not (node.module or "").split(".")[-1].startswith("_"), source
                assert all(not alias.name.startswith("_") for alias in node.names), source
