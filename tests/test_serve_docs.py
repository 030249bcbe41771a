"""docs/serve.md's curl examples, run in order against ``comfytrio serve --fake 2``: the
page says what the server answers, and this keeps it true."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import start_serve, stop_serve
from test_docs import DOCS, blocks, environment, scratch

MARK = "# test: serve"


def test_the_curl_examples_run(tmp_path: Path) -> None:
    examples = [b for b in blocks(DOCS / "serve.md") if b.text.startswith(MARK)]
    assert len(examples) >= 8, "docs/serve.md lost its examples"
    work = scratch(tmp_path / "work")
    process, url = start_serve(tmp_path / "serve", "--fake", "2")
    try:
        script = "set -euo pipefail\n" + "".join(
            f"echo '--- {b.where}'\n{b.text}" for b in examples
        )
        script = re.sub(r"http://127\.0\.0\.1:8189", url, script)
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=work,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        lines = done.stdout.splitlines()
        assert '"status":"ok"' in lines[1]  # health, after the first marker line
        assert "422" in lines  # the key used twice
        assert "event: status" in output
        assert '"status":"succeeded"' in output
        assert "204" in lines  # a clean job has no log
        assert (work / "first.png").read_bytes().startswith(b"\x89PNG")
        assert "queued" in lines[-1]  # the split job was accepted
    finally:
        stop_serve(process)
