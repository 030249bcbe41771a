"""The ``comfytrio`` command line: ``run``, ``demo``, ``doctor``, through real processes and
real sockets on 127.0.0.1 (only NVML is replaced, in ``doctor``'s GPU report)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import WORKFLOWS, free_port, free_port_run, png_bytes
from rich.console import Console

import comfytrio
from comfytrio import ParamError, UnknownParamTypeError
from comfytrio._events import NodeProgress, NodeStarted, PromptFinished, PromptStarted
from comfytrio.cli import (
    UsageError,
    build_params,
    load_workflow,
    main,
    parse_lora,
    parse_model,
)
from comfytrio.cli._progress import LineDisplay, ProgressState, node_labels, render
from comfytrio.testing import FakeComfyUI

MODEL_FREE = WORKFLOWS / "model_free.json"
SDXL = WORKFLOWS / "sdxl_txt2img.json"
FakeFactory = Callable[..., Awaitable[FakeComfyUI]]


def workflow(path: Path = MODEL_FREE) -> dict[str, Any]:
    return load_workflow(path)


def std_plugins() -> comfytrio.Plugins:
    """Only the standard plugin: the types a bare comfytrio install has."""
    import comfytrio_std

    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(comfytrio_std, "std")
    return plugins


def infer_param_type(workflow: dict[str, Any], title: str, text: str) -> str | None:
    return std_plugins().infer_param_type(workflow, title, text)


# ---------------------------------------------------------------------- params, pure


@pytest.mark.parametrize(
    ("title", "text", "expected"),
    [
        ("API - BATCH SIZE", "4", "integer"),  # PrimitiveInt
        ("API - PROMPT", "a cat", "string"),  # PrimitiveString
        ("API - PROMPT", "42", "string"),  # the node decides, not the text
        ("API - PICTURE", "cat.png", "image"),  # LoadImage
        ("No Such Node", "0.5", "float"),  # no node: the text decides
        ("No Such Node", "true", "boolean"),
    ],
)
def test_param_type_comes_from_the_node(title: str, text: str, expected: str) -> None:
    # The standard plugin's infer_param_type hook: the command line knows no type.
    assert infer_param_type(workflow(), title, text) == expected


def test_seed_nodes_get_the_seed_type() -> None:
    sdxl = workflow(SDXL)
    assert infer_param_type(sdxl, "K - SEED", "42") == "seed"  # a PrimitiveInt, by its title
    assert infer_param_type(sdxl, "KSampler", "42") == "seed"  # a sampler's seed input
    assert infer_param_type(sdxl, "API - STEP", "20") == "integer"
    assert infer_param_type(sdxl, "KSampler.seed", "42") == "seed"  # TITLE.INPUT
    assert infer_param_type(sdxl, "KSampler.cfg", "7") == "float"  # the input's current value
    assert infer_param_type(sdxl, "KSampler.sampler_name", "euler") == "string"


def test_build_params_from_titles_scale_and_explicit_types() -> None:
    params = build_params(
        workflow(),
        [
            ("--param", "API - PROMPT=a=b"),  # only the first = splits
            ("--scale", "API - BATCH SIZE=8"),
            ("--param", "Empty Image:integer=3"),  # TITLE:TYPE for a node without a class rule
        ],
        plugins=std_plugins(),
    )
    assert params == {
        "API - PROMPT": {"type": "string", "node_mappings": "API - PROMPT", "value": "a=b"},
        "API - BATCH SIZE": {
            "type": "integer",
            "node_mappings": "API - BATCH SIZE",
            "value": 8,
            "gpu_scale": True,
        },
        "Empty Image": {"type": "integer", "node_mappings": "Empty Image", "value": 3},
    }


def test_param_file_entries_are_changed_by_name_or_by_title() -> None:
    file_params = {
        "steps": {
            "type": "integer",
            "value": 20,
            "node_mappings": "API - STEP",
            "gpu_scale": False,
        },
        "batch": {"type": "integer", "value": 1, "node_mappings": "API - BATCH SIZE"},
    }
    params = build_params(
        workflow(SDXL),
        [("--param", "steps=30"), ("--scale", "API - BATCH SIZE=4")],
        plugins=std_plugins(),
        file_params=file_params,
    )
    assert params["steps"]["value"] == 30
    assert params["batch"] == {
        "type": "integer",
        "value": 4,
        "node_mappings": "API - BATCH SIZE",
        "gpu_scale": True,
    }
    assert file_params["steps"]["value"] == 20  # the caller's dict is not changed


def test_bad_values_name_the_param() -> None:
    with pytest.raises(ParamError, match="param 'API - BATCH SIZE': expects an integer, got 'x'"):
        build_params(workflow(), [("--param", "API - BATCH SIZE=x")], plugins=std_plugins())
    with pytest.raises(UsageError, match="TITLE=VALUE"):
        build_params(workflow(), [("--param", "API - STEP")], plugins=std_plugins())


@pytest.mark.parametrize(
    ("assignment", "value"),
    [
        ("API - STEP=20", 20),
        ("KSampler.cfg=7.5", 7.5),
        ("API - STEP:float=20", 20.0),
        ("KSampler.seed:seed=42", 42),
        ("Save Image:boolean=yes", True),
        ("Save Image:boolean=OFF", False),
        ("API - PROMPT=a cat", "a cat"),
    ],
)
def test_each_standard_type_parses_its_own_text(assignment: str, value: object) -> None:
    params = build_params(workflow(SDXL), [("--param", assignment)], plugins=std_plugins())
    (entry,) = params.values()
    assert entry["value"] == value
    assert type(entry["value"]) is type(value)


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("API - STEP:float=fast", "expects a number, got 'fast'"),
        ("K - SEED=random", "expects an integer, got 'random'"),
        ("Save Image:boolean=maybe", "expects true or false, got 'maybe'"),
    ],
)
def test_a_standard_type_refuses_text_naming_the_param(assignment: str, message: str) -> None:
    with pytest.raises(ParamError, match=message) as caught:
        build_params(workflow(SDXL), [("--param", assignment)], plugins=std_plugins())
    assert caught.value.param == assignment.split("=")[0].split(":")[0]


def test_an_unknown_type_is_named_with_the_types_installed() -> None:
    with pytest.raises(UnknownParamTypeError) as info:
        build_params(workflow(SDXL), [("--param", "API - STEP:colour=red")], plugins=std_plugins())
    assert (info.value.param, info.value.type_name) == ("API - STEP", "colour")
    assert "unknown type 'colour'; known types: boolean, float, image, integer, seed, string" in (
        str(info.value)
    )


def test_without_a_plugin_that_infers_a_title_needs_its_type() -> None:
    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    with pytest.raises(ParamError, match='write --scale "API - STEP:TYPE=20"') as caught:
        build_params(workflow(SDXL), [("--scale", "API - STEP=20")], plugins=plugins)
    assert caught.value.param == "API - STEP"
    assert "none installed" in str(caught.value)


async def test_an_unknown_type_on_the_command_line_exits_2() -> None:
    done = await run_cli(
        "run", str(SDXL), "--url", "http://127.0.0.1:9", "--param", "API - STEP:colour=red"
    )
    assert done.returncode == 2
    err = done.stderr.decode()
    assert "unknown type 'colour'" in err
    assert "integer" in err  # the types installed


def test_model_and_lora_syntax() -> None:
    assert parse_model("checkpoints/sub/x.safetensors").name == "sub/x.safetensors"
    lora = parse_lora("d.safetensors=https://user@host/d.safetensors@0.5")
    assert (lora.name, lora.url, lora.strength) == (
        "d.safetensors",
        "https://user@host/d.safetensors",
        0.5,
    )
    assert parse_lora("d.safetensors=https://host/d.safetensors").strength == 1.0
    with pytest.raises(UsageError, match="FOLDER/NAME"):
        parse_model("x.safetensors")
    with pytest.raises(UsageError, match="NAME=URL"):
        parse_lora("d.safetensors")


def test_a_ui_format_workflow_is_refused(tmp_path: Path) -> None:
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(UsageError, match=r"Save \(API\)"):
        load_workflow(ui)


# ---------------------------------------------------------------------- usage errors (exit 2)


def test_unknown_title_exits_2_listing_the_titles(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(MODEL_FREE), "--param", "API - STEPS=20", "--url", "http://x:1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "param 'API - STEPS': no node titled 'API - STEPS'" in err
    assert "API - BATCH SIZE, API - PICTURE, API - PROMPT" in err


def test_bad_param_file_entry_exits_2_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"steps": {"type": "integr", "value": 2, "node_mappings": "x"}}))
    code = main(
        ["run", str(MODEL_FREE), "--param-file", str(params), "--url", "http://x:1", "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 2
    answer = json.loads(out)
    assert answer["ok"] is False
    assert answer["error"]["type"] == "UnknownParamTypeError"
    assert "unknown type 'integr'; known types: boolean, float, image" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to run on"),
        (["--url", "ftp://x"], "--url expects http://HOST:PORT"),
        (["--comfyui", "/nonexistent"], "no main.py there"),
        (["--instances", "2", "--url", "http://x:1"], "need --comfyui PATH"),
        (["--url", "http://x:1", "--model", "x.safetensors"], "FOLDER/NAME"),
        (["--url", "http://x:1", "--seed", "-1"], "--seed must be from 0"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(MODEL_FREE), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_workflow_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.json"), "--url", "http://x:1"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["run"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------- real runs


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "comfytrio", *args]


async def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            cli(*args),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **(env or {})},
        )


def fake_install(tmp_path: Path) -> Path:
    from comfytrio.testing import lay_out_fake_comfyui_install

    return lay_out_fake_comfyui_install(tmp_path / "ComfyUI")


async def test_run_on_started_instances_prints_json(tmp_path: Path) -> None:
    install = fake_install(tmp_path)
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes())
    done = await run_cli(
        "run",
        str(MODEL_FREE),
        "--comfyui",
        str(install),
        "--port",
        str(free_port_run(2)),
        "--instances",
        "2",
        "--cpu",
        "--scale",
        "API - BATCH SIZE=3",
        "--param",
        "API - PROMPT=cli",
        "--param",
        f"API - PICTURE={picture}",
        "--seed",
        "7",
        "--json",
        "--progress",  # the live display, forced onto a pipe: stdout must stay pure JSON
    )
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["ok"] is True
    assert result["seed"] == 7
    assert sorted(s["scaled"]["API - BATCH SIZE"] for s in result["shards"]) == [1, 2]
    names = sorted(Path(p).name for p in result["paths"])
    # The inverted picture does not depend on the split batch: the first shard makes it.
    assert names == ["cli_00001_.png"] * 2 + ["cli_00002_.png"] + ["inverted_00001_.png"]
    assert [o["batch_index"] for o in result["outputs"]] == [0, 1, 2, None]
    assert [s["batch_offset"] for s in result["shards"]] == [0, 2]
    assert result["split"] == "unseeded"  # model-free: nothing seeds the shards apart
    assert result["reproducible"] is False
    assert all(Path(p).is_file() for p in result["paths"])
    assert all(str(install / "comfytrio") in p for p in result["paths"])
    assert "shard(s) done" in done.stderr.decode()  # the live table was drawn on stderr


async def test_run_on_urls_prints_downloaded_paths(
    fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    servers = [await fake_comfyui_factory(), await fake_comfyui_factory()]
    params = tmp_path / "params.json"
    params.write_text(
        json.dumps(
            {
                "batch_size": {
                    "type": "integer",
                    "value": 4,
                    "node_mappings": "API - BATCH SIZE",
                    "gpu_scale": True,
                },
                "picture": {"type": "image", "value": "", "node_mappings": "API - PICTURE"},
            }
        )
    )
    picture = tmp_path / "p.png"
    picture.write_bytes(png_bytes())
    done = await run_cli(
        "run",
        str(MODEL_FREE),
        *(a for s in servers for a in ("--url", s.url)),
        "--param-file",
        str(params),
        "--param",
        f"picture={picture}",
        "--download-dir",
        str(tmp_path / "downloads"),
    )
    assert done.returncode == 0, done.stderr.decode()
    paths = done.stdout.decode().split()
    assert len(paths) == 5  # 2 + 2 generated, 1 inverted (by the first shard)
    assert all(Path(p).is_file() and str(tmp_path / "downloads") in p for p in paths)
    err = done.stderr.decode()
    assert "2 instance(s) ready" in err
    assert "2/2 shard(s) done" in err


async def test_run_same_images_prints_each_outputs_batch_index(
    fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    servers = [await fake_comfyui_factory(), await fake_comfyui_factory()]
    for server in servers:
        server.add_model("checkpoints", "v1-5-pruned-emaonly.safetensors")
    workflow = json.loads((WORKFLOWS / "sd15_seed_in_sampler.json").read_text())
    workflow["5"]["inputs"].update(width=64, height=64)
    path = tmp_path / "sd15.json"

    async def run(sampler: str) -> subprocess.CompletedProcess[bytes]:
        workflow["3"]["inputs"]["sampler_name"] = sampler
        path.write_text(json.dumps(workflow))
        return await run_cli(
            "run",
            str(path),
            *(a for s in servers for a in ("--url", s.url)),
            "--scale",
            "API - BATCH SIZE=4",
            "--same-images",
            "--json",
            "--download-dir",
            str(tmp_path / "downloads"),
        )

    done = await run("euler")
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["split"] == "same-images"
    assert result["reproducible"] is True
    assert [o["batch_index"] for o in result["outputs"]] == [0, 1, 2, 3]
    assert [s["seeds"] for s in result["shards"]] == [{"KSampler": 156680208700286}] * 2

    refused = await run("euler_ancestral")
    assert refused.returncode == 2
    error = json.loads(refused.stdout)["error"]
    assert error["type"] == "NotReproducibleError"
    assert "'KSampler'" in error["message"]
    assert "'euler_ancestral'" in error["message"]


async def test_unreachable_server_exits_1_with_the_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = await run_cli("run", str(MODEL_FREE), "--url", url, "--ready-timeout", "0.5", "-q")
    assert done.returncode == 1
    err = done.stderr.decode()
    assert "error: 0 of the 1 ComfyUI instance(s) needed were ready after 0.5 s" in err
    assert f"ComfyUI at {url} was not ready" in err  # and why: the connection was refused
    assert "ConnectError" in err
    assert done.stdout == b""


async def test_an_unreachable_server_does_not_stop_a_run_on_the_others(
    fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    fake_comfyui.add_input_image("example.png")
    nowhere = f"http://127.0.0.1:{free_port()}"
    done = await run_cli(
        "run",
        str(MODEL_FREE),
        "--url",
        nowhere,
        "--url",
        fake_comfyui.url,
        "--download-dir",
        str(tmp_path / "out"),
        "--json",
    )
    assert done.returncode == 0, done.stderr.decode()
    err = done.stderr.decode()
    assert f"{nowhere.removeprefix('http://')}: connecting" in err
    assert "cannot be reached yet" in err
    result = json.loads(done.stdout)
    assert {o["instance"] for o in result["outputs"]} == {fake_comfyui.url.removeprefix("http://")}
    assert all(Path(o["path"]).is_file() for o in result["outputs"])


async def test_failed_job_exits_1_with_the_typed_error(
    fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    fake_comfyui.fail_node("EmptyImage", message="CUDA out of memory")
    fake_comfyui.add_input_image("example.png")
    done = await run_cli("run", str(MODEL_FREE), "--url", fake_comfyui.url, "--json")
    assert done.returncode == 1
    assert "failed in node 3 (EmptyImage)" in done.stderr.decode()
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "ExecutionError"
    assert "CUDA out of memory" in error["message"]


async def test_partial_failure_prints_the_other_files_and_exits_1(
    fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    good, bad = await fake_comfyui_factory(), await fake_comfyui_factory()
    bad.fail_node("EmptyImage", message="CUDA out of memory")
    for fake in (good, bad):
        fake.add_input_image("example.png")
    done = await run_cli(
        "run",
        str(MODEL_FREE),
        "--url",
        good.url,
        "--url",
        bad.url,
        "--scale",
        "API - BATCH SIZE=2",
        "--download-dir",
        str(tmp_path),
        "--json",
    )
    assert done.returncode == 1
    result = json.loads(done.stdout)
    paths = result["paths"]
    (failed,) = result["failures"]
    # One generated image from the good server; the inverted picture (which the split batch
    # does not feed) is made by shard 0 only, so it is there when the good server ran shard 0.
    assert sorted(Path(p).name.split("_")[0] for p in paths) == (
        ["demo"] if failed["index"] == 0 else ["demo", "inverted"]
    )
    assert all(Path(p).is_file() for p in paths)
    err = done.stderr.decode()
    assert "error: shard" in err
    assert "CUDA out of memory" in err
    assert "1/2 shard(s) failed" in err


def fake_pids(install: Path) -> list[int]:
    """Processes whose command line mentions the install (each has it in its folders)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(install).encode() in cmdline and b"main.py" in cmdline:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the children")
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_interrupt_stops_every_started_process(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    install = fake_install(tmp_path)
    (tmp_path / "p.png").write_bytes(png_bytes())
    process = await trio.lowlevel.open_process(
        cli(
            "run",
            str(MODEL_FREE),
            "--comfyui",
            str(install),
            "--port",
            str(free_port_run(2)),
            "--instances",
            "2",
            "--cpu",
            "--param",
            "API - PICTURE=" + str(tmp_path / "p.png"),
        ),
        env={**os.environ, "COMFYTRIO_FAKE_SECONDS_PER_IMAGE": "30"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    err = b""
    try:
        with trio.fail_after(20):
            async for chunk in process.stderr:
                err += chunk
                if b"shard(s) running" in err:
                    break
        assert len(fake_pids(install)) == 2, err.decode()
        process.send_signal(signum)
        with trio.fail_after(8):
            async for chunk in process.stderr:
                err += chunk
            assert await process.wait() == code, err.decode()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            await process.stderr.aclose()
    assert b"every ComfyUI we started was stopped" in err
    assert fake_pids(install) == []


async def test_demo_prints_paths_that_exist(tmp_path: Path) -> None:
    done = await run_cli("demo", "--dir", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    paths = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert len(paths) == 5  # 4 generated, 1 inverted
    assert all(Path(p).is_file() for p in paths)
    assert "split: same-images" in out
    assert "batch indices 0, 1, 2, 3, then 1 not from the batch:" in out
    assert [Path(p).name.split("_")[0] for p in paths] == ["demo"] * 4 + ["inverted"]


# ---------------------------------------------------------------------- doctor


async def test_doctor_reports_a_server(fake_comfyui: FakeComfyUI) -> None:
    fake_comfyui.add_model("checkpoints", "juggernaut_xl.safetensors")
    done = await run_cli("doctor", "--url", fake_comfyui.url)
    out = done.stdout.decode()
    assert done.returncode == 0, out
    assert "ComfyUI 0.3.64" in out
    assert "node classes" in out
    assert "checkpoints 1" in out
    assert "no problems found" in out


async def test_doctor_says_what_to_fix(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = await run_cli("doctor", "--url", url, "--comfyui", str(tmp_path), "--timeout", "1")
    out = done.stdout.decode()
    assert done.returncode == 1
    assert "2 problem(s):" in out
    assert f"- {url} does not answer" in out
    assert f"- no main.py in {tmp_path.resolve()}" in out


async def test_doctor_starts_an_install(tmp_path: Path) -> None:
    install = fake_install(tmp_path)
    done = await run_cli("doctor", "--comfyui", str(install), "--start", "--cpu")
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "main.py found, version 0.3.64 (comfytrio fake)" in out
    assert "ready at http://127.0.0.1:" in out
    assert "device cpu (cpu)" in out
    assert fake_pids(install) == []


class FakeMemory:
    total = 80 * 2**30
    free = 79 * 2**30


def fake_nvml(count: int, *, broken: bool = False) -> types.SimpleNamespace:
    def get_count() -> int:
        if broken:
            raise RuntimeError("NVML_ERROR_UNKNOWN")
        return count

    return types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"550.54",
        nvmlDeviceGetCount=get_count,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: f"NVIDIA H100 #{h}",
        nvmlDeviceGetMemoryInfo=lambda h: FakeMemory(),
    )


def test_doctor_lists_what_nvml_sees(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("comfytrio._gpu._load_nvml", lambda: fake_nvml(2))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "NVML: driver 550.54, 2 GPU(s)" in out
    assert "GPU 1: NVIDIA H100 #1, 80.0 GiB (79.0 GiB free)" in out


def test_doctor_flags_a_broken_driver(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("comfytrio._gpu._load_nvml", lambda: fake_nvml(2, broken=True))
    assert main(["doctor"]) == 1
    assert "- NVML started but cannot list the GPUs" in capsys.readouterr().out


# ---------------------------------------------------------------------- the progress display


def statistics(instances: list[tuple[str, str, int, int]], jobs: list[tuple[str, int, int]]) -> Any:
    """A stand-in for ``api.statistics()`` with the fields the display reads: instances as
    (name, state, in flight, shards done), jobs as (id, shards, done)."""
    return types.SimpleNamespace(
        instances=[
            types.SimpleNamespace(name=n, state=s, in_flight=f, shards_done=d, shards_failed=0)
            for n, s, f, d in instances
        ],
        jobs=[
            types.SimpleNamespace(
                job_id=j, shards=n, done=d, failed=0, queued_at=0.0, finished_at=None
            )
            for j, n, d in jobs
        ],
        queued_shards=0,
    )


def test_progress_state_follows_statistics_and_events() -> None:
    labels = node_labels(workflow(SDXL))
    state = ProgressState(["a:1", "b:2"], labels)
    state.update(
        statistics([("a:1", "ready", 1, 0), ("b:2", "starting", 0, 0)], [("job1", 2, 1)]),
        now=3.0,
    )
    state.handle(PromptStarted("a:1", "p1"))
    state.handle(NodeStarted("a:1", "p1", "3"))
    state.handle(NodeProgress("a:1", "p1", "3", 7, 20))
    a = state.instances["a:1"]
    assert (a.label, a.node, a.step, a.steps) == ("running", "KSampler", 7, 20)
    assert state.instances["b:2"].label == "starting"
    assert not state.all_ready
    text = io.StringIO()
    Console(file=text, width=120).print(render(state))
    assert "KSampler" in text.getvalue()
    assert "7/20" in text.getvalue()
    assert "job job1: 1/2 shard(s) done" in text.getvalue()
    state.handle(PromptFinished("a:1", "p1", "success"))
    assert state.instances["a:1"].node is None


def test_line_display_writes_changes_once() -> None:
    state = ProgressState(["a:1"])
    out = io.StringIO()
    display = LineDisplay(out)
    for ready, done in [(False, 0), (True, 0), (True, 0), (True, 1)]:
        state.update(
            statistics(
                [("a:1", "ready" if ready else "starting", 0, done)],
                [("j", 1, done)] if ready else [],
            ),
            now=1.0,
        )
        display.show(state)
    assert out.getvalue().splitlines() == [
        "a:1: starting",
        "a:1: ready",
        "1 instance(s) ready",
        "job j: 1 shard(s) running",
        "job j: 1/1 shard(s) done",
    ]


async def test_plugins_lists_every_type_and_resolver_with_its_plugin() -> None:
    done = await run_cli("plugins")
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert any(
        line.split()[:5] == ["param", "type", "integer", "std", "(comfytrio"] for line in lines
    )
    # The third-party example plugin, installed by the README's test command, is found by
    # its entry point like the standard one.
    assert any("size" in line.split() and "example" in line.split() for line in lines)
    listed = json.loads((await run_cli("plugins", "--json")).stdout)
    kinds = {(e["kind"], e["name"]): e for e in listed}
    assert kinds[("asset resolver", "lora-downloads")]["plugin"] == "std"
    assert kinds[("param type", "size")]["distribution"].startswith("comfytrio-example-plugin ")
    assert all(e["summary"].endswith(".") for e in listed)
