"""Supervised reference on the demo corpus: what a small 3D CNN learns from scratch with
every label. The ceiling the demo's pretrained-vs-random comparison is read against, and
the check that the synthetic task carries a learnable signal at the demo's size.

    python benchmarks/supervised_ref.py [--shards demo_out/shards] [--epochs 40]
        [--out benchmarks/results/supervised_ref.json] [--no-probe]

Without --shards it builds the demo's corpus (`engine.demo.demo_synth_config`) and its
shards (VP9, 112^2) under --work, timing both. The clips are the demo's (recipe
echofm_tiny: 16 frames, stride 2, 112^2, read through the same DALI stream), decoded once
into memory: `--train-clips` evenly spaced clips per training video (each epoch draws one
per video), `--test-clips` per test video (predictions averaged per video).

`Small3DCNN`: four conv3d blocks (3x3x3, batch norm, ReLU; spatial stride 2, temporal
stride 2 in the last two), pooled into the mean feature and, per place, the std and the
range over time averaged over places (how much each place changes over the cycle: what EF
needs); two linear heads, view (cross-entropy) and standardised EF (MSE), trained jointly
with AdamW and a cosine schedule, one seed, on the train split only. Augmented (shift
+-8 px, gain x0.8-1.25, time reversal: none changes a view or an EF): without it the CNN
memorises the ~100 training clips (train EF MAE 3, test at chance).

Rows of the table (test split, held-out patients; 95% CI from a patient bootstrap):
    cnn          the CNN above
    pixels       the demo's linear probe on pixel statistics (mean frame 7x7, per-pixel
                 temporal std 14x14; weight decay picked on val)
    random_vit   the demo's linear probe on a random-init echofm_tiny: view accuracy far
                 below 1 says the views are not trivially separable by random features
    chance       majority training view; EF: the training mean
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echofm.engine import bench

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "echofm_tiny.yaml"
METRICS = ("view_accuracy", "ef_mae", "ef_r2")


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ---------------------------------------------------------------- data


def build_demo_shards(work: Path, seed: int) -> tuple[Path, dict, dict]:
    """The demo's corpus and shards under `work` (reused when there) -> (shards, corpus
    config, {stage: wall and CPU seconds})."""
    from echofm.engine.demo import DemoConfig, demo_synth_config
    from echofm.loaders.ingest import IngestConfig, ingest
    from echofm.loaders.synth import make_corpus

    cfg = demo_synth_config(DemoConfig(seed=seed))
    corpus, shards, secs = work / "corpus", work / "shards", {}
    t, c = time.perf_counter(), cpu_seconds()
    if not (corpus / "labels.csv").is_file():
        make_corpus(corpus, cfg)
    secs["synth_s"], secs["synth_cpu_s"] = round(time.perf_counter() - t, 1), round(cpu_seconds() - c, 1)
    t, c = time.perf_counter(), cpu_seconds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 112 < 128 px is intended for CPU runs
        ingest([corpus], shards, IngestConfig(size=112, codec="vp9", progress=False))
    secs["ingest_s"], secs["ingest_cpu_s"] = round(time.perf_counter() - t, 1), round(cpu_seconds() - c, 1)
    return shards, dataclasses.asdict(cfg), secs


def load_split(data, split: str, clips: int) -> tuple[torch.Tensor, list[dict]]:
    """Every video of `split`, `clips` evenly spaced clips each -> (uint8 [N, T, H, W]
    grey, metas [N]); the clips of one video are consecutive rows."""
    from echofm.engine.downstream.features import stream_config
    from echofm.loaders.stream import ClipStream

    videos, metas = [], []
    for b in ClipStream(stream_config(data, split, clips, batch=8, seg=False), train=False):
        videos.append(b["video"][..., 0].cpu())  # grey: the three channels are equal
        metas += [dict(m) for m in b["meta"]]
    keys = [m["key"] for m in metas]
    if not metas or any(len(set(keys[i:i + clips])) != 1 for i in range(0, len(keys), clips)):
        raise SystemExit(f"{data.shards}: split {split!r} is empty or its clips are not grouped by video")
    return torch.cat(videos), metas


# ---------------------------------------------------------------- the CNN


def _block(cin: int, cout: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class Small3DCNN(nn.Module):
    """uint8 or float [B, T, H, W] grey clips (0-255) -> (view logits [B, V], standardised EF [B])."""

    def __init__(self, views: int, width: int = 8):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(_block(1, w, (1, 2, 2)), _block(w, 2 * w, (1, 2, 2)),
                                   _block(2 * w, 4 * w, (2, 2, 2)), _block(4 * w, 8 * w, (2, 2, 2)))
        self.view = nn.Linear(3 * 8 * w, views)
        self.ef = nn.Linear(3 * 8 * w, 1)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (video.float() / 255.0 - 0.2)[:, None] / 0.25          # [B, 1, T, H, W]
        s = self.trunk(x)                                           # [B, C, T', h, w]
        # how much each place changes over the clip, then averaged over places: pooling over
        # space first would cancel the LV emptying against the atria filling
        f = torch.cat([s.mean((2, 3, 4)), s.std(2).mean((2, 3)), (s.amax(2) - s.amin(2)).mean((2, 3))], 1)
        return self.view(f), self.ef(f)[:, 0]                       # f: [B, 3C]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B, T, H, W] -> float [B, T, H, W]: one shift of up to 8 px (zero fill), a gain
    of 0.8-1.25 per clip, and half of the clips played backwards."""
    b, _, h, w = x.shape
    dy, dx = torch.randint(-8, 9, (2,), generator=gen).tolist()
    out = F.pad(x.float(), (8, 8, 8, 8))[:, :, 8 + dy:8 + dy + h, 8 + dx:8 + dx + w]
    out = (out * torch.empty(b, 1, 1, 1).uniform_(0.8, 1.25, generator=gen)).clamp_(0, 255)
    back = torch.rand(b, generator=gen) < 0.5
    out[back] = out[back].flip(1)
    return out


def train_cnn(model: Small3DCNN, x: torch.Tensor, view: torch.Tensor, ef: torch.Tensor, clips: int, *,
              epochs: int, batch: int, lr: float, seed: int, log=print) -> None:
    """x: uint8 [V * clips, T, H, W] (clips of a video consecutive); view int [V]; ef float
    [V] standardised. Each epoch visits every video once, with one random clip of it."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    n = len(view)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(batch):
            rows = idx * clips + torch.randint(clips, (len(idx),), generator=gen)
            logits, pred = model(augment(x[rows], gen))
            loss = F.cross_entropy(logits, view[idx]) + F.mse_loss(pred, ef[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == 0:
            log(f"  epoch {epoch + 1}/{epochs}: loss {total / n:.3f} ({time.perf_counter() - t0:.0f} s)")


@torch.no_grad()
def predict(model: Small3DCNN, x: torch.Tensor, clips: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (view class [V], standardised EF [V]), clip outputs averaged per video."""
    model.eval()
    logits, ef = zip(*(model(x[i:i + 16]) for i in range(0, len(x), 16)))
    prob = torch.cat(logits).softmax(1)
    return (prob.reshape(-1, clips, prob.shape[1]).mean(1).argmax(1).numpy(),
            torch.cat(ef).reshape(-1, clips).mean(1).numpy())


# ---------------------------------------------------------------- scoring


def score(view_y, view_p, ef_y, ef_p, patients, *, bootstrap: int, seed: int) -> dict:
    """View accuracy, EF MAE and R^2 with patient-bootstrap CIs (arrays: one row per video)."""
    from echofm.engine.downstream import metrics as task_metrics

    fns = {"view_accuracy": lambda i: task_metrics.accuracy(view_y[i], view_p[i]),
           "ef_mae": lambda i: task_metrics.mae(ef_y[i], ef_p[i]), "ef_r2": lambda i: task_metrics.r2(ef_y[i], ef_p[i])}
    return task_metrics.with_ci(fns, patients, samples=bootstrap, ci=0.95, seed=seed)


def _probe_rows(results: dict) -> dict:
    """compare_backbones-style {task: metrics} -> this table's row."""
    pick = lambda m: {k: m[k] for k in ("value", "ci_low", "ci_high")}  # noqa: E731
    return {"view_accuracy": pick(results["view"]["accuracy"]), "ef_mae": pick(results["ef"]["mae"]),
            "ef_r2": pick(results["ef"]["r2"])}


def pixel_probe(recipe, splits: dict[str, tuple[torch.Tensor, list[dict]]]) -> dict:
    """The demo's linear probe (view, EF) on pixel statistics of the decoded clips."""
    from echofm.engine.downstream import evaluation
    from echofm.engine.downstream.features import FeatureSet
    from echofm.engine.downstream.probe import fit_video_probe
    from echofm.engine.downstream.tasks import make_task

    fs = {}
    for name, (x, metas) in splits.items():
        v = x.float() / 255.0                                               # [N, T, H, W]
        mean = F.adaptive_avg_pool2d(v.mean(1, keepdim=True), 7).flatten(1)  # [N, 49]
        std = F.adaptive_avg_pool2d(v.std(1, keepdim=True), 14).flatten(1)   # [N, 196]
        fs[name] = FeatureSet(feats=torch.cat([mean, std], 1), metas=metas)
    out = {}
    for task_name in ("view", "ef"):
        cfg = dataclasses.replace(recipe.downstream, task=task_name, label_key="", classes=[])
        task = make_task(cfg, fs["train"].metas)
        head, _ = fit_video_probe(task, fs["train"], fs["val"], cfg)
        out[task_name] = evaluation.score_video_task(task, head, fs["test"])
    return _probe_rows(out)


def random_vit_probe(recipe) -> dict:
    """The demo's linear probe (view, EF) on a random-init echofm_tiny."""
    from echofm.engine.downstream.probe import compare_backbones

    return _probe_rows(compare_backbones({"random": "random"}, recipe, tasks=("view", "ef"),
                                         log=lambda *_: None)["random"])


# ---------------------------------------------------------------- main


def reference(args, recipe) -> tuple[dict, dict, dict]:
    """Decode, train the CNN, score every row -> (rows, counts, seconds)."""
    secs = {}
    t = time.perf_counter()
    splits = {"train": load_split(recipe.data, "train", args.train_clips),
              "val": load_split(recipe.data, "val", args.test_clips),
              "test": load_split(recipe.data, "test", args.test_clips)}
    secs["decode_s"] = round(time.perf_counter() - t, 1)
    (x_tr, m_tr), (x_te, m_te) = splits["train"], splits["test"]
    v_tr, v_te = m_tr[::args.train_clips], m_te[::args.test_clips]  # one meta per video
    views = sorted({m["view"] for m in v_tr})
    vy_tr = torch.tensor([views.index(m["view"]) for m in v_tr])
    vy_te = np.array([views.index(m["view"]) if m["view"] in views else -1 for m in v_te])
    ef_tr, ef_te = (np.array([m["labels"]["ef"] for m in v]) for v in (v_tr, v_te))
    mu, sd = ef_tr.mean(), ef_tr.std()
    patients = [str(m["patient"]) for m in v_te]
    print(f"supervised reference: {len(v_tr)} train / {len(v_te)} test videos ({len(set(patients))} "
          f"test patients), {args.train_clips} clips per train video, {args.epochs} epochs", flush=True)

    torch.manual_seed(args.seed)
    model = Small3DCNN(len(views), args.width)
    t = time.perf_counter()
    train_cnn(model, x_tr, vy_tr, torch.tensor((ef_tr - mu) / sd, dtype=torch.float32), args.train_clips,
              epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed)
    secs["train_s"] = round(time.perf_counter() - t, 1)
    vp, ep = predict(model, x_te, args.test_clips)
    top = int(np.bincount(vy_tr.numpy()).argmax())
    kw = dict(bootstrap=args.bootstrap, seed=args.seed)
    rows = {"cnn": score(vy_te, vp, ef_te, ep * sd + mu, patients, **kw)}
    if not args.no_probe:
        t = time.perf_counter()
        rows["pixels"] = pixel_probe(recipe, splits)
        rows["random_vit"] = random_vit_probe(recipe)
        secs["probes_s"] = round(time.perf_counter() - t, 1)
    rows["chance"] = score(vy_te, np.full_like(vy_te, top), ef_te, np.full(len(ef_te), mu), patients, **kw)
    counts = {"train_videos": len(v_tr), "test_videos": len(v_te), "test_patients": len(set(patients)),
              "views": views}
    return rows, counts, secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=Path, help="a shard folder (default: build the demo's under --work)")
    ap.add_argument("--work", type=Path, default=Path("demo_out_ref"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--train-clips", type=int, default=4)
    ap.add_argument("--test-clips", type=int, default=4)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--no-probe", action="store_true", help="skip the pixel and random-ViT probes")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: a new run folder runs/bench/supervised_ref-<timestamp>/; the "
                    "committed numbers: --out benchmarks/results/supervised_ref.json)")
    args = ap.parse_args()
    if min(args.epochs, args.batch, args.train_clips, args.test_clips) < 1:
        ap.error("--epochs, --batch, --train-clips and --test-clips must be >= 1")

    from echofm.engine.config import load_recipe

    t0 = time.perf_counter()
    corpus, secs = None, {}
    shards = args.shards
    if shards is None:
        shards, corpus, secs = build_demo_shards(args.work, args.seed)
    recipe = load_recipe(RECIPE, [f"data.shards={shards}", f"downstream.bootstrap={args.bootstrap}"])
    rows, counts, more = reference(args, recipe)
    secs.update(more, total_s=round(time.perf_counter() - t0, 1))
    print_table(rows)
    out = {"shards": str(Path(shards).resolve()), **counts, "corpus": corpus,
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "rows": rows, "seconds": secs, "threads": torch.get_num_threads(), "host": platform.node(),
           "torch": torch.__version__}
    print(f"seconds: {secs}")
    bench.write_json(bench.results_path("supervised_ref", args.out, "supervised_ref.json"), out, recipe)
    return 0


def print_table(rows: dict) -> None:
    print(f"{'test split':<14}{'view accuracy':>24}{'EF MAE':>24}{'EF R^2':>24}")
    for name, r in rows.items():
        print(f"{name:<14}" + "".join(f"{r[k]['value']:.3f} [{r[k]['ci_low']:.2f}, {r[k]['ci_high']:.2f}]".rjust(24)
                                      for k in METRICS))


if __name__ == "__main__":
    sys.exit(main())
