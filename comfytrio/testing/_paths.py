"""The folders of one fake ComfyUI and the file rules a real one applies to them.

A real ComfyUI (``folder_paths.py``) has a base directory with ``models/<folder>/``,
``input/``, ``output/``, ``temp/`` and ``user/``; each can be moved by a flag, and
``extra_model_paths`` files add more model roots. The fake keeps the same layout and the same
observable rules: which model files a folder lists, the ``name [input]`` annotations, the
``prefix_00001_.png`` counter found by scanning the output folder, and the traversal checks.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing

__all__ = [
    "MODEL_FOLDERS",
    "FakePaths",
    "disk_work",
    "parse_extra_model_paths",
]

T = TypeVar("T")


async def disk_work(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking file work in a worker thread, as a real server keeps its loop free; run
    it inline under trio's ``MockClock``, whose autojump would otherwise leap virtual time
    (past the timeouts of the client under test) while the thread runs."""
    if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


logger = logging.getLogger("comfytrio.testing")

_PT_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})

MODEL_FOLDERS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "checkpoints": (("checkpoints",), _PT_EXTENSIONS),
    "configs": (("configs",), frozenset({".yaml"})),
    "loras": (("loras",), _PT_EXTENSIONS),
    "vae": (("vae",), _PT_EXTENSIONS),
    "text_encoders": (("text_encoders", "clip"), _PT_EXTENSIONS),
    "diffusion_models": (("unet", "diffusion_models"), _PT_EXTENSIONS),
    "clip_vision": (("clip_vision",), _PT_EXTENSIONS),
    "style_models": (("style_models",), _PT_EXTENSIONS),
    "embeddings": (("embeddings",), _PT_EXTENSIONS),
    "diffusers": (("diffusers",), frozenset({"folder"})),
    "vae_approx": (("vae_approx",), _PT_EXTENSIONS),
    "controlnet": (("controlnet", "t2i_adapter"), _PT_EXTENSIONS),
    "gligen": (("gligen",), _PT_EXTENSIONS),
    "upscale_models": (("upscale_models",), _PT_EXTENSIONS),
    "custom_nodes": ((), frozenset()),
    "hypernetworks": (("hypernetworks",), _PT_EXTENSIONS),
    "photomaker": (("photomaker",), _PT_EXTENSIONS),
    "classifiers": (("classifiers",), frozenset({""})),
    "model_patches": (("model_patches",), _PT_EXTENSIONS),
    "audio_encoders": (("audio_encoders",), _PT_EXTENSIONS),
}
"""ComfyUI 0.3.64's model folders (``GET /models``), their sub-folders under ``models/`` and
the file extensions each lists (an empty set lists every file)."""

_LEGACY_FOLDERS = {"unet": "diffusion_models", "clip": "text_encoders"}

mimetypes.add_type("image/webp", ".webp")


def _map_legacy(folder: str) -> str:
    return _LEGACY_FOLDERS.get(folder, folder)


@dataclass
class FakePaths:
    """Where one fake ComfyUI keeps its files.

    ``temp`` is the folder PreviewImage writes to (a real ComfyUI given
    ``--temp-directory X`` uses ``X/temp``; the caller passes the final folder).
    """

    base: Path
    input: Path
    output: Path
    temp: Path
    user: Path
    extra_model_dirs: dict[str, list[Path]] = field(default_factory=dict)
    default_model_dirs: dict[str, list[Path]] = field(default_factory=dict)

    @classmethod
    def under(cls, root: Path) -> FakePaths:
        """The layout of a ComfyUI base directory ``root``."""
        root = Path(os.path.abspath(root))
        return cls(
            base=root,
            input=root / "input",
            output=root / "output",
            temp=root / "temp",
            user=root / "user",
        )

    @property
    def models(self) -> Path:
        """``<base>/models``."""
        return self.base / "models"

    def create(self, *, wipe_temp: bool = True) -> None:
        """Make the folders (and empty ``temp``, as ComfyUI does when it starts)."""
        if wipe_temp and self.temp.is_dir():
            shutil.rmtree(self.temp, ignore_errors=True)
        for folder in (self.input, self.output, self.temp, self.user, self.models):
            folder.mkdir(parents=True, exist_ok=True)
        for name, (subs, _exts) in MODEL_FOLDERS.items():
            if name != "custom_nodes":
                for sub in subs[:1]:
                    (self.models / sub).mkdir(exist_ok=True)

    def add_model_dir(self, folder: str, path: Path, *, is_default: bool = False) -> None:
        """Add a model root, as an ``extra_model_paths`` entry does."""
        folder = _map_legacy(folder)
        target = self.default_model_dirs if is_default else self.extra_model_dirs
        dirs = target.setdefault(folder, [])
        if path not in dirs:
            dirs.append(path)

    def model_folder_names(self) -> list[str]:
        """The names ``GET /models`` lists."""
        names = list(MODEL_FOLDERS)
        for extra in (*self.default_model_dirs, *self.extra_model_dirs):
            if extra not in names:
                names.append(extra)
        return names

    def model_dirs(self, folder: str) -> list[Path] | None:
        """The folders searched for ``folder`` (None when ComfyUI does not know it)."""
        folder = _map_legacy(folder)
        known = folder in MODEL_FOLDERS
        if (
            not known
            and folder not in self.extra_model_dirs
            and (folder not in self.default_model_dirs)
        ):
            return None
        dirs: list[Path] = list(self.default_model_dirs.get(folder, []))
        if folder == "custom_nodes":
            dirs.append(self.base / "custom_nodes")
        elif known:
            dirs += [self.models / sub for sub in MODEL_FOLDERS[folder][0]]
        dirs += self.extra_model_dirs.get(folder, [])
        return dirs

    def list_models(self, folder: str) -> list[str] | None:
        """Sorted relative file names a loader's combo offers (None: unknown folder)."""
        dirs = self.model_dirs(folder)
        if dirs is None:
            return None
        name = _map_legacy(folder)
        extensions = MODEL_FOLDERS[name][1] if name in MODEL_FOLDERS else frozenset()
        found: set[str] = set()
        for directory in dirs:
            found.update(_filter_extensions(_walk(directory), extensions))
        return sorted(found)

    def find_model(self, folder: str, filename: str) -> Path | None:
        """The file a loader opens, like ``folder_paths.get_full_path``."""
        dirs = self.model_dirs(folder) or []
        relative = os.path.relpath(os.path.join("/", filename), "/")
        for directory in dirs:
            candidate = directory / relative
            if candidate.is_file():
                return candidate
        return None

    def directory_by_type(self, kind: str | None) -> Path | None:
        """``input``, ``output`` or ``temp``; None for any other name."""
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind or "")

    def annotated(self, name: str) -> tuple[str, Path | None]:
        """Split ``"x.png [output]"`` into the name and its folder (None: no annotation)."""
        for suffix, folder in (
            (" [output]", self.output),
            (" [input]", self.input),
            (" [temp]", self.temp),
        ):
            if name.endswith(suffix.strip()):
                return name[: -len(suffix)], folder
        return name, None

    def annotated_path(self, name: str, default: Path | None = None) -> Path:
        """The file an annotated name points at (``input/`` when not annotated)."""
        bare, folder = self.annotated(name)
        return (folder or default or self.input) / bare

    def input_images(self) -> list[str]:
        """LoadImage's combo: the top-level image files of ``input/``, sorted."""
        try:
            entries = [p for p in self.input.iterdir() if p.is_file()]
        except FileNotFoundError:
            return []
        names = [p.name for p in entries]
        return sorted(n for n in names if (mimetypes.guess_type(n)[0] or "").startswith("image/"))

    def output_images(self) -> list[str]:
        """LoadImageOutput's combo: image files below ``output/`` as ``name [output]``."""
        result = []
        for rel in _walk(self.output):
            if (mimetypes.guess_type(rel)[0] or "").startswith("image/"):
                result.append(f"{rel} [output]")
        return sorted(result)

    def save_image_path(self, prefix: str, folder: Path) -> tuple[Path, str, int, str]:
        """Where SaveImage writes: (folder, file name stem, first counter, subfolder).

        The counter is one more than the highest ``<stem>_NNNNN_`` already in the folder, so
        two servers writing one folder can pick the same name (as real ones do).
        Raises ``ValueError`` for a prefix that leaves the output folder.
        """
        normalized = os.path.normpath(prefix)
        subfolder = os.path.dirname(normalized)
        stem = os.path.basename(normalized)
        full = Path(os.path.abspath(folder / subfolder))
        root = str(Path(os.path.abspath(folder)))
        if os.path.commonpath((root, str(full))) != root:
            raise ValueError(
                "**** ERROR: Saving image outside the output folder is not allowed.\n"
                f" full_output_folder: {full}\n         output_dir: {root}"
            )
        pattern = re.compile(re.escape(stem) + r"_(\d+)_")
        highest = 0
        try:
            names = os.listdir(full)
        except FileNotFoundError:
            full.mkdir(parents=True, exist_ok=True)
            names = []
        for name in names:
            match = pattern.match(name)
            if match:
                highest = max(highest, int(match.group(1)))
        return full, stem, highest + 1, subfolder

    def inside(self, root: Path, candidate: Path) -> bool:
        """Whether ``candidate`` (made absolute) stays within ``root``."""
        root_s = os.path.abspath(root)
        return os.path.commonpath((root_s, os.path.abspath(candidate))) == root_s


def _walk(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    result = []
    for dirpath, subdirs, filenames in os.walk(directory, followlinks=True):
        subdirs[:] = [d for d in subdirs if d != ".git"]
        for name in filenames:
            result.append(os.path.relpath(os.path.join(dirpath, name), directory))
    return result


def _filter_extensions(files: Iterable[str], extensions: frozenset[str]) -> list[str]:
    if not extensions:
        return list(files)
    return [f for f in files if os.path.splitext(f)[-1].lower() in extensions]


def parse_extra_model_paths(text: str, config_dir: Path) -> list[tuple[str, Path, bool]]:
    """Read an ``extra_model_paths.yaml`` (the simple subset ComfyUI documents).

    Returns ``(folder, path, is_default)`` triples. Handles nested ``key: value`` maps,
    quoted values and ``|`` blocks of several paths; anything else is skipped with a warning.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    block_key: str | None = None
    block_indent = 0
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if block_key is not None and current is not None and indent > block_indent:
            current[block_key].append(_unquote(line.strip()))
            continue
        block_key = None
        if indent == 0:
            name = line.strip().rstrip(":").strip()
            current = sections.setdefault(name, {})
            continue
        if current is None or ":" not in line:
            logger.warning("extra_model_paths: cannot read line %r", raw)
            continue
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if value in ("|", ">", "|-", ">-"):
            block_key, block_indent = key.strip(), indent
            current[block_key] = []
        else:
            current[key.strip()] = [_unquote(value)]
    result: list[tuple[str, Path, bool]] = []
    for entries in sections.values():
        base = entries.pop("base_path", [""])[0]
        is_default = entries.pop("is_default", ["false"])[0].lower() == "true"
        base_path = Path(os.path.expanduser(os.path.expandvars(base))) if base else None
        if base_path is not None and not base_path.is_absolute():
            base_path = config_dir / base_path
        for folder, values in entries.items():
            for value in values:
                for part in value.split("\n"):
                    if not part.strip():
                        continue
                    path = Path(os.path.expanduser(os.path.expandvars(part.strip())))
                    if base_path is not None:
                        path = base_path / path
                    result.append((folder, path, is_default))
    return result


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            loaded = json.loads(value)
        except ValueError:
            return value[1:-1]
        return str(loaded)
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    return value
