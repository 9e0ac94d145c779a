"""The issue-15 bar on real echo clips kept outside the repository (licences forbid committing
them): each clip ingested on its own, then checked against independent references.

    python benchmarks/real_clips.py prepare --media DIR --out CLIPS      # once: build the clip set
    python benchmarks/real_clips.py check --clips CLIPS [--size 112] [--out benchmarks/results/real_clips.json]

`prepare` turns public sample videos into the clip set: a side-by-side EchoNet-Dynamic
demo video (the echo left, the same echo with the traced LV in blue right, 224x112) gives a
112x112 clip and its LV area per frame (the reference for period, ED, ES); every clip is
written twice, H.264 (MP4) and MJPEG (AVI, FFmpeg's default quantiser: a rough copy), so
the same clip can be compared across codecs. Clip names are anonymised (e112_00, ...).
`CLIPS/truth.json` holds the LV areas and, per clip family, hand-marked overlay zones that
are not fan (rows of an ECG band, a marker polygon): edit it after looking at the clips.

`check` reports per clip: the fraction of moving pixels (temporal std > 4 grey levels,
overlay zones excluded) outside the crop box and outside the blanking mask; the box
agreement between the two codecs of a clip (max coordinate difference / longer side);
the period against the LV-area period and against a plain autocorrelation of 32x32
frames; ED / ES against the LV area (argmax / argmin per beat, within 5 frames at 50 fps,
or left out); then a moved-tree re-ingest (must add 0) and a scan of every output for
clip names, paths and unkeyed ids. Numbers only go into the JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

MOVING_STD = 4.0


# ---------------------------------------------------------------- prepare


def _read(path: str) -> tuple[np.ndarray, float]:
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)]), float(s.average_rate or 30)


def _write(path: str, frames: np.ndarray, fps: float, codec: str) -> None:
    import av

    enc, pix, opts = {"h264": ("libx264", "yuv420p", {"crf": "20"}), "mjpeg": ("mjpeg", "yuvj420p", {})}[codec]
    with av.open(path, "w") as c:
        s = c.add_stream(enc, rate=round(fps), options=opts)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode(None))


def prepare(media: Path, out: Path) -> None:
    """Side-by-side 224x112 EchoNet demo videos -> e112_NN.{mp4,avi} + LV areas; other videos
    -> vNNN_N.{mp4,avi} (the original kept as one of the two when its codec matches)."""
    out.mkdir(parents=True, exist_ok=True)
    truth: dict = {}
    paths = sorted(p for p in glob.glob(str(media / "*")) if p.lower().endswith((".mp4", ".avi", ".webm", ".mov")))
    n_side = n_other = 0
    for p in paths:
        frames, fps = _read(p)
        h, w = frames.shape[1:3]
        if (h, w) == (112, 224):
            right = frames[:, :, 112:].astype(int)
            blue = (right[..., 2] > right[..., 0] + 40) & (right[..., 2] > right[..., 1] + 40)
            name = f"e112_{n_side:02d}"
            n_side += 1
            clip = np.ascontiguousarray(frames[:, :, :112])
            truth[name] = {"fps": fps, "lv_area": blue.reshape(len(frames), -1).sum(1).tolist()}
        else:
            name = f"v{w:03d}_{n_other}"
            n_other += 1
            clip = frames
            truth[name] = {"fps": fps}
        for codec, ext in (("h264", "mp4"), ("mjpeg", "avi")):
            _write(str(out / f"{name}.{ext}"), clip, fps, codec)
    (out / "truth.json").write_text(json.dumps(truth))
    print(f"wrote {len(truth)} clips x 2 codecs and truth.json to {out}")


# ---------------------------------------------------------------- references


def _peak(a: np.ndarray, lo: int) -> float | None:
    for q in range(max(lo, 1), len(a) - 1):
        if a[q] >= a[q - 1] and a[q] > a[q + 1] and a[q] > 0.2:
            den = a[q - 1] - 2 * a[q] + a[q + 1]
            return q + (0.5 * (a[q - 1] - a[q + 1]) / den if den < 0 else 0.0)
    return None


def plain_autocorr_period(gray: np.ndarray, fps: float) -> float | None:
    """First autocorrelation peak (> 0.2) of 32x32 frames, pixel means removed, rows normalised."""
    import cv2

    x = np.stack([cv2.resize(g.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA) for g in gray])
    x = x.reshape(len(x), -1)
    x = x - x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-9
    f = len(x)
    return _peak(np.array([np.mean(np.sum(x[:f - q] * x[q:], 1)) for q in range(2 * f // 3)]), int(fps * 60 / 240))


def lv_reference(area: list[float], fps: float) -> dict:
    """From a traced LV area per frame: its autocorrelation period, the median ES-to-ES interval,
    ES (prominent minima) and ED (the largest area of each beat, between two ES)."""
    from echofm.loaders.cycles import prominent_minima

    v = np.asarray(area, np.float64)
    s = np.convolve(v, np.ones(3) / 3, mode="same")
    s[0], s[-1] = v[0], v[-1]
    c = v - v.mean()
    f = len(c)
    ac = np.array([np.dot(c[:f - q], c[q:]) / (f - q) for q in range(2 * f // 3)]) / (c.var() + 1e-9)
    lo, hi = np.percentile(s, [5, 95])
    es = [int(t) for t in prominent_minima(s, 0.35 * (hi - lo), max(2, int(0.3 * fps)))]
    ed = [es[i - 1] + 1 + int(np.argmax(s[es[i - 1] + 1:es[i] + 1])) for i in range(1, len(es))]
    if es and es[0] > 0.3 * fps:
        ed.insert(0, int(np.argmax(s[:es[0] + 1])))
    rr = np.diff(es)
    return {"period_autocorr": _peak(ac, int(fps * 60 / 240)),
            "period_mean_beat": float((es[-1] - es[0]) / (len(es) - 1)) if len(es) > 1 else None,
            "rhythm_cv": float(rr.std() / rr.mean()) if len(rr) > 1 else None, "ed": ed, "es": es}


def _event_error(est: list[int], ref: list[int]) -> int | None:
    return int(max(min(abs(e - r) for r in ref) for e in est)) if est and ref else None


def _zones(spec: list, h: int, w: int) -> np.ndarray:
    """Overlay zones from truth.json: ["rows_ge", y] or ["poly", [[x, y], ...]] -> bool [h, w]."""
    import cv2

    m = np.zeros((h, w), np.uint8)
    for kind, v in spec:
        if kind == "rows_ge":
            m[int(v):] = 1
        elif kind == "poly":
            cv2.fillPoly(m, [np.asarray(v, np.int32)], 1)
    return m.astype(bool)


# ---------------------------------------------------------------- check


def _raw_gray(path: Path) -> tuple[np.ndarray, float]:
    """Grey frames at the source size, straight from the decoder (the reference's view)."""
    if path.suffix.lower() == ".dcm":
        from echofm.loaders.sources.dicom import read_dicom

        d = read_dicom(path)
        f = d.frames.astype(np.float32)
        return (f.mean(-1) if f.ndim == 4 else f), d.fps
    frames, fps = _read(str(path))
    return frames.astype(np.float32).mean(-1), fps


def _mask_at_source(path: Path, size: int) -> np.ndarray | None:
    """The blanking mask ingest uses (detected on the frames it keeps), at the source size."""
    import cv2

    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.sector import detect_sector
    from echofm.loaders.sources import discover, load_clip

    (clip,) = discover(path).clips
    dec = load_clip(clip, short_side=IngestConfig(size=size).keep_side)
    s = detect_sector(dec.frames)
    if s is None:
        return None
    h, w = dec.source_size
    return cv2.resize(s.mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0


def check_clip(path: Path, truth: dict, size: int, key_file: Path, work: Path) -> dict:
    """Ingest one clip on its own and measure it against the references."""
    from echofm.loaders.ingest import IngestConfig, ingest
    from echofm.loaders.shards import iter_tar_samples, read_manifest

    stem = path.stem
    family = truth.get(stem, {})
    out = work / f"one_{path.name.replace('.', '_')}"
    rep = ingest([path], out, IngestConfig(size=size, progress=False, id_key=str(key_file)))
    row: dict = {"clip": path.name, "added": rep.added}
    if not rep.added:
        row["reject"] = json.loads((out / "rejects.jsonl").read_text().splitlines()[0])["kind"]
        return row
    m = read_manifest(out)
    meta = json.loads(next(iter_tar_samples(out / m["shards"][0]["tar"]))[1]["json"])
    gray, fps = _raw_gray(path)
    h, w = gray.shape[1:]
    moving = (gray.std(0) > MOVING_STD) & ~_zones(truth.get(stem.split("_")[0], {}).get("exclude", []), h, w)
    y0, y1, x0, x1 = meta["sector_box"]
    inbox = np.zeros((h, w), bool)
    inbox[y0:y1, x0:x1] = True
    mask = _mask_at_source(path, size)
    row.update(source=f"{w}x{h}", fps=round(fps, 2), frames=len(gray), box=meta["sector_box"],
               sector_shape=meta["sector_shape"], crop_fraction=meta["crop_fraction"],
               moving_lost_box_pct=round(100 * (moving & ~inbox).sum() / max(moving.sum(), 1), 3),
               moving_lost_mask_pct=round(100 * (moving & ~mask).sum() / max(moving.sum(), 1), 3),
               period=meta["period"], period_confidence=meta["period_confidence"],
               ed=meta["ed"], es=meta["es"], ed_es_confidence=meta["ed_es_confidence"], rhythm_cv=meta["rhythm_cv"])
    ac = plain_autocorr_period(gray, fps)
    row["period_plain_autocorr"] = None if ac is None else round(ac, 2)
    if "lv_area" in family:
        ref = lv_reference(family["lv_area"], fps)
        tol = 5 * fps / 50
        row.update(lv_period_autocorr=ref["period_autocorr"], lv_period_mean_beat=ref["period_mean_beat"],
                   lv_rhythm_cv=ref["rhythm_cv"], ed_error=_event_error(meta["ed"], ref["ed"]),
                   es_error=_event_error(meta["es"], ref["es"]), event_tolerance=tol)
    return row


def _period_ok(row: dict) -> tuple[bool, bool]:
    """(clip has a visible beat by the references, period found within 5% of it). The reference:
    the LV area's period (its mean beat when the rhythm is irregular: beat-to-beat CV > 0.15),
    else the plain autocorrelation's when the clip holds 1.5 of its periods."""
    if "lv_period_autocorr" in row:
        irregular = (row.get("lv_rhythm_cv") or 0) > 0.15
        ref = row["lv_period_mean_beat"] if irregular else row["lv_period_autocorr"]
    else:
        ref = row.get("period_plain_autocorr")
        if ref is not None and row["frames"] < 1.5 * ref:
            ref = None
    if ref is None:
        return False, False
    p = row.get("period")
    return True, bool(p is not None and abs(p - ref) <= 0.05 * ref)


def moved_tree_and_privacy(clips: list[Path], size: int, work: Path) -> dict:
    """Ingest every clip into one corpus, move and rename the tree, ingest again (must add 0);
    scan every output for clip names, the tree's paths, and unkeyed patient hashes."""
    import hashlib

    from echofm.loaders.ingest import IngestConfig, ingest

    tree = work / "tree_a"
    tree.mkdir()
    for p in clips:
        shutil.copy(p, tree / p.name)
    out = work / "corpus"
    first = ingest([tree], out, IngestConfig(size=size, progress=False))
    moved = work / "moved" / "tree_b"
    moved.parent.mkdir()
    tree.rename(moved)
    for p in sorted(moved.iterdir())[:3]:
        p.rename(p.with_name("renamed_" + p.name))
    second = ingest([moved], out, IngestConfig(size=size, progress=False))
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    names = {p.stem for p in clips} | {p.name for p in clips}
    unkeyed = {hashlib.sha256(f"{d}:{p.stem}".encode()).hexdigest()[:16] for p in clips for d in ("files", "tree_a")}
    return {"first_added": first.added, "first_rejected": first.rejected, "after_move_added": second.added,
            "after_move_skipped": second.skipped,
            "clip_names_in_outputs": sum(n.encode() in blob for n in names),
            "paths_in_outputs": int(str(work).encode() in blob),
            "unkeyed_patient_hashes_in_outputs": sum(u.encode() in blob for u in unkeyed)}


def summarize(rows: list[dict], moved: dict) -> dict:
    fan = [r for r in rows if r.get("added")]
    pairs = {}
    for r in fan:
        pairs.setdefault(Path(r["clip"]).stem, []).append(r)
    box_agree = {}
    for stem, rs in pairs.items():
        if len(rs) == 2:
            side = max(int(x) for x in rs[0]["source"].split("x"))
            box_agree[stem] = round(100 * max(abs(a - b) for a, b in zip(rs[0]["box"], rs[1]["box"])) / side, 2)
    beat = [_period_ok(r) for r in fan]
    visible = [ok for has, ok in beat if has]
    events = [r for r in fan if "ed_error" in r]
    reported = [r for r in events if r["ed"] or r["es"]]
    wrong = [r["clip"] for r in reported if (r["ed_error"] or 0) > r["event_tolerance"] or (r["es_error"] or 0) > r["event_tolerance"]]
    return {"clips": len(rows), "ingested": len(fan),
            "max_moving_lost_box_pct": max(r["moving_lost_box_pct"] for r in fan),
            "max_moving_lost_mask_pct": max(r["moving_lost_mask_pct"] for r in fan),
            "codec_box_disagreement_pct": box_agree, "max_codec_box_disagreement_pct": max(box_agree.values(), default=0),
            "visible_beat_clips": len(visible), "period_within_5pct": sum(visible),
            "period_recall": round(sum(visible) / max(len(visible), 1), 3),
            "ed_es_reference_clips": len(events), "ed_es_reported": len(reported), "ed_es_wrong": wrong,
            "moved_tree": moved}


def check(clips_dir: Path, size: int, out: Path | None) -> None:
    from echofm.loaders import ids

    warnings.simplefilter("ignore")
    truth = json.loads((clips_dir / "truth.json").read_text()) if (clips_dir / "truth.json").exists() else {}
    clips = sorted(p for p in clips_dir.iterdir() if p.suffix.lower() in (".mp4", ".avi", ".dcm", ".gif", ".webm"))
    work = Path(tempfile.mkdtemp(prefix="echofm_real_"))
    try:
        key = work / "bench.idkey"
        ids.load_key(key, create=True)
        rows = []
        for p in clips:
            rows.append(check_clip(p, truth, size, key, work))
            r = rows[-1]
            print(f"{r['clip']:14s} " + (f"REJECT {r['reject']}" if "reject" in r else
                  f"box {r['box']} lost {r['moving_lost_box_pct']:.2f}% (mask {r['moving_lost_mask_pct']:.2f}%) "
                  f"period {r['period']} (plain {r['period_plain_autocorr']}, LV {r.get('lv_period_autocorr')}) "
                  f"ED/ES err {r.get('ed_error')}/{r.get('es_error')} conf {r['ed_es_confidence']}"), flush=True)
        moved = moved_tree_and_privacy(clips, size, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rows, moved)
    print(json.dumps(summary, indent=1, default=_plain))
    result = {"size": size, "moving_std": MOVING_STD,
              "clip_set": "public sample clips from GitHub repositories (EchoNet-Dynamic demo videos, an EchoCLIP "
                          "example, a figure GIF) and pydicom's ybr_color cine; each as H.264 and MJPEG; names "
                          "anonymised; overlay zones: " + json.dumps({k: v.get("exclude") for k, v in truth.items()
                                                                      if v.get("exclude")}),
              "machine": {"cpus": os.cpu_count(), "loadavg_1min": os.getloadavg()[0]},
              "summary": summary, "clips": rows}
    from echofm.engine import bench
    out = bench.results_path("real_clips", out, "real_clips.json")
    bench.write_json(out, json.loads(json.dumps(result, default=_plain)))


def _plain(o):
    """numpy scalars -> Python numbers for json."""
    return o.item() if hasattr(o, "item") else str(o)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--media", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("check")
    c.add_argument("--clips", type=Path, required=True)
    c.add_argument("--size", type=int, default=112)
    c.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: a new run folder; benchmarks/results/real_clips.json to update the committed one)")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.media, args.out)
    else:
        check(args.clips, args.size, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
