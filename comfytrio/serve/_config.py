"""How a ``serve`` app is set up, as one frozen value."""

from __future__ import annotations

from pathlib import Path

import attrs

__all__ = ["ServeConfig"]

DAY = 24 * 3600.0


@attrs.frozen
class ServeConfig:
    """Settings of ``comfytrio serve`` (and of an app built with ``build_serve_app``)."""

    state_dir: Path = attrs.field(converter=Path)
    """Where the SQLite file (``serve.sqlite3``), uploaded and output blobs live."""
    host: str = "127.0.0.1"
    """Address to listen on. Anything but a loopback address needs ``token``."""
    port: int = 8189
    """Port to listen on (0: any free one)."""
    token: str | None = None
    """A static bearer token every request must carry (None: no auth, loopback only)."""
    max_queued: int = 1000
    """Jobs queued or running at once; the next submit gets 429 ``queue_full``."""
    retention: float = DAY
    """Seconds a job and its outputs are kept after it was created (then ``expired``)."""
    idempotency_ttl: float = DAY
    """Seconds an ``Idempotency-Key`` stays claimed."""
    max_upload_bytes: int = 512 * 1024**2
    """Largest asset upload."""
    webhook_url: str | None = None
    """Where every job's terminal status is posted when the job names none."""
    webhook_secret: str | None = None
    """The Standard Webhooks secret (``whsec_...``; None: one is made and kept in
    ``state_dir/webhook-secret``)."""
    keepalive: float = 15.0
    """Seconds between SSE keep-alive comments."""
    progress_interval: float = 0.5
    """Least seconds between two ``progress`` events of one job (the spec's ~2/s)."""
