"""Splitting work into shards."""

from __future__ import annotations

__all__ = ["distribute"]


def distribute(total: int, gpu_count: int) -> list[int]:
    """Split ``total`` as evenly as possible over ``gpu_count`` slots, the larger shares first.

    >>> distribute(4, 3)
    [2, 1, 1]
    >>> distribute(6, 3)
    [2, 2, 2]
    >>> distribute(1, 3)
    [1, 0, 0]

    Raises ``ValueError`` when ``gpu_count`` < 1 or ``total`` < 0.
    """
    if gpu_count < 1:
        raise ValueError(f"gpu_count must be at least 1, got {gpu_count}")
    if total < 0:
        raise ValueError(f"total must not be negative, got {total}")
    base, remainder = divmod(total, gpu_count)
    return [base + (1 if i < remainder else 0) for i in range(gpu_count)]
