"""`echofm finetune` and `echofm evaluate`: one downstream run from a recipe, and its re-check.

A run folder (`downstream.out_dir/<recipe name>/`) holds:

    results.json      every metric of val and test with patient-bootstrap CIs, the task
                      (classes), the head spec, the backbone (spec, kind, weight
                      fingerprint), the label-fraction draw, timings and the full recipe
    head.safetensors  the trained head (video head or segmentation decoder)
    backbone/         fine-tune only: the fine-tuned backbone (EchoFM.save_pretrained)
    finetune/         fine-tune only: the training run (checkpoints/, metrics.jsonl, summary.json;
                      `echofm finetune R --resume auto` continues it)
    recipe.yaml       the resolved recipe
    test_*.png        confusion matrix / EF scatter + Bland-Altman / segmentation overlays
    test_predictions.csv  one row per video: key, patient, label, prediction (video tasks)
    cache/            probe features, keyed by the shards' content (manifest sha256), the
                      backbone fingerprint and the stream settings (never by the shard path)

`evaluate` rebuilds backbone + head from that folder, recomputes the features of the same
splits with the same stream settings and writes evaluate.json: the same numbers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..yaml_io import dump_yaml, to_dict
from . import backbone as B
from . import evaluation as E
from .backbone import pick_device
from .config import DownstreamConfig
from .data import present_splits
from .features import cached_extract, extract
from .heads import SegDecoder, VideoHead
from .tasks import SegTask, Task, make_task

RESULTS, HEAD, BACKBONE_DIR, FINETUNE_DIR = "results.json", "head.safetensors", "backbone", "finetune"


def head_spec(head: torch.nn.Module, task: Task, model) -> dict:
    if isinstance(head, SegDecoder):
        return {"type": "seg", "dim": model.cfg.embed_dim, "num_classes": head.cls.out_channels,
                "hidden": head.proj.out_features, "tubelet": head.tubelet, "frame_size": head.frame_size}
    kind = "linear" if isinstance(head.net, torch.nn.Linear) else "mlp"
    first = head.net if kind == "linear" else head.net[0]
    return {"type": "video", "in_dim": first.in_features, "out_dim": task.out_dim, "kind": kind,
            "hidden": first.out_features if kind == "mlp" else 0}


def build_head(spec: dict) -> torch.nn.Module:
    if spec["type"] == "seg":
        return SegDecoder(spec["dim"], spec["num_classes"], hidden=spec["hidden"], tubelet=spec["tubelet"],
                          frame_size=spec["frame_size"])
    return VideoHead(spec["in_dim"], spec["out_dim"], kind=spec["kind"], hidden=spec["hidden"] or 256)


def _json_safe(x):
    """NaN / inf -> null so results.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _png_name(task: Task, split: str) -> str:
    return f"{split}_" + {"classification": "confusion", "regression": "ef", "segmentation": "seg"}[task.kind] + ".png"


def score_splits(task: Task, head, model, recipe, run_dir: Path, device: torch.device,
                 cached: dict | None = None, cache_dir: Path | None = None) -> dict:
    """Metrics of the val and test splits (those present in the manifest)."""
    cfg: DownstreamConfig = recipe.downstream
    splits = present_splits(recipe.data.shards)
    grid = isinstance(task, SegTask)
    out = {}
    for split in dict.fromkeys((cfg.val_split, cfg.test_split)):
        if not splits.get(split):
            continue
        fs = (cached or {}).get(split) or cached_extract(
            model, {"fingerprint": B.fingerprint(model)}, recipe.data, split, cfg.test_clips,
            cache_dir=cache_dir, features=cfg.features, grid=grid, device=device, batch=cfg.feature_batch)
        out[split] = E.score(task, head, fs, png=run_dir / _png_name(task, split),
                             title=f"{recipe.name} {split}", csv_path=run_dir / f"{split}_predictions.csv")
    return out


def run(recipe, log=print, *, resume: str | None = None) -> dict:
    """`echofm finetune RECIPE`: train the head (probe) or everything (finetune), score
    val and test, write the run folder. Returns the results dict.

    resume (mode finetune): continue the training in `<run>/finetune/` ("auto" or a
    checkpoint path). Under several ranks only rank 0 scores and writes the results (the
    others return {} after training)."""
    from safetensors.torch import save_file

    cfg: DownstreamConfig = recipe.downstream
    device = pick_device(cfg.device)
    run_dir = Path(cfg.out_dir) / recipe.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_yaml(recipe))
    t0 = time.time()
    model, info = B.load_backbone(cfg.backbone, recipe, seed=cfg.seed)
    recipe.validate(model.cfg, what=f"the backbone '{cfg.backbone}'")  # the clips must fit it
    present_splits(recipe.data.shards)  # a missing / bad manifest fails before any feature is computed
    grid = cfg.task == "seg"
    cache_dir = run_dir / "cache"
    kw = dict(features=cfg.features, grid=grid, device=device, batch=cfg.feature_batch)
    cached = {}
    if cfg.mode == "probe":
        from .probe import fit_seg_probe, fit_video_probe

        train_fs = cached_extract(model, info, recipe.data, cfg.train_split, cfg.train_clips,
                                  cache_dir=cache_dir, **kw)
        t_feat = time.time() - t0
        task = make_task(cfg, train_fs.metas)
        t1 = time.time()
        if grid:
            head, fit = fit_seg_probe(task, train_fs, cfg, tubelet=model.cfg.tubelet, frame_size=model.cfg.img_size)
        else:
            splits = present_splits(recipe.data.shards)
            val_fs = None
            if splits.get(cfg.val_split):
                val_fs = cached[cfg.val_split] = cached_extract(model, info, recipe.data, cfg.val_split,
                                                                cfg.test_clips, cache_dir=cache_dir, **kw)
            t1 = time.time()
            head, fit = fit_video_probe(task, train_fs, val_fs, cfg)
        fit.update(feature_seconds=round(t_feat, 2), head_seconds=round(time.time() - t1, 2))
        log(f"probe head trained in {fit['head_seconds']:.1f}s on {fit['train_clips']} clips "
            f"({fit['train_patients']} patients)")
    else:
        from .data import list_samples
        from .finetune import finetune

        task = make_task(cfg, list_samples(recipe.data.shards, cfg.train_split))
        net, fit = finetune(task, model, recipe, run_dir=run_dir / FINETUNE_DIR, resume=resume, log=log)
        if fit["rank"] != 0:
            return {}
        model, head = net.backbone, net.head
        model.save_pretrained(run_dir / BACKBONE_DIR)
        info = dict(info, fingerprint=B.fingerprint(model), finetuned=str(run_dir / BACKBONE_DIR))
    metrics = score_splits(task, head, model, recipe, run_dir, device, cached, cache_dir)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(run_dir / HEAD))
    results = {"name": recipe.name, "task": task.summary(), "mode": cfg.mode,
               "label_fraction": cfg.label_fraction, "backbone": info, "head": head_spec(head, task, model),
               "fit": fit, "metrics": metrics, "seconds": round(time.time() - t0, 2),
               "config": to_dict(recipe)}
    results = _json_safe(results)
    (run_dir / RESULTS).write_text(json.dumps(results, indent=1))
    log(summary_line(results))
    return results


def evaluate(recipe, checkpoint: str | Path, log=print) -> dict:
    """`echofm evaluate RECIPE --checkpoint RUN_DIR`: reload backbone + head of a finished
    run, recompute val/test metrics, write RUN_DIR/evaluate.json. Returns its dict."""
    from safetensors.torch import load_file

    run_dir = Path(checkpoint)
    try:
        saved = json.loads((run_dir / RESULTS).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir / RESULTS}: not a finished downstream run ({e})") from None
    cfg: DownstreamConfig = recipe.downstream
    if saved["task"]["name"] != cfg.task:
        raise UserError(f"{run_dir}: the head is for task {saved['task']['name']!r}, the recipe says "
                        f"downstream.task={cfg.task!r}")
    device = pick_device(cfg.device)
    if (run_dir / BACKBONE_DIR).is_dir():
        model, info = B.load_backbone(f"export:{run_dir / BACKBONE_DIR}", recipe)
    else:
        spec = saved["backbone"]["spec"]
        model, info = B.load_backbone(spec, recipe, seed=saved["backbone"].get("seed") or 0)
    if info["fingerprint"] != saved["backbone"]["fingerprint"]:
        raise UserError(f"{run_dir}: the backbone now loaded from '{info['spec']}' (weights "
                        f"{info['fingerprint']}) is not the one the head was trained on "
                        f"({saved['backbone']['fingerprint']})")
    recipe.validate(model.cfg, what=f"the backbone '{info['spec']}'")
    task = make_task(dataclasses.replace(cfg, classes=list(saved["task"]["classes"])), [])
    head = build_head(saved["head"])
    head.load_state_dict(load_file(str(run_dir / HEAD)))
    metrics = {}
    splits = present_splits(recipe.data.shards)
    for split in saved["metrics"]:
        if not splits.get(split):
            raise UserError(f"{recipe.data.shards}: split {split!r} (scored by the run) is not in the shards")
        fs = extract(model, recipe.data, split, cfg.test_clips, features=cfg.features,
                     grid=isinstance(task, SegTask), device=device, batch=cfg.feature_batch)
        metrics[split] = E.score(task, head, fs, png=run_dir / f"evaluate_{_png_name(task, split)}",
                                 title=f"{recipe.name} {split} (evaluate)")
    out = _json_safe({"name": recipe.name, "checkpoint": str(run_dir), "task": task.summary(),
                      "backbone": info, "metrics": metrics})
    (run_dir / "evaluate.json").write_text(json.dumps(out, indent=1))
    log(summary_line(out))
    return out


def summary_line(results: dict) -> str:
    """One line per split: value [CI] of each headline metric."""
    lines = []
    for split, res in results["metrics"].items():
        parts = [f"{k} {v['value']:.4g} [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}]"
                 for k, v in res.items() if isinstance(v, dict) and v.get("value") is not None]
        lines.append(f"{results['name']} {split}: " + ", ".join(parts))
    return "\n".join(lines)


def _fmt(v) -> str:
    return "nan" if v is None else f"{v:.4g}"
