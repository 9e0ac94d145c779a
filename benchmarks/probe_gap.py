"""Where does the pretrained-vs-random linear-probe gap come from? A diagnostic sweep.

    python benchmarks/probe_gap.py --shards demo_out/shards \
        --backbone pretrained=demo_out/export [--backbone long=runs/x/checkpoints/step_00003000] \
        [--layers 0,3] [--out FILE]

The demo's probe (`compare_backbones`) reads one feature recipe off the last layer. This
sweep runs the SAME probe (`fit_video_probe`: standardised features, linear head, weight
decay picked on val; test-clip averaging) on every listed backbone plus a random init,
for each encoder layer (block outputs; the last one after the final norm) and three
poolings, plus two floors that need no backbone:

    mean       mean token of the layer                      [N, D]
    mean+dyn   mean token and the std over the T' slices
               of each slice's mean token (motion)          [N, 2D]
    grid+dyn   per grid position: the mean over T' and the
               std over T' of the token (layout + motion)   [N, 2 h w D]
    pixels     the clip's mean frame at 7 x 7 and the per-pixel temporal std at 14 x 14
               (a linear model on raw pixel statistics)
    chance     EF: predict the training mean; view: the majority class

Prints a table (view accuracy up, EF MAE down; test split, 95% CI over patients) and
writes probe_gap.json to a new run folder runs/bench/probe_gap-<timestamp>/ (or to --out:
the committed numbers are --out benchmarks/results/probe_gap.json). The shards are only
read. If the pretrained rows do no better than the random init, and the pixel
floor beats both, the pretraining has not yet learned anything a linear head can use.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from echofm.engine import bench

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("view", "ef")


@torch.no_grad()
def layer_features(model, data, split: str, clips: int, layers: list[int], *,
                   pixels: bool = False) -> tuple[dict, list[dict]]:
    """-> ({(layer, pooling): float [N, F]}, metas) for every clip of `split`; with
    pixels=True also {"pixels": float [N, 49 + 196]} from the same decoded clips."""
    from echofm.engine.downstream.features import stream_config
    from echofm.loaders.stream import ClipStream

    acts: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, o: acts.append(o)) for blk in model.blocks]
    c = model.cfg
    grid = (c.num_frames // c.tubelet, c.img_size // c.patch_size, c.img_size // c.patch_size, c.embed_dim)
    feats: dict = {}
    metas: list[dict] = []
    try:
        for b in ClipStream(stream_config(data, split, clips, batch=8, seg=False), train=False):
            acts.clear()
            tokens, _, _ = model.encode(b["video"])
            per_layer = [a[:, 1:] for a in acts[:-1]] + [tokens]  # last block: after the final norm
            for i in layers:
                g = per_layer[i].reshape(len(tokens), *grid).float()  # [B, T', h, w, D]
                per_slice = g.mean((2, 3))                             # [B, T', D]
                mean, dyn = per_slice.mean(1), per_slice.std(1, unbiased=False)
                feats.setdefault((i, "mean"), []).append(mean)
                feats.setdefault((i, "mean+dyn"), []).append(torch.cat([mean, dyn], 1))
                feats.setdefault((i, "grid+dyn"), []).append(torch.cat([g.mean(1).flatten(1),
                                                                        g.std(1, unbiased=False).flatten(1)], 1))
            if pixels:
                feats.setdefault("pixels", []).append(pixel_stats(b["video"]))
            metas += [dict(m) for m in b["meta"]]
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in feats.items()}, metas


def pixel_stats(video: torch.Tensor) -> torch.Tensor:
    """uint8 [B, T, H, W, C] -> float [B, 49 + 196]: the mean frame at 7 x 7 and the
    per-pixel temporal std at 14 x 14 (grey, [0, 1])."""
    v = video.float().mean(-1) / 255.0                                # [B, T, H, W]
    mean = F.adaptive_avg_pool2d(v.mean(1, keepdim=True), 7).flatten(1)
    std = F.adaptive_avg_pool2d(v.std(1, keepdim=True), min(14, v.shape[-1])).flatten(1)
    return torch.cat([mean, std], 1)


def probe(cfg, task_name: str, feats: dict[str, torch.Tensor], metas: dict[str, list[dict]]) -> dict:
    """The demo's linear probe on precomputed features -> headline metric with its CI."""
    from echofm.engine.downstream import evaluation
    from echofm.engine.downstream.features import FeatureSet
    from echofm.engine.downstream.probe import HEADLINE, fit_video_probe
    from echofm.engine.downstream.tasks import make_task

    tcfg = dataclasses.replace(cfg, task=task_name, label_key="", classes=[])
    fs = {s: FeatureSet(feats=feats[s], metas=metas[s]) for s in feats}
    task = make_task(tcfg, fs["train"].metas)
    head, fit = fit_video_probe(task, fs["train"], fs.get("val"), tcfg)
    m = evaluation.score_video_task(task, head, fs["test"])[HEADLINE[task_name]]
    return {"value": m["value"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "weight_decay": fit["weight_decay"]}


def chance(task_name: str, metas: dict[str, list[dict]]) -> float:
    """EF: MAE of predicting the training mean per test video; view: majority-class accuracy."""
    def videos(ms):
        return {m["key"]: m for m in ms}.values()
    if task_name == "ef":
        mu = np.mean([m["labels"]["ef"] for m in videos(metas["train"])])
        return float(np.mean([abs(m["labels"]["ef"] - mu) for m in videos(metas["test"])]))
    views = [m["view"] for m in videos(metas["train"])]
    top = max(sorted(set(views)), key=views.count)  # ties: the first name
    return float(np.mean([m["view"] == top for m in videos(metas["test"])]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--backbone", action="append", default=[], metavar="NAME=SPEC",
                    help="an export dir or training checkpoint; repeatable (a random init is always added)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "pretrain" / "echofm_tiny.yaml"))
    ap.add_argument("--layers", default="", help="encoder block outputs to probe, e.g. 0,2,4 (default: all)")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--out", default=None, help="results JSON (default: a new run folder)")
    args = ap.parse_args()

    from echofm.engine.config import load_recipe
    from echofm.engine.downstream.backbone import load_backbone
    from echofm.engine.downstream.data import present_splits

    recipe = load_recipe(args.recipe, [f"data.shards={args.shards}", f"downstream.bootstrap={args.bootstrap}"])
    cfg = recipe.downstream
    backbones = dict(b.split("=", 1) for b in args.backbone)
    backbones["random"] = "random"
    present = present_splits(recipe.data.shards)
    splits = {s: n for s, n in (("train", cfg.train_clips), ("val", cfg.test_clips), ("test", cfg.test_clips))
              if present.get(s)}
    if "train" not in splits or "test" not in splits:
        raise SystemExit(f"{args.shards}: needs train and test splits, has {sorted(present)}")
    torch.manual_seed(0)
    rows, arch, metas, pix = [], None, {}, {}
    t0 = time.time()
    for name, spec in backbones.items():
        r = recipe if arch is None or spec != "random" else dataclasses.replace(recipe, model=arch)
        model, info = load_backbone(spec, r, seed=cfg.seed)
        arch = arch or model.cfg
        depth = len(model.blocks)
        layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(depth))
        # the first backbone's decode pass also yields the pixel floor's statistics
        per_split = {s: layer_features(model.eval(), recipe.data, s, n, layers, pixels=not pix)
                     for s, n in splits.items()}
        metas = {s: v[1] for s, v in per_split.items()}
        pix = pix or {s: v[0].pop("pixels") for s, v in per_split.items()}
        for key in per_split["train"][0]:
            feats = {s: v[0][key] for s, v in per_split.items()}
            row = {"backbone": name, "spec": spec, "layer": key[0], "last": key[0] == depth - 1, "pooling": key[1]}
            row.update({t: probe(cfg, t, feats, metas) for t in TASKS})
            rows.append(row)
            print(_fmt(row), flush=True)
    row = {"backbone": "pixels", "spec": "", "layer": None, "last": False, "pooling": "mean7+std14"}
    row.update({t: probe(cfg, t, pix, metas) for t in TASKS})
    rows.append(row)
    print(_fmt(row))
    floors = {t: chance(t, metas) for t in TASKS}
    print(f"chance: view accuracy {floors['view']:.3f} (majority class), EF MAE {floors['ef']:.2f} (training mean)")
    out = {"shards": str(Path(args.shards).resolve()), "test_videos": len({m["key"] for m in metas["test"]}),
           "train_videos": len({m["key"] for m in metas["train"]}), "chance": floors, "rows": rows,
           "seconds": round(time.time() - t0, 1), "host": platform.node(), "torch": torch.__version__}
    bench.write_json(bench.results_path("probe_gap", args.out, "probe_gap.json"), out, recipe)


def _fmt(r: dict) -> str:
    layer = "-" if r["layer"] is None else f"{r['layer']}{'*' if r['last'] else ''}"
    v, e = r["view"], r["ef"]
    return (f"{r['backbone']:<12} layer {layer:<3} {r['pooling']:<12} view acc {v['value']:.3f} "
            f"[{v['ci_low']:.2f}, {v['ci_high']:.2f}]   EF MAE {e['value']:6.2f} [{e['ci_low']:.1f}, {e['ci_high']:.1f}]")


if __name__ == "__main__":
    sys.exit(main())
