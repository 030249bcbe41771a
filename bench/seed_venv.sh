#!/usr/bin/env bash
# Create bench/.seed-venv with the seed library (techtrash-comfyapi 1.1.3, asyncio + httpx),
# which bench/seed_runner.py runs in. Idempotent: an existing venv with the package is kept.
#
#     bench/seed_venv.sh            # uses python3 (3.11+)
#     PYTHON=python3.12 bench/seed_venv.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.seed-venv"
python="${PYTHON:-python3}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import comfyapi" 2>/dev/null; then
    echo "$venv: techtrash-comfyapi already installed"
    exit 0
fi
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "techtrash-comfyapi==1.1.3"
"$venv/bin/python" -c "import comfyapi, httpx; print('seed venv ready:', comfyapi.__file__, 'httpx', httpx.__version__)"
