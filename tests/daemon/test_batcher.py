"""Batcher: size and age triggers, ordering, views, growth, and a no-loss property."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalyd.batcher import Batch, Batcher
from anomalyd.buffers import ReadyWindows

L, F = 3, 2


def ready(ids: list[int], padded: bool = False) -> ReadyWindows:
    """Window i is filled with the value i; device f"d{i}"; end_ts i; arrival 1000 + i."""
    k = len(ids)
    w = np.broadcast_to(np.asarray(ids, np.float32)[:, None, None], (k, L, F)).copy()
    ids_f = np.asarray(ids, np.float64)
    return ReadyWindows(w, [f"d{i}" for i in ids], ids_f, ids_f + 1000, np.full(k, padded))


def ids_of(b: Batch) -> list[int]:
    return [int(x) for x in b.windows[:, 0, 0]]


def test_full_batches_go_at_once() -> None:
    bt = Batcher(max_batch=4, max_delay_s=1.0, window_length=L, n_features=F)
    bt.add(ready(list(range(10))), now_mono=0.0)
    out = bt.pop_due(now_mono=0.0)
    assert [ids_of(b) for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert bt.pending == 2
    assert bt.time_until_due(0.25) == pytest.approx(0.75)
    assert bt.pop_due(0.5) == []
    (last,) = bt.pop_due(1.0)
    assert ids_of(last) == [8, 9]
    assert last.devices == ["d8", "d9"]
    assert last.end_ts.tolist() == [8.0, 9.0]
    assert last.arrival_mono.tolist() == [1008.0, 1009.0]
    assert bt.pending == 0
    assert bt.time_until_due(5.0) is None


def test_age_is_measured_from_the_oldest_window() -> None:
    bt = Batcher(max_batch=8, max_delay_s=0.25, window_length=L, n_features=F)
    bt.add(ready([1]), now_mono=10.0)
    bt.add(ready([2, 3]), now_mono=10.125)
    assert bt.time_until_due(10.125) == 0.125
    assert bt.pop_due(10.24) == []
    (b,) = bt.pop_due(10.25)
    assert ids_of(b) == [1, 2, 3]


def test_zero_delay_sends_immediately_and_full_is_due_now() -> None:
    bt = Batcher(max_batch=2, max_delay_s=0.0, window_length=L, n_features=F)
    bt.add(ready([1]), now_mono=0.0)
    assert bt.time_until_due(0.0) == 0.0
    assert [ids_of(b) for b in bt.pop_due(0.0)] == [[1]]
    bt = Batcher(max_batch=2, max_delay_s=9.0, window_length=L, n_features=F)
    bt.add(ready([1, 2]), now_mono=0.0)
    assert bt.time_until_due(0.0) == 0.0


def test_force_flushes_everything() -> None:
    bt = Batcher(max_batch=3, max_delay_s=60.0, window_length=L, n_features=F)
    bt.add(ready([1, 2, 3, 4, 5], padded=True), now_mono=0.0)
    out = bt.pop_due(0.0, force=True)
    assert [ids_of(b) for b in out] == [[1, 2, 3], [4, 5]]
    assert out[1].padded.tolist() == [True, True]
    assert bt.pending == 0


def test_batches_are_views_into_staging_and_valid_until_next_add() -> None:
    bt = Batcher(max_batch=2, max_delay_s=0.0, window_length=L, n_features=F)
    bt.add(ready([1, 2, 3]), now_mono=0.0)
    out = bt.pop_due(0.0)
    assert all(not b.windows.flags.owndata for b in out)
    assert out[0].windows.base is out[1].windows.base
    assert [ids_of(b) for b in out] == [[1, 2], [3]]


def test_growth_beyond_the_initial_capacity_keeps_order() -> None:
    bt = Batcher(max_batch=2, max_delay_s=1.0, window_length=L, n_features=F)
    bt.add(ready(list(range(5))), now_mono=0.0)
    bt.pop_due(0.0)  # takes 0..3, head moves
    bt.add(ready(list(range(5, 40))), now_mono=0.5)  # capacity 8 -> must grow
    out = bt.pop_due(2.0)
    assert [i for b in out for i in ids_of(b)] == list(range(4, 40))
    assert [d for b in out for d in b.devices] == [f"d{i}" for i in range(4, 40)]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(0, 1.0, L, F)
    with pytest.raises(ValueError, match="max_delay_s"):
        Batcher(1, -1.0, L, F)


@given(
    max_batch=st.integers(1, 7),
    delay=st.sampled_from([0.0, 0.5, 2.0]),
    steps=st.lists(st.tuples(st.integers(0, 9), st.floats(0, 1.0)), min_size=1, max_size=25),
)
@settings(max_examples=300, deadline=None)
def test_no_window_lost_or_duplicated_and_order_kept(
    max_batch: int, delay: float, steps: list[tuple[int, float]]
) -> None:
    bt = Batcher(max_batch, delay, L, F)
    now = 0.0
    next_id = 0
    seen: list[int] = []
    added_at: dict[int, float] = {}
    for k, dt in steps:
        ids = list(range(next_id, next_id + k))
        next_id += k
        for i in ids:
            added_at[i] = now
        bt.add(ready(ids), now)
        now += dt
        for b in bt.pop_due(now):
            got = ids_of(b)
            assert 1 <= len(got) <= max_batch
            assert b.devices == [f"d{i}" for i in got]
            # a partial batch only goes when its oldest window is due
            assert len(got) == max_batch or now >= added_at[got[0]] + delay
            seen += got  # use the views before the next add()
        wait = bt.time_until_due(now)
        assert (wait is None) == (bt.pending == 0)
        if wait == 0.0:  # "due now" must mean pop_due delivers now (else the service loop spins)
            due = bt.pop_due(now)
            assert due
            seen += [i for b in due for i in ids_of(b)]
    seen += [i for b in bt.pop_due(now, force=True) for i in ids_of(b)]
    assert seen == list(range(next_id))
    assert bt.pending == 0
