"""benchmarks/gpu_e2e.py's parts at minimum size on CPU (the whole `gpu_e2e.sh --cpu` takes
minutes on 2 cores: three DeepSpeed processes), plus the stream's NVDEC refusal.

The replay stream goes through the real trainer (`pretrain(recipe, stream=...)`) and must give
the losses of the same batches read by a ClipStream; the stream timing and the report's
numbers are checked against what was fed in.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from echofm.engine.config import load_recipe
from echofm.loaders.errors import DataError
from echofm.loaders.pipeline import require_nvdec
from echofm.loaders.stream import ClipStream, StreamConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/pretrain/echofm_tiny.yaml")
# The few-second model of test_trainer: 8 frames of 32^2, patch 8, tubelet 2.
SMALL = ["model.num_frames=8", "model.img_size=32", "model.patch_size=8", "model.tubelet=2",
         "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_depth=1", "model.decoder_num_heads=2", "model.pred_t_dim=4",
         "data.num_frames=8", "data.size=32", "data.batch_size=2", "data.num_threads=1",
         "schedule.warmup_steps=2", "optim.lr=0.002", "logging.every=1", "logging.progress=false",
         "logging.tensorboard=false", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("gpu_e2e", ROOT / "benchmarks" / "gpu_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_e2e"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_nvdec_missing_is_one_clear_line():
    with pytest.raises(DataError) as e:
        require_nvdec("libechofm-no-such-nvcuvid.so.1")
    msg = str(e.value)
    assert "\n" not in msg and "libechofm-no-such-nvcuvid.so.1" in msg and "data.backend=cpu" in msg


def test_replay_stream_state_and_stats(e2e):
    batches = [{"video": torch.full((2, 3, 4, 4, 3), i, dtype=torch.uint8), "i": i} for i in range(3)]
    r = e2e.ReplayStream(batches)
    it = iter(r)
    assert [next(it)["i"] for _ in range(2)] == [0, 1]
    state = r.state_dict()
    assert state == {"epoch": 0, "position": 2}
    assert [b["i"] for b in it] == [2] and r.epoch == 1  # the pass ends: next epoch
    assert [b["i"] for b in r] == [0, 1, 2] and r.epoch == 2
    again = e2e.ReplayStream(batches)
    again.load_state_dict(state)
    assert [b["i"] for b in again] == [2] and again.epoch == 1
    assert r.stats == {"batches": 6, "clips": 12, "frames": 36, "decoded_frames": 0, "skipped": 0}


def _losses(run_dir: Path) -> dict:
    return {d["step"]: d for d in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_replay_feeds_the_trainer_like_the_stream(e2e, tiny_shards, tmp_path):
    """Two steps from a ClipStream and two from the same batches replayed: the same losses
    (CPU runs are deterministic), no decoding counted for the replay."""
    from echofm.engine.trainer import pretrain

    base = SMALL + [f"data.shards={tiny_shards}", "train.steps=2"]
    ref = load_recipe(TINY, base + [f"train.out_dir={tmp_path / 'ref'}"])
    pretrain(ref)
    rec = load_recipe(TINY, base + [f"train.out_dir={tmp_path / 'replay'}"])
    src = ClipStream(rec.data, train=True, device=torch.device("cpu"))
    replay = e2e.ReplayStream.fill(src, 2)
    src.close()
    summary = pretrain(rec, stream=replay)
    a, b = _losses(tmp_path / "ref" / "echofm_tiny"), _losses(tmp_path / "replay" / "echofm_tiny")
    assert summary["steps"] == 2 and sorted(a) == sorted(b) == [1, 2]
    assert [b[s]["loss"] for s in (1, 2)] == [a[s]["loss"] for s in (1, 2)]
    assert all(b[s]["decoded_fps"] == 0 and a[s]["decoded_fps"] > 0 for s in (1, 2))
    assert replay.state_dict() == {"epoch": 0, "position": 2}  # what a checkpoint would keep


def test_time_stream_counts_sampled_and_decoded_frames(e2e, tiny_shards):
    plan = e2e.Plan(**{**e2e.asdict(e2e.CPU), "stream_clips": 8, "stream_max_s": 30.0, "batch": 2})
    r = e2e.time_stream(plan, tiny_shards, "cpu", 2, 1)
    assert r["clips"] >= 8 and r["codec"] == "vp9" and r["backend"] == "cpu"
    # clips_s, not clips / seconds: "seconds" is rounded, and a fast run takes ~0.04 s
    assert r["sampled_fps"] == pytest.approx(r["clips_s"] * 16, rel=0.01)
    # Stride 2: a 16-frame clip spans 31 source frames, all decoded (fewer only for short
    # videos that wrap): decoded fps above sampled fps.
    assert r["decoded_fps"] > r["sampled_fps"] and r["cpu_ms_per_clip"] > 0


def _run(tmp: Path, name: str, rows: list[tuple[int, float, float, float]], resumed_from=None) -> None:
    run = tmp / name / "echofm_vit_base"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    lines = [{"step": s, "loss": loss, "step_time_s": t, "data_wait_s": w, "sampled_fps": 32 * 16 / t,
              "decoded_fps": 1.0, "mfu": 0.2, "memory_gib": 10.0 + s} for s, loss, t, w in rows]
    (run / "metrics.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    (run / "summary.json").write_text(json.dumps({"steps": rows[-1][0], "resumed_from": resumed_from}))


def test_read_run_and_report_numbers(e2e, tmp_path):
    plan = e2e.Plan(**{**e2e.asdict(e2e.GPU), "steps": 4, "resume_at": 2, "steady_from": 1, "log_every": 1})
    # Step 1 (compile) is left out of the steady state; steps 2-4: 0.1 s each, 0.002 s wait.
    _run(tmp_path, "full", [(1, 2.0, 5.0, 1.0), (2, 1.5, 0.1, 0.002), (3, 1.2, 0.1, 0.002), (4, 1.0, 0.1, 0.002)])
    full = e2e.read_run(plan, tmp_path / "full")
    assert full["steps_per_s"] == pytest.approx(10.0) and full["data_wait_fraction"] == pytest.approx(0.02)
    assert full["steady_intervals"] == 3 and full["peak_memory_gib"] == 14.0 and full["mfu"] == pytest.approx(0.2)
    _run(tmp_path, "replay", [(1, 2.0, 4.0, 0.0), (2, 1.5, 0.08, 0.0), (3, 1.2, 0.08, 0.0), (4, 1.0, 0.08, 0.0)])
    replay = e2e.read_run(plan, tmp_path / "replay")
    stream = {"runs": [{"backend": "mixed", "codec": "vp9", "stride": 2, "threads": 8, "clips_s": 1600.0,
                        "sampled_fps": 25600, "decoded_fps": 49600, "cpu_ms_per_clip": 0.5},
                       {"backend": "cpu", "codec": "vp9", "stride": 2, "threads": 16, "clips_s": 300.0,
                        "sampled_fps": 4800, "decoded_fps": 9300, "cpu_ms_per_clip": 50.0}]}
    goals, lines = e2e.summarize(plan, {"preflight": {"nvdec": True, "backend": "mixed", "device_name": "H200"},
                                        "stream": stream, "pretrain": full, "replay": replay})
    assert goals["stream_clips_s"] == 1600.0 and goals["stream_vs_1500"] == pytest.approx(1600 / 1500, abs=1e-3)
    assert goals["stream_goal_met"] and goals["data_wait_goal_met"]
    assert goals["stream_vs_replay_steps"] == pytest.approx(10.0 / 12.5)  # 0.1 s vs 0.08 s steps
    assert any("NVDEC stream >= 1,500 clips/s: 1600.0 (mixed vp9 stride 2) = 1.07x MET" in x for x in lines)
    # Without NVDEC the goal cannot be met by the cpu backend, however fast.
    goals, _ = e2e.summarize(plan, {"stream": {"runs": stream["runs"][1:]}, "pretrain": full})
    assert not goals["stream_goal_met"] and goals["stream_config"] == "cpu vp9 stride 2"


def test_driver_runs_stages_under_budget_and_writes_out(tmp_path):
    """gpu_e2e.sh itself: the shim, per-stage limits cut to the budget, rc bookkeeping, the
    report and log under $OUT (--only report: no corpus, no training)."""
    import os
    import subprocess

    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_e2e.sh"), "--cpu", "--work", str(tmp_path / "w"), "--only", "report"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "out" / "gpu_e2e_cpu.log").read_text()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "dlopen libnvcuvid.so.1" in log and "== stage preflight done" in log and "goals (same run):" in log
    saved = json.loads((tmp_path / "out" / "gpu_e2e_cpu.json").read_text())
    assert saved["stage_rc"] == {"preflight": 0} and saved["stages"]["preflight"]["versions"]["nvidia.dali"]
    # A budget too small for any stage but the report: preflight is skipped and counted.
    r = subprocess.run(cmd[:-2] + ["--only", "report", "--budget", "25"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "stage preflight skipped" in r.stdout
    assert "preflight (timed out)" in r.stdout
