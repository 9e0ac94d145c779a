"""The `echofm` command: one small parser function and one run function per subcommand.

Imports of heavy modules (torch, DALI, DeepSpeed) happen inside the run functions, so
`echofm --help` is instant. Errors a user can fix (bad recipe, bad input file, a file that
cannot be read or written, an attention backend that is not installed) print one line
`echofm: error: ...` and exit 2; anything else is a bug and keeps its traceback. A RECIPE
argument is a file or a shipped preset's name (`echofm config list`).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import UserError


RECIPE_HELP = "recipe file, or a shipped preset's name (echofm config list), e.g. echofm_tiny"
DOWNSTREAM_KEYS = ("downstream.task", "downstream.backbone")
"""What a finetune / evaluate recipe must set itself: defaults would probe a random backbone."""


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set model.depth=6 (repeatable)")


# ---------------------------------------------------------------- config


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="list the shipped recipes, show a resolved recipe")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the recipe after includes, --set, validation and the "
                           "model preset (its dimensions filled in)")
    show.add_argument("recipe", help=RECIPE_HELP)
    _add_set(show)
    show.set_defaults(run=_run_config_show)
    ls = csub.add_parser("list", help="the shipped recipes: name, kind, file")
    ls.set_defaults(run=_run_config_list)


def _run_config_list(args) -> int:
    from .resources import recipe_names

    for name, path in recipe_names().items():
        print(f"{name:<28} {path.parent.name:<11} {path}")
    return 0


def _run_config_show(args) -> int:
    import dataclasses

    from .config import ConfigError, dump_yaml, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    try:  # the preset's dimensions, not null
        recipe = dataclasses.replace(recipe, model=recipe.model.resolved())
    except ValueError as e:
        raise ConfigError(f"{args.recipe}: model: {e}") from None
    print(dump_yaml(recipe), end="")
    return 0


# ---------------------------------------------------------------- pretrain / export / demo


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain EchoFM from a recipe (DeepSpeed; 1 process, "
                       "torchrun or the deepspeed launcher)")
    p.add_argument("recipe", help=RECIPE_HELP)
    _add_set(p)
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: newest complete checkpoint of this run; or a checkpoint/run folder")
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args) -> int:
    import os

    from .config import load_recipe
    from .trainer import pretrain

    recipe = load_recipe(args.recipe, args.overrides)
    check_attn_backend(recipe.model.attn_backend)
    summary = pretrain(recipe, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        dropped = (f", {summary['damaged_samples']} damaged sample(s) skipped"
                   if summary.get("damaged_samples") else "")
        print(f"echofm: {summary['steps']} steps, last loss {summary['last_loss']}{dropped}, "
              f"checkpoint {summary['last_checkpoint']}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="training checkpoint -> model.safetensors + config.json + model card")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (newest checkpoint)")
    p.add_argument("--out", required=True, help="output folder (EchoFM.from_pretrained loads it; "
                   "README.md there is the model card)")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from .export import export

    print(f"echofm: exported to {export(args.checkpoint, args.out)}")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a TRUSTED older or pickled checkpoint into the safe "
                       "format (this command unpickles it: only for files you trust)",
                       description="echofm loads checkpoints without unpickling (weights only), so "
                       "checkpoints of an older format, or files with pickled objects, are refused. "
                       "This command unpickles SRC, which can run code hidden in it: use it only on "
                       "files whose origin you trust. It writes plain-data files and a meta.json "
                       "with the sha256 of every file to OUT.")
    p.add_argument("src", help="a checkpoint folder, a run folder (newest checkpoint), or one .pt/.pth file")
    p.add_argument("--out", required=True, help="new folder (or file, for a file) to write")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from .checkpoint import convert

    print(f"echofm convert: unpickling {args.src} (trusted by you)", flush=True)
    out, rewritten = convert(args.src, args.out)
    print(f"echofm: wrote {out} ({len(rewritten)} file(s) rewritten as plain data"
          + (f": {', '.join(rewritten)}" if rewritten else "") + ")")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="end to end on CPU: synthetic corpus -> ingest -> pretrain "
                       "tiny -> export -> linear probe (a few minutes)")
    p.add_argument("--out", default="demo_out", help="working folder (default demo_out)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the demo's)")
    p.add_argument("--videos", type=int, default=None, help="synthetic videos (default: the demo's)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    sizes = {k: v for k, v in (("steps", args.steps), ("videos", args.videos)) if v is not None}
    run_demo(DemoConfig(out=args.out, **sizes))
    return 0


# ---------------------------------------------------------------- ingest / shards


def _parse_bytes(text: str) -> int:
    """'256MB', '1GiB', '1000000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def _add_ingest(sub) -> None:
    p = sub.add_parser("ingest", help="videos / DICOM / EchoNet / CAMUS / CSV -> WebDataset shards",
                       description="Ingest sources into WebDataset shards + DALI indexes + manifest.json, and "
                       "report how the corpus came out (quality_report.json). Patient ids and source paths are "
                       "keyed hashes (HMAC) with the corpus's secret id key, kept outside the shards.")
    p.add_argument("sources", nargs="+", help="files or folders (layout is recognised) or CSV manifests")
    p.add_argument("--out", required=True, help="shard directory (re-running resumes into it, by content)")
    p.add_argument("--size", type=int, default=None, help="output height = width (default 224, or the recipe's)")
    p.add_argument("--codec", choices=["vp9", "h264", "mjpeg"], default="vp9")
    p.add_argument("--fps", default="keep", help="'keep' or a frame rate to resample to")
    p.add_argument("--fold-stride", type=int, default=1, metavar="S",
                   help="keep every S-th frame: the training stride folded in, decoded at stride 1 (docs/shards.md)")
    p.add_argument("--gop", type=int, default=None,
                   help="keyframe interval, 1..8 (default 8, or 4 with --fold-stride > 1: docs/shards.md)")
    p.add_argument("--shard-size", type=_parse_bytes, default="256MB", help="bytes per shard, e.g. 256MB")
    p.add_argument("--workers", type=int, default=1, help="worker processes (a worker that dies costs its clip only)")
    p.add_argument("--dataset", default=None, help="dataset name in sample keys (default: from the layout)")
    p.add_argument("--min-frames", type=int, default=8, help="shorter clips are rejected")
    p.add_argument("--no-sector", action="store_true", help="keep the full frame (no sector crop)")
    p.add_argument("--id-key", default=None, metavar="FILE",
                   help="the corpus's secret id key (hex; default OUT.idkey beside --out, created on first ingest)")
    p.add_argument("--retry-rejects", action="store_true",
                   help="retry sources rejected for good earlier (missing / unreadable files are always retried)")
    p.add_argument("--dry-run", action="store_true", help="scan, decode and measure; report; write nothing")
    p.add_argument("--recipe", default=None, help="take --size from this recipe's data.size")
    p.add_argument("--label", action="append", default=[], metavar="COLUMN",
                   help="keep this source label column too (beyond docs/shards.md#labels; repeatable)")
    p.add_argument("--clip-timeout", type=float, default=600.0, metavar="S",
                   help="seconds a worker may spend on one clip before it is killed and the clip rejected")
    p.set_defaults(run=_run_ingest)


def _run_ingest(args) -> int:
    from echofm.loaders.ingest import REPORT, IngestConfig, ingest
    from echofm.loaders.reject_log import console_lines, log_path

    size = args.size
    if size is None and args.recipe:
        from .config import load_recipe

        size = load_recipe(args.recipe, []).data.size
    try:
        fps = None if args.fps == "keep" else float(args.fps)
        cfg = IngestConfig(size=size or 224, codec=args.codec, fps=fps, fold_stride=args.fold_stride,
                           gop=args.gop or (4 if args.fold_stride > 1 else 8),
                           shard_size=args.shard_size,
                           workers=args.workers, dataset=args.dataset, min_frames=args.min_frames,
                           sector=not args.no_sector, retry_rejects=args.retry_rejects, id_key=args.id_key,
                           dry_run=args.dry_run, label_columns=tuple(args.label), clip_timeout=args.clip_timeout)
        cfg.validate()
    except ValueError as e:
        raise UserError(f"ingest: {e}") from e
    r = ingest(args.sources, args.out, cfg)
    if r.id_key_created:
        print(f"ingest: created the id key {r.id_key}: keep it private and keep it (later ingests into "
              f"{args.out} need it; without it patient ids cannot be linked back)")
    print(f"ingest: {r.added} {'would be added' if args.dry_run else 'added'}, {r.skipped} skipped (already done), "
          f"{r.duplicates} duplicate(s), {r.rejected} rejected"
          + ("" if args.dry_run else f" ({args.out}/rejects.jsonl), {len(r.shards)} shard(s)")
          + f", {r.frames} frames, {r.clips_per_s:.1f} clips/s, {r.input_mb_per_s:.1f} MB/s in")
    for line in r.quality.lines():
        print(f"ingest: {line}")
    log = None if args.dry_run else log_path(args.out)
    for line in console_lines(r.rejected_files, log):
        print(f"ingest: {line}")
    if not args.dry_run:
        print(f"ingest: report written to {args.out}/{REPORT}")
    return 0


def _add_shards(sub) -> None:
    p = sub.add_parser("shards", help="inspect shard directories")
    ssub = p.add_subparsers(dest="shards_cmd", required=True)
    v = ssub.add_parser("verify", help="manifest vs files, index, json, and every video decodes")
    v.add_argument("dir")
    v.add_argument("--no-decode", action="store_true", help="skip decoding the videos (fast)")
    v.set_defaults(run=_run_shards_verify)
    _add_shards_copy(ssub)


def _add_shards_copy(ssub) -> None:
    """`shards push LOCAL URL` / `shards pull URL LOCAL` (loaders/remote.py, docs/data.md)."""
    for name, src, dst, text in (("push", "local", "url", "copy a shard folder to s3://bucket/prefix"),
                                 ("pull", "url", "local", "copy a shard folder from s3:// or https:// to a folder")):
        c = ssub.add_parser(name, help=f"{text}: every tar checked against the manifest's sha256, the "
                            "manifest written last")
        c.add_argument(src, help="shard folder" if src == "local" else "s3://bucket/prefix or https://...")
        c.add_argument(dst, help="shard folder" if dst == "local" else "s3://bucket/prefix")
        c.set_defaults(run=_run_shards_copy, copy=name)


def _run_shards_copy(args) -> int:
    from echofm.loaders import remote

    try:
        if args.copy == "push":
            n = remote.push(args.local, args.url)
        else:
            n = remote.pull(args.url, args.local)
    except OSError as e:
        raise UserError(f"shards {args.copy}: {e.filename or ''}: {e.strerror or e}") from None
    print(f"shards {args.copy}: {n} shard(s) copied and verified; manifest written last")
    return 0


def _run_shards_verify(args) -> int:
    from echofm.loaders.shard_verify import verify

    rep = verify(args.dir, decode=not args.no_decode, progress=sys.stderr.isatty())
    for p in rep.problems:
        print(f"PROBLEM {p}")
    print(rep.summary())
    return 0 if rep.ok else 1


# ---------------------------------------------------------------- finetune / evaluate


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="downstream run: linear probe or full fine-tune of a backbone "
                       "(fine-tune: 1 process, torchrun or the deepspeed launcher)")
    p.add_argument("recipe", help="downstream recipe (it sets downstream.task and downstream.backbone): a "
                   "file or a preset name, e.g. ef_regression")
    _add_set(p)
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="mode finetune: auto = continue the run's newest checkpoint; or a checkpoint folder")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    from .config import load_recipe
    from .downstream.run import run

    recipe = load_recipe(args.recipe, args.overrides, require=DOWNSTREAM_KEYS)
    check_attn_backend(recipe.model.attn_backend)
    run(recipe, resume=args.resume)
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="recompute a downstream run's metrics from its saved head and "
                       "recipe, or score an external cohort (--data)",
                       description="Rebuild backbone + head of a finished `echofm finetune` run from its folder "
                       "and score its val/test splits again with the run's own recipe (RUN_DIR/recipe.yaml) and "
                       "any --set on top: with no --set the numbers are the run's. --data scores another shard "
                       "set (e.g. an external cohort ingested with every patient in split 'test'). A "
                       "--set downstream.backbone=... is honoured only when it holds the weights the head was "
                       "trained on, refused otherwise.")
    p.add_argument("run_dir", help="the run folder written by `echofm finetune` (downstream.out_dir/<name>)")
    _add_set(p)
    p.add_argument("--data", default=None, metavar="SHARDS",
                   help="score this shard set instead (writes RUN_DIR/evaluate_<folder name>.json)")
    p.add_argument("--recipe", default=None, help="start from this recipe instead of RUN_DIR/recipe.yaml")
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)  # the older form: RECIPE --checkpoint RUN
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from .config import load_recipe
    from .downstream.run import evaluate, load_run_recipe

    run_dir, recipe_file = args.run_dir, args.recipe
    if args.checkpoint:  # `echofm evaluate RECIPE --checkpoint RUN_DIR` (before the run folder held its recipe)
        run_dir, recipe_file = args.checkpoint, args.run_dir
    if recipe_file:  # the run folder's own recipe.yaml has every key
        load_recipe(recipe_file, args.overrides, require=DOWNSTREAM_KEYS)
    recipe = load_run_recipe(run_dir, args.overrides, recipe_file)
    check_attn_backend(recipe.model.attn_backend)
    evaluate(recipe, run_dir, data=args.data)
    return 0


# ---------------------------------------------------------------- synth


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic echo corpus with exact ground truth")
    p.add_argument("--out", required=True, help="output directory (videos/, masks/, labels.csv)")
    p.add_argument("--videos", type=int, default=200, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="same seed -> identical corpus")
    p.add_argument("--size", default="160-320", metavar="MIN-MAX", help="frame height range, e.g. 160-320")
    p.add_argument("--frames", default="40-120", metavar="MIN-MAX", help="clip length range (plus short clips)")
    p.add_argument("--short-fraction", type=float, default=0.1, help="fraction of clips < 32 frames")
    p.add_argument("--avi-fraction", type=float, default=0.2, help="fraction written as AVI/MJPEG")
    p.add_argument("--dicom-fraction", type=float, default=0.05, help="fraction written as DICOM (rest MP4)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(run=_run_synth)


def _run_synth(args) -> int:
    import os
    import time

    from echofm.loaders.synth import SynthConfig, make_corpus, summarize

    try:
        # "MIN-MAX" or a single "N"
        (lo, hi), (flo, fhi) = ((int(a), int(b or a)) for a, _, b in
                                (r.partition("-") for r in (args.size, args.frames)))
        cfg = SynthConfig(videos=args.videos, seed=args.seed, min_size=lo, max_size=hi, min_frames=flo,
                          max_frames=fhi, short_fraction=args.short_fraction, avi_fraction=args.avi_fraction,
                          dicom_fraction=args.dicom_fraction, workers=args.workers or os.cpu_count() or 1)
        cfg.validate()
    except ValueError as e:
        raise UserError(f"synth: {e} (ranges are MIN-MAX, e.g. --size 160-320)") from e
    t0 = time.perf_counter()
    rows = make_corpus(args.out, cfg)
    print(f"synth: wrote {args.out}/labels.csv, videos/, masks/ in {time.perf_counter() - t0:.1f} s")
    for line in summarize(rows):
        print(f"  {line}")
    return 0


# ---------------------------------------------------------------- bench

BENCHMARKS = ("synth", "ingest", "loader", "kernels", "train", "probe_gap", "integrity", "embed", "ablation",
              "demo_scale", "lowlabel", "supervised_ref")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (table + JSON in a run folder)",
                       description="Run benchmarks/NAME.py (shipped with echofm). Results go to a new run folder "
                       "runs/bench/NAME-<timestamp>/ unless the script's --out names a file (the committed "
                       "results in benchmarks/results/ are written only that way). Synthetic corpora and other "
                       "caches are kept in ~/.cache/echofm/bench/NAME/ (announced with their size); "
                       "--clean removes them.")
    p.add_argument("name", nargs="?", choices=BENCHMARKS, help="the benchmark (with --clean: only its cache)")
    p.add_argument("--clean", action="store_true", help="remove the benchmark caches (all, or NAME's) and exit")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (see its --help)")
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    import runpy

    from . import bench
    from .resources import BENCHMARKS as SCRIPTS

    if args.clean:
        removed = bench.clean([args.name] if args.name else None)
        for path, size in removed:
            print(f"removed {path} ({size / 2**20:.0f} MB)")
        if not removed:
            print(f"no benchmark caches under {bench.cache_root()}")
        return 0
    if args.name is None:
        raise UserError("bench: name a benchmark (" + ", ".join(BENCHMARKS) + ") or pass --clean")
    # Scripts, run as __main__: benchmarks/ in a checkout, echofm/benchmarks in a wheel.
    script = SCRIPTS / f"{args.name}.py"
    if not script.is_file():
        raise UserError(f"{script}: not found; this echofm was installed without its benchmarks "
                        "(reinstall it from the repository: pip install .)")
    sys.argv = [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


# ---------------------------------------------------------------- embed / neighbours


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="a backbone's clip and phase embeddings of a shard set -> Parquet "
                       "(1 process or torchrun; resumable)")
    p.add_argument("shards", help="shard directory written by `echofm ingest`")
    p.add_argument("--backbone", required=True, help="export dir, checkpoint dir, official EchoFM or "
                   "VideoMAE file (prefix official: / videomae: to force), or 'random'")
    p.add_argument("--out", required=True, help="output folder (part-<rank>-<n>.parquet, embed.json)")
    p.add_argument("--clips", type=int, default=1, help="evenly spaced clips per sample (default 1)")
    p.add_argument("--split", default="all", help="manifest split, or 'all' (default)")
    p.add_argument("--features", default="tokens", help="pooled features of the embedding column, "
                   "'+'-joined tokens, cls, phase, dynamics (default tokens)")
    p.add_argument("--batch", type=int, default=0, help="clips per forward (default 64 on CUDA, 8 on CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if a GPU is visible), cpu, cuda:N")
    p.add_argument("--recipe", default=None, help="recipe (file or preset name) whose model: builds 'random' / "
                   "VideoMAE and whose data: gives the stride (default: the defaults)")
    _add_set(p)
    p.add_argument("--part-rows", type=int, default=4096, help="rows per Parquet part: the most work a kill "
                   "loses (default 4096)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run_embed)


def _run_embed(args) -> int:
    from .embed import EmbedConfig, embed

    recipe = None
    if args.recipe or args.overrides:
        from .config import load_recipe, recipe_from_data
        from .yaml_io import apply_overrides

        recipe = (load_recipe(args.recipe, args.overrides) if args.recipe
                  else recipe_from_data(apply_overrides({}, args.overrides), file="--set"))
    cfg = EmbedConfig(shards=args.shards, backbone=args.backbone, out=args.out, split=args.split, clips=args.clips,
                      features=args.features, batch=args.batch, device=args.device, part_rows=args.part_rows,
                      progress=args.progress)
    embed(cfg, recipe)
    return 0


def _add_neighbours(sub) -> None:
    p = sub.add_parser("neighbours", help="nearest clips (cosine) to a sample in an `echofm embed` folder")
    p.add_argument("embed_dir")
    p.add_argument("key", help="sample key")
    p.add_argument("--k", type=int, default=10, help="how many (default 10)")
    p.set_defaults(run=_run_neighbours)


def _run_neighbours(args) -> int:
    from .embed import neighbours

    print(f"{'cosine':>7}  {'key':<48} {'clip':>4}  {'view':<6} {'split':<5} patient / study")
    for r in neighbours(args.embed_dir, args.key, args.k):
        print(f"{r['cosine']:7.4f}  {r['key']:<48} {r['clip']:>4}  {str(r['view']):<6} {str(r['split']):<5} "
              f"{r['patient']} / {r['study']}")
    return 0


# ---------------------------------------------------------------- main

# Each entry adds one subcommand; later features append theirs here.
SUBCOMMANDS: list[Callable] = [_add_synth, _add_ingest, _add_shards, _add_pretrain, _add_export,
                               _add_convert, _add_finetune, _add_evaluate, _add_bench, _add_demo,
                               _add_config, _add_embed, _add_neighbours]


class _Version(argparse.Action):
    """--version, resolved only when asked (it may run git)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from .provenance import version_line

        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echofm", description="EchoFM: echocardiography video foundation model engine")
    parser.add_argument("--version", action=_Version, help="print the echofm version (and git commit) and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def check_attn_backend(backend: str) -> None:
    """model.attn_backend=xformers needs the xformers package and a CUDA GPU: refused up front
    (one line) rather than inside the first forward."""
    if backend != "xformers":
        return
    import importlib.util

    import torch

    if importlib.util.find_spec("xformers") is None:
        raise UserError("model.attn_backend=xformers: xformers is not installed (pip install xformers, on a "
                        "CUDA machine); use auto")
    if not torch.cuda.is_available():
        raise UserError("model.attn_backend=xformers: needs a CUDA GPU (xformers has no CPU kernel); use auto")


def _backend_unavailable(e: RuntimeError) -> bool:
    """A kernels.reference.BackendUnavailable (looked up only if the kernels were imported:
    importing them here would load torch for every command)."""
    ref = sys.modules.get("echofm.kernels.reference")
    return ref is not None and isinstance(e, ref.BackendUnavailable)


def _os_error_line(e: OSError) -> str:
    """'FILE: what went wrong' (both files for a rename / copy) or the error's own text."""
    what = e.strerror or str(e)
    if e.filename is None:
        return what
    files = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{files}: {what}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from echofm.loaders.errors import DataError

    try:
        return int(args.run(args) or 0)
    except (UserError, DataError) as e:
        print(f"echofm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that is missing, unreadable, unwritable, or a full disk
        print(f"echofm: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not _backend_unavailable(e):
            raise
        print(f"echofm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
