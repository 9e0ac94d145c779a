"""Training-step benchmark: our EchoFM step vs the plain way, and the whole trainer on shards.

    python benchmarks/train.py [--steps 24] [--threads N] [--cache ~/.cache/echofm/bench_train]
                               [--out benchmarks/results/train_cpu.json]

1. Step (compute only, fed from uint8 tensors already on the device; tiny preset, batch 4,
   16 x 112^2, tube mask 0.75): forward + backward + AdamW, the same weights and the same
   masks for every variant, best of interleaved repeats:
     plain       Conv3d patch embedding of ALL patches, then drop the masked tokens
                 (torch.gather), unfused attention (`math`: the T*K x T*K matrix in memory)
     +fused attn the plain embedding with our attention (SDPA on CPU, Triton on CUDA)
     ours        masking gather first (only visible patches are read and embedded), fused
                 attention: EchoFM as trained
   All variants must give the same loss (checked) -- they are the same model.
2. Trainer (CPU): `echofm pretrain` of the tiny recipe on shards of a synthetic corpus (DALI
   CPU decode with 1 thread, one process, DeepSpeed, torch threads as the trainer picks
   them): steps/s, sampled fps, decoded fps and the data-wait fraction of step time, from
   the run's metrics.jsonl (first interval = pipeline start-up, dropped).
3. GPU (CUDA only): ViT-B and ViT-L steps in bf16 (autocast, fp32 master weights, fused
   AdamW) fed from device tensors: clips/s, sampled fps and MFU against the H200's measured
   bf16 peak (DESIGN §7), plus the plain ViT-B step for the ratio.

Writes benchmarks/results/train_cpu.json (or train_gpu.json with CUDA) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the plain step


def plain_model_class():
    from echofm.engine.model import EchoFM

    class PlainEchoFM(EchoFM):
        """The same EchoFM, encoder input computed the plain way (mae_st / official code):
        Conv3d over every patch of the normalised float clip, position embedding on all N
        tokens, then torch.gather of the visible ones."""

        def forward_encoder(self, video, mask):
            c = self.cfg
            x = self.normalize(video).permute(0, 4, 1, 2, 3)  # [B, C, T, H, W] float32
            x = x.to(self.patch_embed.weight.dtype)
            w = self.patch_embed.weight.view(c.embed_dim, c.in_chans, c.tubelet, c.patch_size, c.patch_size)
            tok = F.conv3d(x, w, self.patch_embed.bias, stride=(c.tubelet, c.patch_size, c.patch_size))
            tok = tok.flatten(2).transpose(1, 2)  # [B, N, D], (t, h, w) order
            tok = tok + self._pos(self.pos_embed_spatial, self.pos_embed_temporal)
            tok = torch.gather(tok, 1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, c.embed_dim))
            cls = (self.cls_token + self.pos_embed_class).expand(tok.shape[0], -1, -1)
            x = self.norm(self._run(self.blocks, torch.cat([cls, tok], dim=1), mask.grid, False))
            return x[:, 1:], x[:, 0]

    return PlainEchoFM


def build_variants(preset: str, device: torch.device, ratio: float = 0.75,
                   names: tuple[str, ...] = ("plain", "+fused attn", "ours")):
    """{name: model} sharing one set of weights; attention backend per variant."""
    import dataclasses

    from echofm.engine.masking import MaskConfig
    from echofm.engine.model import EchoFM, ModelConfig

    cfg = ModelConfig(preset=preset)
    fused = "auto"
    torch.manual_seed(0)
    ours = EchoFM(dataclasses.replace(cfg, attn_backend=fused), MaskConfig(ratio=ratio)).to(device)
    plain_cls = plain_model_class()
    mask = MaskConfig(ratio=ratio)
    make = {"plain": lambda: plain_cls(dataclasses.replace(cfg, attn_backend="math"), mask),
            "+fused attn": lambda: plain_cls(dataclasses.replace(cfg, attn_backend=fused), mask),
            "ours": lambda: ours}
    variants = {n: make[n]() for n in names}
    for name, m in variants.items():
        if m is not ours:
            m.load_state_dict(ours.state_dict())
            m.to(device)
    return variants


def time_steps(models: dict, batch: int, steps: int, device: torch.device, bf16: bool,
               repeats: int = 5) -> dict:
    """Best-of-repeats fwd+bwd+AdamW step time per variant (interleaved repeats, same masks;
    the best run counts: the machine is shared, contention only ever adds time)."""
    c = next(iter(models.values())).cfg
    g = torch.Generator(device="cpu").manual_seed(1)
    video = torch.randint(0, 256, (batch, c.num_frames, c.img_size, c.img_size, c.in_chans),
                          generator=g, dtype=torch.uint8).to(device)
    masks = [next(iter(models.values())).draw_mask(batch, device) for _ in range(steps)]
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
            for n, m in models.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(name, mask):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = models[name](video, mask=mask)
        out["loss"].backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return out["loss"].detach()

    # Same model, same masks: the first losses agree (before any update).
    first = {n: float(step(n, masks[0])) for n in models}
    times = {n: [] for n in models}
    for _ in range(repeats):
        for n in models:
            step(n, masks[0])  # warm-up of this round
            sync()
            t0 = time.perf_counter()
            for mk in masks:
                step(n, mk)
            sync()
            times[n].append((time.perf_counter() - t0) / steps)
    out = {}
    for n in models:
        t = min(times[n])
        out[n] = {"step_s": t, "steps_per_s": 1 / t, "clips_per_s": batch / t,
                  "sampled_fps": batch * c.num_frames / t, "first_loss": first[n]}
        if device.type == "cuda":
            out[n]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---------------------------------------------------------------- the trainer on shards


def build_shards(cache: Path, videos: int, size: int) -> Path:
    """Synthetic corpus -> VP9 shards (cached by content: corpus_cache.py) -> shard dir."""
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.synth import SynthConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # `echofm bench` runs this file by path
    from corpus_cache import cached_shards

    return cached_shards(cache, SynthConfig(videos=videos, seed=0, min_size=128, max_size=192, max_frames=90),
                         IngestConfig(size=size, codec="vp9", progress=False), log=lambda m: None)


def run_trainer(shards: Path, cache: Path, steps: int) -> dict:
    """The tiny recipe through `pretrain` (DALI CPU stream, DeepSpeed) in this process."""
    import shutil

    from echofm.engine.config import load_recipe
    from echofm.engine.trainer import pretrain

    out = cache / "runs"
    shutil.rmtree(out / "bench_tiny", ignore_errors=True)
    every = max(steps // 4, 1)
    recipe = load_recipe(ROOT / "recipes/pretrain/echofm_tiny.yaml", [
        f"data.shards={shards}", f"train.out_dir={out}", "name=bench_tiny", f"train.steps={steps}",
        "train.checkpoint_every=0", f"logging.every={every}", "logging.plot_every=0",
        "logging.progress=false", "logging.tensorboard=false"])
    summary = pretrain(recipe)
    lines = [json.loads(x) for x in (out / "bench_tiny" / "metrics.jsonl").read_text().splitlines()]
    steady = lines[1:] or lines  # the first interval holds pipeline start-up
    t = sum(d["step_time_s"] for d in steady)
    wait = sum(d["data_wait_s"] for d in steady)
    return {"recipe": "echofm_tiny", "batch": recipe.data.batch_size, "num_frames": recipe.data.num_frames,
            "size": recipe.data.size, "steps": steps, "steps_per_s": len(steady) / t,
            "sampled_fps": statistics.mean(d["sampled_fps"] for d in steady),
            "decoded_fps": statistics.mean(d["decoded_fps"] for d in steady),
            "data_wait_fraction": wait / t, "wall_s": summary["wall_s"],
            "loss_first": summary["first_loss"], "loss_last": summary["last_loss"]}


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="trainer steps on shards (CPU)")
    ap.add_argument("--step-iters", type=int, default=4, help="timed steps per repeat (step benchmark)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: what the trainer picks: cores minus 1 decode thread)")
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/echofm/bench_train")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-trainer", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.threads is None:
        from echofm.engine.trainer import TrainConfig, cpu_threads

        args.threads = 8 if cuda else cpu_threads(TrainConfig(), argparse.Namespace(num_threads=1))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    res: dict = {"host": platform.node(), "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "threads": args.threads, "torch": torch.__version__}

    print("1. tiny step: plain vs ours (batch 4, 16 x 112^2, mask 0.75)", flush=True)
    variants = build_variants("echofm_tiny", device)
    res["tiny_step"] = time_steps(variants, 4, args.step_iters, device, bf16=False)
    tiny = res["tiny_step"]
    res["tiny_ratio_ours_vs_plain"] = tiny["plain"]["step_s"] / tiny["ours"]["step_s"]

    if not cuda and not args.skip_trainer:
        print("2. trainer: echofm_tiny recipe on VP9 shards (DALI CPU, DeepSpeed)", flush=True)
        args.cache.mkdir(parents=True, exist_ok=True)
        shards = build_shards(args.cache, args.videos, 112)
        res["trainer_tiny"] = run_trainer(shards, args.cache, args.steps)
        res["skipped"] = {  # train-step FLOPs per clip from flops.model_flops, not timed here
            "echofm_vit_base": "needs a GPU: ~0.2 TFLOP per clip per step, seconds per clip on 2 cores",
            "echofm_vit_large": "needs a GPU: ~1 TFLOP per clip per step"}

    if cuda:
        from echofm.engine.flops import H200_BF16_PEAK, model_flops
        from echofm.engine.masking import MaskConfig
        from echofm.engine.model import ModelConfig

        from echofm.engine.trainer import PEAK_BF16_TFLOPS

        name = torch.cuda.get_device_name()
        peak = next((tf * 1e12 for k, tf in PEAK_BF16_TFLOPS.items() if k in name), H200_BF16_PEAK)
        res["peak_bf16_flops"] = peak
        for preset, batch, ratio in (("echofm_vit_base", 32, 0.9), ("echofm_vit_large", 8, 0.75)):
            print(f"3. {preset} bf16 step, batch {batch}, mask {ratio}", flush=True)
            names = ("ours",) if preset == "echofm_vit_large" else ("plain", "+fused attn", "ours")
            models = build_variants(preset, device, ratio, names)
            r = time_steps(models, batch, 10, device, bf16=True, repeats=2)
            fl = model_flops(ModelConfig(preset=preset), MaskConfig(ratio=ratio))["train_step"]
            for v in r.values():
                v["mfu"] = fl * v["clips_per_s"] / peak
            res[preset] = r
            if "plain" in r:
                res[f"{preset}_ratio_ours_vs_plain"] = r["plain"]["step_s"] / r["ours"]["step_s"]
            del models
            torch.cuda.empty_cache()

    # Table.
    print(f"\n{'what':34s} {'step s':>8s} {'steps/s':>8s} {'sampled fps':>12s} {'MFU':>6s}  note")
    for key in ("tiny_step", "echofm_vit_base", "echofm_vit_large"):
        for n, v in res.get(key, {}).items():
            mfu = f"{v['mfu']:.1%}" if "mfu" in v else "-"
            print(f"{key + ' ' + n:34s} {v['step_s']:8.3f} {v['steps_per_s']:8.2f} {v['sampled_fps']:12,.0f} "
                  f"{mfu:>6s}  loss {v['first_loss']:.5f}")
    print(f"tiny step ours vs plain: {res['tiny_ratio_ours_vs_plain']:.2f}x (bar >= 1.0, goal 1.5)")
    if "echofm_vit_base_ratio_ours_vs_plain" in res:
        print(f"ViT-B step ours vs plain: {res['echofm_vit_base_ratio_ours_vs_plain']:.2f}x")
    if "trainer_tiny" in res:
        t = res["trainer_tiny"]
        print(f"trainer echofm_tiny (B {t['batch']}, {t['num_frames']} x {t['size']}^2): "
              f"{t['steps_per_s']:.2f} "
              f"steps/s, sampled {t['sampled_fps']:,.0f} fps, decoded {t['decoded_fps']:,.0f} fps, "
              f"data wait {t['data_wait_fraction']:.1%} of step time (bar < 10%)")
    out = args.out or RESULTS / ("train_gpu.json" if cuda else "train_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
