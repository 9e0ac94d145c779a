"""The stream's exact-resume logic without DALI (loaders/sampling.py): which clip, which frames,
which random numbers, as pure functions of (seed, epoch, rank, batch)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from echofm.loaders.errors import DataError
from echofm.loaders.sampling import (Position, Sampling, batch_draws, clip_frames, crop_windows, epoch_plan,
                                     items_digest)


def _s(**kw) -> Sampling:
    base = dict(seed=7, train=True, batch_size=3, num_frames=16, stride=2)
    return Sampling(**(base | kw))


def _items(plan: list[np.ndarray]) -> list[int]:
    return [int(v) for rows in plan for v in rows[:, 1]]


def test_plan_and_draws_are_functions_of_seed_epoch_rank():
    a, b = epoch_plan(50, 3, _s(rank=1, world_size=2)), epoch_plan(50, 3, _s(rank=1, world_size=2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == 25 // 3
    assert _items(epoch_plan(50, 4, _s())) != _items(epoch_plan(50, 3, _s()))  # a new order each epoch
    assert _items(epoch_plan(50, 3, _s(seed=8))) != _items(epoch_plan(50, 3, _s()))
    d1, d2 = batch_draws(_s(rank=1), 3, 5, 4), batch_draws(_s(rank=1), 3, 5, 4)
    assert np.array_equal(d1.u, d2.u) and np.array_equal(d1.flips, d2.flips)
    for other in (batch_draws(_s(rank=0), 3, 5, 4), batch_draws(_s(rank=1), 4, 5, 4),
                  batch_draws(_s(rank=1), 3, 6, 4), batch_draws(_s(rank=1, seed=8), 3, 5, 4)):
        assert not np.array_equal(other.u, d1.u)
    # The reference: the numbers are numpy's generator seeded with [seed, epoch, rank, batch].
    rng = np.random.default_rng([7, 3, 1, 5])
    assert np.array_equal(d1.u, rng.random(4)) and np.array_equal(d1.flips, rng.random(4) < 0.5)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_take_disjoint_equal_parts_of_one_permutation(world):
    n = 23
    parts = [_items(epoch_plan(n, 2, _s(rank=r, world_size=world, drop_last=False))) for r in range(world)]
    flat = [v for p in parts for v in p]
    assert len(set(flat)) == len(flat)  # disjoint
    assert all(len(p) == n // world for p in parts)  # equal shares: the same number of steps
    order = np.random.default_rng([7, 2]).permutation(n)
    assert flat == order[: n // world * world].tolist()  # contiguous parts of the epoch's permutation
    positions = [int(p) for r in range(world) for rows in epoch_plan(n, 2, _s(rank=r, world_size=world,
                                                                             drop_last=False)) for p in rows[:, 0]]
    assert positions == list(range(n // world * world))
    # drop_last: each rank keeps only whole batches
    assert all(len(rows) == 3 for rows in epoch_plan(n, 2, _s(rank=0, world_size=world)))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_reads_every_clip_once_in_order(world):
    n, clips = 7, 3
    rows = [r for rank in range(world)
            for b in epoch_plan(n, 0, _s(train=False, eval_clips=clips, rank=rank, world_size=world)) for r in b]
    assert [tuple(r[1:]) for r in rows] == [(v, c) for v in range(n) for c in range(clips)]


def test_mid_epoch_resume_gives_the_same_next_batch():
    s = _s(rank=1, world_size=2, crop_scale=(0.5, 1.0), frame=(120, 160))
    at = Position(epoch=5, position=3, seed=s.seed, rank=1, world_size=2, items=items_digest(["a", "b"]))
    state = pickle.loads(pickle.dumps(at.state_dict()))
    resumed = Position(seed=s.seed, rank=1, world_size=2, items=items_digest(["a", "b"]))
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (5, 3)
    # the batch a never-stopped run would make next, made from the restored position alone
    ref_rows, ref = epoch_plan(40, 5, s)[3], batch_draws(s, 5, 3, 3)
    rows, draws = epoch_plan(40, resumed.epoch, s)[resumed.position], batch_draws(s, resumed.epoch, resumed.position, 3)
    assert np.array_equal(rows, ref_rows) and np.array_equal(draws.u, ref.u)
    assert all(np.array_equal(a, b) for a, b in zip(draws.rois, ref.rois))
    for key, value in (("world_size", 4), ("seed", 8), ("items", items_digest(["a"]))):
        with pytest.raises(DataError, match=key):
            Position(seed=s.seed, rank=1, world_size=2, items=items_digest(["a", "b"])).load_state_dict(
                dict(state, **{key: value}))


def test_short_videos_wrap_around_and_starts_stay_valid():
    s = _s(num_frames=8, stride=2)  # span 15
    assert clip_frames(5, s, u=0.9).tolist() == [0, 2, 4, 1, 3, 0, 2, 4]  # loops, never pads
    assert clip_frames(1, s).tolist() == [0] * 8
    long = _s(num_frames=16, stride=2)  # span 31 of 100 frames: 70 valid starts
    assert clip_frames(100, long, u=0.0)[0] == 0
    last = clip_frames(100, long, u=np.nextafter(1.0, 0.0))
    assert last[0] == 69 and last[-1] == 99 and np.all(np.diff(last) == 2)
    # evaluation: clips evenly spaced over the valid starts (one clip: the centre)
    ev = _s(train=False, num_frames=4, stride=2, eval_clips=3)
    assert [clip_frames(40, ev, clip=c)[0] for c in range(3)] == [0, 17, 33]
    assert clip_frames(40, _s(train=False, num_frames=4, stride=2))[0] == 17


def test_crop_windows_fit_the_frame_and_the_scale():
    rng = np.random.default_rng(0)
    wins = crop_windows(rng, 200, (0.3, 0.6), (120, 160))
    for y0, x0, y1, x1 in wins:
        assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
        area = (y1 - y0) * (x1 - x0)
        assert 0.3 - 1e-6 <= area <= 0.6 + 1e-6
        assert 3 / 4 - 1e-4 <= ((x1 - x0) * 160) / ((y1 - y0) * 120) <= 4 / 3 + 1e-4
