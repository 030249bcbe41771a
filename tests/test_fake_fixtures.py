"""The pytest plugin's fixtures, used here and in a user's own pytest-trio suite."""

from __future__ import annotations

import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from conftest import WORKFLOWS

from comfytrio.testing import FakeComfyUI

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
    result.assert_outcomes(passed=3)


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
