"""Running a group of calls at once with the library's error rule: the first
``ComfyAPIError`` cancels the rest and is raised as itself, never as an exception group.

Used by the core (collecting a shard's outputs) and handed to plugins through
``comfytrio.hookspecs`` (their ``prepare``/``resolve`` fan I/O out with it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import trio

from ._errors import ComfyAPIError

__all__ = ["run_concurrently"]


async def run_concurrently(fns: Iterable[Callable[[], Awaitable[object]]]) -> None:
    """Run every ``fn()`` at once in a trio nursery; on the first ``ComfyAPIError``, cancel
    the others and raise it (not an exception group), with any other such errors that
    happened meanwhile in its ``other_errors``. Other exceptions propagate as trio raises
    them.
    """
    errors: list[ComfyAPIError] = []

    async with trio.open_nursery() as nursery:

        async def run(fn: Callable[[], Awaitable[object]]) -> None:
            try:
                await fn()
            except ComfyAPIError as exc:
                errors.append(exc)
                nursery.cancel_scope.cancel()

        for fn in fns:
            nursery.start_soon(run, fn)
    if errors:
        first = errors[0]
        first.other_errors.extend(errors[1:])
        raise first
