"""distribute(): the seed's fair split, larger shares first."""

from __future__ import annotations

import pytest

from comfytrio import distribute


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [(4, 3, [2, 1, 1]), (6, 3, [2, 2, 2]), (1, 3, [1, 0, 0]), (0, 2, [0, 0]), (7, 1, [7])],
)
def test_spec_examples(total: int, count: int, expected: list[int]) -> None:
    assert distribute(total, count) == expected


@pytest.mark.parametrize(("total", "count"), [(5, 0), (-1, 2)])
def test_bad_arguments_raise(total: int, count: int) -> None:
    with pytest.raises(ValueError, match="must"):
        distribute(total, count)


def test_shares_always_sum_to_total() -> None:
    for total in range(50):
        for count in range(1, 9):
            shares = distribute(total, count)
            assert sum(shares) == total
            assert max(shares) - min(shares) <= 1
