"""The one exception the serve app turns into the Comfy API v2 error envelope.

Every route raises ``ApiProblem(status, code, message, ...)`` for a request it refuses; the
app answers ``{"error": {"code", "message", "details"}}`` with that status (and
``Retry-After`` when set). Codes are the spec's (``invalid_workflow``, ``workflow_format_ui``,
``missing_asset``, ``hash_mismatch``, ``blob_not_found``, ``idempotency_key_reuse``,
``queue_full``, ``not_found``, ``unauthorized``, ``asset_in_use``) plus ``invalid_request``
(a malformed body, header or query) and ``upstream_error`` (anything unexpected; its message
never carries internals).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiProblem", "error_envelope"]


class ApiProblem(Exception):
    """A request refused with a v2 error code; carries what the envelope needs."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        """The HTTP status."""
        self.code = code
        """The machine-readable ``error.code``."""
        self.message = message
        """What to fix, for a person."""
        self.details = details
        """``error.details`` (None: null)."""
        self.retry_after = retry_after
        """Seconds for a ``Retry-After`` header (None: no header)."""

    def envelope(self) -> dict[str, Any]:
        """The JSON body."""
        return error_envelope(self.code, self.message, self.details)


def error_envelope(
    code: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``{"error": {"code", "message", "details"}}``, the spec's ``ErrorEnvelope``."""
    return {"error": {"code": code, "message": message, "details": details}}
