"""Linear probe: frozen backbone, features cached once, a head trained on them in seconds.

Video-level tasks train a `VideoHead` on pooled features; the weight decay is picked on the
val split from a fixed grid (the same rule for every backbone, so comparisons are fair).
Segmentation trains the light `SegDecoder` on the frozen token grids.
`compare_backbones` runs the same probes on several backbones (the demo's last step).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from echofm.loaders.errors import DataError

from ..downstream_config import DownstreamConfig
from . import evaluation
from . import metrics as task_metrics
from .backbone import check_model_section, load_backbone, pick_device
from .data import label_fraction_patients, patient_of, present_splits
from .features import FeatureSet, extract
from .heads import SegDecoder, VideoHead
from .tasks import SegTask, Task, make_task

WD_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def training_rows(task: Task, fs: FeatureSet, cfg: DownstreamConfig) -> tuple[list[int], set[str]]:
    """Rows of labelled clips whose patient is in the label-fraction draw."""
    keep = label_fraction_patients(fs.metas, task.stratum, cfg.label_fraction, cfg.seed)
    rows = [i for i, m in enumerate(fs.metas) if patient_of(m) in keep and task.target(m) is not None]
    if not rows:
        raise DataError(f"no labelled training clips for task {task.name!r} (label '{task.key}') in the "
                        "training split")
    return rows, keep


def train_video_head(task: Task, x: torch.Tensor, y: torch.Tensor, cfg: DownstreamConfig,
                     wd: float) -> VideoHead:
    """x: float [N, F] features; y: int [N] classes or float [N] EF. Mini-batch Adam with
    an L2 penalty `wd` on the weights; seeded, so the same inputs give the same head."""
    with _one_thread():
        return _train_video_head(task, x, y, cfg, wd)


class _one_thread:
    """Head training is thousands of tiny matmuls: thread hand-offs cost more than they
    save (10x slower on 2 busy cores), so it runs on one thread."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _train_video_head(task: Task, x: torch.Tensor, y: torch.Tensor, cfg: DownstreamConfig,
                      wd: float) -> VideoHead:
    torch.manual_seed(cfg.seed)
    head = VideoHead(x.shape[1], task.out_dim, kind=cfg.head, hidden=cfg.hidden)
    head.set_input_stats(x)
    if task.kind == "regression":
        head.set_output_stats(y.float()[:, None])
        y = (y.float() - head.out_mean[0]) / head.out_std[0]
    weights = [p for n, p in head.named_parameters() if p.ndim > 1]
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(x)
    for _ in range(cfg.epochs):
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            loss = task.loss(head.raw(x[idx]), y[idx]) + wd * sum((w ** 2).sum() for w in weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def _val_score(task: Task, res: dict) -> float:
    """Higher is better: accuracy for classifiers (then macro-F1), -MAE for EF."""
    if task.kind == "regression":
        return -res["mae"]["value"]
    return res["accuracy"]["value"] + 1e-3 * np.nan_to_num(res["macro_f1"]["value"])


def fit_video_probe(task: Task, train: FeatureSet, val: FeatureSet | None,
                    cfg: DownstreamConfig) -> tuple[VideoHead, dict]:
    """Train on the label-fraction rows of `train`; pick the weight decay on `val`."""
    rows, keep = training_rows(task, train, cfg)
    x = train.feats[rows].float()
    y = torch.as_tensor([task.target(train.metas[i]) for i in rows])
    grid = WD_GRID if (cfg.select_wd and val is not None and len(val.metas)) else (cfg.weight_decay,)
    best = None
    for wd in grid:
        head = train_video_head(task, x, y, cfg, wd)
        s = _val_score(task, evaluation.score_video_task(task, head, val, bootstrap=0)) if len(grid) > 1 else 0.0
        if best is None or s > best[0]:
            best = (s, wd, head)
    info = {"weight_decay": best[1], "train_patients": len(keep), "train_clips": len(rows),
            "val_selection": _val_name(task) if len(grid) > 1 else None}
    return best[2], info


def _val_name(task: Task) -> str:
    return "mae" if task.kind == "regression" else "accuracy"


def fit_seg_probe(task: SegTask, train: FeatureSet, cfg: DownstreamConfig, *, tubelet: int,
                  frame_size: int) -> tuple[SegDecoder, dict]:
    """Train the light decoder on frozen token grids [N, T', h, w, D] (float16 cache)."""
    rows, keep = training_rows(task, train, cfg)
    torch.manual_seed(cfg.seed)
    dec = SegDecoder(train.feats.shape[-1], len(cfg.seg_labels) + 1, hidden=cfg.hidden,
                     tubelet=tubelet, frame_size=frame_size)
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows_t = torch.as_tensor(rows)
    dec.train()
    for _ in range(cfg.epochs):
        for idx in rows_t[torch.randperm(len(rows), generator=gen)].split(cfg.batch_size):
            out = dec(train.feats[idx].float())
            loss = task.loss(out, task.remap(train.seg[idx]), train.valid[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return dec.eval(), {"train_patients": len(keep), "train_clips": len(rows)}


def compare_backbones(backbones: dict[str, str], recipe, *, tasks: tuple[str, ...] = ("view", "ef"),
                      log=print) -> dict[str, dict[str, dict]]:
    """Linear probes of several backbones on the same shards, same clips, same rules.

    backbones: {name: spec} (spec as `downstream.backbone`; 'random' takes the architecture
    of the first non-random backbone, so the baseline differs only in its weights).
    recipe: data (shards, clip shape) and the downstream settings. Each backbone's
    train / val / test features are computed once and shared by every task.
    Returns {name: {task: test-split metrics (+ 'fit')}}."""
    cfg: DownstreamConfig = recipe.downstream
    device = pick_device(cfg.device)
    splits = present_splits(recipe.data.shards)
    order = sorted(backbones, key=lambda k: backbones[k] == "random")
    arch = None
    out: dict[str, dict[str, dict]] = {}
    for name in order:
        r = recipe if (backbones[name] != "random" or arch is None) else dataclasses.replace(recipe, model=arch)
        model, info = load_backbone(backbones[name], r, seed=cfg.seed)
        arch = arch or model.cfg
        check_model_section(r, model, backbones[name])
        recipe.validate(model.cfg, what=f"the backbone '{backbones[name]}'")
        t0 = time.time()
        kw = dict(features=cfg.features, grid=False, device=device, batch=cfg.feature_batch)
        train = extract(model, recipe.data, cfg.train_split, cfg.train_clips, **kw)
        val = extract(model, recipe.data, cfg.val_split, cfg.test_clips, **kw) if splits.get(cfg.val_split) else None
        test = extract(model, recipe.data, cfg.test_split, cfg.test_clips, **kw)
        t_feat = time.time() - t0
        out[name] = {}
        for task_name in tasks:
            tcfg = dataclasses.replace(cfg, task=task_name, label_key="", classes=[])
            task = make_task(tcfg, train.metas)
            t1 = time.time()
            head, fit = fit_video_probe(task, train, val, tcfg)
            fit.update(feature_seconds=round(t_feat, 2), head_seconds=round(time.time() - t1, 2))
            res = evaluation.score_video_task(task, head, test)
            res["fit"] = fit
            keys, y, scores, patients = evaluation.video_predictions(task, head, test)
            pred = scores.argmax(1) if task.kind == "classification" else scores[:, 0]
            res["per_video"] = {"key": keys, "patient": patients, "y": y.tolist(), "pred": pred.tolist()}
            out[name][task_name] = res
        log(f"probe [{name}] features {t_feat:.1f}s; " + format_row(out[name]))
    return out


HEADLINE = {"view": "accuracy", "ef": "mae", "grade": "accuracy"}


def format_row(res: dict[str, dict]) -> str:
    return ", ".join(f"{t} {HEADLINE[t]} {r[HEADLINE[t]]['value']:.3f} "
                     f"[{r[HEADLINE[t]]['ci_low']:.3f}, {r[HEADLINE[t]]['ci_high']:.3f}]" for t, r in res.items())


def paired_gap(results: dict[str, dict[str, dict]], task: str, a: str = "pretrained", b: str = "random", *,
               samples: int = 1000, ci: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Headline-metric gap of `a` over `b` on the same test videos (positive = `a` better:
    accuracy a - b, MAE b - a) with a PAIRED patient bootstrap: each resample draws
    patients once and scores both backbones on them, so the shared test-set noise cancels."""
    va, vb = results[a][task]["per_video"], results[b][task]["per_video"]
    if va["key"] != vb["key"]:
        raise ValueError(f"{a} and {b} were scored on different videos")
    y, pa, pb = np.asarray(va["y"]), np.asarray(va["pred"]), np.asarray(vb["pred"])
    if HEADLINE[task] == "mae":
        def gap(i):
            return task_metrics.mae(y[i], pb[i]) - task_metrics.mae(y[i], pa[i])
    else:
        def gap(i):
            return task_metrics.accuracy(y[i], pa[i]) - task_metrics.accuracy(y[i], pb[i])
    lo, hi = task_metrics.bootstrap_ci(gap, va["patient"], samples=samples, ci=ci, seed=seed)
    return {"value": gap(np.arange(len(y))), "ci_low": lo, "ci_high": hi}
