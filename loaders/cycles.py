"""Cardiac cycle per clip: period (frames per beat) and ED / ES frames, each with a confidence.

Frames -> 16x16 grayscale `x [F, 256]`, each pixel's slow drift (respiration, probe motion,
gain) removed by a temporal Gaussian high-pass (sigma 0.5 s: beats >= 30 bpm pass, a 4 s
breath keeps ~25% of its amplitude).

Period: the autocorrelation by lag of the rows of x (`a[l]`, energy weighted); the period is
the first strong local maximum of `a` in the plausible range (heart rate 30-240 bpm, at least
1.5 beats in the clip), refined by parabolic interpolation. A peak that is too low or not
prominent over the dip before it -> period None: we say so, not guess.

ED / ES: an LV-volume proxy `v [F]` is the darkness of the upper-central part of the cropped
fan (in apical views the ventricles sit near the apex; their blood pool is dark and largest
at end-diastole), denoised by projecting it onto the clip's top principal motion
components. On real EchoNet clips it correlates with the traced LV area at r = 0.6-0.95.
ES are its prominent minima (one per beat, any rhythm), ED the end of filling before each ES
(the last frame within `ed_level` of the beat's top). `ed_es_confidence` says how much of
the proxy the dominant motion explains and how regular its beats are; below
`min_ed_es_confidence` ED/ES are left empty (never a guess presented as a label).
Irregular rhythms (atrial fibrillation): the period is the mean beat (first to last ES).
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
    highpass_s: float = 0.5
    """Sigma (seconds) of the Gaussian whose smoothing is subtracted from every pooled pixel."""
    components: int = 4
    """Principal motion components the volume proxy is projected onto."""
    proxy_highpass_s: float = 0.5
    """The drift filter for the ED/ES proxy (longer: less distortion near the clip ends)."""
    min_peak: float = 0.15
    """The autocorrelation at the period must be at least this..."""
    min_prominence: float = 0.45
    """...and rise this much above the lowest value at a shorter lag. Real echo clips with a
    visible beat score >= 0.20 / 0.63 (13 public clips), synthetic beating clips >= 0.27 /
    0.56; noise, ramps, random walks and pans <= 0.13 / 0.32."""
    min_prominence_repeated: float = 0.3
    """...or this much when a second peak near twice the lag confirms the beat (small or noisy
    clips with 3+ beats; a random walk or a pan does not repeat)."""
    harmonic: float = 0.8
    """The first local maximum reaching this fraction of the highest one is the period
    (later maxima at 2P, 3P are harmonics of the same beat)."""
    min_bpm: float = 30.0
    max_bpm: float = 240.0
    min_beat_s: float = 0.3
    """Two ES closer than this (seconds) are one beat (the deeper is kept)."""
    """Plausible heart rates; with a known fps they bound the lag search."""
    min_beats: float = 1.5
    """The clip must hold this many periods."""
    es_prominence: float = 0.35
    """An ES minimum of the volume proxy rises this fraction of its range on both sides."""
    event_band: float = 0.1
    """An ED (ES) frame is the beat's proxy maximum (minimum); the frames within this fraction of
    the beat's amplitude of it are its uncertainty..."""
    max_event_s: float = 0.2
    """...and an event whose uncertainty is wider than this (seconds) is left out..."""
    noise_k: float = 2.0
    """...where the frames within noise_k x the proxy's frame-to-frame noise count as near it too."""
    es_band: float = 0.01
    """ES is the first frame within this fraction of the amplitude of the trough's bottom."""
    agree_s: float = 0.06
    """...and so is one that the dominant motion component does not place within this (s)."""
    min_ed_es_confidence: float = 0.8
    min_event_explained: float = 0.85
    """The beats (ES) time the period (irregular rhythm, harmonics) only when the proxy is
    this well explained by the motion; else the autocorrelation's period stands."""
    """Below this, ED / ES are left out (the confidence is still recorded)."""


@dataclass(kw_only=True, slots=True)
class Cycle:
    period: float | None
    """Frames per cardiac cycle (sub-frame), None when there is no clear periodicity."""
    ed: list[int] = field(default_factory=list)
    es: list[int] = field(default_factory=list)
    strength: float = 0.0
    """Autocorrelation at the period (0 when none was found)."""
    period_confidence: float = 0.0
    """0..1: the autocorrelation peak's prominence scaled so that the acceptance threshold is 0.5."""
    ed_es_confidence: float = 0.0
    """0..1; ED / ES are empty when it is below `CycleConfig.min_ed_es_confidence`."""
    rhythm_cv: float | None = None
    """Coefficient of variation of the beat-to-beat intervals (None: fewer than 2 intervals)."""


# Where the ventricles' blood pool sits in a fan cropped to its box, as (row0, row1, col0, col1)
# fractions: near the apex in apical views (and when the view is unknown), mid-fan in
# parasternal views.
LV_REGION = {"apical": (0.1, 0.55, 0.2, 0.8), "PLAX": (0.25, 0.7, 0.25, 0.85), "PSAX": (0.25, 0.75, 0.25, 0.75)}


WITNESS_SHRINK = 0.1


def lv_region_for(view: str | None) -> str:
    """The LV_REGION key for a view label ("A4C", "PLAX", "psax-mid", None -> "apical")."""
    v = (view or "").upper()
    return "PLAX" if v.startswith("PLAX") else "PSAX" if v.startswith(("PSAX", "SAX")) else "apical"


def pooled_signal(frames: np.ndarray, grid: int = 16, view: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [F, H, W(, 3)] -> (pooled grey float64 [F, grid*grid], LV-region darkness [F, 2]:
    the region, and the region without its lower `WITNESS_SHRINK` (away from the valve plane))."""
    import cv2

    from .video_io import to_gray

    gray = to_gray(frames)
    f, h, w = gray.shape
    small = np.empty((f, grid, grid), np.float32)
    for t in range(f):
        cv2.resize(gray[t].astype(np.float32), (grid, grid), dst=small[t], interpolation=cv2.INTER_AREA)
    r0, r1, c0, c1 = LV_REGION[lv_region_for(view)]
    dark = np.stack([-gray[:, int(r0 * h):max(int(b * h), 1), int(c0 * w):max(int(c1 * w), 1)]
                     .reshape(f, -1).mean(1, dtype=np.float64) for b in (r1, r1 - WITNESS_SHRINK)], 1)
    return small.reshape(f, -1).astype(np.float64), dark


def highpass(x: np.ndarray, sigma: float) -> np.ndarray:
    """x [F, D] minus its temporal Gaussian smoothing (sigma in frames, edges replicated)."""
    import cv2

    if sigma <= 0:  # a least-squares line per column
        t = np.linspace(-1.0, 1.0, len(x))
        a = np.stack([np.ones_like(t), t], 1)
        return x - a @ np.linalg.lstsq(a, x, rcond=None)[0]
    k = 2 * int(round(3 * sigma)) + 1
    smooth = cv2.GaussianBlur(np.ascontiguousarray(x, np.float64), (1, k), sigmaX=1e-6, sigmaY=sigma,
                              borderType=cv2.BORDER_REPLICATE)
    return x - smooth


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
def energy_lag_profile(x: np.ndarray, max_lag: int) -> np.ndarray:
    """a[l] = sum_i <x_i, x_{i+l}> / sqrt(sum_i |x_i|^2 * sum_i |x_{i+l}|^2) over the overlap
    (a correlation coefficient per lag, weighted by frame energy); x [F, D] -> [max_lag+1]."""
    f, d = x.shape
    e = np.zeros(f)
    for i in range(f):
        for k in range(d):
            e[i] += x[i, k] * x[i, k]
    out = np.zeros(max_lag + 1)
    for lag in range(max_lag + 1):
        s, ea, eb = 0.0, 0.0, 0.0
        for i in range(f - lag):
            for k in range(d):
                s += x[i, k] * x[i + lag, k]
            ea += e[i]
            eb += e[i + lag]
        out[lag] = s / np.sqrt(ea * eb) if ea > 0 and eb > 0 else 0.0
    return out


@numba.njit(cache=True)
def pick_period(a: np.ndarray, lo: int, hi: int, min_peak: float, min_prom: float,
                harmonic: float) -> tuple[float, float, float]:
    """First strong local max of a[lo..hi] -> (refined lag, height, prominence); (-1, 0, 0) when none."""
    best = -1e9
    for l in range(max(lo, 1), min(hi, len(a) - 2) + 1):
        if a[l] >= a[l - 1] and a[l] > a[l + 1] and a[l] > best:
            best = a[l]
    if best < min_peak:
        return -1.0, 0.0, 0.0
    lowest = a[0]
    for l in range(1, min(hi, len(a) - 2) + 1):
        if a[l] < lowest:
            lowest = a[l]
        if l < lo or not (a[l] >= a[l - 1] and a[l] > a[l + 1]):
            continue
        if a[l] >= harmonic * best and a[l] >= min_peak and a[l] - lowest >= min_prom:
            # Parabola through (l-1, l, l+1): vertex offset in (-0.5, 0.5).
            den = a[l - 1] - 2.0 * a[l] + a[l + 1]
            off = 0.5 * (a[l - 1] - a[l + 1]) / den if den < 0 else 0.0
            return l + off, a[l], a[l] - lowest
    return -1.0, 0.0, 0.0


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


@numba.njit(cache=True)
def prominent_minima(s: np.ndarray, min_prom: float, min_sep: int) -> np.ndarray:
    """Indices of local minima of s [F] whose prominence (the lower of the highest points
    between it and a deeper value, or the clip edge, on either side, minus its value) is
    >= min_prom; of two closer than min_sep frames the deeper is kept."""
    f = len(s)
    keep = np.zeros(f, np.bool_)
    for t in range(1, f - 1):
        if not (s[t] < s[t - 1] and s[t] <= s[t + 1]):
            continue
        left = s[t]
        i = t - 1
        while i >= 0 and s[i] >= s[t]:
            left = max(left, s[i])
            i -= 1
        right = s[t]
        j = t + 1
        while j < f and s[j] >= s[t]:
            right = max(right, s[j])
            j += 1
        if min(left, right) - s[t] >= min_prom:
            keep[t] = True
    idx = np.flatnonzero(keep)
    out = np.zeros(len(idx), np.int64)
    n = 0
    for t in idx:
        if n > 0 and t - out[n - 1] < min_sep:
            if s[t] < s[out[n - 1]]:
                out[n - 1] = t
            continue
        out[n] = t
        n += 1
    return out[:n]


def estimate_cycle(frames: np.ndarray, fps: float = 0.0, cfg: CycleConfig | None = None,
                   view: str | None = None) -> Cycle:
    """Period and ED/ES of uint8 [F, H, W(, 3)] frames cropped to the fan (fps 0: unknown, 30
    assumed for the drift filter); `view` (e.g. "PSAX") picks where the LV is looked for."""
    cfg = cfg or CycleConfig()
    f = frames.shape[0]
    if f < 8:
        return Cycle(period=None)
    rate = fps if fps > 0 else 30.0
    pooled, dark = pooled_signal(frames, cfg.grid, view)
    x = highpass(pooled, cfg.highpass_s * rate)
    p, height, prom = _period(x, f, fps, cfg)
    if p is None:
        return Cycle(period=None)
    period_conf = float(min(1.0, 0.5 * prom / cfg.min_prominence))
    xp = highpass(pooled, cfg.proxy_highpass_s * rate)
    dark = highpass(dark, cfg.proxy_highpass_s * rate)
    v, u0, explained = volume_proxy(xp, dark[:, 0], cfg.components)
    ed, es = beat_events(v, p, rate, cfg)
    period, cv = _beat_period(p, es) if explained >= cfg.min_event_explained else (p, None)
    # a second witness: the dominant motion component, oriented like the proxy; an event it
    # does not see within the tolerance is left out (the proxy's region held something else)
    tol = cfg.agree_s * rate
    for witness in (u0, volume_proxy(xp, dark[:, 1], cfg.components)[0]):
        ed2, es2 = beat_events(witness, p, rate, cfg)
        ed = [t for t in ed if any(abs(t - q) <= tol for q in ed2)]
        es = [t for t in es if any(abs(t - q) <= tol for q in es2)]
    conf = explained * (1.0 if cv is None else max(0.0, 1.0 - 2.0 * cv))
    if not es or conf < cfg.min_ed_es_confidence:
        ed, es = [], []
    return Cycle(period=period, ed=ed, es=es, strength=float(height), period_confidence=period_conf,
                 ed_es_confidence=round(float(conf), 3), rhythm_cv=cv)


def _period(x: np.ndarray, f: int, fps: float, cfg: CycleConfig) -> tuple[float | None, float, float]:
    """(refined period, autocorrelation height, prominence) of high-passed features x [F, D]."""
    lo, hi = 3, int(f / cfg.min_beats)
    if fps > 0:
        lo = max(lo, int(np.floor(fps * 60.0 / cfg.max_bpm)))
        hi = min(hi, int(np.ceil(fps * 60.0 / cfg.min_bpm)))
    if hi <= lo + 1:
        return None, 0.0, 0.0
    a = energy_lag_profile(x, max(hi, min(f - 2, int(2.2 * hi))) + 1)
    p, h, prom = pick_period(a, lo, hi, cfg.min_peak, cfg.min_prominence, cfg.harmonic)
    if p < 0:  # a weaker peak counts when the beat repeats: a second peak near twice the lag
        p, h, prom = pick_period(a, lo, hi, cfg.min_peak, cfg.min_prominence_repeated, cfg.harmonic)
        if p < 0 or not _repeats(a, p, h, f):
            return None, 0.0, 0.0
    return float(p), float(h), float(prom)


def _repeats(a: np.ndarray, p: float, h: float, f: int) -> bool:
    """A local maximum of a within 10% of lag 2p, at least half as high as the one at p (and
    2p leaves a third of the clip to compare)."""
    lo, hi = int(np.floor(1.9 * p)), int(np.ceil(2.1 * p))
    if hi >= min(len(a) - 1, f - f // 3):
        return False
    return any(a[q] >= a[q - 1] and a[q] >= a[q + 1] and a[q] >= max(0.5 * h, 0.1) for q in range(lo, hi + 1))


def volume_proxy(x: np.ndarray, dark: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The LV-region darkness dark [F] projected onto the top-k motion components of x [F, D]
    -> (proxy [F], the first component oriented like it [F], fraction of dark's energy the
    projection keeps)."""
    u = top_components(gram(x), k)
    n = np.linalg.norm(u, axis=0)
    u = u[:, n > 1e-9] / n[n > 1e-9]
    v = u @ (u.T @ dark)
    e = float(dark @ dark)
    u0 = u[:, 0] * (1.0 if u[:, 0] @ v >= 0 else -1.0)
    return v, u0, float(v @ v) / e if e > 0 else 0.0


def beat_events(v: np.ndarray, period: float, fps: float, cfg: CycleConfig) -> tuple[list[int], list[int]]:
    """ED and ES frames of the volume proxy v [F] (ES: prominent minima; ED: end of filling before each)."""
    s = np.convolve(v, np.ones(3) / 3, mode="same")
    s[0], s[-1] = v[0], v[-1]
    lo, hi = np.percentile(s, [5, 95])
    if hi - lo <= 0:
        return [], []
    # beats may be irregular (the autocorrelation period can span two of them): separate ES
    # minima by physiology only, the prominence test rejects secondary dips
    min_sep = max(2, int(round(fps * cfg.min_beat_s)))
    es = [int(t) for t in prominent_minima(s, cfg.es_prominence * (hi - lo), min_sep)]
    # frame-to-frame noise left in the proxy: an extremum is only as sharp as it stands out of it
    noise = cfg.noise_k * 1.4826 * float(np.median(np.abs(v - s)))
    ed, sharp_es = [], []
    for i, t in enumerate(es):
        start = es[i - 1] + 1 if i else max(0, t - int(round(0.8 * period)))
        if i == 0 and start == 0 and t < 0.45 * period:
            continue  # the clip starts mid-systole: this beat's ED is not in it
        win = s[start:t + 1]
        top = int(np.argmax(win))
        band = max(cfg.event_band * (win[top] - s[t]), noise)
        # an extremum inside a flat stretch (diastasis) has no well-defined frame: leave it out
        if _run_width(win, top, win[top] - band, above=True) <= cfg.max_event_s * fps:
            ed.append(start + top)
    for t in es:
        level = s[t] + cfg.es_band * (hi - lo)
        if _run_width(s, t, s[t] + max(cfg.event_band * (hi - lo), noise), above=False) <= cfg.max_event_s * fps:
            a = t  # end of ejection: the first frame of the trough (a flat bottom follows ES)
            while a > 0 and s[a - 1] <= level:
                a -= 1
            sharp_es.append(a)
    return ed, sharp_es


def _run_width(s: np.ndarray, t: int, level: float, above: bool) -> int:
    """Length of the run of frames around t with s >= level (above) or s <= level."""
    inside = s >= level if above else s <= level
    a = t
    while a > 0 and inside[a - 1]:
        a -= 1
    b = t
    while b < len(s) - 1 and inside[b + 1]:
        b += 1
    return b - a + 1


IRREGULAR_CV = 0.15
"""Beat-to-beat intervals varying more than this (coefficient of variation) are irregular."""


def _beat_period(p: float, es: list[int]) -> tuple[float, float | None]:
    """The reported period: the autocorrelation's p, or its 1/k when ES spacing shows it spans k
    beats; when beats are irregular (no such k), the mean beat (first to last ES over the beats
    between: per-event jitter cancels). Also the intervals' CV (None if < 2 intervals)."""
    if len(es) < 3:
        return p, None
    d = np.diff(es).astype(np.float64)
    k = np.maximum(1, np.round(d / p))  # a gap of k autocorrelation periods: k beats, one ES missed
    d = np.repeat(d / k, k.astype(np.int64))
    med, cv = float(np.median(d)), round(float(d.std() / d.mean()), 3)
    for k in (1, 2, 3):
        if cv <= IRREGULAR_CV and abs(p / k - med) <= 0.15 * med:
            return p / k, cv
    return (es[-1] - es[0]) / len(d), cv
