"""The fake's HTTP routes: answers, status codes and content types."""

from __future__ import annotations

import io
import json

import pytest
from conftest import Comfy, png_bytes
from PIL import Image

from comfytrio.testing import COMFYUI_VERSION

JSON = "application/json; charset=utf-8"
ERROR_500 = "500 Internal Server Error\n\nServer got itself in trouble"


async def test_idle_answers(comfy: Comfy) -> None:
    stats = (await comfy.http.get("/system_stats")).json()
    assert stats["system"]["comfyui_version"] == COMFYUI_VERSION == "0.3.64"
    assert str(comfy.fake.port) in stats["system"]["argv"]
    assert stats["devices"][0]["type"] == "cpu"
    assert (await comfy.http.get("/prompt")).json() == {"exec_info": {"queue_remaining": 0}}
    assert (await comfy.http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
    assert (await comfy.http.get("/history")).json() == {}
    features = await comfy.http.get("/features")
    assert features.json() == {"supports_preview_metadata": True, "max_upload_size": 104857600}
    assert features.headers["content-type"] == JSON
    # aiohttp's json_response spacing, so lengths match a real server byte for byte
    assert (await comfy.http.get("/prompt")).headers["content-length"] == "37"


@pytest.mark.parametrize(
    "path",
    [
        "/prompt",
        "/queue",
        "/history",
        "/object_info/EmptyImage",
        "/models",
        "/system_stats",
        "/features",
    ],
)
async def test_every_route_is_also_under_api(comfy: Comfy, path: str) -> None:
    plain = await comfy.http.get(path)
    api = await comfy.http.get("/api" + path)
    assert plain.status_code == api.status_code == 200
    if path != "/system_stats":
        assert plain.json() == api.json()


async def test_unknown_route_is_a_plain_404(comfy: Comfy) -> None:
    response = await comfy.http.get("/no/such/route")
    assert response.status_code == 404
    assert response.text == "404: Not Found"


async def test_object_info_lists_supported_nodes_with_live_combos(comfy: Comfy) -> None:
    info = (await comfy.http.get("/object_info")).json()
    for name in (
        "PrimitiveInt",
        "EmptyImage",
        "LoadImage",
        "SaveImage",
        "PreviewImage",
        "ImageScale",
        "CheckpointLoaderSimple",
        "KSampler",
        "VAEDecode",
    ):
        assert name in info
    assert info["LoadImage"]["input"]["required"]["image"] == [[], {"image_upload": True}]
    comfy.fake.add_input_image("b.png")
    comfy.fake.add_input_image("a.png")
    (comfy.fake.input_dir / "notes.txt").write_text("not an image")
    comfy.fake.add_model("checkpoints", "sdxl.safetensors")
    comfy.fake.add_model("checkpoints", "readme.md")
    info = (await comfy.http.get("/object_info")).json()
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["a.png", "b.png"]
    ckpt = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    assert ckpt[0] == ["sdxl.safetensors"]
    one = (await comfy.http.get("/object_info/CheckpointLoaderSimple")).json()
    assert one == {"CheckpointLoaderSimple": info["CheckpointLoaderSimple"]}
    assert (await comfy.http.get("/object_info/NoSuchNode")).json() == {}


async def test_models_routes(comfy: Comfy) -> None:
    folders = (await comfy.http.get("/models")).json()
    assert folders[:4] == ["checkpoints", "configs", "loras", "vae"]
    assert (await comfy.http.get("/models/loras")).json() == []
    comfy.fake.add_model("loras", "sub/style.safetensors")
    comfy.fake.add_model("loras", "detail.safetensors")
    assert (await comfy.http.get("/models/loras")).json() == [
        "detail.safetensors",
        "sub/style.safetensors",
    ]
    missing = await comfy.http.get("/models/nonsense")
    assert missing.status_code == 404
    assert missing.content == b""


@pytest.mark.parametrize(
    "body",
    [
        b"this is not json",
        b'{"prompt": [1, 2]}',
        b"",
        b'{"prompt": {"1": 5}}',
        b'{"number": "abc", "prompt": {}}',
    ],
)
async def test_malformed_prompt_bodies_are_aiohttp_500s(comfy: Comfy, body: bytes) -> None:
    response = await comfy.http.post("/prompt", content=body)
    assert response.status_code == 500
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == ERROR_500


async def test_number_counts_every_post_and_front_is_negative(comfy: Comfy) -> None:
    bad = await comfy.http.post("/prompt", json={"client_id": "x"})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "no_prompt"
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    first = await comfy.submit(prompt)
    front = await comfy.submit(prompt, front=True)
    explicit = await comfy.submit(prompt, number=7)
    after = await comfy.submit(prompt)
    assert first.json()["number"] == 1
    assert front.json()["number"] == -2
    assert explicit.json()["number"] == 7.0
    assert isinstance(explicit.json()["number"], float)
    assert after.json()["number"] == 3
    assert len(comfy.fake.prompts_received) == 5


async def test_history_listing_and_deletion(comfy: Comfy) -> None:
    listener = await comfy.listen()
    ids = []
    for color in range(4):
        prompt = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "h"},
            },
        }
        prompt_id, _, _ = await comfy.run(prompt, listener)
        ids.append(prompt_id)
    assert list((await comfy.http.get("/history?max_items=2")).json()) == ids[2:]
    assert list((await comfy.http.get("/history?max_items=1&offset=0")).json()) == ids[:1]
    assert list((await comfy.http.get("/history?offset=3")).json()) == ids[3:]
    assert (await comfy.http.get("/history?max_items=x")).status_code == 500
    deleted = await comfy.http.post("/history", json={"delete": [ids[0], "unknown"]})
    assert deleted.status_code == 200
    assert deleted.content == b""
    assert list((await comfy.http.get("/history")).json()) == ids[1:]
    await comfy.http.post("/history", json={"clear": True})
    assert (await comfy.http.get("/history")).json() == {}


async def test_view_serves_outputs_and_refuses_traversal(comfy: Comfy) -> None:
    listener = await comfy.listen()
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 32, "height": 16, "batch_size": 1, "color": 0xFF0000},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "sub/dir/pic"},
        },
    }
    _, _, entry = await comfy.run(prompt, listener)
    image = entry["outputs"]["2"]["images"][0]
    assert image == {"filename": "pic_00001_.png", "subfolder": "sub/dir", "type": "output"}
    params = {"filename": "pic_00001_.png", "subfolder": "sub/dir", "type": "output"}
    response = await comfy.http.get("/view", params=params)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-disposition"] == 'filename="pic_00001_.png"'
    with Image.open(io.BytesIO(response.content)) as img:
        assert img.size == (32, 16)
        assert img.getpixel((0, 0)) == (255, 0, 0)
    webp = await comfy.http.get("/view", params={**params, "preview": "webp;50"})
    assert webp.headers["content-type"] == "image/webp"
    assert webp.content[:4] == b"RIFF"
    jpeg = await comfy.http.get("/view", params={**params, "preview": "jpeg;80"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    annotated = await comfy.http.get(
        "/view",
        params={"filename": "pic_00001_.png [output]", "subfolder": "sub/dir", "type": "input"},
    )
    assert annotated.status_code == 200
    assert (await comfy.http.get("/view", params={**params, "type": "input"})).status_code == 404
    assert (
        await comfy.http.get("/view", params={**params, "subfolder": "../.."})
    ).status_code == 403
    assert (await comfy.http.get("/view", params={**params, "type": "bogus"})).status_code == 400
    dots = await comfy.http.get("/view", params={"filename": "../x.png", "type": "output"})
    assert dots.status_code == 400


async def test_upload_rules(comfy: Comfy) -> None:
    def upload(name: str, data: bytes) -> dict[str, tuple[str, bytes, str]]:
        return {"image": (name, data, "image/png")}

    first, second = png_bytes(color=(1, 1, 1)), png_bytes(color=(2, 2, 2))
    answer = await comfy.http.post("/upload/image", files=upload("u.png", first))
    assert answer.json() == {"name": "u.png", "subfolder": "", "type": "input"}
    same = await comfy.http.post("/upload/image", files=upload("u.png", first))
    assert same.json()["name"] == "u.png"
    other = await comfy.http.post("/upload/image", files=upload("u.png", second))
    assert other.json()["name"] == "u (1).png"
    third = await comfy.http.post(
        "/upload/image", files=upload("u.png", png_bytes(color=(3, 3, 3)))
    )
    assert third.json()["name"] == "u (2).png"
    replaced = await comfy.http.post(
        "/upload/image", data={"overwrite": "1"}, files=upload("u.png", second)
    )
    assert replaced.json()["name"] == "u.png"
    assert (comfy.fake.input_dir / "u.png").read_bytes() == second
    temp = await comfy.http.post(
        "/upload/image", data={"type": "temp", "subfolder": "a/b"}, files=upload("t.png", first)
    )
    assert temp.json() == {"name": "t.png", "subfolder": "a/b", "type": "temp"}
    assert (comfy.fake.temp_dir / "a" / "b" / "t.png").is_file()
    for fields in ({"subfolder": "../../etc"}, {"subfolder": "/etc"}):
        refused = await comfy.http.post("/upload/image", data=fields, files=upload("x.png", first))
        assert refused.status_code == 400
        assert refused.content == b""
    missing = await comfy.http.post("/upload/image", data={"overwrite": "true"})
    assert missing.status_code == 400
    bad_type = await comfy.http.post(
        "/upload/image", data={"type": "nope"}, files=upload("x.png", first)
    )
    assert bad_type.status_code == 500


async def test_queue_interrupt_and_free_answer_empty_200(comfy: Comfy) -> None:
    for path, body in (
        ("/queue", {"delete": ["nope"]}),
        ("/queue", {"clear": True}),
        ("/interrupt", {}),
        ("/interrupt", {"prompt_id": "nope"}),
        ("/free", {"unload_models": True, "free_memory": True}),
    ):
        response = await comfy.http.post(path, json=body)
        assert response.status_code == 200, path
        assert response.content == b""
        assert "content-type" not in response.headers
    assert (await comfy.http.post("/interrupt")).status_code == 200
    assert (await comfy.http.post("/interrupt", content=b"garbage")).status_code == 200
    assert (await comfy.http.post("/free", content=b"garbage")).status_code == 500
    assert (await comfy.http.post("/queue", content=b"garbage")).status_code == 500


async def test_websocket_first_message_and_feature_flags(comfy: Comfy) -> None:
    named = await comfy.listen("my-id")
    assert named.messages[0] == {
        "type": "status",
        "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "my-id"},
    }
    anonymous = await comfy.listen(None)
    sid = anonymous.messages[0]["data"]["sid"]
    assert len(sid) == 32
    int(sid, 16)
    await named.send({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    answer = await named.wait_for(lambda m: m["type"] == "feature_flags")
    assert answer["data"] == {"supports_preview_metadata": True, "max_upload_size": 104857600}
    await anonymous.send({"type": "something else"})
    await anonymous.send({"type": "feature_flags", "data": {}})  # not first: ignored
    assert comfy.fake.websocket_count == 2
    assert json.dumps(named.messages[0]).startswith('{"type": "status"')
