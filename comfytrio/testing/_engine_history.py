"""The history of one server generation: finished prompts, oldest first, as ``GET
/history`` and ``GET /history/{prompt_id}`` answer them and ``POST /history`` edits them."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["MAX_HISTORY", "SENSITIVE_EXTRA_DATA", "History"]

MAX_HISTORY = 10000
"""ComfyUI's ``MAXIMUM_HISTORY_SIZE``: the oldest entry goes when a new one comes."""

SENSITIVE_EXTRA_DATA = ("auth_token_comfy_org", "api_key_comfy_org")
"""``execution.SENSITIVE_EXTRA_DATA_KEYS``: the API keys kept out of the history."""


class History:
    """The finished prompts by id, oldest first."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def record(
        self, queued: list[Any], success: bool, messages: list[Any], result: dict[str, Any]
    ) -> None:
        """Keep a finished prompt: ``queued`` is its ``/queue`` entry (``[number, prompt_id,
        prompt, extra_data, outputs]``; the API keys in ``extra_data`` are dropped),
        ``result`` its ``outputs`` and ``meta``."""
        if len(self.entries) > MAX_HISTORY:
            self.entries.pop(next(iter(self.entries)))
        extra_data = queued[3]
        for key in SENSITIVE_EXTRA_DATA:
            extra_data.pop(key, None)
        entry: dict[str, Any] = {
            "prompt": queued,
            "outputs": {},
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": copy.deepcopy(messages),
            },
        }
        entry.update(result)
        self.entries[queued[1]] = entry

    def page(self, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        """``GET /history`` (the last ``max_items`` by default, oldest first)."""
        if offset < 0 and max_items is not None:
            offset = len(self.entries) - max_items
        result: dict[str, Any] = {}
        for index, (key, value) in enumerate(self.entries.items()):
            if index >= offset:
                result[key] = value
                if max_items is not None and len(result) >= max_items:
                    break
        return result

    def answer(self, prompt_id: str) -> dict[str, Any]:
        """``GET /history/{prompt_id}``: ``{prompt_id: entry}``, or ``{}``."""
        entry = self.entries.get(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    def clear(self) -> None:
        """Forget every entry."""
        self.entries.clear()

    def delete(self, prompt_id: Any) -> None:
        """Forget one entry, if there is one."""
        self.entries.pop(prompt_id, None)
