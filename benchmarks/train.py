"""Training-step benchmark: the step `echofm pretrain` runs, on a GPU (MFU, batch sweep, variants)
and on this CPU (tiny step vs the plain way, the whole trainer on shards).

    python benchmarks/train.py [--budget 200] [--presets echofm_vit_large,echofm_vit_base]
                               [--variants eager,compile,...] [--out benchmarks/results/train_gpu.json]
    python benchmarks/train.py --smoke            # the GPU section's code on CPU, tiny preset
    python benchmarks/train.py [--steps 24] [--threads N] [--skip-trainer]     # CPU machine

Every timed step is the trainer's own: `engine.step.micro_step` (forward and loss, the one
host read of the loss and its terms, backward, the engine's optimizer step) on a model
prepared by `engine.distributed.prepare_model` (the recipe's train.compile and
deepspeed.activation_checkpointing), with the optimizer `engine.optim.build_optimizer` (torch
AdamW, fused on CUDA) over `engine.optim.param_groups`. Each measurement's options are recipe
overrides of the preset's recipe (`VARIANTS`), so the winner is a recipe line.

The engine: DeepSpeed's (`engine.distributed.build_engine`, the recipe's ZeRO stage, bf16) when
`deepspeed` imports, which is exactly what `echofm pretrain` runs. The GPU image has no
DeepSpeed unless its wheels are carried (benchmarks/gpu_check.sh); without it the engine is
`StandInEngine`, the arithmetic of DeepSpeed 0.19's bf16 step: the module in bf16 (forward
and backward in bf16, no autocast), fp32 master weights, the bf16 gradients copied to fp32,
clipped by global norm (optim.clip_grad), the client AdamW on the masters, the masters copied
back to bf16 (at ZeRO 0 also DeepSpeed's AdamW step on zero gradients at init); fp32 recipes:
AdamW on the weights after the clip. That is what DeepSpeed does at ZeRO 0
(FP16_UnfusedOptimizer) and, on one rank, at ZeRO 1 (the ZeRO optimizer), minus its
per-parameter Python loops and host reads (overflow flag, gradient norm): three steps of
both give the same losses (tests/test_trainer.py). With DeepSpeed there, the stand-in runs
too (`standin` variants), to show what those cost.

GPU (CUDA; issue 14), per preset (ViT-L mask 0.75 and ViT-B mask 0.9, as their recipes),
bf16, fed from uint8 clips already on the device, masks drawn by the model as in training
(seeded alike for every variant), within --budget seconds (each preset an equal share; JSON
rewritten after every measurement, so a killed run keeps what it measured):
  1. batch sweep of the eager step (ViT-L 8..128, ViT-B 32..512): stops at out-of-memory or
     when clips/s grows < 5%; the fastest batch is the "best batch";
  2. the plain model WITH SDPA at the best batch, same step (Conv3d over every patch, torch
     gathers, torch SDPA attention: mae_st / official style with fused attention);
  3. the variants at the best batch (`VARIANTS`, in run order): compile (train.compile
     blocks + loss, inductor), compile-ro (the same with mode reduce-overhead: CUDA graphs
     of each compiled region's forward and backward), standin / standin+compile (the
     stand-in engine, when DeepSpeed is the engine), graphs / compile+graphs (the whole step
     captured in one CUDA graph, GraphedStep: NOT a step the trainer can run, see
     engine/compile.py; an upper bound), ckpt (activation checkpointing; also at 2x the batch
     when the sweep ended in out-of-memory).
  The winner is the trainer-runnable variant on the trainer's engine with the most clips/s;
  MFU = engine.flops.mfu (docs/mfu.md: train-step FLOPs per clip x clips/s / the device's
  dense bf16 peak, 790 TFLOP/s on an H200); ratio = the best such variant at the plain
  model's batch / plain with SDPA. Peak memory is reset before and read after every
  measurement (it includes the fp32 copy of the weights every variant starts from).

CPU (no CUDA, no --smoke):
1. Tiny step (batch 4, 16 x 112^2, tube mask 0.75, the tiny recipe: fp32): the trainer's
   micro-batch on the stand-in engine, the same weights and masks for: plain (the official
   code's computation, frozen in `plain_model_class`: Conv3d over all patches, math
   attention, the phase block on every row, every token predicted, the mask-weighted loss
   over all N, and the official optimizer, torch AdamW's per-parameter loop on CPU), +fused
   attn (plain with our attention), ours (the trainer's model and optimizer: visible patches
   picked before the clip is converted, fused attention, the slice CLS computed once, the
   last decoder block, head and loss on the removed tokens only, fused AdamW); all must give
   the same first loss (relative 1e-5, checked). Best of interleaved repeats.
2. Trainer: `echofm pretrain` of the tiny recipe on shards of a synthetic corpus (DALI CPU
   decode, DeepSpeed): steps/s, sampled / decoded fps, data-wait fraction of step time.

Prints a table and writes train_gpu.json (CUDA) or train_cpu.json (CPU) into a new run
folder, or where --out says (benchmarks/results/... updates the committed results;
gpu_check.sh does); --smoke writes only to an explicit --out. The GPU table ends with the
issue's bar and the recipe line of each preset's winner. Shards are cached in
~/.cache/echofm/bench/train/ (`echofm bench --clean train` removes them).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the plain model


def plain_model_class():
    from echofm.engine import losses
    from echofm.engine.model import EchoFM
    from echofm.kernels import gather_patches, reference, tube_attention

    class PlainEchoFM(EchoFM):
        """The same EchoFM computed the plain way (mae_st / official code), frozen here as the
        reference: Conv3d over every patch of the normalised float clip, position embedding on
        all N tokens, then torch.gather of the visible ones; the phase block on every row of
        every slice; the decoder's prediction, the
        norm-pix target (every patch of the clip, Tensor.var) and the mask-weighted loss over
        all N tokens; the cycle prior from the whole clip in float."""

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

        def forward_phase(self, latent, mask):
            """The official projector: the whole block's q, k, v on every [slice CLS, slice
            tokens] row, slice attention, then the CLS rows."""
            if mask.grid is None:
                return super().forward_phase(latent, mask)
            c, blk = self.cfg, self.phase_block
            b, d = latent.shape[0], c.embed_dim
            cls = self.phase_cls_token.expand(b, c.t_grid, d)  # [B, T', D]
            t, k = mask.grid
            x = torch.cat([cls.unsqueeze(2), latent.view(b, t, k, d)], dim=2)  # [B, T', 1+K, D]
            q, kk, v = (a.transpose(1, 2) for a in blk.attn.qkv_heads(blk.norm1(x)))  # [B, H, T', 1+K, Dh]
            o = tube_attention(q, kk, v, "slice", backend=blk.attn.backend)[:, :, :, 0].transpose(1, 2)
            z = cls + blk.attn.proj(o.flatten(-2))
            z = z + blk.mlp(blk.norm2(z))
            return self.phase_norm(z)

        def plain_target(self, video):
            """[B, N, u*p*p*C]: every patch of the predicted frames (on CPU: the whole float clip
            normalised, then patchified; on CUDA the Triton gather, as before)."""
            c = self.cfg
            frames = video if c.pred_t_dim == c.num_frames else video[:, self.target_frames()]
            b, n, patch = video.shape[0], c.t_grid * c.l_grid, (c.pred_u, c.patch_size, c.patch_size)
            ids = torch.arange(n, device=video.device).expand(b, n).contiguous()
            if frames.is_cuda:
                x = gather_patches(frames, ids, patch, c.mean, c.std, backend=self._backend(frames))
            else:
                x = frames.float() if frames.dtype == torch.uint8 else frames
                scale, shift = reference.device_norm(c.in_chans, frames.dtype == torch.uint8, c.mean, c.std,
                                                     x.device, x.dtype)
                x = reference.gather_tokens(reference.patchify(x * scale + shift, patch), ids)
            x = x.view(b, n, c.in_chans, c.pred_u, c.patch_size, c.patch_size).permute(0, 1, 3, 4, 5, 2)
            return losses.work_dtype(x.reshape(b, n, c.pred_dim))

        def forward(self, video, mask=None, generator=None):
            if mask is None:
                mask = self.draw_mask(video.shape[0], video.device, generator)
            latent, _ = self.forward_encoder(video, mask)
            phase = losses.work_dtype(self.forward_phase(latent, mask))
            pred = losses.work_dtype(self.forward_decoder(latent, mask))
            lc = self.loss_cfg
            target = self.plain_target(video)
            if lc.norm_pix:
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                target = (target - mean) / (var + 1.0e-6) ** 0.5
            per_patch = (pred - target).pow(2).mean(-1)  # [B, N]
            rec = (per_patch * mask.mask).sum() / mask.mask.sum().clamp(min=1.0)
            sim = losses.phase_similarity(phase, lc.variant, lc.centre_eps)
            with torch.no_grad():  # the whole clip in float, then the channel mean
                x = losses.work_dtype(video).mean(-1)
                b, t = video.shape[:2]
                x = x.view(b, self.cfg.t_grid, t // self.cfg.t_grid, *x.shape[2:]).mean(2)
                x = F.adaptive_avg_pool2d(x, (lc.prior_grid, lc.prior_grid)).flatten(2)
                x = x - x.mean(-1, keepdim=True)
                x = F.normalize(x - lc.prior_center_alpha * x.mean(1, keepdim=True), dim=-1)
                prior = torch.bmm(x, x.transpose(1, 2)) if lc.phase_prior == "pixel" else sim.detach()
            valid = None if mask.grid is not None else mask.slice_valid()
            cyc = losses.cycle_kl(sim, prior.to(sim.dtype), lc.cycle_tau, valid)
            trip, active = losses.periodic_contrastive(sim, prior.to(sim.dtype), lc.triplet_margin, valid)
            loss = rec + lc.triplet_weight * trip + lc.cycle_weight * cyc
            terms = {"rec": rec.detach(), "triplet": trip.detach(), "cycle": cyc.detach(), "active": active.detach()}
            return {"loss": loss, "terms": terms, "pred": pred, "mask": mask.mask, "phase": phase}

    return PlainEchoFM


def official_adamw(groups: list[dict], cfg, lr: float, *, capturable: bool = False) -> torch.optim.AdamW:
    """The official training code's optimizer (MAE's main_pretrain): torch AdamW with its
    defaults, i.e. the per-parameter loop on CPU (foreach on CUDA)."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, capturable=capturable)


# ---------------------------------------------------------------- the trainer's step


def bench_recipe(preset: str, batch: int, overrides=(), *, ratio: float | None = None, precision: str | None = None):
    """The preset's recipe (recipes/pretrain/<preset>.yaml) at this batch, one micro-batch per
    step, with `overrides` (--set syntax) and optionally another mask ratio / precision."""
    from echofm.engine.config import load_recipe

    sets = [f"data.batch_size={batch}", "deepspeed.grad_accum=1"]
    sets += [f"mask.ratio={ratio}"] if ratio is not None else []
    sets += [f"deepspeed.precision={precision}"] if precision else []
    return load_recipe(ROOT / f"recipes/pretrain/{preset}.yaml", sets + list(overrides))


class StandInEngine:
    """DeepSpeed 0.19's step arithmetic without DeepSpeed (module docstring), with the interface
    `engine.step.micro_step` uses: module, __call__, backward, step, optimizer, global_steps.

    bf16 recipes: the module is cast to bf16 and AdamW (engine.optim.build_optimizer over
    param_groups, at the recipe's peak lr) steps fp32 masters; fp32: AdamW on the weights."""

    def __init__(self, model: torch.nn.Module, recipe, *, capturable: bool = False, optimizer_fn=None):
        from echofm.engine.optim import build_optimizer, param_groups, peak_lr

        if recipe.deepspeed.precision not in ("bf16", "fp32"):
            raise ValueError(f"StandInEngine: precision {recipe.deepspeed.precision!r} (bf16 or fp32 only)")
        self.module, self.clip, self.global_steps = model, recipe.optim.clip_grad or 0.0, 0
        groups = param_groups(model, recipe.optim.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.masters = None
        if recipe.deepspeed.precision == "bf16":
            model.to(torch.bfloat16)  # first, as DeepSpeed: the masters start from the bf16 weights
            self.masters = [p.detach().float() for p in self.params]
            for m in self.masters:
                m.grad = torch.zeros_like(m)  # fixed fp32 gradient buffers (a CUDA graph reuses them)
            index = {id(p): m for p, m in zip(self.params, self.masters)}
            groups = [{**g, "params": [index[id(p)] for p in g["params"]]} for g in groups]
        self.optimizer = (optimizer_fn or build_optimizer)(groups, recipe.optim,
                                                           peak_lr(recipe.optim, recipe.data.batch_size),
                                                           capturable=capturable)
        if self.masters is not None and recipe.deepspeed.zero_stage == 0:
            # As DeepSpeed's FP16_UnfusedOptimizer (bf16 at ZeRO 0) at init: one AdamW step on zero
            # gradients (its state starts at step 1; the masters get one weight-decay step).
            for m in self.masters:
                m.grad.zero_()
            self.optimizer.step()

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        weights = self.params if self.masters is None else self.masters
        if self.masters is not None:  # bf16 gradients -> fp32
            torch._foreach_copy_([m.grad for m in self.masters], [p.grad for p in self.params])
        if self.clip:
            torch.nn.utils.clip_grad_norm_(weights, self.clip, foreach=True)
        self.optimizer.step()
        if self.masters is not None:  # fp32 -> bf16
            torch._foreach_copy_([p.data for p in self.params], self.masters)
        for p in self.params:
            p.grad = None
        self.global_steps += 1


def deepspeed_available() -> str | None:
    """None when DeepSpeed imports, else why not (one line)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken install's own error
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    return None


def make_engine(kind: str, model: torch.nn.Module, recipe, *, capturable: bool = False, optimizer_fn=None):
    """The trainer's engine for `model` and `recipe`: "deepspeed" (engine.distributed.build_engine:
    prepare_model + DeepSpeed), or "standin" (prepare_model + StandInEngine; optimizer_fn:
    another optimizer builder than engine.optim.build_optimizer, e.g. `official_adamw`)."""
    from echofm.engine.distributed import build_engine, init_distributed, prepare_model, step_device

    if kind == "deepspeed":
        init_distributed()
        engine, _, _ = build_engine(model, recipe, world_size=1, total_steps=1000)
        return engine
    return StandInEngine(prepare_model(model, recipe, step_device()), recipe, capturable=capturable,
                         optimizer_fn=optimizer_fn)


def trainer_step(engine):
    """(video, mask) -> the loss: `engine.step.micro_step` on {"video": video}, the model
    drawing its own mask as in training (the mask argument is for GraphedStep's steps)."""
    from echofm.engine.step import micro_step

    def step(video, _mask=None):
        return micro_step(engine, {"video": video})[0].loss

    return step


def captured_step(engine):
    """The step without the host read, for GraphedStep (an upper bound: see engine/compile.py):
    forward with a given mask, backward, the stand-in's optimizer step."""
    def step(video, mask):
        loss = engine(video, mask=mask)["loss"]
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


# ---------------------------------------------------------------- CPU: the tiny step


def build_variants(preset: str, device: torch.device, ratio: float = 0.75,
                   names: tuple[str, ...] = ("plain", "+fused attn", "ours")):
    """{name: model} sharing one set of weights; attention backend per variant."""
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


LOSS_RTOL = 1e-5
"""The tiny step's variants compute one objective: their first losses agree to float32 rounding."""


def time_steps(models: dict, recipe, steps: int, device: torch.device, repeats: int = 5) -> dict:
    """Best-of-repeats time of the trainer's micro-batch (stand-in engine, `recipe`'s precision and
    optimizer) per variant: interleaved repeats, the same masks (seeded) for every variant; the
    best run counts: the machine is shared, contention only ever adds time."""
    c, batch = next(iter(models.values())).cfg, recipe.data.batch_size
    g = torch.Generator(device="cpu").manual_seed(1)
    video = torch.randint(0, 256, (batch, c.num_frames, c.img_size, c.img_size, c.in_chans),
                          generator=g, dtype=torch.uint8).to(device)
    # The plain variants step with the official code's optimizer, ours with the trainer's.
    steps_of = {n: trainer_step(make_engine("standin", m, recipe, optimizer_fn=None if n == "ours" else official_adamw))
                for n, m in models.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = {}
    for n, step in steps_of.items():  # same weights, same mask: the first losses agree
        torch.manual_seed(0)
        first[n] = step(video)
    ref = next(iter(first.values()))
    if any(abs(v - ref) > LOSS_RTOL * abs(ref) for v in first.values()):
        raise SystemExit(f"benchmarks/train.py: the variants' first losses differ (not the same objective): {first}")
    times = {n: [] for n in models}
    for r in range(repeats):
        for n, step in steps_of.items():
            step(video)  # warm-up of this round
            torch.manual_seed(1 + r)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(video)
            sync()
            times[n].append((time.perf_counter() - t0) / steps)
    out = {}
    for n in models:
        t = min(times[n])
        out[n] = {"step_s": t, "steps_per_s": 1 / t, "clips_per_s": batch / t,
                  "sampled_fps": batch * c.num_frames / t, "first_loss": first[n]}
    return out


# ---------------------------------------------------------------- the trainer on shards


def build_shards(cache: Path, videos: int, size: int) -> Path:
    """Synthetic corpus -> VP9 shards with the tiny recipe's stride 2 folded in (fold_stride 2,
    GOP 4: docs/data.md; cached by their full config: echofm.loaders.corpus) -> shard dir."""
    from echofm.loaders.corpus import cached_corpus
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.synth import SynthConfig

    return cached_corpus(SynthConfig(videos=videos, seed=0, min_size=128, max_size=192, max_frames=90),
                         IngestConfig(size=size, codec="vp9", progress=False, fold_stride=2, gop=4), cache,
                         log=lambda m: None)


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
            "decode_waste": statistics.mean(d["decode_waste"] for d in steady),
            "data_wait_fraction": wait / t, "wall_s": summary["wall_s"],
            "loss_first": summary["first_loss"], "loss_last": summary["last_loss"]}


# ---------------------------------------------------------------- the GPU step (issue 14)

# preset: (tube mask ratio of its recipe, per-GPU batches to sweep)
SWEEPS = {"echofm_vit_large": (0.75, (8, 16, 32, 64, 128)),
          "echofm_vit_base": (0.9, (32, 64, 128, 256, 512))}
SMOKE_SWEEPS = {"echofm_tiny": (0.75, (1, 2))}
GROWTH = 1.05  # the sweep stops when clips/s grows less than this from one batch to the next
COMPILE = ("train.compile.blocks=true", "train.compile.loss=true")
RO = ("train.compile.mode=reduce-overhead",)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One measured setting: recipe overrides on the preset's recipe, the engine ("trainer": the
    trainer's, DeepSpeed when it imports, else the stand-in; "standin"), and whether the whole
    step is captured in one CUDA graph (GraphedStep: not a step the trainer can run)."""

    overrides: tuple[str, ...] = ()
    engine: str = "trainer"
    graphs: bool = False


# In run order: the most informative first, since a tight budget skips the tail.
VARIANTS = {
    "eager": Variant(),
    "compile": Variant(COMPILE),
    "compile-ro": Variant(COMPILE + RO),
    "standin": Variant((), "standin"),
    "standin+compile": Variant(COMPILE, "standin"),
    "graphs": Variant((), "standin", graphs=True),
    "compile+graphs": Variant(COMPILE, "standin", graphs=True),
    "ckpt": Variant(("deepspeed.activation_checkpointing=true",)),
}
BAR = {"echofm_vit_large": 0.45, "echofm_vit_base": 0.35, "ratio": 1.3}
COMPILE_NEED_S = 45.0  # a compile variant starts only with this much of its preset's budget left


def timed(step, inputs: list, device: torch.device, target_s: float) -> tuple[float, int]:
    """Seconds per step over a window of about target_s (after 2 warm steps); inputs cycle
    through pre-drawn (video, mask) pairs. The trainer's step reads the host once per micro-batch
    (as in training); a graphed step syncs only at the window's ends."""
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


def _compiles(v: Variant) -> bool:
    return any(o.startswith("train.compile.") for o in v.overrides)


def _variant_recipe(run: dict, v: Variant, batch: int):
    """The preset's recipe for variant v at `batch`, or a reason to skip it."""
    if any(o.startswith("train.compile.mode=") for o in v.overrides) and run["compile_backend"] != "inductor":
        return None, f"mode needs inductor (--compile-backend {run['compile_backend']})"
    backend = (f"train.compile.backend={run['compile_backend']}",) if _compiles(v) else ()
    return bench_recipe(run["recipe"], batch, v.overrides + backend, ratio=run["ratio"], precision="bf16"), None


def measure(run: dict, variant: str, batch: int, model_fn, target_s: float) -> dict:
    """One variant at one batch: recipe, engine, first (compiling) step, timed window, peak memory."""
    from echofm.engine import compile as compiling
    from echofm.engine.flops import mfu

    device, v = run["device"], VARIANTS[variant]
    engine_kind = run["engine"] if v.engine == "trainer" else v.engine
    row = {"variant": variant, "batch": batch, "engine": engine_kind, "trainer_step": not v.graphs}
    recipe, why = _variant_recipe(run, v, batch)
    if why:
        return {**row, "skipped": why}
    row["recipe"] = [f"data.batch_size={batch}", *v.overrides]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engine = step = None
    try:
        engine = make_engine(engine_kind, model_fn(), recipe, capturable=v.graphs and cuda)
        model, inputs = engine.module, run["inputs"](batch)
        step = (captured_step if v.graphs else trainer_step)(engine)
        torch.manual_seed(batch)  # the same masks for every variant at this batch
        t0 = time.perf_counter()
        row["first_loss"] = float(compiling.first_step_or_eager(step, model, *inputs[0]))
        row["first_step_s"] = time.perf_counter() - t0
        row["compiled"] = compiling.is_compiled(model)
        if v.graphs:
            step = compiling.GraphedStep(step, *inputs[0], warmup=2)
            row["graphed"] = step.captured
        # Compile or capture unavailable (CPU) or failed: eager numbers, not this variant's.
        row["fell_back"] = (recipe.train.compile.enabled and not row["compiled"]) or (v.graphs and not row["graphed"])
        row["step_s"], row["timed_steps"] = timed(step, inputs, device, target_s)
        row.update(clips_per_s=batch / row["step_s"], sampled_fps=batch * run["frames"] / row["step_s"])
        if run["peak"]:
            row["mfu"] = mfu(run["flops"], row["clips_per_s"], run["peak"])
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:  # noqa: BLE001 -- one variant failing must not end the run
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    if cuda:
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del engine, step
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
    """batch -> [(uint8 video, mask)] * count, drawn once per batch (the same for every variant;
    the trainer's step draws its own masks, the graphed one takes these)."""
    cache: dict[int, list] = {}
    c = model.cfg

    def inputs(batch: int) -> list:
        if batch not in cache:
            cache.clear()  # one batch size at a time: ViT-B at 512 holds 1.2 GB of clips
            g = torch.Generator(device=device).manual_seed(batch)  # drawn on the device: seconds on a CPU
            video = torch.randint(0, 256, (batch, c.num_frames, c.img_size, c.img_size, c.in_chans),
                                  generator=g, dtype=torch.uint8, device=device)
            cache[batch] = [(video, model.draw_mask(batch, device, g)) for _ in range(count)]
        return cache[batch]

    return inputs


def run_preset(res: dict, preset: str, ratio: float, batches, run: dict, deadline: float, args, save) -> None:
    """Sweep, then the plain model with SDPA and each variant at the best batch; fills `res`
    in place and calls save() after each measurement (a killed run keeps what it measured)."""
    from echofm.engine.flops import model_flops
    from echofm.engine.model import EchoFM

    recipe = bench_recipe(preset, batches[0], ratio=ratio)
    torch.manual_seed(0)
    base = EchoFM(recipe.model, recipe.mask, recipe.loss).to(run["device"])  # fp32; each variant copies it
    run = dict(run, recipe=preset, ratio=ratio, flops=model_flops(recipe.model, recipe.mask, recipe.loss)["train_step"],
               frames=base.cfg.num_frames, inputs=preset_inputs(base, run["device"]))
    target = 0.05 if args.smoke else 1.0
    res.update(mask_ratio=ratio, engine=run["engine"], train_flops_per_clip=run["flops"],
               zero_stage=recipe.deepspeed.zero_stage,
               attention_dispatch=dispatch_decisions(base, run["inputs"](1)[0][1], run["device"]),
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
        m = plain_cls(dataclasses.replace(recipe.model, attn_backend="sdpa"), recipe.mask, recipe.loss)
        m.load_state_dict(base.state_dict())
        return m.to(run["device"])

    res["plain_sdpa"] = measure(run, "eager", b, plain, target)
    summarise(res)
    save()
    todo = [(n, n, b) for n in args.variants if n != "eager"
            and not (VARIANTS[n].engine == "standin" and not VARIANTS[n].graphs and run["engine"] == "standin")]
    if best["batch"] == ok[-1]["batch"] and "error" in res["sweep"][-1] and "ckpt" in args.variants:
        todo.append(("ckpt@2x", "ckpt", 2 * b))  # memory-bound sweep: checkpointing may fit more
    for key, name, batch in todo:
        need = COMPILE_NEED_S if _compiles(VARIANTS[name]) and not args.smoke else 0.0
        if deadline - time.perf_counter() < need or time.perf_counter() > deadline:
            res["variants"][key] = {"variant": name, "batch": batch, "skipped": "time budget"}
            continue
        r = res["variants"][key] = measure(run, name, batch, lambda: copy.deepcopy(base), target)
        print(f"   {key:15s} batch {batch}: " + (f"{r['clips_per_s']:9.1f} clips/s" if "step_s" in r
              else r.get("error", r.get("skipped"))), flush=True)
        summarise(res)
        save()


def dispatch_decisions(model, mask, device: torch.device) -> dict:
    """Which kernel runs each attention call of this model's training forward: `auto`'s choice
    for the tube_attention calls; SDPA for the calls with fewer queries than keys (the phase
    block's slice CLS queries, the decoder's last block on the removed tokens)."""
    from echofm.kernels import attention_backend

    c, (t, k) = model.cfg, mask.grid
    cls = int(getattr(c, "cls_embed", True))  # the encoder CLS is optional (VideoMAE has none)
    n = 1 + t * c.l_grid
    calls = {"encoder joint": (c.num_heads, 1, cls + t * k, c.embed_dim, "joint"),
             "decoder joint": (c.decoder_num_heads, 1, n, c.decoder_embed_dim, "joint")}
    out = {}
    for name, (h, tt, kk, d, mode) in calls.items():
        q = torch.empty(1, h, tt, kk, d // h, device=device, dtype=torch.bfloat16)
        out[name] = {"tokens": tt * kk if mode == "joint" else kk, "Dh": d // h,
                     "backend": attention_backend(q, mode, train=True)}
    if c.decoder_depth > 1:
        out["decoder joint"]["blocks"] = c.decoder_depth - 1
    else:  # its only block is the last
        del out["decoder joint"]
    out["phase slice, CLS queries"] = {"tokens": 1 + k, "Dh": c.embed_dim // c.num_heads, "backend": "sdpa"}
    out["decoder last block, removed-token queries"] = {"tokens": n, "Dh": c.decoder_embed_dim // c.decoder_num_heads,
                                                        "backend": "sdpa"}
    return out


def summarise(res: dict) -> None:
    """Winner (most clips/s among the trainer-runnable variants on the trainer's engine), its MFU
    and recipe line; the best of the other engine and of the whole-step graphs (upper bound);
    ours / plain-with-SDPA at the plain model's batch."""
    done = {n: r for n, r in res["variants"].items() if "step_s" in r and not r.get("fell_back")}
    ours = {n: r for n, r in done.items() if r["trainer_step"] and r["engine"] == res["engine"]}
    if not ours:
        return
    win = max(ours, key=lambda n: ours[n]["clips_per_s"])
    res.update(winner=win, winner_batch=ours[win]["batch"], mfu=ours[win].get("mfu"),
               winner_recipe=" ".join(ours[win]["recipe"]))
    for key, pick in (("best_other_engine", lambda r: r["trainer_step"] and r["engine"] != res["engine"]),
                      ("upper_bound", lambda r: not r["trainer_step"])):
        rows = {n: r for n, r in done.items() if pick(r)}
        top = max(rows, key=lambda n: rows[n]["clips_per_s"], default=None)
        res[key] = ({"variant": top, "engine": rows[top]["engine"], "clips_per_s": rows[top]["clips_per_s"],
                     "mfu": rows[top].get("mfu")} if top else None)
    plain = res.get("plain_sdpa", {})
    if "step_s" in plain:
        same = {n: r for n, r in ours.items() if r["batch"] == plain["batch"]}
        top = max(same, key=lambda n: same[n]["clips_per_s"])
        res["ratio_vs_plain_sdpa"] = same[top]["clips_per_s"] / plain["clips_per_s"]
        res["ratio_vs_plain_sdpa_variant"] = top
        res["ratio_eager_vs_plain_sdpa"] = done["eager"]["clips_per_s"] / plain["clips_per_s"]


def gpu_section(args, device: torch.device, save_json) -> dict:
    """Every preset within args.budget seconds (each gets an equal share of what is left)."""
    from echofm.engine.flops import H200_BF16_PEAK, device_peak

    peak = (device_peak(torch.cuda.get_device_name()) or H200_BF16_PEAK) if device.type == "cuda" else None
    no_ds = deepspeed_available()
    engine = "standin" if no_ds else "deepspeed"
    sweeps = SMOKE_SWEEPS if args.smoke else {p: SWEEPS[p] for p in args.presets}
    out = {"peak_bf16_flops": peak, "budget_s": args.budget, "variants_run": list(args.variants), "engine": engine,
           "deepspeed": no_ds or "imports", "presets": {}}
    print(f"engine: {engine}" + (f" (deepspeed: {no_ds})" if no_ds else ""), flush=True)
    run = {"device": device, "peak": peak, "engine": engine, "compile_backend": args.compile_backend}

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
        run_preset(res, preset, ratio, batches, run, deadline, args, save)
    save()
    return out


def bar(out: dict) -> dict:
    """ViT-L MFU >= 0.45, ViT-B MFU >= 0.35, ours / plain-with-SDPA >= 1.3 (each preset)."""
    p = out["presets"]
    line = {"vit_l_mfu": p.get("echofm_vit_large", {}).get("mfu"),
            "vit_b_mfu": p.get("echofm_vit_base", {}).get("mfu"),
            "ratio_vit_b": p.get("echofm_vit_base", {}).get("ratio_vs_plain_sdpa"),
            "ratio_vit_l": p.get("echofm_vit_large", {}).get("ratio_vs_plain_sdpa"),
            "engine": out.get("engine")}
    checks = [(line["vit_l_mfu"], BAR["echofm_vit_large"]), (line["vit_b_mfu"], BAR["echofm_vit_base"]),
              (line["ratio_vit_b"], BAR["ratio"]), (line["ratio_vit_l"], BAR["ratio"])]
    line["pass"] = all(v is not None and v >= goal for v, goal in checks)
    return line


def _fmt(v, pct=True) -> str:
    return "n/a" if v is None else (f"{v:.1%}" if pct else f"{v:.2f}x")


def print_gpu(out: dict) -> None:
    print(f"\n{'preset':18s} {'variant':15s} {'engine':9s} {'batch':>5s} {'step s':>8s} {'clips/s':>9s} {'MFU':>6s} "
          f"{'peak GiB':>8s} {'first s':>8s}  note")
    for preset, res in out["presets"].items():
        rows = [("sweep", r) for r in res["sweep"]] + [(n, r) for n, r in res.get("variants", {}).items()]
        rows += [("plain+sdpa", res["plain_sdpa"])] if "plain_sdpa" in res else []
        for name, r in rows:
            head = (f"{preset:18s} {(r['variant'] if name == 'sweep' else name):15s} {r.get('engine', ''):9s} "
                    f"{r['batch']:5d}")
            if "step_s" not in r:
                print(f"{head}  {r.get('error') or r.get('skipped')}")
                continue
            note = (" (sweep)" if name == "sweep" else " (fell back to eager)" if r.get("fell_back")
                    else " (upper bound: not the trainer's step)" if not r.get("trainer_step", True) else "")
            print(f"{head} {r['step_s']:8.4f} {r['clips_per_s']:9.1f} {_fmt(r.get('mfu')):>6s} "
                  f"{r.get('peak_memory_gib', 0):8.1f} {r['first_step_s']:8.1f}  loss {r['first_loss']:.4f}{note}")
        print(f"{preset}: attention " + ", ".join(f"{n} ({d['tokens']} tokens, Dh {d['Dh']}) -> {d['backend']}"
                                                  for n, d in res.get("attention_dispatch", {}).items()))
        if "winner" in res:
            ratio = res.get("ratio_vs_plain_sdpa")
            print(f"{preset}: winner {res['winner']} ({res['engine']}) at batch {res['winner_batch']}, MFU "
                  f"{_fmt(res['mfu'])}" + (f"; ours ({res['ratio_vs_plain_sdpa_variant']}) / plain+sdpa at batch "
                                           f"{res['plain_sdpa']['batch']}: {ratio:.2f}x (eager/eager "
                                           f"{res['ratio_eager_vs_plain_sdpa']:.2f}x)" if ratio else ""))
            for key, what in (("best_other_engine", "other engine"), ("upper_bound", "whole-step graph")):
                if res.get(key):
                    o = res[key]
                    print(f"{preset}: best {what}: {o['variant']} ({o['engine']}) {o['clips_per_s']:.1f} clips/s, "
                          f"MFU {_fmt(o['mfu'])}")
            print(f"{preset}: recipe: {res['winner_recipe']}")
    b = out["bar"]
    print(f"bar ({b['engine']} engine): ViT-L MFU {_fmt(b['vit_l_mfu'])} (>= 45%), ViT-B MFU {_fmt(b['vit_b_mfu'])} "
          f"(>= 35%), ours / plain+sdpa ViT-B {_fmt(b['ratio_vit_b'], False)}, ViT-L {_fmt(b['ratio_vit_l'], False)} "
          f"(>= 1.3x): {'PASS' if b['pass'] else 'not met'}")


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="trainer steps on shards (CPU)")
    ap.add_argument("--step-iters", type=int, default=4, help="timed steps per repeat (CPU step benchmark)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: what the trainer picks: cores minus 1 decode thread)")
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--cache", type=Path, default=None, help="default: engine.bench.cache_dir('train')")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="the GPU section on CPU: tiny preset, batches 1-2 (checks the code; numbers mean nothing)")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the GPU section, all presets")
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
        from echofm.engine.distributed import cpu_threads
        from echofm.engine.trainer import TrainConfig

        args.threads = 8 if cuda else cpu_threads(TrainConfig(), argparse.Namespace(num_threads=1))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    res: dict = {"host": platform.node(), "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "threads": args.threads, "torch": torch.__version__}
    from echofm.engine import bench

    args.cache = args.cache or bench.cache_dir("train")
    out = args.out or (None if args.smoke else bench.results_path("train", None, f"train_{device.type}.json"))

    def save_json(extra: dict | None = None) -> None:
        """Written after each stage, so a run cut short by its time limit keeps what it measured."""
        res.update(extra or {})
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1, default=str) + "\n")

    if cuda or args.smoke:
        import triton

        res.update(triton=triton.__version__, step="engine.step.micro_step (benchmarks/train.py docstring)")
        print_gpu(gpu_section(args, device, save_json))
    else:
        cpu_section(args, device, res)
    if out is not None:
        bench.write_json(out, res)
    if not args.skip_trainer and not cuda and not args.smoke:
        bench.announce_cache(args.cache)
    return 0


def cpu_section(args, device: torch.device, res: dict) -> None:
    """The tiny step (plain vs ours) and the trainer on shards, on this CPU."""
    print("1. tiny step: plain vs ours (batch 4, 16 x 112^2, mask 0.75)", flush=True)
    variants = build_variants("echofm_tiny", device)
    res["tiny_step"] = time_steps(variants, bench_recipe("echofm_tiny", 4), args.step_iters, device)
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
    print(f"tiny step ours vs plain: {res['tiny_ratio_ours_vs_plain']:.2f}x (bar >= 1.5, same first loss)")
    if "trainer_tiny" in res:
        t = res["trainer_tiny"]
        print(f"trainer echofm_tiny (B {t['batch']}, {t['num_frames']} x {t['size']}^2): "
              f"{t['steps_per_s']:.2f} "
              f"steps/s, sampled {t['sampled_fps']:,.0f} fps, decoded {t['decoded_fps']:,.0f} fps "
              f"(decode waste {t['decode_waste']:.2f}), data wait {t['data_wait_fraction']:.1%} of step time (bar < 10%)")


if __name__ == "__main__":
    sys.exit(main())
