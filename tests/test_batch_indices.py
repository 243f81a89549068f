"""recipes.sft.batch_indices: one seeded permutation per epoch, built once, a pure function of (seed, step)."""

from __future__ import annotations

import random

import pytest

from recipes import sft as train


@pytest.fixture
def shuffles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts full-permutation shuffles done by batch_indices."""
    calls: list[int] = []

    class Counting(random.Random):
        def shuffle(self, x: list) -> None:  # type: ignore[override]
            calls.append(len(x))
            super().shuffle(x)

    monkeypatch.setattr(train.random, "Random", Counting)
    train._epoch_permutation.cache_clear()
    yield calls
    train._epoch_permutation.cache_clear()


def test_one_permutation_per_epoch(shuffles: list[int]) -> None:
    n, bs = 1000, 64
    steps = 3 * n // bs  # 46 steps touch three epochs; batches 15 and 31 straddle an epoch boundary
    batches = [train.batch_indices(s, bs, n, seed=7) for s in range(steps)]
    # before: one full shuffle of n per index, i.e. batch_size per step (O(batch x n) per step)
    assert len(shuffles) == 3, shuffles
    flat = [i for b in batches for i in b]
    for e in range(2):  # each (complete) epoch visits every example exactly once, in a seed-dependent order
        assert sorted(flat[e * n : (e + 1) * n]) == list(range(n))
    assert flat[:n] != flat[n : 2 * n] and flat[:n] != list(range(n))


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    n, bs = 50, 8
    straight = [train.batch_indices(s, bs, n, seed=3) for s in range(20)]
    train._epoch_permutation.cache_clear()  # a resumed process starts with an empty cache
    resumed = [train.batch_indices(s, bs, n, seed=3) for s in range(11, 20)]
    assert resumed == straight[11:]
    # the same permutation as one shuffle per index gave before: runs started before the change resume alike
    reference = []
    for k in range(5 * bs, 6 * bs):
        epoch, pos = divmod(k, n)
        perm = list(range(n))
        random.Random(3 * 1_000_003 + epoch).shuffle(perm)
        reference.append(perm[pos])
    assert straight[5] == reference
    assert train.batch_indices(5, bs, n, seed=4) != straight[5]
