"""Synthetic corpus generation speed (`echofm synth`): clips/s and frames/s, per stage.

    python benchmarks/synth.py [--videos 200] [--workers 2] [--frames 40-120] [--size 160-320] [--out FILE]

1. The whole corpus with `make_corpus` and `--workers` processes: wall time, and CPU time
   (this process + its workers, from getrusage). On a shared machine the wall time
   includes other people's load; CPU seconds / workers is what an idle machine would take.
2. Stage split on the first 20 clips in this process (CPU time): rendering (numpy),
   encoding (PyAV libx264 / MJPEG, pydicom) and writing the masks.
Writes synth.json to a new run folder runs/bench/synth-<timestamp>/, or to --out (the
committed numbers: --out benchmarks/results/synth.json). The corpus is written to a
temporary folder and removed.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from echofm.engine import bench
from echofm.loaders.synth import SynthConfig, make_corpus, plan_corpus, render_clip, write_dicom, write_video


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--frames", default="40-120")
    ap.add_argument("--size", default="160-320")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: a new run folder)")
    args = ap.parse_args()
    (flo, fhi), (slo, shi) = ([int(v) for v in r.split("-")] for r in (args.frames, args.size))
    cfg = SynthConfig(videos=args.videos, seed=0, min_frames=flo, max_frames=fhi, min_size=slo,
                      max_size=shi, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        c0, t0 = cpu_seconds(), time.perf_counter()
        rows = make_corpus(tmp, cfg)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        frames = sum(r["frames"] for r in rows)
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())

        stages = {"render": 0.0, "encode": 0.0, "masks": 0.0}
        n_stage = 0
        for spec in plan_corpus(cfg)[:20]:
            t = time.process_time()
            clip = render_clip(spec)
            stages["render"] += time.process_time() - t
            t = time.process_time()
            path = Path(tmp) / f"stage.{spec.container}"
            if spec.container == "dcm":
                write_dicom(path, clip.video, fps=spec.fps, patient=spec.patient, study=spec.study, name=spec.name,
                            seed=0)
            else:
                write_video(path, clip.video, spec.fps, spec.container)
            stages["encode"] += time.process_time() - t
            t = time.process_time()
            np.save(Path(tmp) / "stage.npy", clip.masks)
            stages["masks"] += time.process_time() - t
            n_stage += spec.frames
    result = {
        "videos": len(rows), "frames": frames, "workers": args.workers, "frames_range": args.frames,
        "size_range": args.size, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "idle_machine_wall_s_estimate": round(cpu / args.workers, 2),
        "clips_per_s": round(len(rows) / wall, 2), "frames_per_s": round(frames / wall, 1),
        "cpu_ms_per_frame": {k: round(1e3 * v / n_stage, 3) for k, v in stages.items()},
        "disk_mb": round(disk / 2**20, 1),
    }
    print(f"synth: {len(rows)} clips / {frames} frames in {wall:.1f} s wall with {args.workers} workers "
          f"({len(rows) / wall:.1f} clips/s, {frames / wall:.0f} frames/s); CPU {cpu:.1f} s "
          f"(-> {cpu / args.workers:.1f} s on an idle {args.workers}-core machine); {disk / 2**20:.0f} MB")
    print("CPU ms per frame: " + ", ".join(f"{k} {v}" for k, v in result["cpu_ms_per_frame"].items()))
    bench.write_json(bench.results_path("synth", args.out, "synth.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
