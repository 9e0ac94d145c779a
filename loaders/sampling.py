"""Which clip, which frames, which random numbers: the stream's exact-resume logic, pure numpy.

`stream.py` reads bytes and runs DALI; everything it decides is decided here, from
(seed, epoch, rank, batch) alone, so it can be tested without DALI and resumed from two
integers:

- `epoch_plan`: training draws one permutation of the split per epoch from (seed, epoch);
  rank r takes its contiguous, equal share (every rank runs the same number of steps) and
  cuts it into batches. Evaluation reads every clip of every video in order, contiguous
  per rank.
- `batch_draws`: batch b's random numbers come from (seed, epoch, rank, b): the clip start
  fraction per sample, the random-resized-crop windows, the flip flags, in that order.
- `clip_frames`: T frames at stride S from a start uniform over the valid starts
  (training) or evenly spaced (evaluation); indices wrap modulo the frame count, so a
  video shorter than the clip loops (never pads with black frames, docs/data.md).
- `Position`: the loader state (epoch, next batch) and the settings a resume must share.
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


def epoch_plan(n: int, epoch: int, s: Sampling) -> list[np.ndarray]:
    """This rank's batches of `epoch` over items 0..n-1; each int64 [b, 3] rows of
    (position in the epoch, item, clip index)."""
    W, r = s.world_size, s.rank
    if s.train:
        order = np.random.default_rng([s.seed, epoch]).permutation(n) if s.shuffle else np.arange(n)
        per_rank = n // W  # equal shares: every rank runs the same number of steps
        pos = np.arange(r * per_rank, (r + 1) * per_rank)
        rows = np.stack([pos, order[pos], np.zeros_like(pos)], axis=1)
    else:
        m = n * s.eval_clips  # every clip of every video, in order, contiguous per rank
        pos = np.arange(r * m // W, (r + 1) * m // W)
        rows = np.stack([pos, pos // s.eval_clips, pos % s.eval_clips], axis=1)
    B = s.batch_size
    nb = len(rows) // B if (s.train and s.drop_last) else math.ceil(len(rows) / B)
    return [rows[i * B:(i + 1) * B] for i in range(nb)]


def batch_draws(s: Sampling, epoch: int, b: int, n: int) -> Draws:
    """The random numbers of batch `b` of `epoch` on this rank (n planned samples); the same
    whenever the batch is made, whatever came before."""
    rng = np.random.default_rng([s.seed, epoch, s.rank, b])
    u = rng.random(n)
    rois = crop_windows(rng, n, s.crop_scale, s.frame) if s.crop_scale is not None else None
    return Draws(u=u, rois=rois, flips=rng.random(n) < 0.5)


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
    the window fits, else the whole frame."""
    lo, hi = scale
    H, W = frame
    s = rng.uniform(lo, hi, size=(n, CROP_TRIES))
    ratio = np.exp(rng.uniform(*np.log(CROP_RATIO), size=(n, CROP_TRIES)))
    w = np.sqrt(s * ratio * H / W)  # relative width:  sqrt(s*H*W*r) / W
    h = np.sqrt(s / ratio * W / H)  # relative height: sqrt(s*H*W/r) / H
    where = rng.random((n, 2))
    out = []
    for i in range(n):
        ok = np.nonzero((w[i] <= 1) & (h[i] <= 1))[0]
        wi, hi_ = (w[i, ok[0]], h[i, ok[0]]) if len(ok) else (1.0, 1.0)
        y0, x0 = where[i, 0] * (1 - hi_), where[i, 1] * (1 - wi)
        out.append(np.array([y0, x0, y0 + hi_, x0 + wi], dtype=np.float32))
    return out


def items_digest(keys: list[str]) -> str:
    """16 hex digits naming the sample set a plan permutes (its keys, in corpus order)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


@dataclass(kw_only=True, slots=True)
class Position:
    """Loader state: the next batch is batch `position` of `epoch`; plus what must match
    for that to mean the same batch on resume."""

    epoch: int = 0
    position: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    train: bool = True
    items: str = ""
    """`items_digest` of the sample set (a fine-tune's labelled subset differs from the split)."""

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "train": self.train, "items": self.items}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; DataError when it was saved with other settings (an exact
        resume needs the same seed, ranks, mode and samples). Keys missing from older states
        are not checked."""
        for k in ("seed", "world_size", "rank", "train", "items"):
            mine = getattr(self, k)
            if state.get(k, mine) != mine:
                raise DataError(f"loader state was saved with {k}={state[k]}, this stream has {k}={mine}: "
                                "an exact resume needs the same seed, ranks, mode and samples")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
