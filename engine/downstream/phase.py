"""Cycle-phase retrieval: do per-slice embeddings find the same cardiac phase in another beat?

The periodic objective trains the phase projector so that slices at the same point of the
cycle embed alike. On clips whose cycle is known (the synthetic corpus: the first
end-diastole frame `ed` and the period `P`, in frames), each temporal slice has a phase
phi = ((t - ed) mod P) / P in [0, 1), t its centre frame. For every query slice of a video,
the candidates are that video's other slices at least P / 2 frames away (so never the same
moment of the same beat: a match must come from another beat), embeddings centred on the
video's mean (what is common to the whole video, e.g. anatomy, says nothing about phase)
and compared by cosine. The top-1 candidate's circular phase error |phi_q - phi_c| (in
cycles, 0..0.5) is scored against chance (the mean error over all candidates: 0.25 for
uniform phases). The same rule scores any representation: phase embeddings of a
pretrained or random backbone, or the pixels themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import metrics as task_metrics

HIT = 0.1
"""A retrieval is a hit when its phase error is under this fraction of a cycle."""


@dataclass(kw_only=True, slots=True)
class Slices:
    """Temporal slices of several clips, one row each (M rows)."""

    emb: np.ndarray
    """float [M, D] the representation of each slice."""
    phase: np.ndarray
    """float [M] cycle phase in [0, 1) (0 = end-diastole)."""
    time: np.ndarray
    """float [M] centre frame of the slice in its video."""
    period: np.ndarray
    """float [M] cardiac period of the slice's video, in frames."""
    video: np.ndarray
    """[M] video key (retrieval stays within a video)."""
    patient: np.ndarray
    """[M] patient id (the bootstrap resamples patients)."""


def circular_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| on the unit circle of phases in [0, 1): values in [0, 0.5]."""
    d = np.abs(np.asarray(a, float) - np.asarray(b, float)) % 1.0
    return np.minimum(d, 1.0 - d)


def slice_phase(frames_index: torch.Tensor | np.ndarray, ed: float, period: float, tubelet: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """frames_index int [T] (source frame of each sampled frame) -> (phase [T'], centre
    frame [T']) of its T' = T / tubelet slices; a slice's phase is the circular mean of its
    frames' phases."""
    t = np.asarray(frames_index, float).reshape(-1, tubelet)                 # [T', tubelet]
    ang = 2 * np.pi * (((t - ed) % period) / period)
    phase = (np.arctan2(np.sin(ang).mean(1), np.cos(ang).mean(1)) / (2 * np.pi)) % 1.0
    return phase, t.mean(1)


def retrieve(s: Slices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 retrieval of every slice that has a candidate -> (rows [Q] of the queries,
    phase error [Q] of their top-1, chance [Q]: mean phase error over their candidates)."""
    rows, err, chance = [], [], []
    for v in np.unique(s.video):
        idx = np.flatnonzero(s.video == v)
        e = s.emb[idx] - s.emb[idx].mean(0, keepdims=True)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-8)
        sim = e @ e.T
        far = np.abs(s.time[idx, None] - s.time[None, idx]) >= s.period[idx, None] / 2
        dist = circular_distance(s.phase[idx, None], s.phase[None, idx])
        for q in np.flatnonzero(far.any(1)):
            cand = np.flatnonzero(far[q])
            best = cand[np.argmax(sim[q, cand])]
            rows.append(idx[q])
            err.append(dist[q, best])
            chance.append(dist[q, cand].mean())
    return np.asarray(rows, int), np.asarray(err, float), np.asarray(chance, float)


def phase_retrieval(s: Slices, *, bootstrap: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """{'error', 'hit_rate', 'chance_error'}: each {'value', 'ci_low', 'ci_high'} with a
    patient-bootstrap CI; plus 'queries', 'per_query' {'row', 'error', 'patient'} for paired
    comparisons (`paired_difference`)."""
    rows, err, chance = retrieve(s)
    patients = s.patient[rows]
    out = task_metrics.with_ci({"error": lambda i: float(err[i].mean()),
                     "hit_rate": lambda i: float((err[i] < HIT).mean()),
                     "chance_error": lambda i: float(chance[i].mean())},
                    patients, samples=bootstrap, ci=ci, seed=seed)
    out["queries"] = len(rows)
    out["per_query"] = {"row": rows.tolist(), "error": err.tolist(), "patient": patients.tolist()}
    return out


def paired_difference(a: dict, b: dict, *, bootstrap: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Mean phase error of `a` minus `b` (negative: `a` retrieves better) on the same queries,
    with a paired patient bootstrap; a and b are `phase_retrieval` results on the same slices."""
    qa, qb = a["per_query"], b["per_query"]
    if qa["row"] != qb["row"]:
        raise ValueError("the two retrievals were scored on different queries")
    ea, eb = np.asarray(qa["error"]), np.asarray(qb["error"])

    def gap(i):
        return float(ea[i].mean() - eb[i].mean())

    lo, hi = task_metrics.bootstrap_ci(gap, qa["patient"], samples=bootstrap, ci=ci, seed=seed)
    return {"value": gap(np.arange(len(ea))), "ci_low": lo, "ci_high": hi}


def pixel_slices(video: torch.Tensor, tubelet: int, pool: int = 8) -> torch.Tensor:
    """The pixel baseline: video uint8 [B, T, H, W, C] -> float [B, T', (H/pool)(W/pool)],
    each slice's grey frames average-pooled by `pool` and averaged over its tubelet."""
    b, t, h, w, _ = video.shape
    grey = video.float().mean(-1).reshape(b * t, 1, h, w) / 255.0
    small = torch.nn.functional.avg_pool2d(grey, pool).reshape(b, t // tubelet, tubelet, -1)
    return small.mean(2)


@torch.no_grad()
def split_slices(models: dict, data, split: str, clips: int, *, tubelet: int, device: torch.device,
                 batch: int = 8) -> tuple[dict[str, Slices], int]:
    """Every clip of `split` (`clips` per video, the deterministic evaluation read) through
    each model's phase projector (`model.encode(video)[2]`, [B, T', D]) and the pixel
    baseline -> ({name: Slices} with 'pixels' added, videos skipped for lack of a known cycle).
    Clips need the ground-truth cycle in their labels (`period_true`, `ed_true`: the
    synthetic corpus has both)."""
    from echofm.loaders.stream import ClipStream

    from .features import stream_config

    stream = ClipStream(stream_config(data, split, clips, batch=batch, seg=False), train=False, rank=0,
                        world_size=1, device=device)
    models = {k: m.to(device).eval() for k, m in models.items()}
    emb = {k: [] for k in (*models, "pixels")}
    cols = {"phase": [], "time": [], "period": [], "video": [], "patient": []}
    skipped = set()
    for b in stream:
        keep = [i for i, m in enumerate(b["meta"]) if _cycle(m)]
        skipped |= {m["key"] for m in b["meta"] if not _cycle(m)}
        if not keep:
            continue
        video = b["video"][keep]
        for k, m in models.items():
            emb[k].append(m.encode(video)[2].float().cpu().numpy())
        emb["pixels"].append(pixel_slices(video.cpu(), tubelet).numpy())
        for i in keep:
            m, (period, ed) = b["meta"][i], _cycle(b["meta"][i])
            ph, t = slice_phase(b["frames_index"][i].cpu(), ed, period, tubelet)
            cols["phase"].append(ph)
            cols["time"].append(t)
            cols["period"].append(np.full(len(ph), period))
            cols["video"].append(np.full(len(ph), m["key"], dtype=object))
            cols["patient"].append(np.full(len(ph), m["patient"], dtype=object))
    flat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    out = {k: Slices(emb=np.concatenate(v).reshape(-1, v[0].shape[-1]), **flat) for k, v in emb.items() if v}
    return out, len(skipped)


def _cycle(meta: dict) -> tuple[float, float] | None:
    """(period, first end-diastole frame) from the ground-truth labels, in stored frames (the
    unit of `frames_index`), or None. The labels count source frames (docs/shards.md); on
    shards ingested with the stride folded in, stored frame i is source frame i x
    `stride_folded`."""
    lab = meta.get("labels") or {}
    period, ed = lab.get("period_true"), lab.get("ed_true")
    ed = ed[0] if isinstance(ed, (list, tuple)) and ed else ed
    if not period or ed is None or isinstance(ed, (list, tuple)):
        return None
    fold = float(meta.get("stride_folded", 1))
    return float(period) / fold, float(ed) / fold
