"""The fake's binary websocket frames, byte layout for byte layout.

Against ``16_binary_ws_messages.json`` (a real ComfyUI 0.3.64 running SaveImageWebsocket and
GetImageSize, with and without ``supports_preview_metadata``) and ComfyUI's ``server.py``
(``send_image``, ``send_image_with_metadata``, ``send_progress_text``): the frames, the
order around ``progress``, a client written for the real server (ComfyUI's own
``websockets_api_example_ws_images.py`` logic) against ``comfytrio fake-server``, latent
previews when asked, and PreviewAny's text output.
"""

from __future__ import annotations

import io
import json
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio_websocket
from conftest import Child, Comfy, free_port, load_recording, sampler_workflow
from PIL import Image

from comfytrio.cli import main
from comfytrio.testing import FakeComfyUI, decode_frame, lay_out_fake_comfyui_install

RECORDING = load_recording("16_binary_ws_messages.json")
Factory = Callable[..., Awaitable[FakeComfyUI]]


def red_png() -> bytes:
    """The PNG ComfyUI sends for one 24x16 red frame (``compress_level=1``)."""
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (255, 0, 0)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def binaries(messages: list[Any]) -> list[bytes]:
    return [m for m in messages if isinstance(m, bytes)]


async def replay(comfy: Comfy, case: str) -> tuple[str, list[Any]]:
    recorded = RECORDING[case]
    listener = await comfy.listen(recorded["request"]["client_id"])
    if recorded["feature_flags_sent"]:
        await listener.send({"type": "feature_flags", "data": recorded["feature_flags_sent"]})
        await listener.wait_for(lambda m: isinstance(m, dict) and m["type"] == "feature_flags")
    prompt_id, messages, _ = await comfy.run(
        recorded["request"]["prompt"], listener, client_id=recorded["request"]["client_id"]
    )
    return prompt_id, messages


async def test_save_image_websocket_is_there_as_in_a_stock_install(comfy: Comfy) -> None:
    info = (await comfy.http.get("/object_info/SaveImageWebsocket")).json()
    assert info["SaveImageWebsocket"]["output_node"] is True
    assert info["SaveImageWebsocket"]["python_module"] == "custom_nodes.websocket_image_save"
    assert list((await comfy.http.get("/object_info")).json())[-1] == "SaveImageWebsocket"
    features = (await comfy.http.get("/features")).json()
    assert features == load_recording("01_idle_gets.json")["/features"]["body"]


async def test_type_1_frames_are_the_recorded_bytes(comfy: Comfy) -> None:
    prompt_id, messages = await replay(comfy, "without_feature_flags")
    frames = binaries(messages)
    recorded = [m for m in RECORDING["without_feature_flags"]["ws_messages"] if m["kind"] != "text"]
    assert [f[:4] for f in frames] == [struct.pack(">I", r["event_type_be_u32"]) for r in recorded]
    image_frames = [f for f in frames if f[:4] == struct.pack(">I", 1)]
    assert len(image_frames) == 2
    for frame in image_frames:
        # u32be 1 (PREVIEW_IMAGE), u32be 2 (PNG), the PNG: 4 + 4 + 93 = 101 bytes as recorded.
        assert frame == struct.pack(">II", 1, 2) + red_png()
        assert len(frame) == 101
    text = struct.pack(">II", 3, 1) + b"2" + b"width: 24, height: 16\n batch size: 2"
    assert text in frames  # TEXT: u32be 3, u32be len(node id), node id, UTF-8 text
    # The image comes after its progress message (hijack_progress sends it last).
    kinds = [m["type"] if isinstance(m, dict) else m[:4] for m in messages]
    for index, kind in enumerate(kinds):
        if kind == struct.pack(">I", 1):
            assert kinds[index - 1] == "progress"
    # SaveImageWebsocket writes nothing and has no UI output.
    entry = (await comfy.http.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert set(entry["outputs"]) == {"4"}
    assert sorted(p.name for p in comfy.fake.output_dir.iterdir()) == ["bin_00001_.png"]
    assert not any(
        isinstance(m, dict) and m["type"] == "executed" and m["data"]["node"] == "5"
        for m in messages
    )


async def test_type_4_frames_are_the_recorded_bytes(comfy: Comfy) -> None:
    prompt_id, messages = await replay(comfy, "with_supports_preview_metadata")
    frames = [f for f in binaries(messages) if f[:4] == struct.pack(">I", 4)]
    assert len(frames) == 2
    header = json.dumps(
        {
            "node_id": "5",
            "prompt_id": prompt_id,
            "display_node_id": "5",
            "parent_node_id": None,
            "real_node_id": "5",
            "image_type": "image/png",
        }
    ).encode()
    assert len(header) == 165  # 0xa5, as recorded
    for frame in frames:
        assert frame == struct.pack(">II", 4, len(header)) + header + red_png()
        assert len(frame) == 266
        decoded = decode_frame(frame)
        assert decoded.node_id == "5"
        assert decoded.image == red_png()
    # With metadata the image comes before its progress message.
    kinds = [m["type"] if isinstance(m, dict) else m[:4] for m in messages]
    for index, kind in enumerate(kinds):
        if kind == struct.pack(">I", 4):
            assert kinds[index + 1] == "progress"
            assert kinds[index - 1] == "progress_state"


def test_decode_frame_reads_every_kind() -> None:
    image = decode_frame(struct.pack(">II", 1, 1) + b"\xff\xd8jpeg")
    assert (image.event, image.image_type, image.image) == (1, "image/jpeg", b"\xff\xd8jpeg")
    text = decode_frame(struct.pack(">II", 3, 2) + b"12" + "é".encode())
    assert (text.event, text.node_id, text.text) == (3, "12", "é")
    other = decode_frame(struct.pack(">I", 9) + b"x")
    assert (other.event, other.image) == (9, b"x")
    for bad in (b"\x00", struct.pack(">II", 4, 50) + b"{}", struct.pack(">I", 1)):
        try:
            decode_frame(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} decoded")


# -- a client written for the real server ------------------------------------------------------

WS_IMAGES_PROMPT: dict[str, Any] = {
    # script_examples/websockets_api_example_ws_images.py's prompt (batch 2 instead of 1).
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "cfg": 8,
            "denoise": 1,
            "latent_image": ["5", 0],
            "model": ["4", 0],
            "negative": ["7", 0],
            "positive": ["6", 0],
            "sampler_name": "euler",
            "scheduler": "normal",
            "seed": 5,
            "steps": 20,
        },
    },
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
    },
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"batch_size": 2, "height": 512, "width": 512},
    },
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"clip": ["4", 1], "text": "masterpiece best quality man"},
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "save_image_websocket_node": {
        "class_type": "SaveImageWebsocket",
        "inputs": {"images": ["8", 0]},
    },
}


async def get_images(url: str, client_id: str, prompt: dict[str, Any]) -> dict[str, list[bytes]]:
    """``get_images`` of ComfyUI's websocket-images example, on trio-websocket and httpx."""
    ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    async with trio_websocket.open_websocket_url(ws_url) as ws, httpx.AsyncClient() as http:
        answer = await http.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id})
        prompt_id = answer.json()["prompt_id"]
        output_images: dict[str, list[bytes]] = {}
        current_node = ""
        while True:
            out = await ws.get_message()
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["prompt_id"] == prompt_id:
                        if data["node"] is None:
                            break  # Execution is done
                        current_node = data["node"]
            elif current_node == "save_image_websocket_node":
                output_images.setdefault(current_node, []).append(out[8:])
        return output_images


def cli() -> list[str]:
    script = Path(sys.executable).with_name("comfytrio")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from comfytrio.cli import main; sys.exit(main())"]


async def test_a_websocket_images_client_runs_unchanged_against_fake_server(
    spawn: Callable[..., Awaitable[Child]], tmp_path: Path
) -> None:
    root = tmp_path / "base"
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors").write_bytes(b"w")
    # --previews: the sampler's JPEG previews come too; the client skips them, as it must.
    child = await spawn([*cli(), "fake-server", "--port", "0", "--root", str(root), "--previews"])
    url = await child.wait_ready()
    images = await get_images(url, "ws-images-example", WS_IMAGES_PROMPT)
    assert list(images) == ["save_image_websocket_node"]
    assert len(images["save_image_websocket_node"]) == 2
    for data in images["save_image_websocket_node"]:
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert (image.format, image.size, image.mode) == ("PNG", (512, 512), "RGB")
    assert not any((root / "output").iterdir())  # nothing on the server's disk


async def test_fake_server_takes_a_comfyui_version(
    spawn: Callable[..., Awaitable[Child]], tmp_path: Path, capsys: Any
) -> None:
    assert main(["fake-server", "--root", str(tmp_path), "--comfyui-version", "9.9"]) == 2
    assert "0.3.64, 0.38.1" in capsys.readouterr().err
    child = await spawn(
        [
            *cli(),
            "fake-server",
            "--port",
            "0",
            "--root",
            str(tmp_path / "b"),
            "--comfyui-version",
            "0.38.1",
        ]
    )
    url = await child.wait_ready()
    async with httpx.AsyncClient(base_url=url) as http:
        stats = (await http.get("/system_stats")).json()
        assert stats["system"]["comfyui_version"] == "0.38.1"
        jobs = (await http.get("/api/jobs")).json()
        assert jobs == {
            "jobs": [],
            "pagination": {"offset": 0, "limit": None, "total": 0, "has_more": False},
        }


# -- latent previews ---------------------------------------------------------------------------


async def sampler_run(comfy: Comfy, *, flags: bool, seed: int) -> tuple[str, list[Any]]:
    comfy.fake.add_model("checkpoints", "m.safetensors")
    listener = await comfy.listen(f"previews-{flags}")
    if flags:
        await listener.send({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        await listener.wait_for(lambda m: isinstance(m, dict) and m["type"] == "feature_flags")
    prompt = sampler_workflow(height=96, seed=seed)
    prompt_id, messages, _ = await comfy.run(prompt, listener, client_id=f"previews-{flags}")
    return prompt_id, messages


def jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.size


async def test_no_latent_previews_unless_asked(comfy: Comfy) -> None:
    _, messages = await sampler_run(comfy, flags=False, seed=1)
    assert binaries(messages) == []
    assert not comfy.fake.previews


async def test_latent_previews_as_type_1_jpeg_frames(comfy: Comfy) -> None:
    comfy.fake.previews = True
    _, messages = await sampler_run(comfy, flags=False, seed=2)
    frames = binaries(messages)
    assert len(frames) == 3  # one per step
    for frame in frames:
        decoded = decode_frame(frame)
        assert (decoded.event, decoded.image_type) == (1, "image/jpeg")
        assert frame[4:8] == struct.pack(">I", 1)  # JPEG
        # Latent2RGB gives the latent's 8x12; send_image's ImageOps.contain scales it to 512.
        assert jpeg_size(decoded.image) == (341, 512)
    kinds = [m["type"] if isinstance(m, dict) else "binary" for m in messages]
    for index, kind in enumerate(kinds):
        if kind == "binary":
            assert kinds[index - 1] == "progress"
            assert messages[index - 1]["data"]["node"] == "4"


async def test_latent_previews_as_type_4_frames_with_metadata(
    fake_comfyui_factory: Factory, comfy_for: Callable[[FakeComfyUI], Comfy]
) -> None:
    comfy = comfy_for(await fake_comfyui_factory(previews=True))
    prompt_id, messages = await sampler_run(comfy, flags=True, seed=3)
    frames = binaries(messages)
    assert len(frames) == 3
    for frame in frames:
        decoded = decode_frame(frame)
        assert decoded.event == 4
        assert decoded.metadata == {
            "node_id": "4",
            "prompt_id": prompt_id,
            "display_node_id": "4",
            "parent_node_id": None,
            "real_node_id": "4",
            "image_type": "image/jpeg",
        }
        assert jpeg_size(decoded.image) == (341, 512)
    kinds = [m["type"] if isinstance(m, dict) else "binary" for m in messages]
    for index, kind in enumerate(kinds):
        if kind == "binary":
            assert (kinds[index - 1], kinds[index + 1]) == ("progress_state", "progress")


# -- text output ---------------------------------------------------------------------------------


async def test_preview_any_reports_text_and_no_file(comfy: Comfy) -> None:
    listener = await comfy.listen("text")
    prompt = {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "hello"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "3": {"class_type": "PrimitiveInt", "inputs": {"value": 42}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "5": {"class_type": "StringLength", "inputs": {"string": ["1", 0]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    }
    _, messages, entry = await comfy.run(prompt, listener, client_id="text")
    executed = {
        m["data"]["node"]: m["data"]["output"]
        for m in messages
        if isinstance(m, dict) and m["type"] == "executed"
    }
    assert executed == {"2": {"text": ["hello"]}, "4": {"text": ["42"]}, "6": {"text": ["5"]}}
    assert entry["outputs"] == executed
    assert not any(comfy.fake.output_dir.iterdir())
    assert not any(comfy.fake.temp_dir.iterdir())


async def test_an_install_takes_preview_method_and_a_version(
    spawn: Callable[..., Awaitable[Child]], tmp_path: Path
) -> None:
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    (install / "models" / "checkpoints" / "m.safetensors").write_bytes(b"w")
    child = await spawn(
        [
            sys.executable,
            "main.py",
            "--cpu",
            "--port",
            str(free_port()),
            "--preview-method",
            "auto",
        ],
        cwd=install,
        env={"COMFYTRIO_FAKE_COMFYUI_VERSION": "0.38.1"},
    )
    url = await child.wait_ready()
    async with httpx.AsyncClient(base_url=url) as http:
        stats = (await http.get("/system_stats")).json()
        assert stats["system"]["comfyui_version"] == "0.38.1"
        ws_url = url.replace("http://", "ws://") + "/ws?clientId=install"
        async with trio_websocket.open_websocket_url(ws_url) as ws:
            answer = await http.post(
                "/prompt", json={"prompt": sampler_workflow(height=96), "client_id": "install"}
            )
            prompt_id = answer.json()["prompt_id"]
            frames: list[bytes] = []
            while True:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    frames.append(message)
                elif json.loads(message) == {
                    "type": "executing",
                    "data": {"node": None, "prompt_id": prompt_id},
                }:
                    break
        assert [decode_frame(f).image_type for f in frames] == ["image/jpeg"] * 3
        job = (await http.get(f"/api/jobs/{prompt_id}")).json()
        assert job["status"] == "completed"
