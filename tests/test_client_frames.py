"""Binary websocket frames, as the client reads them: images an output node sends
(``SaveImageWebsocket``) are outputs, a sampler's latent previews are events, a node's text
is an event, what ComfyUI never sends is counted and costs at most its prompt. Real sockets
against the fake ComfyUI, on both of its versions."""

from __future__ import annotations

import io
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import sampler_workflow
from PIL import Image

from comfytrio import (
    ComfyClient,
    ComfyEvent,
    NodePreview,
    NodeProgress,
    NodeText,
    PromptFinished,
    ServerLostError,
    ServerProtocolError,
    open_comfy_client,
)
from comfytrio._firewall import Malformed
from comfytrio._frames import FrameSender, ImageFrame, Streams, TextFrame, Unknown, decode
from comfytrio._prompts import Prompts
from comfytrio.testing import COMFYUI_VERSIONS, FakeComfyUI, decode_frame

Factory = Callable[..., Awaitable[FakeComfyUI]]


def to_websocket(batch: int = 3, *, slow: bool = False) -> dict[str, Any]:
    """``EmptyImage`` of ``batch`` images (inverted first when ``slow``) sent back over the
    websocket by ``SaveImageWebsocket``, as ComfyUI's websocket-images example does."""
    workflow: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 24, "height": 16, "batch_size": batch, "color": 0xFF0000},
        },
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    if slow:
        workflow["3"] = {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
        workflow["2"]["inputs"]["images"] = ["3", 0]
    return workflow


def png_of(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.format, image.size


@pytest.fixture(params=COMFYUI_VERSIONS)
async def fake(request: pytest.FixtureRequest, fake_comfyui_factory: Factory) -> FakeComfyUI:
    """A fake ComfyUI of each version."""
    return await fake_comfyui_factory(comfyui_version=request.param)


@pytest.fixture
async def client(fake: FakeComfyUI) -> AsyncIterator[ComfyClient]:
    async with open_comfy_client(fake.url, silence_timeout=0.5, reconnect_timeout=2) as c:
        yield c


async def events_of(client: ComfyClient, run: Awaitable[Any]) -> tuple[Any, list[ComfyEvent]]:
    """What ``run`` returned, and every event of the client while it ran."""
    seen: list[ComfyEvent] = []
    async with client.subscribe() as events:
        result = await run
        while True:
            event = events.receive_nowait()
            seen.append(event)
            if isinstance(event, PromptFinished):
                return result, seen


# -- outputs ------------------------------------------------------------------------------------


async def test_save_image_websocket_images_are_the_prompt_s_outputs(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    result = await client.run(to_websocket(batch=3))
    assert [(i.node_id, i.index, i.image_type) for i in result.images] == [
        ("2", 0, "image/png"),
        ("2", 1, "image/png"),
        ("2", 2, "image/png"),
    ]
    for image in result.images:
        assert png_of(image.data) == ("PNG", (24, 16))
    assert result.files == []  # nothing written on the server
    assert not any(Path(fake.output_dir).iterdir())
    stats = client.statistics()
    assert stats.preview_metadata  # type 4 frames: we announced supports_preview_metadata
    assert stats.malformed == 0


async def test_type_1_frames_belong_to_the_node_that_runs(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    # A server that ignores the feature flag sends each image as u32 1, u32 2 (PNG), PNG.
    def without_metadata(payload: bytes) -> bytes:
        decoded = decode_frame(struct.pack(">I", 4) + payload)
        return struct.pack(">II", 1, 2) + decoded.image

    fake.send_ws_after(4, without_metadata, replace=True, times=None)
    result = await client.run(to_websocket(batch=2))
    assert [(i.node_id, i.index) for i in result.images] == [("2", 0), ("2", 1)]
    assert png_of(result.images[0].data) == ("PNG", (24, 16))
    assert fake.hostile_hits == 2


async def test_latent_previews_are_events_never_outputs(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    fake.add_model("checkpoints", "m.safetensors")
    fake.previews = True
    workflow = sampler_workflow(image_output="SaveImageWebsocket")
    result, events = await events_of(client, client.run(workflow))
    previews = [e for e in events if isinstance(e, NodePreview)]
    assert [(p.prompt_id, p.node_id, p.image_type) for p in previews] == [
        (result.prompt_id, "4", "image/jpeg")
    ] * 3  # one per step of the sampler
    assert png_of(previews[0].image)[0] == "JPEG"
    # The sampled image itself is the one output: a PNG from SaveImageWebsocket.
    assert [(i.node_id, i.image_type) for i in result.images] == [("6", "image/png")]
    progress = [e for e in events if isinstance(e, NodeProgress) and e.node_id == "4"]
    assert len(progress) == 3


async def test_fewer_images_than_the_node_counted_fail_the_prompt(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    fake.drop_ws_messages(4)  # one of three images never comes
    with pytest.raises(ServerProtocolError) as info:
        await client.run(to_websocket(batch=3))
    assert "node 2 (SaveImageWebsocket) sent 2 image(s) but its progress counted 3" in str(
        info.value
    )
    assert fake.hostile_hits == 1


async def test_an_image_over_the_cap_fails_its_prompt(client: ComfyClient) -> None:
    client.max_image_bytes = 50
    with pytest.raises(ServerProtocolError, match="over the 50-byte cap"):
        await client.run(to_websocket(batch=1))
    client.max_image_bytes = None
    assert len((await client.run(to_websocket(batch=1, slow=True))).images) == 1


async def test_images_sent_while_the_websocket_was_down_are_lost(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    fake.set_node_seconds("ImageInvert", 0.5)
    submitted = await client.submit(to_websocket(batch=2, slow=True))
    await trio.sleep(0.2)
    fake.drop_websockets()  # its images go out while we reconnect
    with trio.fail_after(10), pytest.raises(ServerLostError, match="images it sent are lost"):
        await client.wait(submitted.prompt_id)
    assert len((await client.run(to_websocket(batch=2))).images) == 2


# -- values and text ----------------------------------------------------------------------------


async def test_text_and_values_of_output_nodes_reach_the_caller(client: ComfyClient) -> None:
    workflow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 24, "height": 16, "batch_size": 2, "color": 0},
        },
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    result, events = await events_of(client, client.run(workflow))
    assert result.values == {"3": {"text": ["24"]}}
    assert result.files == []
    assert result.images == ()
    texts = [e for e in events if isinstance(e, NodeText)]
    assert [(t.prompt_id, t.node_id, t.text) for t in texts] == [
        (result.prompt_id, "2", "width: 24, height: 16\n batch size: 2")
    ]


# -- what ComfyUI never sends -------------------------------------------------------------------


async def test_odd_frames_are_counted_and_cost_nothing(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    fake.send_ws(struct.pack(">I", 9) + b"a future event")  # unknown: skipped
    fake.send_ws(struct.pack(">II", 4, 2**31) + b"{}")  # a header longer than the frame
    fake.send_ws(b"\x00\x00")  # no event type
    result = await client.run(to_websocket(batch=1))
    assert len(result.images) == 1
    stats = client.statistics()
    assert (stats.frames_skipped, stats.malformed) == (1, 2)


def test_decode_reads_every_frame_comfyui_sends_and_refuses_the_rest() -> None:
    header = b'{"node_id": "5", "prompt_id": "p", "display_node_id": "5", '
    header += b'"parent_node_id": null, "real_node_id": "5", "image_type": "image/png"}'
    typed = decode(struct.pack(">II", 4, len(header)) + header + b"PNG")
    assert typed == ImageFrame("image/png", b"PNG", FrameSender("5", "p", "5"))
    assert decode(struct.pack(">II", 1, 1) + b"JPG") == ImageFrame("image/jpeg", b"JPG")
    assert decode(struct.pack(">II", 3, 2) + b"12hi") == TextFrame("12", "hi")
    with pytest.raises(Unknown):
        decode(struct.pack(">I", 2) + b"x")
    for bad in (
        b"",
        struct.pack(">I", 1),
        struct.pack(">II", 1, 7) + b"x",  # no such image type
        struct.pack(">II", 1, 2),  # no image
        struct.pack(">II", 4, 2) + b"[]x",  # a header that is no object
        struct.pack(">II", 4, 9) + b'{"a": NaN}x',
        struct.pack(">II", 3, 5) + b"ab",
        struct.pack(">II", 3, 1) + b"1\xff",
    ):
        with pytest.raises(Malformed):
            decode(bad)


def test_a_frame_without_metadata_is_the_running_node_s() -> None:
    prompts = Prompts("s")
    mine = prompts.watch("p1", 0.0)
    assert prompts.owner(ImageFrame("image/png", b"x")) is None  # nothing runs yet
    prompts.message("executing", {"node": "7", "prompt_id": "p1"}, 1.0)
    assert prompts.owner(ImageFrame("image/png", b"x")) == (mine, "7")
    assert prompts.owner(TextFrame("3", "hi")) == (mine, "3")
    prompts.message("executing", {"node": None, "prompt_id": "p1"}, 2.0)
    assert prompts.owner(ImageFrame("image/png", b"x")) is None
    other = ImageFrame("image/png", b"x", FrameSender("7", "someone-else's"))
    assert prompts.owner(other) is None


def test_which_output_nodes_must_send_all_their_images() -> None:
    streams = Streams.of(
        {
            "1": {"class_type": "SaveImage", "inputs": {}},
            "2": {"class_type": "SendImageWebSocket", "inputs": {}},  # a custom output node
            "3": {"class_type": "SaveImageWebsocket", "inputs": {}},
        }
    )
    outputs = frozenset({"SaveImage", "SendImageWebSocket", "SaveImageWebsocket"})
    streams.progress("1", 3)  # a node that writes files: its progress counts no frames
    assert streams.shortfall(outputs) is None
    streams.progress("3", 1)  # SaveImageWebsocket always sends one image per tick
    assert streams.shortfall(outputs) == (
        "output node 3 (SaveImageWebsocket) sent 0 image(s) but its progress counted 1"
    )
    streams.add("3", ImageFrame("image/png", b"x"), max_image=None, max_held=None)
    streams.progress("2", 2)  # another output node is held to its count once it sent one
    assert streams.shortfall(outputs) is None
    streams.add("2", ImageFrame("image/png", b"y"), max_image=None, max_held=None)
    assert "node 2 (SendImageWebSocket) sent 1 image(s)" in (streams.shortfall(outputs) or "")
    with pytest.raises(Malformed, match="more than 2 bytes in all"):
        streams.add("2", ImageFrame("image/png", b"zz"), max_image=None, max_held=2)
    assert not streams.lost(outputs)
    streams.missed = True  # the websocket was down while it ran
    assert streams.lost(outputs)
