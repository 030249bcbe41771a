"""ComfyAPI: processes under the nursery, sharding, partial failure, cancellation.

Local instances are fake ComfyUI installs started as real child processes through the same
launch path as a real ComfyUI; remote ones are in-process fakes given by URL.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import image_pixels, until
from test_gpu import FakeNVML
from test_plugins_support import Route, png, safetensors_bytes, start_http_server

import comfytrio
from comfytrio import (
    ComfyAPI,
    ComfyUIInstance,
    ComfyUIStartupError,
    ComfyUITimeoutError,
    ExecutionError,
    GPUInfo,
    LoRARef,
    ModelRef,
    PortInUseError,
    RemoteComfyUI,
)
from comfytrio._files import output_path
from comfytrio.testing import FakeComfyUI, lay_out_fake_comfyui_install

WORKFLOWS = Path(__file__).parent / "workflows"

BATCH_WORKFLOW: dict[str, Any] = {
    "1": {
        "class_type": "PrimitiveInt",
        "inputs": {"value": 1},
        "_meta": {"title": "API - BATCH SIZE"},
    },
    "2": {
        "class_type": "EmptyImage",
        "inputs": {"width": 16, "height": 16, "batch_size": ["1", 0], "color": 7},
    },
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "b"}},
}


def batch(n: int) -> dict[str, dict[str, Any]]:
    return {
        "batch_size": {
            "type": "integer",
            "value": n,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        }
    }


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def install(tmp_path: Path) -> Path:
    return lay_out_fake_comfyui_install(tmp_path / "ComfyUI")


def local_api(install: Path, tmp_path: Path, count: int, **kwargs: Any) -> ComfyAPI:
    kwargs.setdefault("gpu", GPUInfo(cuda_available=False, device_count=count))
    kwargs.setdefault("ready_timeout", 30)
    kwargs.setdefault("grace", 3)
    return ComfyAPI(
        [ComfyUIInstance(install, port) for port in free_ports(count)],
        tmp_path / "models",
        state_dir=tmp_path / "state",
        **kwargs,
    )


def pids(api: ComfyAPI) -> list[int]:
    return [i.process.pid for i in api.instances if i.process is not None]


# --------------------------------------------------------------------------- processes


async def test_instances_start_in_parallel_and_stop_with_no_process_left(
    install: Path, tmp_path: Path
) -> None:
    api = local_api(install, tmp_path, 3, env={"COMFYTRIO_FAKE_STARTUP_DELAY": "0.5"})
    async with api:
        running = [i.process for i in api.instances]
        assert all(p is not None for p in running)
        spawned = [p.spawned_at for p in running if p is not None]
        ready = [p.ready_at for p in running if p is not None]
        assert max(spawned) < min(ready)  # every process was started before any was ready
        started = pids(api)
        assert all(alive(pid) for pid in started)
        for instance in api.instances:
            assert instance.process is not None
            argv = instance.process.system_stats["system"]["argv"]
            assert "--cpu" in argv
            assert argv[argv.index("--listen") + 1] == "127.0.0.1"
        dirs = {str(i.output_dir) for i in api.instances}
        assert len(dirs) == 3  # every instance writes into its own folder
    assert not any(alive(pid) for pid in started)


async def test_an_exception_in_the_block_stops_every_process(install: Path, tmp_path: Path) -> None:
    api = local_api(install, tmp_path, 2)
    with pytest.raises(KeyError, match="boom"):
        async with api:
            started = pids(api)
            raise KeyError("boom")
    assert len(started) == 2
    assert not any(alive(pid) for pid in started)


async def test_a_cancelled_block_stops_every_process(install: Path, tmp_path: Path) -> None:
    api = local_api(install, tmp_path, 2)
    started: list[int] = []
    with trio.move_on_after(60) as scope:
        async with api:
            started = pids(api)
            scope.cancel()
            await trio.sleep_forever()
    assert len(started) == 2
    assert not any(alive(pid) for pid in started)


async def test_a_process_that_dies_at_start_raises_with_its_log(
    install: Path, tmp_path: Path
) -> None:
    api = local_api(install, tmp_path, 2, env={"COMFYTRIO_FAKE_EXIT_AT_START": "3"})
    with pytest.raises(ComfyUIStartupError) as info:
        async with api:
            pytest.fail("must not start")
    err = info.value
    assert "exited with code 3" in str(err)
    assert err.log_tail  # what the process printed before it died
    # The other instance failed too, or was stopped when this one failed first.
    assert all(isinstance(e, ComfyUIStartupError) for e in err.other_errors)
    assert all(i.process is None or not alive(i.process.pid) for i in api.instances)


async def test_a_server_that_never_answers_times_out(install: Path, tmp_path: Path) -> None:
    api = local_api(
        install, tmp_path, 1, ready_timeout=1, env={"COMFYTRIO_FAKE_STARTUP_DELAY": "60"}
    )
    with pytest.raises(ComfyUITimeoutError, match="not ready after 1 s"):
        async with api:
            pytest.fail("must not start")


async def test_a_port_held_by_someone_else_is_refused(install: Path, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        api = ComfyAPI(
            [ComfyUIInstance(install, port)],
            tmp_path / "models",
            gpu=GPUInfo(False, 1),
            state_dir=tmp_path / "state",
        )
        with pytest.raises(PortInUseError) as info:
            async with api:
                pytest.fail("must not adopt a server it did not start")
    assert info.value.port == port


async def test_cuda_instances_are_pinned_one_gpu_each(
    install: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(comfytrio._gpu, "_load_nvml", lambda: FakeNVML(["H100", "H100"]))
    ports = free_ports(3)
    api = ComfyAPI(
        [ComfyUIInstance(install, p) for p in ports],
        tmp_path / "models",
        state_dir=tmp_path / "state",
        ready_timeout=30,
    )
    assert api.gpu == GPUInfo(cuda_available=True, device_count=2)
    assert len(api.instances) == 2  # a third instance has no GPU to run on
    async with api:
        for index, instance in enumerate(api.instances):
            assert instance.process is not None
            stats = instance.process.system_stats
            assert "--cpu" not in stats["system"]["argv"]
            assert f"CUDA_VISIBLE_DEVICES={index}" in stats["devices"][0]["name"]


# --------------------------------------------------------------------------- jobs


async def test_spec_quickstart_txt2img_and_img2img(install: Path, tmp_path: Path) -> None:
    """The seed library's quickstart, changed only in its import line and trio."""
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "juggernaut_xl.safetensors").write_bytes(b"weights")
    async with trio.open_nursery() as nursery:
        web = await start_http_server(
            nursery,
            {
                "/detail_enhancer.safetensors": Route(body=safetensors_bytes()),
                "/photo.png": Route(body=png("green", (64, 64)), content_type="image/png"),
            },
        )
        instances = [ComfyUIInstance(path=install, port=p) for p in free_ports(3)]
        async with ComfyAPI(
            instances, models_path=models, gpu=GPUInfo(False, 3), state_dir=tmp_path / "state"
        ) as api:
            params: dict[str, dict[str, Any]] = {
                "steps": {"type": "integer", "value": 20, "node_mappings": "API - STEP"},
                "prompt": {
                    "type": "string",
                    "value": "A beautiful landscape",
                    "node_mappings": "API - PROMPT",
                },
                "batch_size": {
                    "type": "integer",
                    "value": 4,
                    "gpu_scale": True,
                    "node_mappings": "API - BATCH SIZE",
                },
            }
            picture = {
                "image_input": {
                    "type": "image",
                    "value": web.url("/photo.png"),
                    "node_mappings": "API - PICTURE",
                }
            }
            for name in ("sdxl_txt2img.json", "sdxl_img2img.json"):
                images = await api.execute_workflow(
                    workflow=json.loads((WORKFLOWS / name).read_text()),
                    models=[ModelRef(type="checkpoints", name="juggernaut_xl.safetensors")],
                    loras=[
                        LoRARef(
                            name="detail_enhancer.safetensors",
                            url=web.url("/detail_enhancer.safetensors"),
                            strength=0.8,
                        )
                    ],
                    params=params | picture if name == "sdxl_img2img.json" else params,
                )
                assert len(images) == 4, name
                assert len(set(images)) == 4
                assert len({image_pixels(p) for p in images}) == 4  # no image twice
                assert all(Path(p).is_file() and Path(p).is_absolute() for p in images)
                per_instance = sorted(
                    sum(1 for p in images if f"/{i.port}/" in p) for i in instances
                )
                assert per_instance == [1, 1, 2]  # distribute(4, 3)
        assert web.count("/detail_enhancer.safetensors") == 1  # downloaded once
        assert (
            models / "loras" / "detail_enhancer.safetensors"
        ).read_bytes() == safetensors_bytes()
        nursery.cancel_scope.cancel()


async def test_the_same_job_twice_never_returns_the_same_file(
    install: Path, tmp_path: Path
) -> None:
    workflow = json.loads((WORKFLOWS / "model_free.json").read_text())
    del workflow["5"], workflow["6"], workflow["7"]  # no input picture needed
    async with local_api(install, tmp_path, 2) as api:
        first = await api.execute_workflow(workflow, params=batch(4))
        second = await api.execute_workflow(workflow, params=batch(4))  # cache would replay
    assert len(first) == len(second) == 4
    assert not set(first) & set(second)
    assert all(Path(p).is_file() for p in first + second)


# --------------------------------------------------------------------------- remote


@pytest.fixture
async def fakes(fake_comfyui_factory: Callable[[], Awaitable[FakeComfyUI]]) -> list[FakeComfyUI]:
    """3 fake servers (the plugin's factory: they stop with the test)."""
    return [await fake_comfyui_factory() for _ in range(3)]


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    """A virtual clock that jumps once every task has been blocked for 20 ms of real time.
    ``autojump_clock`` jumps at once, also while a request is on its way over a real socket
    to the fakes, so a 5 s cancel deadline could pass before the interrupt arrived."""
    return trio.testing.MockClock(autojump_threshold=0.02)


def remote_api(fakes: list[FakeComfyUI], tmp_path: Path, **kwargs: Any) -> ComfyAPI:
    return ComfyAPI(
        [f.url for f in fakes], tmp_path / "models", download_dir=tmp_path / "downloads", **kwargs
    )


async def test_remote_servers_get_uploads_and_outputs_are_downloaded(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    workflow = json.loads((WORKFLOWS / "model_free.json").read_text())
    params = {
        **batch(3),
        "picture": {"type": "image", "value": png("red", (8, 8)), "node_mappings": "API - PICTURE"},
    }
    async with remote_api(fakes, tmp_path) as api:
        result = await api.run_workflow(workflow, params=params)
    assert result.ok
    assert len([o for o in result.outputs if o.node_id == "4"]) == 3
    # The inverted picture does not depend on the split batch: made once, not once a shard.
    assert len([o for o in result.outputs if o.node_id == "7"]) == 1
    for output in result.outputs:
        assert Path(output.path).is_relative_to(tmp_path / "downloads")
        assert Path(output.path).read_bytes().startswith(b"\x89PNG")
    for fake in fakes:
        uploaded = [p.name for p in Path(fake.input_dir).iterdir()]
        assert any(name.startswith("comfytrio_") for name in uploaded)


async def test_every_output_of_a_remote_shard_is_downloaded(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    async with remote_api(fakes[:1], tmp_path) as api:
        result = await api.run_workflow(BATCH_WORKFLOW, params=batch(5))
    assert len(result.outputs) == 5
    paths = [Path(o.path) for o in result.outputs]
    assert len(set(paths)) == 5
    for output, path in zip(result.outputs, paths, strict=True):
        assert path.name == output.filename
        assert (
            path.read_bytes()
            == (fakes[0].output_dir / output.subfolder / output.filename).read_bytes()
        )
    assert not [p for p in paths[0].parent.iterdir() if p.name.endswith(".part")]


async def test_an_output_that_cannot_be_saved_is_a_download_error(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    (tmp_path / "downloads").write_text("a file where the folder should be")
    async with remote_api(fakes, tmp_path) as api:
        with pytest.raises(comfytrio.DownloadError, match="cannot write") as info:
            await api.execute_workflow(BATCH_WORKFLOW, params=batch(2))
        assert "/view?filename=" in info.value.url
        assert statistics_ok(api)


def statistics_ok(api: ComfyAPI) -> bool:
    """Every instance is still ready and takes work."""
    return all(i.state == "ready" for i in api.statistics().instances)


async def test_zero_shares_are_not_sent(fakes: list[FakeComfyUI], tmp_path: Path) -> None:
    async with remote_api(fakes, tmp_path) as api:
        result = await api.run_workflow(BATCH_WORKFLOW, params=batch(1))
    assert len(result.shards) == 1
    assert len(result.outputs) == 1
    assert sorted(len(f.prompts_received) for f in fakes) == [0, 0, 1]


async def test_partial_failure_returns_the_other_shards(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    fakes[1].fail_node("SaveImage")
    async with remote_api(fakes, tmp_path) as api:
        result = await api.run_workflow(BATCH_WORKFLOW, params=batch(6))
        paths = await api.execute_workflow(BATCH_WORKFLOW, params=batch(6))
    assert len(result.outputs) == 4
    assert len(result.failures) == 1
    failure = result.failures[0]
    assert failure.instance == fakes[1].url.removeprefix("http://")
    assert isinstance(failure.error, ExecutionError)
    assert failure.error.node_type == "SaveImage"
    assert failure.prompt_id == failure.error.prompt_id
    assert len(paths) == 4


async def test_a_plugin_that_breaks_when_a_shard_is_built_fails_the_job_not_the_api(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    class Broken(comfytrio.hookspecs.BaseAssetResolver):
        """Raises while a shard's workflow is built."""

        name = "broken"

        def inject(self, workflow: dict[str, Any], job: comfytrio.hookspecs.JobContext) -> None:
            if job.params["batch_size"].value == 2:
                raise KeyError("node 99")

    class Plugin:
        @comfytrio.hookimpl
        def register_asset_resolvers(self, register: Any) -> None:
            register(Broken())

    plugins = comfytrio.make_plugin_manager()
    plugins.register(Plugin(), "broken")
    async with remote_api(fakes, tmp_path, plugins=plugins) as api:
        with pytest.raises(comfytrio.PluginError, match="'broken' failed to inject") as info:
            await api.execute_workflow(BATCH_WORKFLOW, params=batch(2))
        assert len(info.value.other_errors) == 1
        assert len(await api.execute_workflow(BATCH_WORKFLOW, params=batch(3))) == 3
    assert [len(f.prompts_received) for f in fakes] == [1, 1, 1]  # the broken job sent none


async def test_when_every_shard_fails_the_first_error_is_raised(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    for fake in fakes:
        fake.fail_node("SaveImage")
    async with remote_api(fakes, tmp_path) as api:
        with pytest.raises(ExecutionError) as info:
            await api.execute_workflow(BATCH_WORKFLOW, params=batch(3))
    assert len(info.value.other_errors) == 2
    assert all(isinstance(e, ExecutionError) for e in info.value.other_errors)


async def test_a_shard_past_its_timeout_fails_and_is_interrupted(
    io_clock: trio.testing.MockClock, fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    fakes[0].set_seconds_per_image(300)
    async with remote_api(fakes, tmp_path) as api:
        started = trio.current_time()
        result = await api.run_workflow(BATCH_WORKFLOW, params=batch(3), timeout=5)
        assert 5 <= trio.current_time() - started < 30  # virtual seconds: not the 300 s
        assert len(result.outputs) == 2
        assert isinstance(result.failures[0].error, ComfyUITimeoutError)
        # Interrupted: it does not run its 300 s to the end. (No fail_after here: the
        # autojump clock would jump past it while the interrupt is still on the wire.)
        await fakes[0].wait_idle()
        assert trio.current_time() - started < 300


async def test_a_cancelled_job_leaves_no_prompt_on_any_server(
    io_clock: trio.testing.MockClock, fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    for fake in fakes:
        fake.set_seconds_per_image(300)
    async with remote_api(fakes, tmp_path) as api:
        async with trio.open_nursery() as nursery:
            for _ in range(2):  # two jobs: one prompt runs and one waits on each server
                nursery.start_soon(partial(api.execute_workflow, BATCH_WORKFLOW, params=batch(3)))
            await until(lambda: all(len(f.queue_ids()) == 1 for f in fakes))
            nursery.cancel_scope.cancel()
        # Right after the cancellation: nothing pending, nothing running on any server
        # (virtual seconds: the images would take 300).
        cancelled_at = trio.current_time()
        for fake in fakes:
            await fake.wait_idle()
        assert trio.current_time() - cancelled_at < 300
        assert all(f.queue_ids() == [] and f.running_id is None for f in fakes)


async def test_identical_shards_on_one_server_get_their_own_files(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    # Two instances that are the same server: shares [2, 2] give two identical prompts
    # back to back, which ComfyUI's cache would answer with the first one's files.
    async with ComfyAPI(
        [fakes[0].url, fakes[0].url + "/"], tmp_path / "models", download_dir=tmp_path / "downloads"
    ) as api:
        result = await api.run_workflow(BATCH_WORKFLOW, params=batch(4))
    assert len(result.shards) == 2
    assert len({(o.subfolder, o.filename) for o in result.outputs}) == 4


@pytest.mark.parametrize(
    ("subfolder", "filename"),
    [
        ("", "../x.png"),
        ("a/../..", "x.png"),
        ("/etc", "passwd"),
        ("", ""),
        ("..", ""),
        ("sub/a/..", "x.png"),
        ("..\\..", "x.png"),
        ("", "x\x00.png"),
        ("C:", "x.png"),
    ],
)
def test_a_servers_output_name_never_leaves_its_folder(
    tmp_path: Path, subfolder: str, filename: str
) -> None:
    with pytest.raises(comfytrio.UnsafeNameError):
        output_path(tmp_path / "job", subfolder, filename)
    assert output_path(tmp_path / "job", "sub", "x.png") == tmp_path / "job" / "sub" / "x.png"
    # A Windows server reports its sub-folders with backslashes.
    assert output_path(tmp_path, "sub\\deep", "x.png") == tmp_path / "sub" / "deep" / "x.png"


def test_a_remote_servers_tls_context_reaches_its_instance(tmp_path: Path) -> None:
    trusting = ssl.create_default_context()
    api = ComfyAPI(
        [RemoteComfyUI("https://gpu-box:8188", ssl_context=trusting), "https://other:8188"],
        tmp_path / "models",
        gpu=GPUInfo(cuda_available=False, device_count=0),
    )
    assert [i.ssl_context for i in api.instances] == [trusting, None]
