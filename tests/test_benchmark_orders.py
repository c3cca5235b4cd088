"""The order of providers in the benchmarks' paired rounds (benchmarks/_common.py)."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import balanced_orders  # noqa: E402


@pytest.mark.parametrize("n", range(2, 9))
def test_balanced_orders_put_every_provider_after_every_other_equally_often(n):
    """A Williams design: each order a permutation; over the orders every provider in every position, and
    right after every other provider, the same number of times (a rotation gives each one a fixed
    predecessor: benchmarks/NOTES.md, G4)."""
    orders = balanced_orders(n)
    assert len(orders) == (2 * n if n % 2 else n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    after = Counter((o[i], o[i + 1]) for o in orders for i in range(n - 1))
    assert len(after) == n * (n - 1) and len(set(after.values())) == 1
    places = Counter((p, i) for o in orders for i, p in enumerate(o))
    assert len(places) == n * n and len(set(places.values())) == 1
