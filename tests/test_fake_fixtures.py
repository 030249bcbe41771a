"""The pytest plugin's fixtures, used here and in a user's own pytest-trio suite."""

from __future__ import annotations

import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing
from conftest import WORKFLOWS
from test_fault_tolerance import JOB, params

from comfytrio import ComfyAPI, ComfyUITimeoutError, FaultPolicy
from comfytrio.testing import FakeComfyUI, fast_fault_policy

USER_TESTS = """
import httpx
import pytest

{marker}
async def test_fixture(fake_comfyui):
    async with httpx.AsyncClient(base_url=fake_comfyui.url) as http:
        stats = (await http.get("/system_stats")).json()
    assert stats["system"]["comfyui_version"] == "0.3.64"
    assert fake_comfyui.root.name == "comfyui"

{marker}
async def test_factory(fake_comfyui_factory):
    first = await fake_comfyui_factory()
    second = await fake_comfyui_factory(seconds_per_image=0.5)
    assert first.port != second.port
    assert first.output_dir != second.output_dir
    assert second.seconds_per_image == 0.5

def test_install(fake_comfyui_install):
    assert (fake_comfyui_install / "main.py").is_file()

@pytest.mark.comfy_api(fakes=1)
{marker}
async def test_api(comfy_api, comfy_fakes):
    assert len(comfy_api.instances) == len(comfy_fakes) == 1
    assert comfy_api.instances[0].healthy

@pytest.mark.comfy_api(fakes=0)
{marker}
async def test_no_fakes(comfy_api):
    pass
"""


async def test_fake_comfyui_fixture(fake_comfyui: FakeComfyUI) -> None:
    assert fake_comfyui.url == f"http://127.0.0.1:{fake_comfyui.port}"
    for folder in (
        fake_comfyui.input_dir,
        fake_comfyui.output_dir,
        fake_comfyui.temp_dir,
        fake_comfyui.models_dir / "checkpoints",
    ):
        assert folder.is_dir()
    async with httpx.AsyncClient(base_url=fake_comfyui.url) as http:
        assert (await http.get("/system_stats")).status_code == 200


async def test_factory_starts_independent_servers(
    fake_comfyui_factory: Callable[..., Awaitable[FakeComfyUI]], tmp_path: Path
) -> None:
    servers = [await fake_comfyui_factory() for _ in range(3)]
    assert len({s.port for s in servers}) == 3
    assert len({s.root for s in servers}) == 3
    custom = await fake_comfyui_factory(root=tmp_path / "mine", seconds_per_image=0.25)
    assert custom.root == tmp_path / "mine"
    assert custom.seconds_per_image == 0.25
    servers[0].crash()
    async with httpx.AsyncClient(base_url=servers[1].url) as http:
        assert (await http.get("/queue")).status_code == 200


def test_fake_comfyui_install_fixture(fake_comfyui_install: Path) -> None:
    assert (fake_comfyui_install / "main.py").read_text().startswith('"""Not ComfyUI')
    assert (fake_comfyui_install / "models" / "checkpoints").is_dir()


@pytest.mark.parametrize(
    ("ini", "marker"),
    [("[pytest]\ntrio_mode = true\n", ""), ("[pytest]\n", "@pytest.mark.trio")],
)
def test_fixtures_in_a_users_suite(pytester: pytest.Pytester, ini: str, marker: str) -> None:
    pytester.makeini(ini)
    pytester.makepyfile(test_user=USER_TESTS.format(marker=marker))
    result = pytester.runpytest_inprocess("-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)  # the marker is known: no warning
    result.stdout.fnmatch_lines(["*ValueError: comfy_fakes needs a number of servers*0*"])


DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
EXAMPLE = re.compile(r"```python\n# (\S+\.py)\n(.*?)```", re.DOTALL)


def test_docs_examples_are_real(pytester: pytest.Pytester) -> None:
    examples = dict(EXAMPLE.findall(DOC.read_text()))
    tests = {name: code for name, code in examples.items() if name.startswith("test_")}
    assert len(tests) >= 4
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    workflows = pytester.path / "workflows"
    workflows.mkdir()
    shutil.copy(WORKFLOWS / "sdxl_txt2img_rgthree_loras.json", workflows)
    for name, code in examples.items():
        (pytester.path / name).write_text(code)
    result = pytester.runpytest_inprocess("-W", "error", "-p", "no:cacheprovider", *tests)
    passed = sum(len(re.findall(r"^async def test_", code, re.M)) for code in tests.values())
    result.assert_outcomes(passed=passed)
    script = pytester.runpython(pytester.path / "example_script.py")
    assert script.ret == 0
    assert script.outlines[-1] == "0.3.64"


# --------------------------------------------------------------------------- comfy_api


async def test_comfy_api_is_ready_on_two_fakes_with_test_defaults(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    assert len(comfy_fakes) == 2
    assert len({fake.root for fake in comfy_fakes}) == 2
    assert all(instance.healthy for instance in comfy_api.instances)
    assert comfy_api.faults == fast_fault_policy()
    assert comfy_api.models_path is None
    assert comfy_api.download_dir == (tmp_path / "comfy_api-downloads").resolve()
    assert (comfy_api.ready_timeout, comfy_api.execution_timeout) == (10.0, 60.0)
    assert comfy_api.min_instances == 2
    assert not comfy_api.gpu.cuda_available
    result = await comfy_api.run_workflow(JOB, params=params("pair", 4))
    assert len(result.outputs) == 4
    # In the order of the fakes: instance i is fake i.
    for instance, fake in zip(comfy_api.instances, comfy_fakes, strict=True):
        made = {o.prompt_id for o in result.outputs if o.instance == instance.name}
        assert made
        assert made <= set(fake.history())


@pytest.mark.comfy_api(fakes=3, prompts_per_instance=1, execution_timeout=5.0)
async def test_the_marker_gives_the_count_and_the_apis_keywords(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    assert len(comfy_fakes) == len(comfy_api.instances) == 3
    assert comfy_api.execution_timeout == 5.0
    assert comfy_api.min_instances == 3
    assert comfy_api.faults == fast_fault_policy()  # what the marker did not change
    result = await comfy_api.run_workflow(JOB, params=params("three", 3))
    assert [len(f.prompts_received) for f in comfy_fakes] == [1, 1, 1]
    assert len(result.outputs) == 3


@pytest.mark.parametrize("comfy_fakes", [1, 3], indirect=True)
async def test_the_count_may_be_an_indirect_parameter(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI], request: pytest.FixtureRequest
) -> None:
    count = request.node.callspec.params["comfy_fakes"]
    assert len(comfy_fakes) == len(comfy_api.instances) == count


async def test_comfy_api_on_the_virtual_clock_finds_a_hang_in_its_hang_timeout(
    autojump_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    hung, other = comfy_api.instances
    comfy_fakes[0].hang()
    since = trio.current_time()
    with trio.fail_after(10):
        while hung.state != "hung":
            await hung.wait_state_change()
    silent = trio.current_time() - since  # virtual seconds
    # Found once hang_timeout has passed (a probe always gets 1 s at least).
    assert comfy_api.faults.hang_timeout <= silent <= 1.0 + 2 * comfy_api.faults.health_interval
    result = await comfy_api.run_workflow(JOB, params=params("other", 2))
    assert {o.instance for o in result.outputs} == {other.name}
    comfy_fakes[0].unhang()
    with trio.fail_after(10):
        await hung.wait_healthy()


@pytest.mark.comfy_api(fakes=1, execution_timeout=20.0, faults=FaultPolicy())
async def test_a_long_prompt_on_the_virtual_clock_meets_the_fixtures_timeout(
    autojump_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    comfy_fakes[0].set_seconds_per_image(600)
    started = trio.current_time()
    with pytest.raises(ComfyUITimeoutError) as caught:
        await comfy_api.run_workflow(JOB, params=params("long", 1))
    assert caught.value.timeout == 20.0
    assert 20.0 <= trio.current_time() - started < 60.0
    await comfy_fakes[0].wait_idle()  # interrupted, not left to run its 600 s


def test_fast_fault_policy_is_fast_and_takes_changes() -> None:
    fast, default = fast_fault_policy(), FaultPolicy()
    timings = [
        "restart_backoff",
        "health_interval",
        "hang_timeout",
        "reconnect_timeout",
        "silence_timeout",
        "no_instance_timeout",
    ]
    for name in timings:
        assert getattr(fast, name) <= 3.0
        assert getattr(fast, name) < getattr(default, name)
    assert fast.health_interval < fast.hang_timeout  # a hang is seen by a probe
    assert (fast.max_shard_attempts, fast.max_restarts) == (
        default.max_shard_attempts,
        default.max_restarts,
    )
    changed = fast_fault_policy(max_shard_attempts=1, hang_timeout=2.0)
    assert changed == attrs.evolve(fast, max_shard_attempts=1, hang_timeout=2.0)
    with pytest.raises(TypeError):
        fast_fault_policy(no_such_field=1)
