"""Training-step benchmark: the step `echofm pretrain` runs, on a GPU (MFU, batch sweep, variants)
and on this CPU (tiny step vs the plain way, the whole trainer on shards).

    python benchmarks/train.py [--budget 220] [--presets echofm_vit_large,echofm_vit_base]
                               [--variants eager,compile,...] [--out benchmarks/results/train_gpu.json]
    python benchmarks/train.py --smoke            # the GPU section's code on CPU, tiny preset
    python benchmarks/train.py [--steps 24] [--threads N] [--skip-trainer]     # CPU machine

GPU (CUDA; issue 14), per preset (ViT-L mask 0.75 and ViT-B mask 0.9, as their recipes),
bf16, fed from uint8 clips already on the device with pre-drawn tube masks (the same for
every variant), within --budget seconds (each preset an equal share; JSON rewritten after
every measurement, so a killed run keeps what it measured):
  1. batch sweep of the eager step (ViT-L 8..128, ViT-B 32..512): stops at out-of-memory or
     when clips/s grows < 5%; the fastest batch is the "best batch";
  2. the plain model WITH SDPA at the best batch, same step (Conv3d over every patch, torch
     gathers, torch SDPA attention: mae_st / official style with fused attention);
  3. variants of our step at the best batch, each measured (`VARIANTS`): eager; compile
     (engine/compile.py: regional torch.compile of every Block, inductor); compile+graphs
     (plus the whole step captured in one CUDA graph: GraphedStep); graphs (eager kernels,
     captured); ckpt (grad checkpointing on; also at 2x the batch when the sweep ended in
     out-of-memory); autocast (fp32 weights + bf16 autocast instead of bf16 weights);
     foreach (AdamW foreach instead of fused); deepspeed (the trainer's DeepSpeed engine via
     engine.trainer.build_engine, when `deepspeed` imports: it is not on the GPU image
     unless its wheels are carried); compile-ro (torch.compile mode="reduce-overhead",
     torch's own CUDA graphs per block).
  The winner is the variant with the most clips/s; MFU = train-step FLOPs per clip
  (engine/flops.py, docs/mfu.md) x clips/s / the device's dense bf16 peak (790 TFLOP/s on
  an H200, DESIGN §7); ratio = ours (best variant at that batch) / plain with SDPA (eager).
  Peak memory is reset before and read after every measurement (it includes the fp32 copy
  of the weights every variant starts from: 1.2 GiB for ViT-L).

The step ("bf16-master", `master_step`) is what DeepSpeed 0.19's engine does for the
recipes' `precision: bf16, zero_stage: 0` with the trainer's client torch AdamW: the module
is cast to bf16 (forward and backward in bf16, no autocast), DeepSpeed wraps the optimizer
in its FP16_UnfusedOptimizer for bf16, which keeps fp32 master weights, copies the bf16
gradients to fp32, clips them by global norm (optim.clip_grad 1.0) and runs the client
AdamW (fused, betas 0.9/0.95, decay groups of engine.optim) on the masters, then copies
them back to bf16. Here the same arithmetic runs with foreach copies instead of
DeepSpeed's per-parameter Python loop, without its single-rank gradient all-reduce and
without the trainer's per-micro-batch host syncs (issue 14 removes those from the trainer).
It is an equivalent rather than the engine itself because the GPU image has no DeepSpeed
and because a CUDA graph cannot capture the engine's step; the `deepspeed` variant
measures the real engine where it imports, to show the difference.

CPU (no CUDA, no --smoke):
1. Tiny step (batch 4, 16 x 112^2, tube mask 0.75): forward + backward + AdamW, the same
   weights and masks for: plain (Conv3d over all patches, math attention), +fused attn (the
   plain embedding with our attention), ours (masking gather first, fused attention);
   all must give the same loss. Best of interleaved repeats.
2. Trainer: `echofm pretrain` of the tiny recipe on shards of a synthetic corpus (DALI CPU
   decode, DeepSpeed): steps/s, sampled / decoded fps, data-wait fraction of step time.

Writes benchmarks/results/train_gpu.json (CUDA) or train_cpu.json (CPU; --smoke writes
only to an explicit --out) and prints a table; the GPU table ends with the issue's bar.
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
    """Synthetic corpus -> VP9 shards (cached by their full config: echofm.loaders.corpus) -> shard dir."""
    from echofm.loaders.corpus import cached_corpus
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.synth import SynthConfig

    return cached_corpus(SynthConfig(videos=videos, seed=0, min_size=128, max_size=192, max_frames=90),
                         IngestConfig(size=size, codec="vp9", progress=False), cache, log=lambda m: None)


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


# ---------------------------------------------------------------- the GPU step (issue 14)

# preset: (tube mask ratio of its recipe, per-GPU batches to sweep)
SWEEPS = {"echofm_vit_large": (0.75, (8, 16, 32, 64, 128)),
          "echofm_vit_base": (0.9, (32, 64, 128, 256, 512))}
SMOKE_SWEEPS = {"echofm_tiny": (0.75, (1, 2))}
GROWTH = 1.05  # the sweep stops when clips/s grows less than this from one batch to the next
CLIP, LR = 1.0, 1e-4
# name: (precision, optimizer, compile mode, CUDA graph, grad checkpointing), in run order:
# the most informative first, since a tight budget skips the tail.
VARIANTS = {
    "eager": ("bf16-master", "fused", None, False, False),
    "compile": ("bf16-master", "fused", "default", False, False),
    "compile+graphs": ("bf16-master", "fused", "default", True, False),
    "graphs": ("bf16-master", "fused", None, True, False),
    "ckpt": ("bf16-master", "fused", None, False, True),
    "autocast": ("autocast", "fused", None, False, False),
    "foreach": ("bf16-master", "foreach", None, False, False),
    "deepspeed": ("deepspeed", "fused", None, False, False),
    "compile-ro": ("bf16-master", "fused", "reduce-overhead", False, False),
}
STEP = ("bf16-master: bf16 module, fp32 master weights + fp32 grads, global-norm clip 1.0, AdamW "
        "(0.9, 0.95) on the masters, bf16 copy back: DeepSpeed 0.19 bf16 / ZeRO 0 with the client AdamW "
        "(benchmarks/train.py docstring)")
BAR = {"echofm_vit_large": 0.45, "echofm_vit_base": 0.35, "ratio": 1.3}
COMPILE_NEED_S = 45.0  # a compile variant starts only with this much of its preset's budget left


def master_step(model: torch.nn.Module, fused: bool, capturable: bool):
    """The DeepSpeed-equivalent bf16 step (see the module docstring): bf16 module, fp32 master
    weights, fp32 gradients, global-norm clip, AdamW on the masters, bf16 copy back."""
    from echofm.engine.optim import param_groups

    groups = param_groups(model, 0.05)
    params = [p for g in groups for p in g["params"]]
    masters = [p.detach().float().clone() for p in params]
    for m in masters:
        m.grad = torch.zeros_like(m)
    index = {id(p): m for p, m in zip(params, masters)}
    opt = torch.optim.AdamW([{**g, "params": [index[id(p)] for p in g["params"]]} for g in groups], lr=LR,
                            betas=(0.9, 0.95), fused=fused or None, foreach=None if fused else True,
                            capturable=capturable)
    model.to(torch.bfloat16)
    mgrads = [m.grad for m in masters]

    def step(video, mask):
        for p in params:
            p.grad = None
        loss = model(video, mask=mask)["loss"]
        loss.backward()
        torch._foreach_copy_(mgrads, [p.grad for p in params])  # bf16 -> fp32
        torch.nn.utils.clip_grad_norm_(masters, CLIP, foreach=True)
        opt.step()
        torch._foreach_copy_([p.data for p in params], masters)  # fp32 -> bf16
        return loss.detach()

    return step


def autocast_step(model: torch.nn.Module, fused: bool, capturable: bool):
    """fp32 weights, bf16 autocast, AdamW straight on the weights (the old benchmark's step)."""
    from echofm.engine.optim import param_groups

    groups = param_groups(model, 0.05)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=fused or None, foreach=None if fused else True,
                            capturable=capturable)
    dev = params[0].device.type

    def step(video, mask):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(video, mask=mask)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        return loss.detach()

    return step


def deepspeed_step(model: torch.nn.Module, preset: str, ratio: float, batch: int):
    """The trainer's own engine: engine.trainer.build_engine for the preset's recipe at this batch
    (bf16, ZeRO 0, the client fused AdamW). Needs `deepspeed` (not on the GPU image by default)."""
    import deepspeed  # noqa: F401  ImportError -> the variant is reported as skipped

    from echofm.engine.config import load_recipe
    from echofm.engine.trainer import build_engine, init_distributed

    init_distributed()
    recipe = load_recipe(ROOT / f"recipes/pretrain/{preset}.yaml", [
        f"data.batch_size={batch}", "deepspeed.precision=bf16", "deepspeed.zero_stage=0",
        "deepspeed.grad_accum=1", "deepspeed.activation_checkpointing=false", f"mask.ratio={ratio}"])
    engine, _, _ = build_engine(model, recipe, world_size=1, total_steps=1000)

    def step(video, mask):
        loss = engine(video, mask=mask)["loss"]
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def make_step(variant: str, model, run: dict, capturable: bool):
    precision, optimizer, _, _, ckpt = VARIANTS[variant]
    model.set_grad_checkpointing(ckpt)
    cuda = next(model.parameters()).is_cuda
    fused, capturable = optimizer == "fused" and cuda, capturable and cuda  # CPU: GraphedStep runs eager
    if precision == "deepspeed":
        return deepspeed_step(model, run["preset"], run["ratio"], run["batch"])
    return (autocast_step if precision == "autocast" else master_step)(model, fused, capturable)


def timed(step, inputs: list, device: torch.device, target_s: float) -> tuple[float, int]:
    """Seconds per step over a window of about target_s (after 2 warm steps), host-synced only
    at the window's ends; inputs cycle through pre-drawn (video, mask) pairs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(2):
        step(*inputs[i % len(inputs)])
    sync()
    t0 = time.perf_counter()
    step(*inputs[0])
    sync()
    n = int(min(30, max(3, target_s / max(time.perf_counter() - t0, 1e-6))))
    t0 = time.perf_counter()
    for i in range(n):
        step(*inputs[i % len(inputs)])
    sync()
    return (time.perf_counter() - t0) / n, n


def measure(run: dict, variant: str, batch: int, model_fn, target_s: float) -> dict:
    """One variant at one batch: build, first (compiling) step, timed window, peak memory."""
    from echofm.engine import compile as C

    device, row = run["device"], {"variant": variant, "batch": batch}
    _, _, mode, graphs, _ = VARIANTS[variant]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, step = None, None
    try:
        model = model_fn()
        step = make_step(variant, model, dict(run, batch=batch), capturable=graphs)
        if mode is not None:
            C.compile_regions(model, mode, backend=run["compile_backend"])
        inputs = run["inputs"](batch)
        t0 = time.perf_counter()
        row["first_loss"] = float(C.first_step_or_eager(step, model, *inputs[0]))
        row["first_step_s"] = time.perf_counter() - t0
        row["compiled"] = C.is_compiled(model)
        if graphs:
            step = C.GraphedStep(step, *inputs[0], warmup=2)
            row["graphed"] = step.captured
        # Compile or capture unavailable (CPU) or failed: eager numbers, not this variant's.
        row["fell_back"] = (mode is not None and not row["compiled"]) or (graphs and not row["graphed"])
        row["step_s"], row["timed_steps"] = timed(step, inputs, device, target_s)
        row.update(clips_per_s=batch / row["step_s"], sampled_fps=batch * run["frames"] / row["step_s"])
        if run["peak"]:
            row["mfu"] = run["flops"] * row["clips_per_s"] / run["peak"]
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except ImportError as e:
        row["skipped"] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 -- one variant failing must not end the run
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    if cuda:
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, step
    if cuda:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return row


def sweep_batches(run: dict, batches, model_fn, deadline: float, target_s: float) -> list[dict]:
    """Eager steps at growing batches: stop at OOM, at the deadline, or when clips/s grows < GROWTH."""
    rows = []
    for b in batches:
        if rows and time.perf_counter() > deadline:
            rows.append({"variant": "eager", "batch": b, "skipped": "time budget"})
            break
        row = measure(run, "eager", b, model_fn, target_s)
        rows.append(row)
        print(f"   sweep batch {b:4d}: " + (f"{row['clips_per_s']:9.1f} clips/s, {row.get('mfu') or 0:.1%} MFU, "
              f"{row.get('peak_memory_gib', 0):.1f} GiB" if "step_s" in row else row.get("error", row.get("skipped"))),
              flush=True)
        ok = [r for r in rows if "step_s" in r]
        if "step_s" not in row or (len(ok) > 1 and ok[-1]["clips_per_s"] < GROWTH * ok[-2]["clips_per_s"]):
            break
    return rows


def preset_inputs(model, device: torch.device, count: int = 3):
    """batch -> [(uint8 video, mask)] * count, drawn once per batch (the same for every variant)."""
    cache: dict[int, list] = {}
    c = model.cfg

    def inputs(batch: int) -> list:
        if batch not in cache:
            cache.clear()  # one batch size at a time: ViT-B at 512 holds 1.2 GB of clips
            g = torch.Generator(device=device).manual_seed(batch)  # drawn on the device: seconds on a CPU
            video = torch.randint(0, 256, (batch, c.num_frames, c.img_size, c.img_size, c.in_chans),
                                  generator=g, dtype=torch.uint8, device=device)
            cache[batch] = [(video, model.draw_mask(batch, device)) for _ in range(count)]
        return cache[batch]

    return inputs


def run_preset(res: dict, preset: str, ratio: float, batches, device, peak, deadline: float, args, save) -> None:
    """Sweep, then the plain model with SDPA and each variant at the best batch; fills `res`
    in place and calls save() after each measurement (a killed run keeps what it measured)."""
    import copy
    import dataclasses

    from echofm.engine.flops import model_flops
    from echofm.engine.masking import MaskConfig
    from echofm.engine.model import EchoFM, ModelConfig

    torch.manual_seed(0)
    cfg, mask_cfg = ModelConfig(preset=preset), MaskConfig(ratio=ratio)
    base = EchoFM(cfg, mask_cfg).to(device)  # fp32 weights; every variant starts from a copy
    flops = model_flops(cfg, mask_cfg)["train_step"]
    run = {"preset": preset, "ratio": ratio, "device": device, "peak": peak, "flops": flops,
           "frames": base.cfg.num_frames, "inputs": preset_inputs(base, device),
           "compile_backend": args.compile_backend}
    target = 0.05 if args.smoke else 1.0
    res.update(mask_ratio=ratio, train_flops_per_clip=flops,
               attention_dispatch=dispatch_decisions(base, run["inputs"](1)[0][1], device),
               sweep=sweep_batches(run, batches, lambda: copy.deepcopy(base), deadline, target))
    save()
    ok = [r for r in res["sweep"] if "step_s" in r]
    if not ok:
        return
    best = max(ok, key=lambda r: r["clips_per_s"])
    res["best_batch"] = b = best["batch"]
    res["variants"] = {"eager": best}
    plain_cls = plain_model_class()

    def plain():
        m = plain_cls(dataclasses.replace(cfg, attn_backend="sdpa"), mask_cfg).to(device)
        m.load_state_dict(base.state_dict())
        return m

    res["plain_sdpa"] = measure(run, "eager", b, plain, target)
    summarise(res)
    save()
    todo = [(n, n, b) for n in args.variants if n != "eager"]
    if best["batch"] == ok[-1]["batch"] and "error" in res["sweep"][-1] and "ckpt" in args.variants:
        todo.append(("ckpt@2x", "ckpt", 2 * b))  # memory-bound sweep: checkpointing may fit more
    for key, name, batch in todo:
        need = COMPILE_NEED_S if VARIANTS[name][2] and not args.smoke else 0.0
        if deadline - time.perf_counter() < need or time.perf_counter() > deadline:
            res["variants"][key] = {"variant": name, "batch": batch, "skipped": "time budget"}
            continue
        r = res["variants"][key] = measure(run, name, batch, lambda: copy.deepcopy(base), target)
        print(f"   {key:15s} batch {batch}: " + (f"{r['clips_per_s']:9.1f} clips/s" if "step_s" in r
              else r.get("error", r.get("skipped"))), flush=True)
        summarise(res)
        save()


def dispatch_decisions(model, mask, device: torch.device) -> dict:
    """Which kernel `auto` runs for each attention call of this model's training forward."""
    from echofm.kernels import attention_backend

    c, (t, k) = model.cfg, mask.grid
    cls = int(getattr(c, "cls_embed", True))  # the encoder CLS is optional (VideoMAE has none)
    calls = {"encoder joint": (c.num_heads, 1, cls + t * k, c.embed_dim, "joint"),
             "phase slice": (c.num_heads, t, 1 + k, c.embed_dim, "slice"),
             "decoder joint": (c.decoder_num_heads, 1, 1 + t * c.l_grid, c.decoder_embed_dim, "joint")}
    out = {}
    for name, (h, tt, kk, d, mode) in calls.items():
        q = torch.empty(1, h, tt, kk, d // h, device=device, dtype=torch.bfloat16)
        out[name] = {"tokens": tt * kk if mode == "joint" else kk, "Dh": d // h,
                     "backend": attention_backend(q, mode, train=True)}
    return out


def summarise(res: dict) -> None:
    """Winner (most clips/s), its MFU, and ours / plain-with-SDPA at the same batch."""
    done = {n: r for n, r in res["variants"].items() if "step_s" in r and not r.get("fell_back")}
    win = max(done, key=lambda n: done[n]["clips_per_s"])
    res["winner"] = win
    res["winner_batch"] = done[win]["batch"]
    res["mfu"] = done[win].get("mfu")
    plain = res.get("plain_sdpa", {})
    if "step_s" in plain:
        same = {n: r for n, r in done.items() if r["batch"] == plain["batch"]}
        top = max(same, key=lambda n: same[n]["clips_per_s"])
        res["ratio_vs_plain_sdpa"] = same[top]["clips_per_s"] / plain["clips_per_s"]
        res["ratio_vs_plain_sdpa_variant"] = top
        res["ratio_eager_vs_plain_sdpa"] = done["eager"]["clips_per_s"] / plain["clips_per_s"]


def gpu_section(args, device: torch.device, save_json) -> dict:
    """Every preset within args.budget seconds (each gets an equal share of what is left)."""
    try:
        from echofm.engine.trainer import PEAK_BF16_TFLOPS
    except ImportError:
        PEAK_BF16_TFLOPS = {}
    from echofm.engine.flops import H200_BF16_PEAK

    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((tf * 1e12 for k, tf in PEAK_BF16_TFLOPS.items() if k in name), H200_BF16_PEAK)
    sweeps = SMOKE_SWEEPS if args.smoke else {p: SWEEPS[p] for p in args.presets}
    out = {"peak_bf16_flops": peak, "budget_s": args.budget, "variants_run": list(args.variants), "presets": {}}

    def save():
        out["bar"] = bar(out)
        save_json(out)

    start = time.perf_counter()
    for i, (preset, (ratio, batches)) in enumerate(sweeps.items()):
        left = args.budget - (time.perf_counter() - start)
        deadline = time.perf_counter() + left / (len(sweeps) - i)
        print(f"3. {preset} bf16 train step, mask {ratio}: batch sweep {batches}, then variants "
              f"({left:.0f} s left)", flush=True)
        res = out["presets"][preset] = {}
        run_preset(res, preset, ratio, batches, device, peak, deadline, args, save)
    save()
    return out


def bar(out: dict) -> dict:
    """ViT-L MFU >= 0.45, ViT-B MFU >= 0.35, ours / plain-with-SDPA >= 1.3 (each preset)."""
    p = out["presets"]
    line = {"vit_l_mfu": p.get("echofm_vit_large", {}).get("mfu"),
            "vit_b_mfu": p.get("echofm_vit_base", {}).get("mfu"),
            "ratio_vit_b": p.get("echofm_vit_base", {}).get("ratio_vs_plain_sdpa"),
            "ratio_vit_l": p.get("echofm_vit_large", {}).get("ratio_vs_plain_sdpa")}
    checks = [(line["vit_l_mfu"], BAR["echofm_vit_large"]), (line["vit_b_mfu"], BAR["echofm_vit_base"]),
              (line["ratio_vit_b"], BAR["ratio"]), (line["ratio_vit_l"], BAR["ratio"])]
    line["pass"] = all(v is not None and v >= goal for v, goal in checks)
    return line


def print_gpu(out: dict) -> None:
    print(f"\n{'preset':18s} {'variant':15s} {'batch':>5s} {'step s':>8s} {'clips/s':>9s} {'MFU':>6s} "
          f"{'peak GiB':>8s} {'first s':>8s}  note")
    for preset, res in out["presets"].items():
        rows = [("sweep", r) for r in res["sweep"]] + [(n, r) for n, r in res.get("variants", {}).items()]
        rows += [("plain+sdpa", res["plain_sdpa"])] if "plain_sdpa" in res else []
        for name, r in rows:
            head = f"{preset:18s} {(r['variant'] if name == 'sweep' else name):15s} {r['batch']:5d}"
            if "step_s" not in r:
                print(f"{head}  {r.get('error') or r.get('skipped')}")
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            note = " (sweep)" if name == "sweep" else " (fell back to eager)" if r.get("fell_back") else ""
            print(f"{head} {r['step_s']:8.4f} {r['clips_per_s']:9.1f} {mfu:>6s} {r.get('peak_memory_gib', 0):8.1f} "
                  f"{r['first_step_s']:8.1f}  loss {r['first_loss']:.4f}{note}")
        print(f"{preset}: attention " + ", ".join(f"{n} ({d['tokens']} tokens, Dh {d['Dh']}) -> {d['backend']}"
                                                  for n, d in res.get("attention_dispatch", {}).items()))
        if "winner" in res:
            ratio = res.get("ratio_vs_plain_sdpa")
            print(f"{preset}: winner {res['winner']} at batch {res['winner_batch']}"
                  + (f", MFU {res['mfu']:.1%}" if res.get("mfu") is not None else "")
                  + (f"; ours ({res['ratio_vs_plain_sdpa_variant']}) / plain+sdpa at batch "
                     f"{res['plain_sdpa']['batch']}: {ratio:.2f}x (eager/eager "
                     f"{res['ratio_eager_vs_plain_sdpa']:.2f}x)" if ratio else ""))
    b = out["bar"]

    def fmt(v, pct=True):
        return "n/a" if v is None else (f"{v:.1%}" if pct else f"{v:.2f}x")

    print(f"bar: ViT-L MFU {fmt(b['vit_l_mfu'])} (>= 45%), ViT-B MFU {fmt(b['vit_b_mfu'])} (>= 35%), "
          f"ours / plain+sdpa ViT-B {fmt(b['ratio_vit_b'], False)}, ViT-L {fmt(b['ratio_vit_l'], False)} "
          f"(>= 1.3x): {'PASS' if b['pass'] else 'not met'}")


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="trainer steps on shards (CPU)")
    ap.add_argument("--step-iters", type=int, default=4, help="timed steps per repeat (CPU step benchmark)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: what the trainer picks: cores minus 1 decode thread)")
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/echofm/bench_train")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="the GPU section on CPU: tiny preset, batches 1-2 (checks the code; numbers mean nothing)")
    ap.add_argument("--budget", type=float, default=220.0, help="seconds for the GPU section, all presets")
    ap.add_argument("--presets", default=",".join(SWEEPS), help="GPU section presets (comma list)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"GPU step variants, from {list(VARIANTS)}")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the compile variants (default inductor; aot_eager with --smoke)")
    args = ap.parse_args(argv)
    args.presets, args.variants = args.presets.split(","), args.variants.split(",")
    for name, given, known in (("--presets", args.presets, SWEEPS), ("--variants", args.variants, VARIANTS)):
        if set(given) - set(known):
            ap.error(f"{name}: unknown {sorted(set(given) - set(known))}; choose from {list(known)}")
    if "eager" not in args.variants:
        ap.error("--variants must include eager (the batch sweep)")
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    cuda = torch.cuda.is_available() and not args.smoke
    if args.threads is None:
        from echofm.engine.trainer import TrainConfig, cpu_threads

        args.threads = 8 if cuda else cpu_threads(TrainConfig(), argparse.Namespace(num_threads=1))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    res: dict = {"host": platform.node(), "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "threads": args.threads, "torch": torch.__version__}
    out = args.out or (None if args.smoke else RESULTS / ("train_gpu.json" if cuda else "train_cpu.json"))

    def save_json(extra: dict | None = None) -> None:
        res.update(extra or {})
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1, default=str) + "\n")

    if cuda or args.smoke:
        import triton

        res.update(triton=triton.__version__, step=STEP)
        print_gpu(gpu_section(args, device, save_json))
    else:
        cpu_section(args, device, res)
    save_json()
    if out is not None:
        print(f"wrote {out}")
    return 0


def cpu_section(args, device: torch.device, res: dict) -> None:
    """The tiny step (plain vs ours) and the trainer on shards, on this CPU."""
    print("1. tiny step: plain vs ours (batch 4, 16 x 112^2, mask 0.75)", flush=True)
    variants = build_variants("echofm_tiny", device)
    res["tiny_step"] = time_steps(variants, 4, args.step_iters, device, bf16=False)
    tiny = res["tiny_step"]
    res["tiny_ratio_ours_vs_plain"] = tiny["plain"]["step_s"] / tiny["ours"]["step_s"]
    if not args.skip_trainer:
        print("2. trainer: echofm_tiny recipe on VP9 shards (DALI CPU, DeepSpeed)", flush=True)
        args.cache.mkdir(parents=True, exist_ok=True)
        shards = build_shards(args.cache, args.videos, 112)
        res["trainer_tiny"] = run_trainer(shards, args.cache, args.steps)
        res["skipped"] = {  # train-step FLOPs per clip from flops.model_flops, not timed here
            "echofm_vit_base": "needs a GPU: ~0.2 TFLOP per clip per step, seconds per clip on 2 cores",
            "echofm_vit_large": "needs a GPU: ~1 TFLOP per clip per step"}
    print(f"\n{'what':34s} {'step s':>8s} {'steps/s':>8s} {'sampled fps':>12s}  note")
    for n, v in res["tiny_step"].items():
        print(f"{'tiny_step ' + n:34s} {v['step_s']:8.3f} {v['steps_per_s']:8.2f} {v['sampled_fps']:12,.0f}  "
              f"loss {v['first_loss']:.5f}")
    print(f"tiny step ours vs plain: {res['tiny_ratio_ours_vs_plain']:.2f}x (bar >= 1.0, goal 1.5)")
    if "trainer_tiny" in res:
        t = res["trainer_tiny"]
        print(f"trainer echofm_tiny (B {t['batch']}, {t['num_frames']} x {t['size']}^2): "
              f"{t['steps_per_s']:.2f} "
              f"steps/s, sampled {t['sampled_fps']:,.0f} fps, decoded {t['decoded_fps']:,.0f} fps, "
              f"data wait {t['data_wait_fraction']:.1%} of step time (bar < 10%)")


if __name__ == "__main__":
    sys.exit(main())
