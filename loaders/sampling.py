"""Which clip, which frames, which random numbers: the stream's exact-resume logic, pure numpy.

`stream.py` reads bytes and runs DALI; everything it decides is decided here, from
(seed, epoch, global position) alone, so it can be tested without DALI and resumed from
two integers (epoch, global cursor), at any world size:

- `epoch_plan`: training draws one permutation of the split per epoch from (seed, epoch),
  cuts it into global batches of batch_size x world_size, and rank r takes part r of each
  (every rank runs the same number of steps). Evaluation reads every clip of every video
  in order, contiguous per rank.
- `batch_draws`: a global batch's random numbers come from (seed, epoch, its first
  position): the clip start fraction per sample, the random-resized-crop windows, the
  flip flags, in that order; each rank takes its part.
- `clip_frames`: T frames at stride S from a start uniform over the valid starts
  (training) or evenly spaced (evaluation); indices wrap modulo the frame count, so a
  video shorter than the clip loops (never pads with black frames, docs/data.md).
- `Position`: the loader state (epoch, next batch, global cursor) and the settings a resume
  must share (or may change: elastic resume).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .errors import DataError

CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range of random-resized-crop windows (torchvision's)."""
CROP_TRIES = 10
"""Window draws per sample before falling back to the whole frame (torchvision's rule)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Sampling:
    """What the sampling decisions depend on (StreamConfig's sampling fields + the rank)."""

    seed: int
    train: bool
    rank: int = 0
    world_size: int = 1
    batch_size: int
    num_frames: int
    stride: int
    shuffle: bool = True
    drop_last: bool = True
    eval_clips: int = 1
    crop_scale: tuple[float, float] | None = None
    """Random-resized-crop area scale range (training only); None: no crop windows drawn."""
    frame: tuple[int, int] = (1, 1)
    """Source frame (height, width): the crop windows are relative to it."""


@dataclass(slots=True)
class Draws:
    """The random numbers of one batch, one entry per planned sample."""

    u: np.ndarray
    """float64 [n] in [0, 1): where in its valid range each clip starts (training)."""
    rois: list[np.ndarray] | None
    """Per sample float32 [4] relative crop window (y0, x0, y1, x1); None without crops."""
    flips: np.ndarray
    """bool [n]: mirror horizontally (used when the graph flips)."""


def epoch_plan(n: int, epoch: int, s: Sampling, start: int = 0) -> list[np.ndarray]:
    """This rank's batches of `epoch` over items 0..n-1 from global position `start` on; each
    int64 [b, 3] rows of (position in the epoch, item, clip index).

    Training: the epoch's order is one permutation of the items drawn from (seed, epoch)
    alone, the same whatever the world size. It is cut into global batches of
    batch_size x world_size consecutive positions from `start`, and rank r takes part r of
    each: the global cursor (positions consumed) is then the whole loader state, and a run
    resumed at another world size or per-rank batch size continues from it with every
    sample of the epoch read exactly once (`start` = the cursor at the change).
    Evaluation reads every clip of every video in order, contiguous per rank."""
    W, r, B = s.world_size, s.rank, s.batch_size
    if s.train:
        order = np.random.default_rng([s.seed, epoch]).permutation(n) if s.shuffle else np.arange(n)
        G = B * W
        full = (n - start) // G
        pos = [start + k * G + r * B + np.arange(B) for k in range(full)]
        tail = (n - start - full * G) // W  # equal shares: every rank runs the same number of steps
        if tail and not s.drop_last:
            pos.append(start + full * G + r * tail + np.arange(tail))
        return [np.stack([p, order[p], np.zeros_like(p)], axis=1) for p in pos]
    m = n * s.eval_clips  # every clip of every video, in order, contiguous per rank
    pos = np.arange(r * m // W, (r + 1) * m // W)
    rows = np.stack([pos, pos // s.eval_clips, pos % s.eval_clips], axis=1)
    return [rows[i * B:(i + 1) * B] for i in range(math.ceil(len(rows) / B))]


def batch_draws(s: Sampling, epoch: int, rows: np.ndarray) -> Draws:
    """The random numbers of the batch `rows` (an `epoch_plan` batch of this rank).

    They are drawn for the whole global batch the rows belong to, from (seed, epoch, its
    first position: [seed, epoch, 0, k] for global batch k on the grid of batch_size x
    world_size, [seed, epoch, 1, position] off it), and this rank takes its part: the same whenever the batch is made,
    whatever came before, and the same sample gets the same clip, crop and flip at any
    world size with the same global batch."""
    n = len(rows)
    if not s.train:
        lo, size, g0 = 0, n, int(rows[0, 0]) if n else 0
    else:
        lo, size = s.rank * n, n * s.world_size
        g0 = int(rows[0, 0]) - lo if n else 0
    G = s.batch_size * s.world_size
    # Global batch k of a plan from position 0 draws from [seed, epoch, 0, k]: one rank's batch k
    # draws what it always has. A plan resumed at another global batch size is off that grid.
    rng = np.random.default_rng([s.seed, epoch, 0, g0 // G] if g0 % G == 0 else [s.seed, epoch, 1, g0])
    u = rng.random(size)
    rois = crop_windows(rng, size, s.crop_scale, s.frame)[lo:lo + n] if s.crop_scale is not None else None
    return Draws(u=u[lo:lo + n], rois=rois, flips=(rng.random(size) < 0.5)[lo:lo + n])


def clip_frames(nframes: int, s: Sampling, *, u: float = 0.0, clip: int = 0) -> np.ndarray:
    """int64 [T]: the source frames of one clip of a video of `nframes` frames.

    Training: the start is uniform over the valid starts (`u` in [0, 1) from `batch_draws`);
    evaluation: clip `clip` of `eval_clips` evenly spaced over them (one clip: the centre).
    Indices wrap modulo nframes: a video shorter than the span loops."""
    T, S = s.num_frames, s.stride
    nvalid = max(nframes - (T - 1) * S, 1)
    if s.train:
        start = min(int(u * nvalid), nvalid - 1)
    else:
        p = 0.5 if s.eval_clips == 1 else clip / (s.eval_clips - 1)
        start = int(np.floor(p * (nvalid - 1) + 0.5))
    return (start + S * np.arange(T)) % nframes


def crop_windows(rng: np.random.Generator, n: int, scale: tuple[float, float],
                 frame: tuple[int, int]) -> list[np.ndarray]:
    """Random-resized-crop windows, relative (y0, x0, y1, x1), for frames of (height, width)
    `frame`; torchvision's rule: up to CROP_TRIES draws of (area scale, log aspect) until
    the window fits, else the whole frame. Vectorised: a global batch of hundreds costs
    microseconds."""
    lo, hi = scale
    H, W = frame
    s = rng.uniform(lo, hi, size=(n, CROP_TRIES))
    ratio = np.exp(rng.uniform(*np.log(CROP_RATIO), size=(n, CROP_TRIES)))
    w = np.sqrt(s * ratio * H / W)  # relative width:  sqrt(s*H*W*r) / W
    h = np.sqrt(s / ratio * W / H)  # relative height: sqrt(s*H*W/r) / H
    where = rng.random((n, 2))
    ok = (w <= 1) & (h <= 1)
    first, fits = ok.argmax(axis=1), ok.any(axis=1)
    rows = np.arange(n)
    wi = np.where(fits, w[rows, first], 1.0)
    hi_ = np.where(fits, h[rows, first], 1.0)
    y0, x0 = where[:, 0] * (1 - hi_), where[:, 1] * (1 - wi)
    win = np.stack([y0, x0, y0 + hi_, x0 + wi], axis=1).astype(np.float32)
    return list(win)


def items_digest(keys: list[str]) -> str:
    """16 hex digits naming the sample set a plan permutes (its keys, in corpus order)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


@dataclass(kw_only=True, slots=True)
class Position:
    """Loader state: the next batch is batch `position` of `epoch`'s plan from global position
    `start`; plus what must match for the rest of the epoch to hold each sample exactly once.

    The state a rank saves is global (every rank's is the same but for the counters): the
    epoch and the cursor, the number of the epoch's positions consumed by all ranks."""

    epoch: int = 0
    position: int = 0
    start: int = 0
    """Global position the current plan starts from (0, or the cursor of an elastic resume)."""
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    batch_size: int = 1
    shuffle: bool = True
    train: bool = True
    items: str = ""
    """`items_digest` of the sample set (a fine-tune's labelled subset differs from the split)."""

    @property
    def cursor(self) -> int:
        """Positions of the epoch consumed by all ranks before the next batch (training)."""
        return self.start + self.position * self.batch_size * self.world_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "start": self.start, "cursor": self.cursor,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "train": self.train, "items": self.items}

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue from `state`; returns the allowed layout changes, as notes ("world size
        2 -> 1"). DataError naming the setting when the epoch's order would differ (seed,
        shuffle, samples, mode), or evaluation changed its layout. Keys missing from older
        states are not checked."""
        for k, name in (("seed", "data.seed"), ("shuffle", "data.shuffle"), ("train", "train"),
                        ("items", "items")):
            mine = getattr(self, k)
            if state.get(k, mine) != mine:
                raise DataError(f"loader state was saved with {name}={state[k]}, this stream has {name}={mine}: "
                                "the rest of the epoch would not hold each sample exactly once; resume "
                                f"with {name}={state[k]}")
        notes = [f"{label} {state[k]} -> {getattr(self, k)}"
                 for k, label in (("world_size", "world size"), ("batch_size", "data.batch_size"))
                 if state.get(k, getattr(self, k)) != getattr(self, k)]
        if notes and not self.train:
            raise DataError(f"loader state was saved with another layout ({', '.join(notes)}): an evaluation "
                            "pass resumes only on the same ranks and batch size")
        self.epoch = int(state["epoch"])
        if notes:  # elastic: the new layout's plan starts at the saved cursor
            cursor = state.get("cursor", int(state["position"]) * int(state.get("batch_size", self.batch_size))
                               * int(state.get("world_size", self.world_size)))
            self.start, self.position = int(cursor), 0
        else:
            self.start, self.position = int(state.get("start", 0)), int(state["position"])
        return notes
