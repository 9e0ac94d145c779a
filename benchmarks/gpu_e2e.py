"""The whole system on one GPU, stage by stage: synthetic corpus -> `echofm ingest` (VP9, H.264)
-> the DALI stream (NVDEC "mixed" next to the CPU backend) -> `echofm pretrain` ViT-B bf16
through DeepSpeed -> checkpoint and resume -> the same trainer fed from GPU memory.

    python benchmarks/gpu_e2e.py STAGE --work DIR [--results DIR] [--cpu]
    STAGE: preflight | corpus | stream | pretrain | resume | replay | report

benchmarks/gpu_e2e.sh runs the stages in order, each in its own process under its own
timeout (a hang costs one stage, not the call). Each stage writes WORK/stages/<stage>.json
and reuses what an earlier call left in WORK (corpus, shards): a rerun on a warm machine
skips finished work. `report` merges the stages into RESULTS/gpu_e2e.json (gpu_e2e_cpu.json
with --cpu; RESULTS: --results, else a new run folder runs/bench/gpu_e2e-<timestamp>/) and prints the summary with the goals measured in the same run (docs/mfu.md):
the NVDEC stream at >= 1,500 clips/s at 16 x 224^2 (what a ViT-B step at 40% MFU consumes)
and data wait < 5% of step time in the real pretrain.

Without the driver's libnvcuvid the preflight says so with the evidence, the stream stage
checks that a mixed ClipStream refuses with its one-line error, and the CPU backend (16
threads) feeds the GPU step instead. `--cpu` runs every stage at a tiny scale on a CPU-only
machine (VP9 only: DALI's CPU decoder cannot read H.264; the echofm_tiny recipe), to test
this script where there is no GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from echofm.engine import bench

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
STAGES = ("preflight", "corpus", "stream", "pretrain", "resume", "replay", "report")
NEED_CLIPS_S = 1500.0  # docs/mfu.md: ViT-B video MAE at 40% MFU on one H200
MAX_DATA_WAIT = 0.05
FRAMES = 16


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU one, or the CPU twin that tests this script."""

    cpu: bool
    videos: int
    synth_size: str
    synth_frames: str
    size: int
    codecs: tuple[str, ...]
    recipe: str
    batch: int
    cpu_threads: int
    """DALI threads for the cpu backend (the GPU machine's 16 cores)."""
    mixed_threads: int
    """DALI threads with the mixed backend (host work only: cut, parse, feed)."""
    stream_clips: int
    stream_max_s: float
    steps: int
    resume_at: int
    log_every: int
    warmup_steps: int
    replay_batches: int
    steady_from: int
    """Logged steps after this one are the steady state (compile and warm-up excluded)."""
    loss_rtol: float
    """Resumed vs uninterrupted mean loss: bf16 on GPU is not bit-exact; on CPU it is."""
    workers: int


GPU = Plan(cpu=False, videos=384, synth_size="160-320", synth_frames="40-120", size=224,
           codecs=("vp9", "h264"), recipe="recipes/pretrain/echofm_vit_base.yaml", batch=32,
           cpu_threads=16, mixed_threads=8, stream_clips=4096, stream_max_s=8.0, steps=300,
           resume_at=150, log_every=10, warmup_steps=30, replay_batches=12, steady_from=50,
           loss_rtol=0.02, workers=16)
CPU = Plan(cpu=True, videos=16, synth_size="128-144", synth_frames="40-56", size=112, codecs=("vp9",),
           recipe="recipes/pretrain/echofm_tiny.yaml", batch=4, cpu_threads=2, mixed_threads=2,
           stream_clips=32, stream_max_s=4.0, steps=12, resume_at=6, log_every=3, warmup_steps=3,
           replay_batches=3, steady_from=3, loss_rtol=1e-6, workers=2)


# ---------------------------------------------------------------- helpers


def _load(work: Path, stage: str) -> dict:
    p = work / "stages" / f"{stage}.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _save(work: Path, stage: str, data: dict) -> None:
    (work / "stages").mkdir(parents=True, exist_ok=True)
    (work / "stages" / f"{stage}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def _sh(cmd: str) -> str:
    """A shell command's output (stdout + stderr), for evidence in the results."""
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)
    return (r.stdout + r.stderr).strip()


def echofm(*args) -> float:
    """Run `echofm ARGS` (python -m echofm.engine.cli: the project is not installed there);
    its output goes to this log, progress bars reduced to their last state. Returns wall
    seconds; raises on failure."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "echofm.engine.cli", *map(str, args)]
    print("$ echofm " + " ".join(map(str, args)), flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as p:
        for line in p.stdout:  # bytes: text mode would turn each "\r" update into a line
            print(line.decode(errors="replace").rstrip().split("\r")[-1], flush=True)
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd)
    return round(time.perf_counter() - t0, 2)


def _device(plan: Plan):
    import torch

    return torch.device("cpu") if plan.cpu else torch.device("cuda", 0)


def _backend(work: Path) -> str:
    return _load(work, "preflight").get("backend", "cpu")


# ---------------------------------------------------------------- preflight


def stage_preflight(plan: Plan, work: Path) -> dict:
    """NVDEC evidence first (cheap), then what the kit brought: versions, the device."""
    from echofm.loaders.errors import DataError
    from echofm.loaders.pipeline import NVCUVID, require_nvdec

    out: dict = {"plan": asdict(plan), "nvcuvid": {
        "ldconfig -p | grep -i nvcuvid": _sh("ldconfig -p | grep -i nvcuvid") or "(nothing)",
        "ls /usr/local/nvidia/lib64": _sh("ls /usr/local/nvidia/lib64 2>&1 | grep -i -E 'nvcuvid|cannot' "
                                          "|| echo '(no nvcuvid there)'")}}
    try:
        require_nvdec()
        out["nvdec"], out["nvdec_error"] = True, None
    except DataError as e:
        out["nvdec"], out["nvdec_error"] = False, str(e)
    out["nvcuvid"][f"dlopen {NVCUVID}"] = "ok" if out["nvdec"] else out["nvdec_error"]
    out["backend"] = "mixed" if out["nvdec"] and not plan.cpu else "cpu"
    versions = {"python": sys.version.split()[0]}
    for mod in ("torch", "triton", "nvidia.dali", "deepspeed", "av", "numpy"):
        try:
            versions[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as e:  # noqa: BLE001  (a missing kit package is a finding, not a crash here)
            versions[mod] = f"missing: {type(e).__name__}: {e}"
    out["versions"] = versions
    import torch

    out["cuda"] = torch.cuda.is_available()
    out["device_name"] = torch.cuda.get_device_name(0) if out["cuda"] else "cpu"
    out["nvidia_smi"] = _sh("nvidia-smi -L") if out["cuda"] else None
    out["cpus"] = os.cpu_count()
    if not plan.cpu and not out["cuda"]:
        raise SystemExit("gpu_e2e: no CUDA device (run with --cpu on a CPU-only machine)")
    for k, v in out["nvcuvid"].items():
        print(f"  {k}: {v}")
    print(f"  backend for this run: {out['backend']}" + ("" if out["nvdec"] or plan.cpu else
          f" (NVDEC unavailable; the cpu backend with {plan.cpu_threads} threads feeds the GPU)"))
    print("  " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; device {out['device_name']}")
    return out


# ---------------------------------------------------------------- corpus


def stage_corpus(plan: Plan, work: Path) -> dict:
    """`echofm synth` then `echofm ingest` once per codec (both resumable: a rerun skips)."""
    synth = work / "synth"
    out: dict = {"videos": plan.videos}
    if not (synth / "labels.csv").exists():
        out["synth_s"] = echofm("synth", "--out", synth, "--videos", plan.videos, "--seed", 0,
                                "--size", plan.synth_size, "--frames", plan.synth_frames,
                                "--dicom-fraction", 0, "--workers", plan.workers)
    for codec in plan.codecs:
        shards = work / f"shards_{codec}"
        fresh = not (shards / "manifest.json").exists()  # else a rerun: ingest only completes it
        secs = echofm("ingest", synth, "--out", shards, "--size", plan.size, "--codec", codec,
                      "--workers", plan.workers)
        m = json.loads((shards / "manifest.json").read_text())
        out[codec] = {"ingest_s": secs, "fresh": fresh, "clips": m["total_samples"], "frames": m["total_frames"],
                      "shards": len(m["shards"]), "mib": round(sum(s["bytes"] for s in m["shards"]) / 2**20, 1),
                      "clips_per_s": round(m["total_samples"] / secs, 1) if fresh else None}
    return out


# ---------------------------------------------------------------- stream


class DecoderUtil:
    """Samples nvidia-smi's decoder / GPU utilisation (%) every 100 ms while running."""

    def __init__(self) -> None:
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.decoder,utilization.gpu",
                 "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None

    def stop(self) -> dict:
        if self.proc is None:
            return {"decoder_util_mean": None}
        self.proc.terminate()
        text = self.proc.communicate(timeout=5)[0]
        rows = []
        for line in text.splitlines():
            try:
                rows.append([float(x) for x in line.split(",")])
            except ValueError:
                continue  # "[N/A]" where the driver does not report it
        if not rows:
            return {"decoder_util_mean": None}
        dec = [r[0] for r in rows]
        return {"decoder_util_mean": round(sum(dec) / len(dec), 1), "decoder_util_max": max(dec),
                "gpu_util_mean": round(sum(r[1] for r in rows) / len(rows), 1), "util_samples": len(rows)}


def time_stream(plan: Plan, shards: Path, backend: str, stride: int, threads: int) -> dict:
    """Clips/s, sampled and decoded fps and host CPU per clip of one ClipStream configuration,
    after 3 warm-up batches, over `stream_clips` clips or `stream_max_s` seconds."""
    import torch
    from loader import _cpu_seconds

    from echofm.loaders.stream import ClipStream, StreamConfig

    dev = _device(plan)
    cfg = StreamConfig(shards=str(shards), split="all", num_frames=FRAMES, stride=stride, size=plan.size,
                       batch_size=plan.batch, num_threads=threads, backend=backend)
    s = ClipStream(cfg, train=True, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def batches():
        while True:
            yield from s

    it = batches()
    for _ in range(3):
        next(it)
    sync()
    util = DecoderUtil() if dev.type == "cuda" else None
    t0, c0, d0 = time.perf_counter(), _cpu_seconds([os.getpid()]), s.stats["decoded_frames"]
    n = 0
    while n < plan.stream_clips and time.perf_counter() - t0 < plan.stream_max_s:
        n += next(it)["video"].shape[0]
    sync()
    dt, cpu = time.perf_counter() - t0, _cpu_seconds([os.getpid()]) - c0
    decoded = s.stats["decoded_frames"] - d0
    s.close()
    codec = json.loads((shards / "manifest.json").read_text())["codec"]
    out = {"backend": backend, "codec": codec, "stride": stride, "threads": threads,
           "batch": plan.batch, "clips": n, "seconds": round(dt, 4), "clips_s": round(n / dt, 1),
           "sampled_fps": round(n * FRAMES / dt), "decoded_fps": round(decoded / dt),
           "cpu_cores_used": round(cpu / dt, 2), "cpu_ms_per_clip": round(cpu / max(n, 1) * 1e3, 3)}
    if util is not None:
        out.update(util.stop())
    print(f"  {backend:5s} {out['codec']:4s} stride {stride} threads {threads:2d}: {out['clips_s']:8.1f} clips/s "
          f"{out['sampled_fps']:8d} sampled fps {out['decoded_fps']:8d} decoded fps "
          f"{out['cpu_ms_per_clip']:7.2f} CPU-ms/clip", flush=True)
    return out


def stage_stream(plan: Plan, work: Path) -> dict:
    """Mixed (NVDEC) on every codec at stride 2 and 1, next to the cpu backend on the VP9 shards."""
    from echofm.loaders.errors import DataError
    from echofm.loaders.stream import ClipStream, StreamConfig

    out: dict = {"runs": []}
    if _backend(work) == "mixed":
        for codec in plan.codecs:
            for stride in (2, 1):
                out["runs"].append(time_stream(plan, work / f"shards_{codec}", "mixed", stride, plan.mixed_threads))
    elif not plan.cpu:  # a GPU without NVDEC: the stream must refuse mixed with its one-line error
        try:
            ClipStream(StreamConfig(shards=str(work / "shards_vp9"), split="all", backend="mixed",
                                    size=plan.size), device=_device(plan))
            out["mixed_refusal"] = "NOT refused: ClipStream(mixed) built without libnvcuvid"
        except DataError as e:
            out["mixed_refusal"] = str(e)
    for stride in (2, 1):
        out["runs"].append(time_stream(plan, work / "shards_vp9", "cpu", stride, plan.cpu_threads))
    return out


# ---------------------------------------------------------------- pretrain, resume, replay


def overrides(plan: Plan, work: Path, out_dir: Path) -> list[str]:
    sets = {"data.shards": work / "shards_vp9", "data.split": "all", "data.batch_size": plan.batch,
            "train.steps": plan.steps, "train.out_dir": out_dir, "train.checkpoint_every": plan.resume_at,
            "train.keep_last": max(2, plan.steps // plan.resume_at + 1), "schedule.warmup_steps": plan.warmup_steps,
            "logging.every": plan.log_every, "logging.plot_every": 0, "logging.tensorboard": "false",
            "logging.progress": "false"}
    if not plan.cpu and _backend(work) == "cpu":  # no NVDEC: 16 CPU decode threads feed the GPU
        sets.update({"data.backend": "cpu", "data.num_threads": plan.cpu_threads})
    return [f"{k}={v}" for k, v in sets.items()]


def read_run(plan: Plan, out_dir: Path) -> dict:
    """Steady-state means from metrics.jsonl (steps after `steady_from`) and the whole-run
    summary.json of the run under out_dir."""
    (run,) = [p.parent for p in out_dir.glob("*/summary.json")]
    lines: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        lines[d["step"]] = d  # a step logged twice (resume): the later line wins
    steady = [lines[s] for s in sorted(lines) if s > plan.steady_from] or [lines[max(lines)]]
    mean = lambda k: (sum(d[k] for d in steady) / len(steady)  # noqa: E731
                      if all(d.get(k) is not None for d in steady) else None)
    step_t = mean("step_time_s")
    summary = json.loads((run / "summary.json").read_text())
    return {"run_dir": str(run), "steady_from_step": plan.steady_from, "steady_intervals": len(steady),
            "steps_per_s": 1 / step_t if step_t else None, "step_time_s": step_t,
            "data_wait_fraction": (sum(d["data_wait_s"] for d in steady) / sum(d["step_time_s"] for d in steady)),
            "sampled_fps": mean("sampled_fps"), "decoded_fps": mean("decoded_fps"), "mfu": mean("mfu"),
            "peak_memory_gib": max(d.get("memory_gib") or 0 for d in lines.values()),
            "losses": {s: lines[s]["loss"] for s in sorted(lines)}, "summary": summary,
            "checkpoints": sorted(p.name for p in (run / "checkpoints").glob("step_*"))}


def stage_pretrain(plan: Plan, work: Path) -> dict:
    out_dir = work / "runs_full"
    _fresh(out_dir)
    secs = echofm("pretrain", REPO / plan.recipe, *[a for s in overrides(plan, work, out_dir) for a in ("--set", s)])
    return {"wall_s": secs, "backend": _backend(work), **read_run(plan, out_dir)}


def stage_resume(plan: Plan, work: Path) -> dict:
    """Resume from the full run's checkpoint at `resume_at` into a fresh folder; its losses
    must continue the uninterrupted run's (same data, same masks)."""
    full = _load(work, "pretrain")
    if "run_dir" not in full:
        raise SystemExit("gpu_e2e: the pretrain stage did not finish: no run to resume")
    ckpt = Path(full["run_dir"]) / "checkpoints" / f"step_{plan.resume_at:08d}"
    if not ckpt.is_dir():
        raise SystemExit(f"gpu_e2e: {ckpt}: no checkpoint to resume from (did the pretrain stage finish?)")
    out_dir = work / "runs_resume"
    _fresh(out_dir)
    secs = echofm("pretrain", REPO / plan.recipe, *[a for s in overrides(plan, work, out_dir) for a in ("--set", s)],
                  "--resume", ckpt)
    res = read_run(plan, out_dir)
    a = {int(k): v for k, v in full["losses"].items() if int(k) > plan.resume_at}
    b = {int(k): v for k, v in res["losses"].items()}
    common = sorted(set(a) & set(b))
    mean_a = sum(a[s] for s in common) / max(len(common), 1)
    mean_b = sum(b[s] for s in common) / max(len(common), 1)
    rel = abs(mean_b - mean_a) / abs(mean_a) if mean_a else None
    counter_ok = (res["summary"]["steps"] == plan.steps and sorted(b) == sorted(a)
                  and str(res["summary"]["resumed_from"]).endswith(ckpt.name))
    return {"wall_s": secs, "resumed_from": str(ckpt), "logged_steps": common,
            "mean_loss_uninterrupted": mean_a, "mean_loss_resumed": mean_b, "rel_diff": rel,
            "max_abs_diff": max((abs(a[s] - b[s]) for s in common), default=None), "rtol": plan.loss_rtol,
            "losses_ok": rel is not None and rel <= plan.loss_rtol and len(common) > 0,
            "step_counter_ok": counter_ok, "final_step": res["summary"]["steps"], "run": res}


class ReplayStream:
    """Batches decoded once, kept in device memory and replayed in order: ClipStream's
    interface (iteration, state_dict, load_state_dict, stats, epoch, damaged, check_dropped)
    at no decode cost, so the trainer's step time with it is the step without the loader."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.epoch, self._pos = 0, 0
        self.stats = {"batches": 0, "clips": 0, "frames": 0, "decoded_frames": 0, "skipped": 0}
        self.damaged: dict[str, str] = {}  # nothing is decoded here, so nothing is found damaged

    @classmethod
    def fill(cls, stream, n: int) -> "ReplayStream":
        """Take n batches from `stream` (continuing into later epochs if needed)."""
        out: list[dict] = []
        while len(out) < n:
            for b in stream:
                out.append(b)
                if len(out) == n:
                    break
        return cls(out)

    def __iter__(self):
        while self._pos < len(self.batches):
            b = self.batches[self._pos]
            self._pos += 1
            B, T = b["video"].shape[:2]
            self.stats.update(batches=self.stats["batches"] + 1, clips=self.stats["clips"] + B,
                              frames=self.stats["frames"] + B * T)
            yield b
        self.epoch, self._pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._pos = int(state["epoch"]), int(state["position"])

    def check_dropped(self, damaged: int | None = None) -> None:
        """Nothing to check: replayed batches were whole when they were decoded."""


def stage_replay(plan: Plan, work: Path) -> dict:
    """The pretrain stage's run again, its clips decoded once into device memory."""
    from echofm.engine.config import load_recipe
    from echofm.engine.trainer import pretrain
    from echofm.loaders.stream import ClipStream

    out_dir = work / "runs_replay"
    _fresh(out_dir)
    recipe = load_recipe(str(REPO / plan.recipe), overrides(plan, work, out_dir))
    src = ClipStream(recipe.data, train=True, device=_device(plan))
    replay = ReplayStream.fill(src, plan.replay_batches)
    src.close()
    t0 = time.perf_counter()
    pretrain(recipe, stream=replay)
    return {"wall_s": round(time.perf_counter() - t0, 2), "replayed_batches": plan.replay_batches,
            **read_run(plan, out_dir)}


def _fresh(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- report


def _f(x, fmt="{:.1f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def summarize(plan: Plan, stages: dict) -> tuple[dict, list[str]]:
    """Goals as ratios measured in this run, and the table lines."""
    pre, stream = stages.get("preflight", {}), stages.get("stream", {})
    full, resume, replay = stages.get("pretrain", {}), stages.get("resume", {}), stages.get("replay", {})
    runs = stream.get("runs", [])
    mixed = [r for r in runs if r["backend"] == "mixed"]
    head = max(mixed or runs, key=lambda r: r["clips_s"], default=None)
    goals = {
        "stream_clips_s": head and head["clips_s"], "stream_config": head and
        f"{head['backend']} {head['codec']} stride {head['stride']}",
        "stream_vs_1500": head and round(head["clips_s"] / NEED_CLIPS_S, 3),
        "stream_goal_met": bool(mixed) and head["clips_s"] >= NEED_CLIPS_S,
        "data_wait_fraction": full.get("data_wait_fraction"),
        "data_wait_goal_met": full.get("data_wait_fraction") is not None
        and full["data_wait_fraction"] < MAX_DATA_WAIT,
        "stream_vs_replay_steps": (full["steps_per_s"] / replay["steps_per_s"])
        if full.get("steps_per_s") and replay.get("steps_per_s") else None,
    }
    where = "CPU twin (tiny scale: not a GPU measurement)" if plan.cpu else pre.get("device_name", "?")
    nvdec = "present" if pre.get("nvdec") else "ABSENT (libnvcuvid does not load; evidence under preflight)"
    lines = [f"== gpu_e2e summary: {where}; stream backend {pre.get('backend', '?')}; NVDEC {nvdec}",
             f"stream, {FRAMES} x {plan.size}^2 clips, batch {plan.batch}",
             f"  {'backend codec stride (threads)':30s} {'clips/s':>9s} {'sampled fps':>12s} {'decoded fps':>12s} "
             f"{'CPU-ms/clip':>12s} {'NVDEC util':>11s}"]
    for r in runs:
        lines.append(f"  {r['backend']:5s} {r['codec']:4s} stride {r['stride']} ({r['threads']:2d} thr)    "
                     f"{r['clips_s']:9.1f} {r['sampled_fps']:12d} {r['decoded_fps']:12d} "
                     f"{r['cpu_ms_per_clip']:12.2f} {_f(r.get('decoder_util_mean'), '{:.0f}%'):>11s}")
    if stream.get("mixed_refusal"):
        lines.append(f"  mixed refused: {stream['mixed_refusal']}")
    lines.append(f"pretrain {Path(plan.recipe).stem}, batch {plan.batch}, {plan.steps} steps (steady: after "
                 f"step {plan.steady_from})")
    lines.append(f"  {'fed by':28s} {'steps/s':>8s} {'sampled fps':>12s} {'data wait':>10s} {'MFU':>7s} {'peak GiB':>9s}")
    for name, r in (("the stream (" + str(full.get("backend")) + ")", full), ("replay (device tensors)", replay)):
        if r:
            lines.append(f"  {name:28s} {_f(r.get('steps_per_s'), '{:8.2f}'):>8s} "
                         f"{_f(r.get('sampled_fps'), '{:12.0f}'):>12s} {_f(r.get('data_wait_fraction'), '{:.1%}'):>10s} "
                         f"{_f(r.get('mfu'), '{:.1%}'):>7s} {_f(r.get('peak_memory_gib'), '{:.1f}'):>9s}")
    if resume:
        lines.append(f"resume at step {plan.resume_at}: mean loss of logged steps after it "
                     f"{_f(resume.get('mean_loss_resumed'), '{:.5f}')} vs {_f(resume.get('mean_loss_uninterrupted'), '{:.5f}')}"
                     f" uninterrupted (rel diff {_f(resume.get('rel_diff'), '{:.2e}')}, tol {plan.loss_rtol:g}): "
                     f"{'ok' if resume.get('losses_ok') else 'FAIL'}; step counter "
                     f"{resume.get('final_step')}/{plan.steps} {'ok' if resume.get('step_counter_ok') else 'FAIL'}")
    lines.append("goals (same run):")
    lines.append(f"  NVDEC stream >= {NEED_CLIPS_S:,.0f} clips/s: {_f(goals['stream_clips_s'])} "
                 f"({goals['stream_config']}) = {_f(goals['stream_vs_1500'], '{:.2f}x')} "
                 f"{'MET' if goals['stream_goal_met'] else 'NOT MET' + ('' if mixed else ' (no NVDEC run)')}")
    lines.append(f"  data wait < {MAX_DATA_WAIT:.0%} of step time in the real pretrain: "
                 f"{_f(goals['data_wait_fraction'], '{:.1%}')} {'MET' if goals['data_wait_goal_met'] else 'NOT MET'}")
    lines.append(f"  what the loader costs: steps/s fed by the stream = {_f(goals['stream_vs_replay_steps'], '{:.2f}x')}"
                 " those fed from device memory")
    return goals, lines


def stage_report(plan: Plan, work: Path, results: Path) -> dict:
    stages = {s: _load(work, s) for s in STAGES[:-1]}
    rcs = {p.stem[3:]: int(p.read_text()) for p in (work / "stages").glob("rc_*")}
    goals, lines = summarize(plan, stages)
    failed = {s: rc for s, rc in rcs.items() if rc != 0}
    if failed:
        lines.append("stages that did not finish: " + ", ".join(
            f"{s} ({'timed out' if rc in (124, 137) else f'rc {rc}'})" for s, rc in failed.items()))
    name = "gpu_e2e_cpu.json" if plan.cpu else "gpu_e2e.json"
    print("\n".join(lines))
    bench.write_json(results / name, {"goals": goals, "stage_rc": rcs, "stages": stages, "summary": lines})
    return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder kept between stages and calls")
    ap.add_argument("--results", type=Path, default=None, help="report folder (default: a new run folder)")
    ap.add_argument("--cpu", action="store_true", help="the tiny CPU twin (tests this script)")
    args = ap.parse_args(argv)
    plan = CPU if args.cpu else GPU
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"== stage {args.stage}", flush=True)
    if args.stage == "report":
        stage_report(plan, args.work, args.results or bench.run_dir("gpu_e2e"))
        return 0
    t0 = time.perf_counter()
    data = globals()[f"stage_{args.stage}"](plan, args.work)
    data["stage_s"] = round(time.perf_counter() - t0, 2)
    _save(args.work, args.stage, data)
    print(f"== stage {args.stage} done in {data['stage_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
