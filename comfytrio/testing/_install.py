"""A directory that looks like a ComfyUI install but runs the fake."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FAKE_NODES_FILE", "lay_out_fake_comfyui_install"]

FAKE_NODES_FILE = "comfytrio_fake_nodes.json"
"""Custom node declarations the fake install loads at start (``declare_node`` keywords)."""

_MAIN = '''"""Not ComfyUI: the comfytrio fake ComfyUI, started with ComfyUI's command line."""

import sys

from comfytrio.testing._main import main

if __name__ == "__main__":
    sys.exit(main())
'''


def lay_out_fake_comfyui_install(
    directory: str | os.PathLike[str],
    *,
    nodes: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a fake ComfyUI install into ``directory`` and return its path.

    It holds a ``main.py`` that accepts ComfyUI's flags (``--cpu --listen --port
    --base-directory --input-directory --output-directory --temp-directory
    --user-directory --database-url --extra-model-paths-config --cuda-device ...``) and
    serves the fake, plus ``models/``, ``input/``, ``output/``, ``custom_nodes/`` like a
    fresh checkout, so code that starts ComfyUI as a child process can start this instead.
    ``nodes`` maps custom class_types to ``FakeComfyUI.declare_node`` keywords (JSON-able:
    ``inputs``, ``optional``, ``outputs``, ``output_names``, ``output_node``, ``seconds``,
    ``info``); they are loaded at every start.

    Environment variables of the started process: ``COMFYTRIO_FAKE_SECONDS_PER_IMAGE``,
    ``COMFYTRIO_FAKE_SECONDS_PER_STEP``, ``COMFYTRIO_FAKE_IDLE_TIMEOUT`` (seconds before an
    idle keep-alive connection is closed, 75 by default), ``COMFYTRIO_FAKE_STARTUP_DELAY``
    (seconds before it listens), ``COMFYTRIO_FAKE_EXIT_AT_START=<code>`` (print to stderr and
    exit while starting), ``COMFYTRIO_FAKE_CRASH_ON_NODE=<id or class_type>`` (SIGKILL
    itself when that node starts), ``COMFYTRIO_FAKE_FAIL_NODE=<id or class_type>`` (that node
    raises), ``COMFYTRIO_FAKE_COMFYUI_VERSION`` (the ComfyUI version it speaks as, 0.3.64 by
    default). ``--preview-method`` (other than ``none``) turns latent previews on.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / "main.py").write_text(_MAIN, encoding="utf-8")
    for folder in (
        "models/checkpoints",
        "models/loras",
        "models/vae",
        "input",
        "output",
        "custom_nodes",
        "user",
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "comfyui_version.py").write_text(
        '__version__ = "0.3.64"  # comfytrio fake ComfyUI\n', encoding="utf-8"
    )
    declarations = root / FAKE_NODES_FILE
    if nodes:
        declarations.write_text(json.dumps(nodes, indent=1), encoding="utf-8")
    elif declarations.exists():
        declarations.unlink()
    return root
