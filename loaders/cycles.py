"""Cardiac cycle per clip: period (frames per beat) and ED / ES frame candidates.

Frames -> 16x16 grayscale, each pixel's temporal mean removed, rows L2-normalised:
`x [F, 256]`. The self-similarity `C = x x^T [F, F]`, denoised to its top principal components and
averaged over its diagonals, is the autocorrelation by lag `a[l]`; the period is the first strong local maximum of `a` in a
plausible range, refined by parabolic interpolation. No clear periodicity (peak too low or
not prominent over the dip before it) -> period None, ED/ES [] — we say so, not guess.

ED/ES: the first principal component of `x` follows the beat; its sign is chosen so that
it rises as the frame gets darker (a larger blood pool: end-diastole); a three-harmonic fit
at the period gives the phase of its maximum (ED) and minimum (ES), one frame per beat.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np


@dataclass(kw_only=True, slots=True)
class CycleConfig:
    """Period / ED / ES estimation knobs."""

    grid: int = 16
    """Frames are pooled to grid x grid grayscale."""
    components: int = 4
    """Principal components kept (denoising) before the autocorrelation."""
    min_peak: float = 0.4
    """The (denoised) autocorrelation at the period must be at least this..."""
    min_prominence: float = 0.8
    """...and rise this much above the lowest value at a shorter lag..."""
    min_raw: float = 0.08
    """...and the raw (not denoised) autocorrelation there at least this. On the synthetic
    corpus beating clips score >= 0.58 / 1.25 / 0.15, pure noise and random walks
    <= 0.27 / 0.69 / 0.02."""
    harmonic: float = 0.8
    """The first local maximum reaching this fraction of the highest one is the period
    (later maxima at 2P, 3P are harmonics of the same beat)."""
    min_bpm: float = 30.0
    max_bpm: float = 240.0
    """Plausible heart rates; with a known fps they bound the lag search."""


@dataclass(kw_only=True, slots=True)
class Cycle:
    period: float | None
    """Frames per cardiac cycle (sub-frame), None when there is no clear periodicity."""
    ed: list[int] = field(default_factory=list)
    es: list[int] = field(default_factory=list)
    strength: float = 0.0
    """Autocorrelation at the period (0 when none was found)."""


def pooled_signal(frames: np.ndarray, grid: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [F, H, W, 3] -> (centred, row-normalised float64 [F, grid*grid], brightness [F])."""
    import cv2

    from .video_io import to_gray

    gray = to_gray(frames).astype(np.float32)
    small = np.stack([cv2.resize(g, (grid, grid), interpolation=cv2.INTER_AREA) for g in gray])
    x = small.reshape(len(small), -1).astype(np.float64)
    bright = x.mean(1)
    x = x - x.mean(0, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-8), bright


@numba.njit(cache=True)
def lag_profile(x: np.ndarray, max_lag: int) -> np.ndarray:
    """a[l] = mean_i <x_i, x_{i+l}> for l in [0, max_lag]; x float64 [F, D] -> [max_lag+1]."""
    f, d = x.shape
    out = np.zeros(max_lag + 1)
    for lag in range(max_lag + 1):
        s = 0.0
        for i in range(f - lag):
            acc = 0.0
            for k in range(d):
                acc += x[i, k] * x[i + lag, k]
            s += acc
        out[lag] = s / max(f - lag, 1)
    return out


@numba.njit(cache=True)
def pick_period(a: np.ndarray, lo: int, hi: int, min_peak: float, min_prom: float,
                harmonic: float) -> tuple[float, float]:
    """First strong local max of a[lo..hi] -> (refined lag, height); (-1, 0) when none."""
    best = -1e9
    for l in range(max(lo, 1), min(hi, len(a) - 2) + 1):
        if a[l] >= a[l - 1] and a[l] > a[l + 1] and a[l] > best:
            best = a[l]
    if best < min_peak:
        return -1.0, 0.0
    lowest = a[0]
    for l in range(1, min(hi, len(a) - 2) + 1):
        if a[l] < lowest:
            lowest = a[l]
        if l < lo or not (a[l] >= a[l - 1] and a[l] > a[l + 1]):
            continue
        if a[l] >= harmonic * best and a[l] - lowest >= min_prom:
            # Parabola through (l-1, l, l+1): vertex offset in (-0.5, 0.5).
            den = a[l - 1] - 2.0 * a[l] + a[l + 1]
            off = 0.5 * (a[l - 1] - a[l + 1]) / den if den < 0 else 0.0
            return l + off, a[l]
    return -1.0, 0.0


@numba.njit(cache=True)
def gram(x: np.ndarray) -> np.ndarray:
    """x [F, D] -> x x^T [F, F] (plain loops: no BLAS threads, ingest runs one clip per core)."""
    f, d = x.shape
    g = np.zeros((f, f))
    for i in range(f):
        for j in range(i, f):
            acc = 0.0
            for k in range(d):
                acc += x[i, k] * x[j, k]
            g[i, j] = acc
            g[j, i] = acc
    return g


@numba.njit(cache=True)
def top_components(g: np.ndarray, k: int, iters: int = 200) -> np.ndarray:
    """Scores on the top-k principal axes [F, k] (column j = eigvec_j * sqrt(eigval_j), largest
    first, signs arbitrary) of a Gram matrix g [F, F], by orthogonal (subspace) iteration."""
    f = g.shape[0]
    k = min(k, f)
    q = np.zeros((f, k))
    for i in range(f):  # deterministic, generic start
        for j in range(k):
            q[i, j] = np.cos(0.7 * (i + 1) * (j + 1) + 0.3 * j) + 1e-3 * ((i * 7919 + j) % 13)
    for it in range(iters):
        z = np.zeros((f, k))
        for i in range(f):
            for j in range(k):
                acc = 0.0
                for m in range(f):
                    acc += g[i, m] * q[m, j]
                z[i, j] = acc
        for j in range(k):  # modified Gram-Schmidt
            for jj in range(j):
                dot = 0.0
                for i in range(f):
                    dot += z[i, j] * z[i, jj]
                for i in range(f):
                    z[i, j] -= dot * z[i, jj]
            n = 0.0
            for i in range(f):
                n += z[i, j] * z[i, j]
            n = np.sqrt(n)
            for i in range(f):
                z[i, j] = z[i, j] / n if n > 1e-300 else 0.0
        delta = 0.0
        for i in range(f):
            for j in range(k):
                delta = max(delta, abs(abs(z[i, j]) - abs(q[i, j])))
        q = z
        if delta < 1e-12:
            break
    lam = np.zeros(k)
    for j in range(k):
        acc = 0.0
        for i in range(f):
            for m in range(f):
                acc += q[i, j] * g[i, m] * q[m, j]
        lam[j] = max(acc, 0.0)
    order = np.argsort(-lam)
    out = np.zeros((f, k))
    for jj in range(k):
        j = order[jj]
        for i in range(f):
            out[i, jj] = q[i, j] * np.sqrt(lam[j])
    return out


def estimate_cycle(frames: np.ndarray, fps: float = 0.0, cfg: CycleConfig | None = None) -> Cycle:
    """Period and ED/ES candidates of uint8 [F, H, W, 3] frames (fps 0: unknown)."""
    cfg = cfg or CycleConfig()
    f = frames.shape[0]
    if f < 8:
        return Cycle(period=None)
    x, bright = pooled_signal(frames, cfg.grid)
    # Rank-k denoising: the beat lives in a few principal components, per-frame speckle and
    # noise spread over all of them; rows re-normalised so a[0] = 1.
    u = top_components(gram(x), cfg.components)
    z = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    lo, hi = 3, (2 * f) // 3
    if fps > 0:
        lo = max(lo, int(np.floor(fps * 60.0 / cfg.max_bpm)))
        hi = min(hi, int(np.ceil(fps * 60.0 / cfg.min_bpm)))
    if hi <= lo + 1:
        return Cycle(period=None)
    a = lag_profile(z, hi + 1)
    p, h = pick_period(a, lo, hi, cfg.min_peak, cfg.min_prominence, cfg.harmonic)
    if p < 0 or lag_profile(x, int(round(p)))[-1] < cfg.min_raw:
        return Cycle(period=None)
    ed, es = phase_frames(u[:, 0], bright, p)
    return Cycle(period=float(p), ed=ed, es=es, strength=float(h))


def phase_frames(s: np.ndarray, bright: np.ndarray, period: float, harmonics: int = 3) -> tuple[list[int], list[int]]:
    """ED / ES frame candidates from the PC1 scores s [F] of the centred frames, the frame
    brightness [F] and a known period.

    PC1 of x follows the beat; it is oriented so that darker frames (larger blood pool:
    end-diastole) score high. A least-squares fit of its first `harmonics` Fourier terms at
    the period gives a smooth one-beat template (robust to per-frame speckle noise); ED
    are the frames at the template's maximum phase, ES at its minimum, one per beat.
    """
    f = len(s)
    if np.corrcoef(s, -bright)[0, 1] < 0:
        s = -s
    t = np.arange(f, dtype=np.float64)
    w = 2 * np.pi / period
    cols = [np.ones(f)]
    for k in range(1, harmonics + 1):
        cols += [np.cos(k * w * t), np.sin(k * w * t)]
    basis = np.stack(cols, 1)
    coef, *_ = np.linalg.lstsq(basis, s, rcond=None)
    grid = np.linspace(0, period, 256, endpoint=False)
    tmpl = coef[0] + sum(coef[2 * k - 1] * np.cos(k * w * grid) + coef[2 * k] * np.sin(k * w * grid)
                         for k in range(1, harmonics + 1))
    return _beat_frames(grid[np.argmax(tmpl)], period, f), _beat_frames(grid[np.argmin(tmpl)], period, f)


def _beat_frames(phase: float, period: float, f: int) -> list[int]:
    """Frames phase + k*period (rounded) inside [0, f)."""
    k0 = int(np.ceil((-0.5 - phase) / period))
    out = []
    k = k0
    while (t := int(round(phase + k * period))) < f:
        if t >= 0:
            out.append(t)
        k += 1
    return out
