"""Full fine-tune: backbone + head trained end to end by the pretraining `Trainer` (the same
step, DeepSpeed engine, checkpoints, resume and per-rank data), with layer-wise lr decay
(the top encoder block gets `backbone_lr`, each block below `layer_decay` times less, the
patch embedding least; the head gets `lr`). Only the labelled clips of the label-fraction
patients are streamed, so every batch is full and every rank gets an equal share.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch
from torch import nn

from echofm.loaders.stream import ClipStream

from ..distributed import init_distributed
from ..downstream_config import DownstreamConfig
from ..errors import ConfigError
from ..optim import no_decay
from ..resume import resume_point
from ..trainer import Trainer
from . import backbone as backbones
from .data import annotated_frames, label_fraction_patients, list_samples, patient_of
from .heads import SegDecoder, VideoHead
from .tasks import SegTask, Task

# EchoFM parameters that `encode` never uses (the MAE decoder): frozen, not optimised.
UNUSED_PREFIXES = ("decoder_", "mask_token")


class DownstreamNet(nn.Module):
    """backbone + head. forward: video uint8 [B, T, H, W, C] -> the head's raw output
    (logits [B, C], standardised EF [B, 1], or seg logits [B, K, T, H, W])."""

    def __init__(self, backbone: nn.Module, head: nn.Module, features: str, grid: bool):
        super().__init__()
        self.backbone, self.head, self.features, self.grid = backbone, head, features, grid

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        f = backbones.encode(self.backbone, video, self.features, grid=self.grid)
        return self.head(f) if self.grid else self.head.raw(f)


def layer_id(name: str, depth: int) -> int:
    """0: patch embedding, tokens, position embeddings; i + 1: encoder block i;
    depth + 1: final norm and the phase projector."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(net: DownstreamNet, cfg: DownstreamConfig, weight_decay: float) -> list[dict]:
    """AdamW groups with per-group lr: backbone layer i gets
    backbone_lr * layer_decay ** (depth + 1 - i); the head gets `lr`. No decay on 1-D
    parameters, tokens and position embeddings."""
    depth = net.backbone.cfg.depth
    groups: dict[tuple, dict] = {}
    for name, p in net.backbone.named_parameters():
        if name.startswith(UNUSED_PREFIXES):
            p.requires_grad_(False)
            continue
        lid = layer_id(name, depth)
        wd = 0.0 if no_decay(name, p) else weight_decay
        g = groups.setdefault((lid, wd), {"params": [], "weight_decay": wd, "layer": lid,
                                          "lr": cfg.backbone_lr * cfg.layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
    for name, p in net.head.named_parameters():
        wd = 0.0 if p.ndim <= 1 else weight_decay
        groups.setdefault(("head", wd), {"params": [], "weight_decay": wd, "layer": "head",
                                         "lr": cfg.lr})["params"].append(p)
    return list(groups.values())


def finetune(task: Task, backbone: nn.Module, recipe, *, run_dir: Path, resume: str | None = None,
             log=print, head: nn.Module | None = None) -> tuple[DownstreamNet, dict]:
    """Train backbone + head on the label-fraction patients of the train split, on the
    pretraining `Trainer` (non-finite skip, checkpoints, resume, SIGTERM save); every rank
    reads its own part of those patients' clips.

    run_dir: the training folder (checkpoints/, metrics.jsonl, summary.json, recipe.yaml);
    resume: None (fresh; refuses a folder with checkpoints), "auto" or a checkpoint path, as
    `echofm pretrain --resume`. head: a trained video head to start from (LP-FT: e.g. a
    linear probe's on this backbone's features) instead of a fresh one. Returns (the trained
    net on the CPU, in eval mode; info for the results)."""
    cfg: DownstreamConfig = recipe.downstream
    if recipe.deepspeed.zero_stage == 3:
        raise ConfigError("deepspeed.zero_stage=3 partitions the parameters, which the fine-tuned backbone "
                          "is read back from; fine-tune with zero_stage 0-2")
    start = resume_point(resume, run_dir, folder_key="downstream.out_dir")
    dist = init_distributed(recipe.train.collective_timeout_s)
    metas = list_samples(recipe.data.shards, cfg.train_split)
    keep = label_fraction_patients(metas, task.stratum, cfg.label_fraction, cfg.seed)
    net = _build_net(task, backbone, cfg, metas, keep) if head is None else \
        DownstreamNet(backbone, head.train(), cfg.features, grid=False)
    grid = isinstance(task, SegTask)
    data = dataclasses.replace(recipe.data, split=cfg.train_split, segmentation=grid)
    keys = {m["key"] for m in metas if patient_of(m) in keep and task.target(m) is not None}
    stream = ClipStream(data, train=True, rank=dist.rank, world_size=dist.world, device=dist.device, keys=keys)
    steps = cfg.epochs * len(stream)
    run_recipe = dataclasses.replace(recipe, data=data, schedule=dataclasses.replace(
        recipe.schedule, warmup_steps=cfg.warmup_epochs * len(stream)))
    groups = layer_decay_groups(net, cfg, recipe.optim.weight_decay)
    lrs = {str(g.pop("layer")): g["lr"] for g in groups}
    trainer = Trainer(run_recipe, net, stream, dist=dist, run_dir=run_dir, steps=steps, seed=cfg.seed,
                      loss_fn=partial(task_loss, task, net.head), param_groups=groups, name="finetune",
                      resume_from=start)
    summary = trainer.fit()
    log(f"finetune: {summary['steps']} steps ({cfg.epochs} epochs of {len(stream)}), loss "
        f"{summary['first_loss']} -> {summary['last_loss']}, {summary['wall_s']} s")
    # fp32 on the CPU: what `evaluate` reloads, so both score with the same numerics.
    net = trainer.engine.module.float().to("cpu").eval()
    return net, {"train_patients": len(keep), "steps": summary["steps"],
                 "train_clips_seen": stream.stats["clips"] * dist.world, "final_loss": summary["last_loss"],
                 "lr_by_layer": lrs, "seconds": summary["wall_s"], "rank": dist.rank, "ranks": dist.world,
                 "resumed_from": summary["resumed_from"]}


def _build_net(task: Task, backbone: nn.Module, cfg: DownstreamConfig, metas: list[dict],
               keep: set[str]) -> DownstreamNet:
    """backbone + a fresh head (seeded: the same on every rank)."""
    torch.manual_seed(cfg.seed)
    if isinstance(task, SegTask):
        c = backbone.cfg
        head = SegDecoder(c.embed_dim, len(cfg.seg_labels) + 1, hidden=cfg.hidden, tubelet=c.tubelet,
                          frame_size=c.img_size)
        return DownstreamNet(backbone, head, cfg.features, grid=True)
    head = VideoHead(backbones.pooled_dim(backbone, cfg.features), task.out_dim, kind=cfg.head, hidden=cfg.hidden)
    if task.kind == "regression":
        ys = torch.tensor([task.target(m) for m in metas if patient_of(m) in keep
                           and task.target(m) is not None], dtype=torch.float32)
        head.set_output_stats(ys[:, None])
    return DownstreamNet(backbone, head, cfg.features, grid=False)


def task_loss(task: Task, head: nn.Module, engine, batch: dict) -> tuple[torch.Tensor, dict, None]:
    """The fine-tune's forward for the Trainer: the task's loss on the head's raw output
    (EF standardised by the head's output stats; segmentation on annotated frames only)."""
    video, meta = batch["video"], batch["meta"]
    out = engine(video.to(engine.device))
    if task.kind == "segmentation":
        valid = torch.stack([annotated_frames(m, fi) for m, fi in zip(meta, batch["frames_index"].cpu())])
        return task.loss(out, task.remap(batch["seg"].to(out.device)), valid.to(out.device)), {}, None
    y = torch.as_tensor([task.target(m) for m in meta], device=out.device)
    if task.kind == "regression":
        y = (y.float() - head.out_mean[0]) / head.out_std[0]
    return task.loss(out, y), {}, None
