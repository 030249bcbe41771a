"""The example third-party plugin (``plugins/third_party_example``), installed with pip into a
fresh virtual environment, works from Python and from ``comfytrio run --param``.

The fresh venv sees what this environment has installed (comfytrio, its dependencies, pip:
each entry of our site-packages is linked into its own) except the example plugin, which
it must not know before pip installs it. Nothing is downloaded: the plugin's wheel is built
here from its ``pyproject.toml`` (its name, version, dependencies, the ``comfytrio`` entry
point and the packages hatchling would put in it), and pip installs that file with
``--no-index --no-deps``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from PIL import Image

import comfytrio
from comfytrio.testing import lay_out_fake_comfyui_install

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "third_party_example"

# A model-free workflow: the plugin's ``size`` type sets the canvas's width and height.
WORKFLOW: dict[str, Any] = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x3366CC},
        "_meta": {"title": "Canvas"},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "sized"}},
}

# What the fresh venv knows of the plugin: its entry point, its module, its param type.
PROBE = """
import importlib.metadata, importlib.util, json
import comfytrio
spec = importlib.util.find_spec("comfytrio_example")
print(json.dumps({
    "entry_points": sorted(e.name for e in importlib.metadata.entry_points(group="comfytrio")),
    "module": spec.origin if spec is not None else None,
    "size_type": "size" in comfytrio.make_plugin_manager().param_types(),
    "comfytrio": comfytrio.__file__,
}))
"""

# From Python: a fake ComfyUI in the script's own trio run, and a ComfyAPI on it.
FROM_PYTHON = """
import json, sys
from pathlib import Path
import trio
from PIL import Image
from comfytrio import ComfyAPI, GPUInfo
from comfytrio.testing import serve_fake_comfyui

async def main() -> None:
    work = Path(sys.argv[1])
    workflow = json.loads((work / "workflow.json").read_text())
    params = {"canvas": {"type": "size", "value": "64x48", "node_mappings": "Canvas"}}
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(serve_fake_comfyui, work / "fake-root")
        api = ComfyAPI([fake.url], gpu=GPUInfo(False, 0), download_dir=work / "downloads")
        async with api:
            result = await api.run_workflow(workflow, params=params)
        inputs = fake.prompts_received[-1]["prompt"]["1"]["inputs"]
        print(json.dumps({
            "sent": [inputs["width"], inputs["height"]],
            "sizes": [Image.open(o.path).size for o in result.outputs],
        }))
        nursery.cancel_scope.cancel()

trio.run(main)
"""


def run(cmd: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )


def checked(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout


def is_the_example(name: str) -> bool:
    """An entry of site-packages that belongs to the example plugin's installation."""
    return "comfytrio_example" in name.lower().replace("-", "_")


def fresh_venv(where: Path) -> Path:
    """A new venv that sees our site-packages but the example plugin; its python."""
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(where)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot create a virtual environment here ({exc!r})")
    python = where / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    target = Path(
        checked(
            run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], where
            )
        ).strip()
    )
    ours = Path(sysconfig.get_path("purelib"))
    for entry in ours.iterdir():
        if is_the_example(entry.name) or entry.name == "__pycache__":
            continue
        if (target / entry.name).exists():
            continue
        if entry.suffix == ".pth" and is_the_example(entry.read_text(errors="replace")):
            continue  # an editable install's path file
        try:
            (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        except OSError as exc:
            pytest.skip(f"cannot link {entry} into a virtual environment ({exc!r})")
    return python


def build_wheel(project: Path, out: Path) -> Path:
    """The project's wheel, as hatchling would build it from its ``pyproject.toml``: its
    packages, and metadata with its dependencies and entry points."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    info = meta["project"]
    name, version = info["name"], info["version"]
    stem = f"{name.replace('-', '_')}-{version}"
    dist_info = f"{stem}.dist-info"
    files: dict[str, bytes] = {}
    for package in meta["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        for path in sorted((project / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(project).as_posix()] = path.read_bytes()
    metadata = [
        "Metadata-Version: 2.3",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: {info.get('description', '')}",
        f"Requires-Python: {info.get('requires-python', '')}",
        *(f"Requires-Dist: {dep}" for dep in info.get("dependencies", [])),
    ]
    files[f"{dist_info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    wheel_info = ["Wheel-Version: 1.0", "Generator: comfytrio-tests", "Root-Is-Purelib: true"]
    files[f"{dist_info}/WHEEL"] = ("\n".join([*wheel_info, "Tag: py3-none-any"]) + "\n").encode()
    entry_points = [
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items())
        for group, points in info.get("entry-points", {}).items()
    ]
    files[f"{dist_info}/entry_points.txt"] = "\n".join(entry_points).encode()
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def probe(python: Path, work: Path) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(checked(run([str(python), "-c", PROBE], work)))
    return answer


def cli_run(python: Path, work: Path, param: str) -> subprocess.CompletedProcess[str]:
    """``comfytrio run`` (as ``python -m comfytrio``) on one fake ComfyUI started as a
    process of its own from the fake install."""
    return run(
        [
            str(python),
            "-m",
            "comfytrio",
            "run",
            "workflow.json",
            "--comfyui",
            "ComfyUI",
            "--cpu",
            "--instances",
            "1",
            "--port",
            str(free_port()),
            "--state-dir",
            "state",
            "--param",
            param,
            "--json",
            "-q",
        ],
        work,
    )


def test_the_example_plugin_installed_in_a_fresh_venv_works_from_python_and_the_cli(
    tmp_path: Path,
) -> None:
    python = fresh_venv(tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    (work / "workflow.json").write_text(json.dumps(WORKFLOW))
    lay_out_fake_comfyui_install(work / "ComfyUI")

    # Before: comfytrio is there (ours), the plugin is not, and --param cannot use its type.
    before = probe(python, work)
    assert Path(before["comfytrio"]).resolve() == Path(comfytrio.__file__).resolve()
    assert "std" in before["entry_points"]
    assert "example" not in before["entry_points"]
    assert before["module"] is None
    assert not before["size_type"]
    refused = cli_run(python, work, "Canvas:size=64x48")
    assert refused.returncode != 0
    assert "'size'" in refused.stderr + refused.stdout

    # pip installs the plugin's wheel, from this file only.
    wheel = build_wheel(PLUGIN, tmp_path)
    checked(
        run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-deps",
                "--no-cache-dir",
                "--disable-pip-version-check",
                str(wheel),
            ],
            work,
            timeout=120,
        )
    )
    after = probe(python, work)
    assert "example" in after["entry_points"]
    assert after["size_type"]
    assert Path(after["module"]).resolve().is_relative_to((tmp_path / "venv").resolve())

    # From Python: the size reached the workflow the server got, and the image.
    (work / "script.py").write_text(FROM_PYTHON)
    made = json.loads(checked(run([str(python), "script.py", str(work)], work)))
    assert made == {"sent": [64, 48], "sizes": [[64, 48]]}

    # From the command line: the --param text reached the plugin's type, then the workflow.
    done = cli_run(python, work, "Canvas:size=64x48")
    result = json.loads(checked(done))
    assert result["ok"], result
    (output,) = result["outputs"]
    with Image.open(output["path"]) as image:
        assert image.size == (64, 48)
