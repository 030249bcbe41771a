"""The fake install's ``main.py``: ComfyUI's flags, env knobs, signals, as a real child process."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio
from conftest import Child, WsListener, free_port, load_workflow
from PIL import Image

from comfytrio.testing import lay_out_fake_comfyui_install

Spawn = Callable[..., Awaitable[Child]]


def tiny(prefix: str = "t", node: str = "SaveImage") -> dict[str, object]:
    second: dict[str, object] = {"class_type": node, "inputs": {"images": ["1", 0]}}
    if node == "SaveImage":
        second["inputs"] = {"images": ["1", 0], "filename_prefix": prefix}
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": second,
    }


async def wait_history(http: httpx.AsyncClient, prompt_id: str) -> dict[str, object]:
    with trio.fail_after(10):
        while True:
            answer = (await http.get(f"/history/{prompt_id}")).json()
            if answer:
                entry: dict[str, object] = answer[prompt_id]
                return entry
            await trio.sleep(0.02)


async def test_main_py_takes_comfyuis_flags(spawn: Spawn, tmp_path: Path) -> None:
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    inst = tmp_path / "instance"
    (inst / "user").mkdir(parents=True)
    port = free_port()
    child = await spawn(
        [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-auto-launch",
            "--base-directory",
            str(inst / "base"),
            "--user-directory",
            str(inst / "user"),
            "--input-directory",
            str(inst / "input"),
            "--output-directory",
            str(inst / "output"),
            "--temp-directory",
            str(inst / "temp"),
            "--database-url",
            f"sqlite:///{inst / 'comfyui.db'}",
            "--disable-metadata",
            "--some-future-flag",
        ],
        cwd=install,
    )
    url = await child.wait_ready()
    assert url == f"http://127.0.0.1:{port}"
    assert "ignoring unknown arguments: --some-future-flag" in child.output
    async with httpx.AsyncClient(base_url=url) as http:
        stats = (await http.get("/system_stats")).json()
        assert stats["system"]["argv"][:5] == [
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
        ]
        assert stats["devices"][0]["name"] == "cpu"
        saved = (await http.post("/prompt", json={"prompt": tiny("flags")})).json()
        preview = (await http.post("/prompt", json={"prompt": tiny(node="PreviewImage")})).json()
        await wait_history(http, saved["prompt_id"])
        await wait_history(http, preview["prompt_id"])
    with Image.open(inst / "output" / "flags_00001_.png") as img:
        assert "prompt" not in img.info  # --disable-metadata
    assert len(list((inst / "temp" / "temp").iterdir())) == 1  # ComfyUI uses <temp>/temp
    assert (inst / "base" / "models" / "checkpoints").is_dir()
    assert await child.stop(signal.SIGINT) == 0
    assert "Stopped server" in child.output
    assert not (inst / "temp" / "temp").exists()  # a clean exit removes temp, like ComfyUI


async def test_gpu_pinning_shows_in_system_stats(spawn: Spawn, tmp_path: Path) -> None:
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    child = await spawn(
        [sys.executable, "main.py", "--port", str(free_port()), "--cuda-device", "3"],
        cwd=install,
        env={"CUDA_VISIBLE_DEVICES": "5"},
    )
    url = await child.wait_ready()
    async with httpx.AsyncClient(base_url=url) as http:
        device = (await http.get("/system_stats")).json()["devices"][0]
    assert device["name"] == "cuda:0 fake (CUDA_VISIBLE_DEVICES=3)"
    assert device["type"] == "cuda"
    assert await child.stop(signal.SIGTERM) == -signal.SIGTERM


async def test_start_failures(spawn: Spawn, tmp_path: Path) -> None:
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    missing = await spawn(
        [sys.executable, "main.py", "--user-directory", str(tmp_path / "nope")], cwd=install
    )
    assert await missing.wait_exit() == 2
    assert "is not a valid directory" in missing.output
    exits = await spawn(
        [sys.executable, "main.py", "--port", str(free_port())],
        cwd=install,
        env={"COMFYTRIO_FAKE_EXIT_AT_START": "3"},
    )
    assert await exits.wait_exit() == 3
    assert "COMFYTRIO_FAKE_EXIT_AT_START=3" in exits.output


async def test_startup_delay_then_sigterm(spawn: Spawn, tmp_path: Path) -> None:
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    port = free_port()
    child = await spawn(
        [sys.executable, "main.py", "--cpu", "--port", str(port)],
        cwd=install,
        env={"COMFYTRIO_FAKE_STARTUP_DELAY": "0.2"},
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        refused = 0
        with trio.fail_after(20):
            while True:
                try:
                    response = await http.get("/system_stats")
                    break
                except httpx.ConnectError:
                    refused += 1
                    await trio.sleep(0.05)
        assert response.status_code == 200
        assert refused > 0  # refused while it waited, then ready
    output = child.output
    assert "starting in 0.2 s" in output
    assert output.index("starting in 0.2 s") < output.index("To see the GUI go to: ")
    # SIGTERM ends it at once: killed by the signal, not ComfyUI's SIGINT shutdown.
    assert await child.stop(signal.SIGTERM) == -signal.SIGTERM
    assert "Stopped server" not in child.output


async def test_models_nodes_and_crash_knobs(
    spawn: Spawn, tmp_path: Path, nursery: trio.Nursery
) -> None:
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "juggernaut_xl.safetensors").write_bytes(b"dummy")
    (models / "loras").mkdir()
    (models / "loras" / "detail_enhancer.safetensors").write_bytes(b"dummy")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(
        f"mine:\n  base_path: {json.dumps(str(models))}\n  is_default: true\n"
        "  checkpoints: checkpoints/\n  loras: |\n    loras/\n    more_loras/\n"
    )
    install = lay_out_fake_comfyui_install(
        tmp_path / "ComfyUI",
        nodes={
            "Power Lora Loader (rgthree)": {
                "optional": {"model": "MODEL", "clip": "CLIP"},
                "outputs": ["MODEL", "CLIP"],
            },
        },
    )
    child = await spawn(
        [
            sys.executable,
            "main.py",
            "--cpu",
            "--port",
            str(free_port()),
            "--extra-model-paths-config",
            str(config),
        ],
        cwd=install,
        env={
            "COMFYTRIO_FAKE_CRASH_ON_NODE": "VAEDecode",
            "COMFYTRIO_FAKE_SECONDS_PER_STEP": "0.01",
        },
    )
    url = await child.wait_ready()
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/models/checkpoints")).json() == ["juggernaut_xl.safetensors"]
        listener: WsListener = await nursery.start(
            WsListener(url.replace("http", "ws") + "/ws?clientId=c").run
        )
        workflow = load_workflow("sdxl_txt2img_rgthree_loras.json")
        answer = await http.post("/prompt", json={"prompt": workflow, "client_id": "c"})
        assert answer.status_code == 200, answer.text
        assert await listener.wait_closed() == 1006
    assert await child.wait_exit() == -signal.SIGKILL


async def test_started_by_comfytrios_launcher(tmp_path: Path) -> None:
    from comfytrio._process import InstanceDirs, LaunchSpec, run_comfyui

    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    (models / "loras" / "x.safetensors").write_bytes(b"dummy")
    spec = LaunchSpec(
        name="fake",
        comfyui_path=install,
        port=free_port(),
        dirs=InstanceDirs(tmp_path / "instance"),
        cpu=True,
        models_path=models,
        ready_timeout=30,
        grace=5,
    )
    async with trio.open_nursery() as nursery:
        running = await nursery.start(run_comfyui, spec)
        assert str(spec.port) in running.system_stats["system"]["argv"]
        async with httpx.AsyncClient(base_url=spec.url) as http:
            assert (await http.get("/models/loras")).json() == ["x.safetensors"]
        nursery.cancel_scope.cancel()
