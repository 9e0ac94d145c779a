"""`echofm finetune` and `echofm evaluate`: one downstream run from a recipe, and its re-check.

A run folder (`downstream.out_dir/<recipe name>/`, printed at the start) holds:

    results.json      every metric of val and test with patient-bootstrap CIs, the task
                      (classes), the head spec, the backbone (spec, kind, weight
                      fingerprint), the label-fraction draw, timings, warnings (CIs on few
                      patients, a missing val split), the full recipe and the provenance
                      (echofm version, git commit, recipe hash, package versions)
    head.safetensors  the trained head (video head or segmentation decoder)
    backbone/         fine-tune only: the fine-tuned backbone (EchoFM.save_pretrained)
    finetune/         fine-tune only: the training run (checkpoints/, metrics.jsonl, train.log,
                      summary.json; `echofm finetune R --resume auto` continues it)
    recipe.yaml       the resolved recipe (what `echofm evaluate RUN_DIR` starts from)
    test_*.png        confusion matrix / EF scatter + Bland-Altman / segmentation overlays
    test_predictions.csv  one row per video: key, patient, label, prediction (video tasks)
    cache/            probe features, keyed by the shards' content (manifest sha256), the
                      backbone fingerprint and the stream settings (never by the shard path)

A run needs a non-empty train and test split (one-line error naming the split otherwise);
without a val split it warns and scores test only. `evaluate` rebuilds backbone + head from
that folder with the run's own recipe.yaml (plus any --set), recomputes the features of the
same splits with the same stream settings and writes evaluate.json: the same numbers. With
`data` (an external cohort: another shard set, e.g. one with only a test split) it scores
the run's splits that cohort has and writes evaluate_<cohort folder name>.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from echofm.loaders.errors import DataError
from echofm.loaders.shards import manifest_sha256

from ..downstream_config import DownstreamConfig
from ..errors import UserError
from ..export import publish
from ..provenance import provenance
from ..yaml_io import dump_yaml, to_dict
from . import backbone as backbones
from . import evaluation
from .backbone import pick_device
from .data import present_splits
from .features import cached_extract
from .heads import SegDecoder, VideoHead
from .tasks import SegTask, Task, make_task

RESULTS, HEAD, BACKBONE_DIR, FINETUNE_DIR, RECIPE = (
    "results.json", "head.safetensors", "backbone", "finetune", "recipe.yaml")


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


# ---------------------------------------------------------------- splits


def require_splits(shards: str, needed: dict[str, str]) -> dict[str, int]:
    """{split: recipe key naming it} must each have samples; -> the manifest's split counts.
    A UserError names the first empty split, what the shards have, and the fix."""
    splits = present_splits(shards)
    for split, key in needed.items():
        if not splits.get(split):
            have = ", ".join(f"{k} {v}" for k, v in sorted(splits.items()) if v) or "no samples"
            raise UserError(f"{shards}: split '{split}' ({key}) is empty (the shards have {have}); give some "
                            f"patients split '{split}' in the source (e.g. a CSV `split` column) and ingest into "
                            f"a new folder, or set {key} to a split that has samples")
    return splits


def run_splits(recipe, log=print) -> list[str]:
    """The splits a run scores: test always (train and test must have samples), val when
    present (a warning otherwise)."""
    cfg: DownstreamConfig = recipe.downstream
    shards = recipe.data.shards
    splits = require_splits(shards, {cfg.train_split: "downstream.train_split",
                                     cfg.test_split: "downstream.test_split"})
    if splits.get(cfg.val_split):
        return list(dict.fromkeys((cfg.val_split, cfg.test_split)))
    wd = (f"; the probe's weight decay is not selected (downstream.weight_decay={cfg.weight_decay:g} is used)"
          if cfg.mode == "probe" and cfg.select_wd and cfg.task != "seg" else "")
    log(f"warning: {shards}: split '{cfg.val_split}' (downstream.val_split) is empty: no val metrics{wd}")
    return [cfg.test_split]


# ---------------------------------------------------------------- scoring


def score_splits(task: Task, head, model, recipe, out_dir: Path, device: torch.device, *, splits: list[str],
                 prefix: str = "", cached: dict | None = None, cache_dir: Path | None = None,
                 log=print) -> tuple[dict, list[str]]:
    """Metrics of `splits` (PNG and predictions CSV per split under out_dir, names starting
    with `prefix`) -> ({split: metrics}, warnings)."""
    cfg: DownstreamConfig = recipe.downstream
    out, warnings = {}, []
    for split in splits:
        fs = (cached or {}).get(split) or cached_extract(
            model, {"fingerprint": backbones.fingerprint(model)}, recipe.data, split, cfg.test_clips, cache_dir=cache_dir,
            features=cfg.features, grid=isinstance(task, SegTask), device=device, batch=cfg.feature_batch)
        try:
            out[split] = evaluation.score(task, head, fs, png=out_dir / f"{prefix}{_png_name(task, split)}",
                                 title=f"{recipe.name} {split}", csv_path=out_dir / f"{prefix}{split}_predictions.csv")
        except DataError as e:
            raise DataError(f"{recipe.data.shards}: split '{split}': {e}") from None
        w = evaluation.ci_warning(split, out[split], cfg.bootstrap)
        if w:
            log(f"warning: {w}")
            warnings.append(w)
    return out, warnings


def _fit_probe(model, info: dict, recipe, splits: list[str], run_dir: Path, kw: dict, log) -> tuple:
    """Probe: features of train (and val), head trained on them -> (task, head, fit, cached)."""
    from .probe import fit_seg_probe, fit_video_probe

    cfg: DownstreamConfig = recipe.downstream
    t0 = time.time()
    train_fs = cached_extract(model, info, recipe.data, cfg.train_split, cfg.train_clips,
                              cache_dir=run_dir / "cache", **kw)
    t_feat = time.time() - t0
    task = make_task(cfg, train_fs.metas)
    cached = {}
    t1 = time.time()
    if kw["grid"]:
        head, fit = fit_seg_probe(task, train_fs, cfg, tubelet=model.cfg.tubelet, frame_size=model.cfg.img_size)
    else:
        if cfg.val_split in splits:
            cached[cfg.val_split] = cached_extract(model, info, recipe.data, cfg.val_split, cfg.test_clips,
                                                   cache_dir=run_dir / "cache", **kw)
        t1 = time.time()
        head, fit = fit_video_probe(task, train_fs, cached.get(cfg.val_split), cfg)
    fit.update(feature_seconds=round(t_feat, 2), head_seconds=round(time.time() - t1, 2))
    log(f"probe head trained in {fit['head_seconds']:.1f}s on {fit['train_clips']} clips "
        f"({fit['train_patients']} patients)")
    return task, head, fit, cached


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
    rank0 = os.environ.get("RANK", "0") == "0"
    splits = run_splits(recipe, log if rank0 else (lambda *_: None))  # before anything is written
    if rank0:
        log(f"{recipe.name}: run folder {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE).write_text(dump_yaml(recipe))
    t0 = time.time()
    model, info = backbones.load_backbone(cfg.backbone, recipe, seed=cfg.seed)
    backbones.check_model_section(recipe, model, cfg.backbone)  # a ViT-B recipe must not run a tiny export
    recipe.validate(model.cfg, what=f"the backbone '{cfg.backbone}'")  # the clips must fit it
    kw = dict(features=cfg.features, grid=cfg.task == "seg", device=device, batch=cfg.feature_batch)
    if cfg.mode == "probe":
        task, head, fit, cached = _fit_probe(model, info, recipe, splits, run_dir, kw, log)
    else:
        from .data import list_samples
        from .finetune import finetune

        task = make_task(cfg, list_samples(recipe.data.shards, cfg.train_split))
        net, fit = finetune(task, model, recipe, run_dir=run_dir / FINETUNE_DIR, resume=resume, log=log)
        if fit["rank"] != 0:
            return {}
        model, head, cached = net.backbone, net.head, {}
        model.save_pretrained(run_dir / BACKBONE_DIR)  # with checksums: evaluate loads it checked
        publish(*(run_dir / BACKBONE_DIR).iterdir())
        info = dict(info, fingerprint=backbones.fingerprint(model), finetuned=str(run_dir / BACKBONE_DIR))
    metrics, warnings = score_splits(task, head, model, recipe, run_dir, device, splits=splits, cached=cached,
                                     cache_dir=run_dir / "cache", log=log)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(run_dir / HEAD))
    publish(run_dir / HEAD)
    results = _json_safe({"name": recipe.name, "task": task.summary(), "mode": cfg.mode,
                          "label_fraction": cfg.label_fraction, "backbone": info,
                          "shards_manifest_sha256": manifest_sha256(recipe.data.shards),
                          "head": head_spec(head, task, model), "fit": fit, "metrics": metrics,
                          "warnings": warnings, "seconds": round(time.time() - t0, 2), "config": to_dict(recipe),
                          "provenance": provenance(recipe)})
    (run_dir / RESULTS).write_text(json.dumps(results, indent=1))
    log(summary_line(results))
    log(f"{recipe.name}: wrote {run_dir / RESULTS}")
    return results


# ---------------------------------------------------------------- evaluate


def load_run_recipe(run_dir: str | Path, overrides: list[str] | None = None, recipe_file: str | None = None):
    """The recipe a finished run used (`<run_dir>/recipe.yaml`), or `recipe_file` instead,
    with `--set` overrides on top."""
    from ..config import load_recipe

    src = Path(recipe_file) if recipe_file else Path(run_dir) / RECIPE
    if not recipe_file and not src.is_file():
        raise UserError(f"{run_dir}: no {RECIPE}: not a run folder written by `echofm finetune`")
    return load_recipe(src, overrides or [])


def _read_results(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RESULTS).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir / RESULTS}: not a finished downstream run ({e})") from None


def _evaluate_splits(recipe, saved: dict, external: bool) -> list[str]:
    """The run's scored splits: all of them on its own shards; on an external cohort those
    it has (at least one)."""
    cfg: DownstreamConfig = recipe.downstream
    scored = list(saved["metrics"])
    keys = {s: "downstream.test_split" if s == cfg.test_split else "downstream.val_split" for s in scored}
    if not external:
        require_splits(recipe.data.shards, keys)
        return scored
    present = present_splits(recipe.data.shards)
    have = [s for s in scored if present.get(s)]
    if not have:
        raise UserError(f"{recipe.data.shards}: none of the splits the run scored ({', '.join(scored)}) has "
                        f"samples (the shards have {', '.join(f'{k} {v}' for k, v in present.items() if v) or 'none'});"
                        f" ingest the cohort with every patient in split '{cfg.test_split}' (a CSV `split` column)")
    return have


def _evaluate_backbone(recipe, saved: dict, run_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The backbone the head was trained on: the run's own (its fine-tuned backbone/, or the
    recorded spec and seed), or the recipe's downstream.backbone when it was overridden and
    holds the same weights (e.g. the export moved). Other weights are refused: a head only
    fits the backbone it was trained on."""
    trained = saved["backbone"]
    spec = recipe.downstream.backbone
    override = spec != trained["spec"]
    if override:
        model, info = backbones.load_backbone(spec, recipe, seed=recipe.downstream.seed)
    elif (run_dir / BACKBONE_DIR).is_dir():
        model, info = backbones.load_backbone(f"export:{run_dir / BACKBONE_DIR}", recipe)
    else:
        model, info = backbones.load_backbone(spec, recipe, seed=trained.get("seed") or 0)
    if info["fingerprint"] != trained["fingerprint"]:
        name = trained.get("finetuned") or trained["spec"]
        fix = (f"drop the override to score the run's own backbone, or `echofm finetune` a new run on '{spec}'"
               if override else "the recipe's model: or the weights changed since the run")
        raise UserError(f"{run_dir}: the backbone now loaded from '{info['spec']}' (weights {info['fingerprint']}) "
                        f"is not the one the head was trained on ('{name}', weights {trained['fingerprint']}); {fix}")
    return model, info


def evaluate(recipe, checkpoint: str | Path, log=print, *, data: str | Path | None = None) -> dict:
    """`echofm evaluate RUN_DIR`: reload backbone + head of a finished run, recompute the
    metrics of its val/test splits, write RUN_DIR/evaluate.json. `recipe`: normally
    `load_run_recipe(RUN_DIR, overrides)`. `data`: score this shard set instead (an external
    cohort), written to RUN_DIR/evaluate_<its folder name>.json. Returns the dict written."""
    from safetensors.torch import load_file

    run_dir = Path(checkpoint)
    saved = _read_results(run_dir)
    cfg: DownstreamConfig = recipe.downstream
    if saved["task"]["name"] != cfg.task:
        raise UserError(f"{run_dir}: the head is for task {saved['task']['name']!r}, the recipe says "
                        f"downstream.task={cfg.task!r}")
    if data is not None:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, shards=str(data)))
    splits = _evaluate_splits(recipe, saved, external=data is not None)
    model, info = _evaluate_backbone(recipe, saved, run_dir)
    backbones.check_model_section(recipe, model, info["spec"])
    recipe.validate(model.cfg, what=f"the backbone '{info['spec']}'")
    task = make_task(dataclasses.replace(cfg, classes=list(saved["task"]["classes"])), [])
    head = build_head(saved["head"])
    head.load_state_dict(load_file(str(run_dir / HEAD)))
    tag = "evaluate" if data is None else f"evaluate_{Path(data).resolve().name}"
    changed = None if data is not None else _shards_changed(saved, recipe.data.shards)
    if changed:
        log(f"WARNING: {changed}")
    metrics, warnings = score_splits(task, head, model, recipe, run_dir, pick_device(cfg.device), splits=splits,
                                     prefix=f"{tag}_", log=log)
    warnings = ([changed] if changed else []) + list(warnings)
    out = _json_safe({"name": recipe.name, "checkpoint": str(run_dir), "data": str(recipe.data.shards),
                      "task": task.summary(), "backbone": info, "metrics": metrics, "warnings": warnings,
                      "config": to_dict(recipe), "provenance": provenance(recipe)})
    (run_dir / f"{tag}.json").write_text(json.dumps(out, indent=1))
    log(summary_line(out))
    log(f"{recipe.name}: wrote {run_dir / f'{tag}.json'}")
    return out


def _shards_changed(saved: dict, shards) -> str | None:
    """A warning when the shards are not the ones the run scored (their manifest's sha256
    differs from the one results.json recorded): evaluate then gives other numbers."""
    then, now = saved.get("shards_manifest_sha256"), manifest_sha256(shards)
    if then is None:
        return (f"{shards}: the run recorded no shards manifest sha256 (an older run): cannot check that "
                "these are the shards it scored")
    if then != now:
        return (f"{shards}/manifest.json: sha256 {now[:16]}... differs from the run's {then[:16]}...: the shards "
                "changed since the run, so these numbers are not the run's")
    return None


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
