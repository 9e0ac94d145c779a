"""What a scanner burns into the screen outside the fan: text in the top corners and an
ECG trace with a moving cursor in a band below the fan (R peaks at the ED frames).

Ingest must find the fan and blank all of this; the tests check that none of it touches
the sector.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import ClipSpec

# 3x5 bitmap font, rows top to bottom.
_GLYPHS = {
    "0": "###,#.#,#.#,#.#,###", "1": ".#.,##.,.#.,.#.,###", "2": "###,..#,###,#..,###",
    "3": "###,..#,###,..#,###", "4": "#.#,#.#,###,..#,..#", "5": "###,#..,###,..#,###",
    "6": "###,#..,###,#.#,###", "7": "###,..#,..#,.#.,.#.", "8": "###,#.#,###,#.#,###",
    "9": "###,#.#,###,..#,###", "A": ".#.,#.#,###,#.#,#.#", "B": "##.,#.#,##.,#.#,##.",
    "C": ".##,#..,#..,#..,.##", "D": "##.,#.#,#.#,#.#,##.", "E": "###,#..,##.,#..,###",
    "F": "###,#..,##.,#..,#..", "G": ".##,#..,#.#,#.#,.##", "H": "#.#,#.#,###,#.#,#.#",
    "I": "###,.#.,.#.,.#.,###", "J": "..#,..#,..#,#.#,.#.", "K": "#.#,#.#,##.,#.#,#.#",
    "L": "#..,#..,#..,#..,###", "M": "#.#,###,###,#.#,#.#", "N": "##.,#.#,#.#,#.#,#.#",
    "O": ".#.,#.#,#.#,#.#,.#.", "P": "##.,#.#,##.,#..,#..", "Q": ".#.,#.#,#.#,##.,.##",
    "R": "##.,#.#,##.,#.#,#.#", "S": ".##,#..,.#.,..#,##.", "T": "###,.#.,.#.,.#.,.#.",
    "U": "#.#,#.#,#.#,#.#,###", "V": "#.#,#.#,#.#,#.#,.#.", "W": "#.#,#.#,###,###,#.#",
    "X": "#.#,#.#,.#.,#.#,#.#", "Y": "#.#,#.#,.#.,.#.,.#.", "Z": "###,..#,.#.,#..,###",
    ":": "...,.#.,...,.#.,...", ".": "...,...,...,...,.#.", "-": "...,...,###,...,...",
    "/": "..#,..#,.#.,#..,#..", " ": "...,...,...,...,...",
}
TEXT_LEVEL, ECG_LEVEL, CURSOR_LEVEL = 220, 170, 255
"""Grey values of the burned-in text, the ECG trace and its cursor."""


@dataclass(kw_only=True, slots=True)
class Overlays:
    """A clip's static overlay pixels and what moves the ECG cursor."""

    text: np.ndarray
    """bool [H, W] burned-in text pixels."""
    ecg: np.ndarray
    """bool [H, W] ECG trace pixels."""
    ecg_y: np.ndarray
    """int [x1 - x0 + 1] trace row per column from `ecg_x0`."""
    ecg_x0: int
    px_per_frame: float
    """Cursor speed along the trace."""
    cursor: int
    """Cursor half-size in pixels."""


def text_bitmap(text: str, scale: int) -> np.ndarray:
    """bool [5 * scale, 4 * len * scale] rendering of `text` (unknown characters blank)."""
    cols = []
    for ch in text.upper():
        g = np.array([[p == "#" for p in row] for row in _GLYPHS.get(ch, _GLYPHS[" "]).split(",")])
        cols += [g, np.zeros((5, 1), bool)]
    bm = np.concatenate(cols, 1) if cols else np.zeros((5, 0), bool)
    return np.kron(bm, np.ones((scale, scale), bool))


def ecg_wave(phase: np.ndarray) -> np.ndarray:
    """ECG-like waveform (R peak at phase 0, the ED frame) in about [-0.3, 1]."""
    ph = (phase + 0.5) % 1.0 - 0.5  # R peak centred at 0
    bump = lambda mu, sd, amp: amp * np.exp(-0.5 * ((ph - mu) / sd) ** 2)  # noqa: E731
    return (bump(-0.16, 0.025, 0.15) + bump(-0.018, 0.008, -0.15) + bump(0.0, 0.01, 1.0)
            + bump(0.02, 0.008, -0.3) + bump(0.3, 0.05, 0.3))


def _text(spec: ClipSpec) -> np.ndarray:
    """bool [H, W]: three lines of text in each top corner."""
    h, w = spec.height, spec.width
    scale = max(1, h // 150)
    text = np.zeros((h, w), bool)
    bpm = round(60.0 * spec.fps / spec.period)
    left = ["ECHOFM SYNTH", spec.patient, f"{spec.fps} FPS"]
    right = [spec.view, f"HR {bpm}", "GAIN 50"]
    line = 7 * scale
    for i, (lt, rt) in enumerate(zip(left, right)):
        y = 2 + i * line
        for s, at_right in ((lt, False), (rt, True)):
            bm = text_bitmap(s, scale)[:, : w // 2 - 4]
            x = w - 2 - bm.shape[1] if at_right else 2
            hh = min(bm.shape[0], h - y)
            text[y:y + hh, x:x + bm.shape[1]] |= bm[:hh]
    return text


def render_overlays(spec: ClipSpec, sector_grown: np.ndarray) -> Overlays:
    """Text and ECG of `spec`, with every pixel inside `sector_grown` (bool [H, W], the fan
    plus a margin) removed."""
    h, w = spec.height, spec.width
    text = _text(spec) & ~sector_grown
    # ECG: a thin polyline in the band below the fan, R peaks at the ED frames
    yb0, yb1 = int(0.885 * h) + 1, int(0.975 * h)
    x0, x1 = int(0.08 * w), int(0.92 * w)
    mid, amp = (yb0 + 2 * yb1) / 3.0, (yb1 - yb0) * 0.55
    px_per_frame = (x1 - x0) / (2.5 * spec.period)
    t = np.arange(x1 - x0 + 1) / px_per_frame
    yc = np.round(mid - amp * ecg_wave((t - spec.ed_offset) / spec.period)).astype(int)
    yc = np.clip(yc, yb0, yb1)
    lo, hi = np.minimum(yc[:-1], yc[1:]), np.maximum(yc[:-1], yc[1:])
    rows = np.arange(h)[:, None]
    ecg = np.zeros((h, w), bool)
    ecg[:, x0:x1] = (rows >= lo[None, :]) & (rows <= hi[None, :])
    ecg &= ~sector_grown
    return Overlays(text=text, ecg=ecg, ecg_y=yc, ecg_x0=x0, px_per_frame=px_per_frame,
                    cursor=max(1, h // 100))


def draw_overlays(frame: np.ndarray, ovl: Overlays, f: int) -> None:
    """Burn text, trace and the cursor of frame index `f` into `frame` (uint8 [H, W])."""
    frame[ovl.text] = TEXT_LEVEL
    frame[ovl.ecg] = ECG_LEVEL
    xcur = ovl.ecg_x0 + int((f * ovl.px_per_frame) % max(1, len(ovl.ecg_y) - 1))  # moving cursor dot
    ycur = ovl.ecg_y[xcur - ovl.ecg_x0]
    r = ovl.cursor
    frame[max(0, ycur - r):ycur + r + 1, max(0, xcur - r):xcur + r + 1] = CURSOR_LEVEL
