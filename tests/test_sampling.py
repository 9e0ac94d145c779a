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
    s = _s(rank=1, world_size=2)
    rows = epoch_plan(50, 3, s)[5]  # global batch 5: positions 30..35, rank 1 takes 33..35
    d1, d2 = batch_draws(s, 3, rows), batch_draws(s, 3, rows)
    assert np.array_equal(d1.u, d2.u) and np.array_equal(d1.flips, d2.flips)
    for other in (batch_draws(_s(rank=0, world_size=2), 3, epoch_plan(50, 3, _s(rank=0, world_size=2))[5]),
                  batch_draws(s, 4, rows), batch_draws(s, 3, epoch_plan(50, 3, s)[6]),
                  batch_draws(_s(rank=1, world_size=2, seed=8), 3, rows)):
        assert not np.array_equal(other.u, d1.u)
    # The reference: numpy's generator seeded with [seed, epoch, 0, global batch] draws the whole
    # global batch's numbers; rank 1 takes the second half. (One rank: [seed, epoch, 0, batch],
    # the numbers of the layout before global batches, so single-rank runs are unchanged.)
    rng = np.random.default_rng([7, 3, 0, 5])
    assert np.array_equal(d1.u, rng.random(6)[3:]) and np.array_equal(d1.flips, (rng.random(6) < 0.5)[3:])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_take_disjoint_equal_parts_of_one_permutation(world):
    n = 23
    parts = [_items(epoch_plan(n, 2, _s(rank=r, world_size=world, drop_last=False))) for r in range(world)]
    flat = [v for p in parts for v in p]
    assert len(set(flat)) == len(flat)  # disjoint
    assert all(len(p) == n // world for p in parts)  # equal shares: the same number of steps
    order = np.random.default_rng([7, 2]).permutation(n)
    positions = sorted(int(p) for r in range(world) for rows in epoch_plan(n, 2, _s(rank=r, world_size=world,
                                                                                    drop_last=False)) for p in rows[:, 0])
    assert positions == list(range(n // world * world))  # a prefix of the epoch's permutation
    assert sorted(flat) == sorted(order[: n // world * world].tolist())
    # global batch k = positions [k*3*world, (k+1)*3*world), rank r takes part r of it
    plans = [epoch_plan(n, 2, _s(rank=r, world_size=world)) for r in range(world)]
    for k in range(len(plans[0])):
        assert [int(p) for r in range(world) for p in plans[r][k][:, 0]] == list(range(k * 3 * world,
                                                                                    (k + 1) * 3 * world))
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
    ref_rows = epoch_plan(40, 5, s)[3]
    ref = batch_draws(s, 5, ref_rows)
    rows = epoch_plan(40, resumed.epoch, s, start=resumed.start)[resumed.position]
    draws = batch_draws(s, resumed.epoch, rows)
    assert np.array_equal(rows, ref_rows) and np.array_equal(draws.u, ref.u)
    assert all(np.array_equal(a, b) for a, b in zip(draws.rois, ref.rois))
    for key, value in (("shuffle", False), ("seed", 8), ("items", items_digest(["a"]))):
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


@pytest.mark.parametrize("saved, resumed", [((2, 3), (1, 3)), ((1, 4), (2, 4)), ((2, 3), (3, 2)), ((3, 2), (2, 5))])
def test_elastic_resume_reads_each_sample_of_the_epoch_once(saved, resumed):
    """Half an epoch at (world, batch) `saved`, the rest at `resumed`: the epoch's samples
    exactly once; with the same global batch the same samples get the same random numbers."""
    n, epoch = 60, 4
    (w0, b0), (w1, b1) = saved, resumed
    steps = len(epoch_plan(n, epoch, _s(world_size=w0, batch_size=b0))) // 2
    first = [rows for r in range(w0) for rows in epoch_plan(n, epoch, _s(rank=r, world_size=w0, batch_size=b0))[:steps]]
    at = Position(epoch=epoch, position=steps, seed=7, world_size=w0, batch_size=b0)
    state = at.state_dict()
    assert state["cursor"] == steps * w0 * b0
    new = Position(seed=7, world_size=w1, batch_size=b1)
    notes = new.load_state_dict(state)
    assert notes == [f"world size {w0} -> {w1}"] + ([f"data.batch_size {b0} -> {b1}"] if b0 != b1 else [])
    assert (new.epoch, new.position, new.start) == (epoch, 0, state["cursor"])
    rest = [rows for r in range(w1) for rows in epoch_plan(n, epoch, _s(rank=r, world_size=w1, batch_size=b1),
                                                            start=new.start)]
    items = [int(v) for rows in first + rest for v in rows[:, 1]]
    assert len(items) == len(set(items))
    assert set(items) == set(range(n))  # (the rest of the epoch divides into global batches here)
    if w0 * b0 == w1 * b1:  # same global batch: the same clip, crop and flip for every sample
        ref = {}
        for r in range(w0):
            s0 = _s(rank=r, world_size=w0, batch_size=b0)
            for rows in epoch_plan(n, epoch, s0):
                ref.update(zip(rows[:, 1].tolist(), batch_draws(s0, epoch, rows).u.tolist()))
        for r in range(w1):
            s1 = _s(rank=r, world_size=w1, batch_size=b1)
            for rows in epoch_plan(n, epoch, s1, start=new.start):
                assert [ref[v] for v in rows[:, 1].tolist()] == batch_draws(s1, epoch, rows).u.tolist()


def test_crop_windows_match_torchvisions_loop():
    """The vectorised windows equal the per-sample first-fit rule they replace."""
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    got = crop_windows(rng_a, 64, (0.08, 1.0), (120, 160))
    s = rng_b.uniform(0.08, 1.0, size=(64, 10))
    ratio = np.exp(rng_b.uniform(*np.log((3 / 4, 4 / 3)), size=(64, 10)))
    w, h, where = np.sqrt(s * ratio * 120 / 160), np.sqrt(s / ratio * 160 / 120), rng_b.random((64, 2))
    for i in range(64):
        ok = np.nonzero((w[i] <= 1) & (h[i] <= 1))[0]
        wi, hi = (w[i, ok[0]], h[i, ok[0]]) if len(ok) else (1.0, 1.0)
        y0, x0 = where[i, 0] * (1 - hi), where[i, 1] * (1 - wi)
        assert np.allclose(got[i], [y0, x0, y0 + hi, x0 + wi], atol=1e-6)
