"""Full fine-tune: backbone + head trained end to end on the trainer's DeepSpeed engine,
with layer-wise lr decay (the top encoder block gets `backbone_lr`, each block below
`layer_decay` times less, the patch embedding least; the head gets `lr`).
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from . import backbone as B
from .config import DownstreamConfig
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
        f = B.encode(self.backbone, video, self.features, grid=self.grid)
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
    from ..optim import no_decay

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


def finetune(task: Task, backbone: nn.Module, recipe, device: torch.device, log=print) -> tuple[DownstreamNet, dict]:
    """Train backbone + head on the label-fraction patients of the train split.
    Returns (the trained net on the CPU, in eval mode; info for the results)."""
    from echofm.loaders.stream import ClipStream

    from ..trainer import build_engine, init_distributed

    cfg: DownstreamConfig = recipe.downstream
    metas = list_samples(recipe.data.shards, cfg.train_split)
    keep = label_fraction_patients(metas, task.stratum, cfg.label_fraction, cfg.seed)
    grid = isinstance(task, SegTask)
    torch.manual_seed(cfg.seed)
    if grid:
        c = backbone.cfg
        head = SegDecoder(c.embed_dim, len(cfg.seg_labels) + 1, hidden=cfg.hidden, tubelet=c.tubelet,
                          frame_size=c.img_size)
    else:
        head = VideoHead(B.pooled_dim(backbone, cfg.features), task.out_dim, kind=cfg.head, hidden=cfg.hidden)
        if task.kind == "regression":
            ys = torch.tensor([task.target(m) for m in metas if patient_of(m) in keep
                               and task.target(m) is not None], dtype=torch.float32)
            head.set_output_stats(ys[:, None])
    net = DownstreamNet(backbone, head, cfg.features, grid)

    data = dataclasses.replace(recipe.data, split=cfg.train_split, segmentation=grid)
    _, world, _, _ = init_distributed()
    stream = ClipStream(data, train=True, rank=0, world_size=1, device=device)
    steps = cfg.epochs * len(stream)
    run_recipe = dataclasses.replace(recipe, data=data, schedule=dataclasses.replace(
        recipe.schedule, warmup_steps=cfg.warmup_epochs * len(stream)))
    groups = layer_decay_groups(net, cfg, recipe.optim.weight_decay)
    lrs = {str(g["layer"]): g["lr"] for g in groups}
    for g in groups:
        del g["layer"]
    engine, _, _ = build_engine(net, run_recipe, world_size=world, total_steps=steps, param_groups=groups)
    engine.train()
    t0, n_steps, clips, last = time.time(), 0, 0, float("nan")
    for epoch in range(cfg.epochs):
        stream.set_epoch(epoch)
        for b in stream:
            rows = [i for i, m in enumerate(b["meta"]) if patient_of(m) in keep and task.target(m) is not None]
            if not rows:
                continue
            video = b["video"][rows].to(engine.device)
            out = engine(video)
            if grid:
                valid = torch.stack([annotated_frames(b["meta"][i], b["frames_index"][i].cpu()) for i in rows])
                loss = task.loss(out, task.remap(b["seg"][rows].to(out.device)), valid.to(out.device))
            else:
                y = torch.as_tensor([task.target(b["meta"][i]) for i in rows], device=out.device)
                if task.kind == "regression":
                    y = (y.float() - net.head.out_mean[0]) / net.head.out_std[0]
                loss = task.loss(out, y)
            engine.backward(loss)
            engine.step()
            n_steps, clips, last = n_steps + 1, clips + len(rows), float(loss.detach())
        log(f"finetune epoch {epoch + 1}/{cfg.epochs}: loss {last:.4f}, {clips} clips, "
            f"{time.time() - t0:.1f}s")
    # fp32 on the CPU: what `evaluate` reloads, so both score with the same numerics.
    net = engine.module.float().to("cpu").eval()
    return net, {"train_patients": len(keep), "steps": n_steps, "train_clips_seen": clips,
                 "final_loss": last, "lr_by_layer": lrs, "seconds": time.time() - t0}
