"""The pretraining loop end to end: real EchoFM on real shards (tiny shapes), DeepSpeed on CPU.

One process in-process (metrics and MFU, figures, lr schedule, export, NaN skip, compiled
steps), SIGTERM + SIGKILL + `--resume auto` in subprocesses (identical losses to the
uninterrupted run, corrupt newer checkpoint ignored), 2-process ZeRO-2 via torchrun, named
recipe errors.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from echofm.engine import checkpoint as ckpt
from echofm.engine.config import ConfigError, load_recipe
from echofm.engine.optim import ScheduleConfig, lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/pretrain/echofm_tiny.yaml")
PEAK_TFLOPS = 0.001  # a made-up peak, so that the CPU runs log an MFU too
# A few-second model: 8 frames of 32^2, patch 8, tubelet 2 -> 4 x 16 tokens, 4 kept per slice.
SMALL = ["model.num_frames=8", "model.img_size=32", "model.patch_size=8", "model.tubelet=2",
         "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_depth=1", "model.decoder_num_heads=2", "model.pred_t_dim=4",
         "data.num_frames=8", "data.size=32", "data.batch_size=2", "data.num_threads=1",
         "schedule.warmup_steps=2", "optim.lr=0.002", "logging.every=1", "logging.progress=false",
         "logging.tensorboard=false", f"train.peak_tflops={PEAK_TFLOPS}"]
COMPILE = ["train.compile.blocks=true", "train.compile.loss=true"]


def _overrides(shards, out, *extra):
    return SMALL + [f"data.shards={shards}", f"train.out_dir={out}", *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a re-run step's later line wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        out[d["step"]] = d["loss"]
    return out


def _env():
    # A fresh rendezvous for each child: drop the pytest process's own port and rank.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(*args):
    return [sys.executable, "-m", "echofm.engine.cli", *args]


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory):
    """An uninterrupted 6-step run in a child process (the same setting the resume test uses)."""
    out = tmp_path_factory.mktemp("ref")
    r = subprocess.run(_cli("pretrain", TINY, *sum((["--set", o] for o in _overrides(
        tiny_shards, out, "train.steps=6", "train.checkpoint_every=2", "logging.plot_every=3")), [])),
        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "echofm_tiny"


def _flops_per_clip(recipe) -> float:
    from echofm.engine.flops import model_flops

    return model_flops(recipe.model, recipe.mask, recipe.loss)["train_step"]


def test_run_logs_metrics_figures_checkpoints_and_exports(reference, tiny_shards, tmp_path):
    run = reference
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [1, 2, 3, 4, 5, 6]
    per_clip = _flops_per_clip(load_recipe(TINY, _overrides(tiny_shards, tmp_path)))
    for d in lines:
        for key in ("loss", "loss_rec", "loss_triplet", "loss_cycle", "lr", "grad_norm", "sampled_fps",
                    "decoded_fps", "step_time_s", "data_wait_s", "compute_s", "memory_gib"):
            assert isinstance(d[key], float) and d[key] >= 0, (key, d)
        assert d["nonfinite_total"] == 0 and d["mfu_peak"] == "train.peak_tflops"
        # the collapse monitor (engine/phase_health.py) rides along with the losses
        assert 0 <= d["phase_slice_share"] <= 1 + 1e-9 and -1 <= d["phase_sp_corr"] <= 1 and d["phase_s_spread"] >= 0
        # docs/mfu.md: train-step FLOPs per clip x clips per second / peak (2 clips per step here)
        assert d["mfu"] == pytest.approx(per_clip * 2 / d["step_time_s"] / (PEAK_TFLOPS * 1e12), rel=1e-9)
        assert d["loss"] == pytest.approx(d["loss_rec"] + d["loss_triplet"] + d["loss_cycle"], rel=1e-5)
        assert d["sampled_fps"] == pytest.approx(2 * 8 / d["step_time_s"], rel=1e-6)
        # decode waste: decoded / sampled frames, the same interval (issue 26)
        assert d["decode_waste"] == pytest.approx(d["decoded_fps"] / d["sampled_fps"], rel=1e-6)
        assert d["decode_waste"] >= 1.0
        assert d["step_time_s"] == pytest.approx(d["data_wait_s"] + d["compute_s"], rel=1e-6)
    # lr used at step s is the schedule's value at 0-based step s - 1 (peak 2e-3, 2 warmup steps).
    sched = ScheduleConfig(warmup_steps=2, min_lr=1e-5)
    assert [d["lr"] for d in lines] == [2e-3 * lr_factor(s, sched, total=6, floor=1e-5 / 2e-3) for s in range(6)]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert sorted(p.name for p in (run / "figures").iterdir()) == [
        "recon_00000003.png", "recon_00000006.png", "similarity_00000003.png", "similarity_00000006.png"]
    # keep_last=2 of the saves at 2, 4, 6.
    assert [p.name for p in ckpt.complete_checkpoints(run / "checkpoints")] == ["step_00000004",
                                                                               "step_00000006"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["last_checkpoint"].endswith("step_00000006")

    # export -> EchoFM.from_pretrained gives the checkpoint's weights.
    from echofm.engine.cli import main
    from echofm.engine.model import EchoFM

    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    model = EchoFM.from_pretrained(tmp_path / "exported")
    assert not model.training  # from_pretrained: eval mode, ready to embed
    state, recipe = ckpt.load_model_state(run)
    assert model.cfg.embed_dim == 32 and recipe["train"]["steps"] == 6
    # the model card: what it is, what it saw (the manifest's digest), steps, provenance
    from echofm.loaders.digest import sha256_file

    card = (tmp_path / "exported" / "README.md").read_text()
    for want in ("## Architecture", "## Objective", "## Intended use", "## Limits", "optimizer steps: 6 of 6",
                 f"manifest.json sha256: `{sha256_file(tiny_shards / 'manifest.json')}`",
                 f"model.safetensors sha256: `{sha256_file(tmp_path / 'exported' / 'model.safetensors')}`",
                 f"git commit {summary['provenance']['git']['commit'] or 'unknown'}", "width 32"):
        assert want in card, want
    mine = model.state_dict()
    assert state.keys() == mine.keys() and all(torch.equal(state[k], mine[k]) for k in state)


def test_sigterm_and_sigkill_then_resume_reproduce_losses(reference, tiny_shards, tmp_path):
    args = _cli("pretrain", TINY, *sum((["--set", o] for o in _overrides(
        tiny_shards, tmp_path, "train.steps=6", "train.checkpoint_every=2", "logging.plot_every=3")), []))
    run = tmp_path / "echofm_tiny"

    def start(*extra):
        return subprocess.Popen(args + list(extra), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def wait_for(proc, cond, what):
        t0 = time.time()
        while not cond():
            assert proc.poll() is None, f"exited before {what}: {proc.stdout.read()[-3000:]}"
            assert time.time() - t0 < 240, f"timed out waiting for {what}"
            time.sleep(0.05)

    # 1. SIGTERM after the first step: it checkpoints that step and exits cleanly.
    p = start()
    wait_for(p, lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text(), "step 1")
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    saved = ckpt.find_checkpoint(run)
    assert saved is not None and 1 <= int(saved.name[5:]) < 6, out[-2000:]
    assert json.loads((run / "summary.json").read_text())["stopped"] is True

    # 2. Resume, SIGKILL right after the step-4 checkpoint lands (before the end).
    p = start("--resume", "auto")
    wait_for(p, lambda: ckpt.is_complete(run / "checkpoints" / "step_00000004"), "checkpoint 4")
    p.kill()
    p.communicate(timeout=60)
    assert not ckpt.is_complete(run / "checkpoints" / "step_00000006")
    # A newer but corrupt checkpoint and a killed save's temp folder must be ignored.
    bad = run / "checkpoints" / "step_00000005"
    if not bad.exists():
        import shutil

        shutil.copytree(run / "checkpoints" / "step_00000004", bad)
    f = bad / "rank_00000.pt"
    f.write_bytes(f.read_bytes()[:50])
    (run / "checkpoints" / ".tmp-step_00000006").mkdir(exist_ok=True)

    # 3. Resume to the end: every step's loss equals the uninterrupted run's.
    p = start("--resume", "auto")
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step_00000004" in out, out[-2000:]
    mine, ref = _losses(run), _losses(reference)
    assert sorted(mine) == [1, 2, 3, 4, 5, 6]
    assert [mine[s] for s in range(1, 7)] == [ref[s] for s in range(1, 7)]
    # Each step once: the killed session's lines after step 4 were dropped on resume.
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], steps


def test_nonfinite_loss_is_skipped_and_counted(tiny_shards, tmp_path):
    from echofm.engine.errors import NonFiniteLoss
    from echofm.engine.trainer import pretrain

    # Two micro-batches per step (and activation checkpointing on): micro-batch 2 is skipped,
    # so step 1 = micro-batches 1 and 3, step 2 = 4 and 5, step 3 = 6 and 7.
    recipe = load_recipe(TINY, _overrides(tiny_shards, tmp_path, "train.steps=3", "train.nan_inject=[2]",
                                          "train.checkpoint_every=0", "name=nan", "deepspeed.grad_accum=2",
                                          "deepspeed.activation_checkpointing=true"))
    summary = pretrain(recipe)
    assert summary["steps"] == 3 and summary["nonfinite_total"] == 1
    lines = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [d["nonfinite_total"] for d in lines] == [1, 1, 1]
    assert all(torch.isfinite(torch.tensor(d["loss"])) for d in lines)
    # Clips that reached the model: 3 micro-batches of 2 in step 1, then 2 of 2.
    fps = [d["sampled_fps"] * d["step_time_s"] for d in lines]
    assert fps == pytest.approx([3 * 2 * 8, 2 * 2 * 8, 2 * 2 * 8], rel=1e-6)
    # MFU counts the clips that completed a training step: 2 micro-batches of 2 in each step.
    trained = [d["mfu"] * d["step_time_s"] * PEAK_TFLOPS * 1e12 / _flops_per_clip(recipe) for d in lines]
    assert trained == pytest.approx([4, 4, 4], rel=1e-9)
    state = torch.load(ckpt.find_checkpoint(tmp_path / "nan") / "rank_00000.pt", weights_only=True)
    assert state["step"] == 3 and state["micro"] == 7

    recipe = load_recipe(TINY, _overrides(tiny_shards, tmp_path, "train.steps=3", "train.nan_inject=[2,3]",
                                          "train.max_nonfinite=2", "name=nan_abort"))
    with pytest.raises(NonFiniteLoss, match="non-finite for 2 micro-batches in a row"):
        pretrain(recipe)


def test_trainer_is_complete_after_init(tiny_shards, tmp_path):
    """`Trainer.__init__` opens the whole run: `train_step()` and `log()` work without `fit()`, and
    neither they nor `fit()` create an attribute (issue 27: state that appears later is state a
    reader of `__init__` cannot see). The hand-driven steps give the losses `fit()` gives."""
    from echofm.engine.distributed import init_distributed
    from echofm.engine.model import EchoFM
    from echofm.engine.trainer import Trainer, pretrain
    from echofm.loaders.stream import ClipStream

    def build(name):
        recipe = load_recipe(TINY, _overrides(tiny_shards, tmp_path, "train.steps=2", "train.checkpoint_every=0",
                                              f"name={name}"))
        dist = init_distributed()
        torch.manual_seed(recipe.train.seed)
        model = EchoFM(recipe.model, recipe.mask, recipe.loss)
        stream = ClipStream(recipe.data, train=True, rank=dist.rank, world_size=dist.world, device=dist.device)
        return Trainer(recipe, model, stream, dist=dist, run_dir=tmp_path / name, steps=2, seed=recipe.train.seed)

    trainer = build("by_hand")
    names = set(vars(trainer))
    for _ in range(2):
        trainer.log(trainer.train_step())
    assert set(vars(trainer)) == names
    trainer.close()
    assert trainer.step == 2 and len(trainer.losses) == 2

    fitted = build("fitted")
    assert set(vars(fitted)) == names
    fitted.fit()
    assert set(vars(fitted)) == names
    assert fitted.losses == trainer.losses
    # and both are what `pretrain` (the CLI's path) logs
    pretrain(load_recipe(TINY, _overrides(tiny_shards, tmp_path, "train.steps=2", "train.checkpoint_every=0",
                                          "name=pretrained")))
    assert list(_losses(tmp_path / "pretrained").values()) == trainer.losses


def _compiled_run(tiny_shards, tmp_path, name, *extra):
    from echofm.engine.trainer import pretrain

    pretrain(load_recipe(TINY, _overrides(tiny_shards, tmp_path, "train.steps=3", "train.checkpoint_every=0",
                                          "logging.plot_every=0", f"name={name}", *extra)))
    return _losses(tmp_path / name)


def test_compiled_step_gives_the_eager_losses(tiny_shards, tmp_path):
    """train.compile (blocks + loss) with aot_eager (dynamo + AOTAutograd, no code generation):
    the eager run's losses. A backend that fails falls back to eager on the first step, with one
    warning, and gives exactly the eager losses (the failed try's random draws are undone)."""
    from torch._dynamo import list_backends, register_backend
    from torch._dynamo.utils import counters

    eager = _compiled_run(tiny_shards, tmp_path, "eager")
    counters.clear()
    compiled = _compiled_run(tiny_shards, tmp_path, "compiled", *COMPILE, "train.compile.backend=aot_eager")
    assert counters["aot_autograd"]["ok"] >= 3  # the encoder block, the decoder block, the loss
    assert list(compiled.values()) == pytest.approx(list(eager.values()), rel=1e-5)

    if "echofm_broken" not in list_backends(exclude_tags=()):
        def broken(gm, example_inputs):
            raise RuntimeError("backend exploded")

        register_backend(broken, name="echofm_broken")
    with pytest.warns(UserWarning, match="compiled step failed .*backend exploded.*running eager"):
        fell_back = _compiled_run(tiny_shards, tmp_path, "broken", *COMPILE, "train.compile.backend=echofm_broken")
    assert fell_back == eager


@pytest.mark.slow(reason="inductor compiles C++ kernels for the CPU: minutes on 2 cores")
def test_inductor_compiled_step_gives_the_eager_losses(tiny_shards, tmp_path):
    eager = _compiled_run(tiny_shards, tmp_path, "eager")
    compiled = _compiled_run(tiny_shards, tmp_path, "inductor", *COMPILE)
    assert list(compiled.values()) == pytest.approx(list(eager.values()), rel=1e-3)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_benchmark_stand_in_engine_steps_like_deepspeed(zero_stage):
    """benchmarks/train.py times `micro_step` on DeepSpeed's engine or, on a GPU image without
    DeepSpeed, on its StandInEngine: DeepSpeed's bf16 step arithmetic (fp32 masters, clip,
    AdamW, DeepSpeed's zero-gradient AdamW step at init). From the same weights and masks, three
    steps of each give the same losses, bit for bit (CPU), and the same weights: bit for bit at
    ZeRO 0; at ZeRO 1 DeepSpeed steps one flat buffer where the stand-in steps each tensor, and
    torch's fused CPU AdamW (engine/optim.py) rounds an element differently in its vectorised
    body and its scalar tail, so a weight may differ by one bf16 ulp (1 of 12288 here)."""
    import copy
    import importlib.util

    from echofm.engine.model import EchoFM
    from echofm.engine.step import micro_step

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "train.py")
    bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(bench)
    # warmup 0: the lr stays at its peak (the stand-in has no schedule); the clip acts (grad norm > 0.01)
    recipe = bench.bench_recipe("echofm_tiny", 2, [o for o in SMALL if o.startswith(("model.", "data."))]
                                + ["optim.lr=0.002", "schedule.warmup_steps=0", "optim.clip_grad=0.01",
                                   f"deepspeed.zero_stage={zero_stage}",
                                   # pinned: with the centred S one near-zero bias (1e-10) differs
                                   # by an ulp after 3 steps (summation order), losses still equal
                                   "loss.variant=official"],
                                precision="bf16")
    torch.manual_seed(0)
    model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    engines = {"deepspeed": bench.make_engine("deepspeed", copy.deepcopy(model), recipe),
               "standin": bench.make_engine("standin", model, recipe)}
    wrapper = {0: "FP16_UnfusedOptimizer", 1: "DeepSpeedZeroOptimizer"}[zero_stage]  # bf16 at ZeRO 0 / 1
    assert type(engines["deepspeed"].optimizer).__name__ == wrapper
    video = torch.randint(0, 256, (2, 8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    losses = {k: [] for k in engines}
    for i in range(3):
        for name, engine in engines.items():
            torch.manual_seed(i)  # the same masks
            losses[name].append(micro_step(engine, {"video": video})[0].loss)
    assert losses["standin"] == losses["deepspeed"] and len(set(losses["standin"])) == 3
    ds, si = engines["deepspeed"].module.state_dict(), engines["standin"].module.state_dict()
    assert all(ds[k].dtype == torch.bfloat16 for k in ds)
    if zero_stage == 0:
        assert all(torch.equal(ds[k], si[k]) for k in ds)
    else:
        differ = sum(int((ds[k] != si[k]).sum()) for k in ds)
        ulp = max(float(((ds[k].float() - si[k].float()).abs() / si[k].float().abs().clamp(min=1e-30)).max())
                  for k in ds)
        assert differ <= 4 and ulp <= 2**-7, (differ, ulp)


def test_memory_gib_is_the_peak_since_the_last_read(monkeypatch):
    """CUDA: each metrics line's memory_gib is the peak since the previous line (read, then
    reset), not the process's all-time peak (which read the same 24 GiB for every run)."""
    from echofm.engine.metrics import memory_gib

    allocated = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocated.update(peak=2**30))
    cuda = torch.device("cuda", 0)
    allocated["peak"] = 24 * 2**30
    assert memory_gib(cuda) == 24.0
    assert memory_gib(cuda) == 1.0  # reset to what is allocated now
    assert memory_gib(torch.device("cpu")) > 0  # CPU: resident memory


@pytest.mark.gpu(reason="reads the CUDA allocator")
def test_memory_gib_resets_on_the_gpu():
    from echofm.engine.metrics import memory_gib

    dev = torch.device("cuda", torch.cuda.current_device())
    memory_gib(dev)
    big = torch.empty(2**30, dtype=torch.uint8, device=dev)
    del big
    assert memory_gib(dev) >= 1.0
    assert memory_gib(dev) < 1.0


def test_the_trainers_adamw_is_fused():
    """build_optimizer (the trainer's client optimizer, which DeepSpeed steps): fused AdamW, one
    kernel for the whole update, on CUDA and on CPU (where torch's default is a per-parameter
    loop, 3x slower for echofm_tiny; tests/test_step_equivalence.py: the same steps to rounding)."""
    from echofm.engine.model import EchoFM, ModelConfig
    from echofm.engine.optim import OptimConfig, build_optimizer, param_groups

    cuda = torch.cuda.is_available()
    model = EchoFM(ModelConfig(preset="echofm_tiny", num_frames=8, img_size=32, patch_size=8, embed_dim=32,
                               depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                               pred_t_dim=4)).to("cuda" if cuda else "cpu")
    opt = build_optimizer(param_groups(model, 0.05), OptimConfig(), 1e-3)
    assert opt.defaults["fused"] is True
    assert opt.defaults["betas"] == (0.9, 0.95) and not opt.defaults["capturable"]


def test_named_errors(tiny_shards, tmp_path, capsys):
    from echofm.engine.cli import main
    from echofm.engine.errors import UserError
    from echofm.engine.trainer import pretrain

    with pytest.raises(ConfigError, match="data.num_frames=16 but the model expects model.num_frames=8"):
        pretrain(load_recipe(TINY, _overrides(tiny_shards, tmp_path, "data.num_frames=16")))
    assert main(["pretrain", TINY, "--set", "deepspeed.zero_stage=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deepspeed" in err and "zero_stage" in err
    with pytest.raises(UserError, match="no complete checkpoint"):
        pretrain(load_recipe(TINY, _overrides(tiny_shards, tmp_path)), resume=str(tmp_path / "none"))
    # The launchers' entry point (`python -m echofm.engine.cli`) prints the same one line.
    r = subprocess.run(_cli("pretrain", TINY, "--set", f"data.shards={tiny_shards}", "--resume",
                            str(tmp_path / "none")), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("echofm: error: --resume"), r.stderr


def test_two_process_zero2_bf16_torchrun(tiny_shards, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "echofm.engine.cli", "pretrain", TINY,
           *sum((["--set", o] for o in _overrides(tiny_shards, tmp_path, "train.steps=3",
                                                   "train.checkpoint_every=2", "deepspeed.zero_stage=2",
                                                   "deepspeed.precision=bf16", "name=zero2")), [])]
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    run = tmp_path / "zero2"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [1, 2, 3]
    # Both ranks' clips count: 2 ranks x batch 2 x 8 frames per step.
    assert all(d["sampled_fps"] == pytest.approx(2 * 2 * 8 / d["step_time_s"], rel=1e-6) for d in lines)
    assert all(d["grad_norm"] is not None and d["grad_norm"] > 0 for d in lines)
    last = ckpt.find_checkpoint(run)
    assert last.name == "step_00000003"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["world_size"] == 2 and {"rank_00000.pt", "rank_00001.pt"} <= set(meta["files"])
    shards = [f for f in meta["files"] if "optim_states" in f]
    assert len(shards) == 2, meta["files"]  # ZeRO-2: one optimizer partition per rank
    state, _ = ckpt.load_model_state(run)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_metrics_lines_after_the_resumed_step_are_dropped(tmp_path):
    from echofm.engine.logging import drop_steps_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    drop_steps_after(path, 2)  # resumed from the step-2 checkpoint; 5 was cut off by a kill
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    drop_steps_after(tmp_path / "none.jsonl", 0)
    assert not (tmp_path / "none.jsonl").exists()


def test_dropped_samples_are_reported_and_bounded(tiny_shards, tmp_path, capsys):
    """data.on_error=skip with a truncated tar: the dropped samples reach stdout, metrics.jsonl
    and summary.json; beyond data.max_dropped the run stops with a named error."""
    import shutil

    from echofm.engine.trainer import pretrain
    from echofm.loaders.errors import DataError
    from echofm.loaders.shards import read_index, read_manifest

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    entry = next(s for s in read_manifest(shards)["shards"] if s["split"] == "train")
    index = read_index(shards / entry["idx"])
    with open(shards / entry["tar"], "r+b") as f:  # the last 2 samples of the shard are cut off
        f.truncate(index[-2][0][1] + 100)
    lost = {c[0][3].split(".")[0] for c in index[-2:]}
    total = sum(s["samples"] for s in read_manifest(shards)["shards"] if s["split"] == "train")
    steps = total // 2 + 1  # batch 2: a whole epoch and one step more reads every sample
    base = _overrides(shards, tmp_path, f"train.steps={steps}", "train.checkpoint_every=0",
                      "data.on_error=skip", "data.shuffle=false", "data.drop_last=true")
    summary = pretrain(load_recipe(TINY, base + ["data.max_dropped=0.5", "name=skip"]))
    out = capsys.readouterr().out
    assert summary["damaged_samples"] == 2 and summary["dropped_total"] >= 2, summary
    for key in lost:
        assert f"skipped damaged sample: {shards / entry['tar']}: sample {key}: component" in out, out
    assert "2 damaged sample(s) skipped" in out
    saved = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert saved["damaged_samples"] == 2
    lines = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["damaged_samples"] == 2 and lines[-1]["dropped_total"] == summary["dropped_total"]
    assert lines[0]["damaged_samples"] <= lines[-1]["damaged_samples"]

    with pytest.raises(DataError, match=r"[12] of the \d+ samples of split 'train' were damaged and skipped"
                                        r".*more than data.max_dropped=0.1"):
        pretrain(load_recipe(TINY, base + ["data.max_dropped=0.1", "name=bounded"]))


def test_resume_with_another_model_size_is_one_line(reference, tiny_shards, tmp_path, capsys):
    from echofm.engine.cli import main

    args = sum((["--set", o] for o in _overrides(tiny_shards, tmp_path, "model.embed_dim=48")), [])
    assert main(["pretrain", TINY, *args, "--resume", str(reference)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit the recipe's model" in err, err
    assert "model.embed_dim=32 (recipe: 48)" in err and str(reference / "checkpoints") in err


def test_stalled_rank_is_named_and_the_run_ends(tiny_shards, tmp_path):
    """2 processes under torchrun; rank 1 is SIGSTOPped after a checkpoint: rank 0 names it
    within train.heartbeat_timeout_s and exits, the last checkpoint stays intact."""
    from echofm.engine.heartbeat import EXIT_STALLED, read_beat

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "echofm.engine.cli", "pretrain", TINY,
           *sum((["--set", o] for o in _overrides(tiny_shards, tmp_path, "train.steps=200", "name=stall",
                                                   "train.checkpoint_every=2", "train.heartbeat_timeout_s=3",
                                                   "train.collective_timeout_s=300")), [])]
    run = tmp_path / "stall"
    p = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not ckpt.is_complete(run / "checkpoints" / "step_00000002"):
            assert p.poll() is None and time.time() - t0 < 240, "no checkpoint 2"
            time.sleep(0.05)
        ranks = [read_beat(run / "heartbeat", r) for r in (0, 1)]
        os.kill(ranks[1]["pid"], signal.SIGSTOP)
        t_stop = time.time()
        while _alive(ranks[0]["pid"]):
            assert time.time() - t_stop < 200, "rank 0 did not end"
            time.sleep(0.05)
        waited = time.time() - t_stop
    finally:
        for b in ranks if "ranks" in locals() else []:
            if b and _alive(b["pid"]):
                os.kill(b["pid"], signal.SIGKILL)  # the stopped rank (torchrun would wait 30 s)
        out, _ = p.communicate(timeout=60)
    assert p.returncode != 0
    assert f"rank 1 (pid {ranks[1]['pid']} on" in out and "sent no heartbeat" in out, out[-3000:]
    assert "last complete checkpoint: " in out and re.search(rf"exitcode\s*:\s*{EXIT_STALLED}\b", out), out[-3000:]
    # heartbeat timeout + a poll interval, well before the collective timeout (300 s); loose
    # upper bound: a loaded 2-core CI machine can take tens of seconds to schedule the exit
    assert waited < 150, waited
    last = ckpt.find_checkpoint(run, check=True)
    assert last is not None and ckpt.verify(last)["step"] >= 2


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stale_torch_extension_lock_does_not_hang_init(tmp_path):
    """Regression (CI hung 80 min): a killed JIT build of DeepSpeed's shm comm op leaves
    `deepspeed_shm_comm/lock`, and torch waits on it forever. CPU runs skip that op."""
    ext = tmp_path / "ext"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    env.update(TORCH_EXTENSIONS_DIR=str(ext), CUDA_VISIBLE_DEVICES="")
    code = ("from echofm.engine.distributed import init_distributed\n"
            "import torch.distributed as d\n"
            "r = init_distributed()\n"
            "print('world', d.get_world_size(), r.device)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "world 1 cpu" in res.stdout
    assert (ext / "deepspeed_shm_comm" / "lock").exists()  # untouched: the op was never built
