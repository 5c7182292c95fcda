"""IdSet against a Python set: same answers on random ids, across buffer flushes and run merges."""

from __future__ import annotations

import random

import pytest

import scanner.scan.idset as idset
from scanner.scan.idset import IdSet


@pytest.fixture()
def small_buffer(monkeypatch):
    monkeypatch.setattr(idset, "BUFFER", 7)  # many runs and merges from few ids


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_python_set(small_buffer, seed):
    rng = random.Random(seed)
    universe = [f"dir{rng.randrange(50)}/img_{i}.jpg" for i in range(400)] + ["p/\udcff.jpg", "", "a.tar::"]
    ours, reference = IdSet(), set()
    for _ in range(60):
        chunk = [rng.choice(universe) for _ in range(rng.randrange(0, 40))]  # duplicates inside a chunk too
        want = []
        for item_id in chunk:
            want.append(item_id not in reference)
            reference.add(item_id)
        assert ours.add_new(chunk) == want
        assert len(ours) == len(reference)
    for item_id in universe + ["never/added.jpg"]:
        assert (item_id in ours) == (item_id in reference)
    assert len(ours._runs) > 1  # the merge path ran


def test_shared_high_half_is_resolved_by_the_low_half(small_buffer, monkeypatch):
    # Force digests that agree in their first 8 bytes: membership must then look at the second half.
    def digest(item_id: str) -> bytes:
        return b"\x01" * 8 + (hash(item_id) & (2**64 - 1)).to_bytes(8, "little")

    monkeypatch.setattr(idset, "_digest", digest)
    ids = [f"x{i}" for i in range(30)]
    s = IdSet(ids[:20])
    assert all(i in s for i in ids[:20])
    assert not any(i in s for i in ids[20:])
    assert s.add_new(ids[15:25]) == [False] * 5 + [True] * 5


def test_contains_does_not_add_and_update_chunks():
    s = IdSet()
    assert "a" not in s and len(s) == 0
    s.update((f"id{i}" for i in range(10_000)), chunk=333)
    assert len(s) == 10_000 and "id9999" in s and "id10000" not in s
