"""`echofm embed`: a backbone's embeddings of a whole shard set, as Parquet parts.

Every sample (or `clips` evenly spaced clips of it) becomes one row per clip: key, clip,
patient, study, view, split, labels (JSON text), `embedding` (float32 [F]: the pooled
features of `features`, as the downstream probe sees them) and `phase` (float32 [T' * D]:
the per-slice phase embeddings, row-major; shape in the file's metadata).

Ranks (torchrun's RANK / WORLD_SIZE; no process group is needed) take contiguous parts of
the split's samples in manifest order: no duplicates, no gaps, the same assignment on
every run. Rows go to `part-<rank>-<n>.parquet`, each written whole (a temporary name,
then a rename): a kill leaves complete parts and at most a stray temporary file. A rerun
into the same folder skips every key already in a part (whatever the number of ranks
was), so a resumed run writes each sample once. `embed.json` records what the rows
depend on (backbone weights, features, clips, stream settings); a rerun that differs is
refused rather than mixing embeddings of two backbones.

docs/embed.md is the user's page.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

META = "embed.json"
PART_GLOB = "part-*.parquet"
COLUMNS = ("key", "clip", "patient", "study", "view", "split", "labels", "embedding", "phase")
"""Parquet columns, in file order."""


@dataclass(kw_only=True, slots=True)
class EmbedConfig:
    """One `echofm embed` run."""

    shards: str
    """Shard directory written by `echofm ingest`."""
    backbone: str = "random"
    """Any downstream backbone spec (export dir, checkpoint dir, official or VideoMAE file,
    'random'), resolved by engine/downstream/backbone.py."""
    out: str = "embeddings"
    """Output folder for the Parquet parts and embed.json."""
    split: str = "all"
    """Manifest split to embed, or 'all'."""
    clips: int = 1
    """Clips per sample, evenly spaced (1: the centre clip)."""
    features: str = "tokens"
    """Pooled features of `embedding` ('+'-joined tokens, cls, phase, dynamics)."""
    batch: int = 0
    """Clips per forward; 0: 64 on CUDA, 8 on the CPU."""
    device: str = "auto"
    """'auto' (cuda:LOCAL_RANK when a GPU is visible), 'cpu', 'cuda', 'cuda:1'."""
    part_rows: int = 4096
    """Rows per Parquet part: the most work a kill can lose."""
    progress: bool = True
    """A progress bar on stderr."""

    def validate(self) -> None:
        from .downstream_config import FEATURES

        parts = self.features.split("+")
        if any(p not in FEATURES for p in parts) or len(set(parts)) != len(parts):
            raise UserError(f"embed: features {self.features!r}: join distinct parts of {', '.join(FEATURES)} with '+'")
        if self.clips < 1 or self.batch < 0 or self.part_rows < 1:
            raise UserError("embed: clips and part_rows must be >= 1, batch >= 0")


def rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_keys(keys: list[str], rank: int, world: int) -> list[str]:
    """Rank `rank`'s contiguous part of `keys` (parts of sizes differing by at most one)."""
    n = len(keys)
    return keys[rank * n // world:(rank + 1) * n // world]


def written_keys(out: Path) -> set[str]:
    """Keys in every complete part under `out` (temporary files are not parts)."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for p in sorted(out.glob(PART_GLOB)):
        try:
            done.update(pq.read_table(p, columns=["key"]).column("key").to_pylist())
        except Exception as e:  # a part is renamed into place whole: damage came later
            raise UserError(f"{p}: unreadable Parquet part ({e}); delete it and rerun to embed its samples again")
    return done


def embed_device(spec: str) -> torch.device:
    from .downstream.backbone import pick_device

    if spec == "auto" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return pick_device(spec)


def _recipe_for(cfg: EmbedConfig, recipe):
    """The recipe that builds a random / VideoMAE backbone and cuts the clips (default: the
    defaults), pointed at cfg.shards."""
    from .config import Recipe

    recipe = recipe or Recipe()
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, shards=cfg.shards))


def _settings(cfg: EmbedConfig, info: dict, stream, phase_shape: list[int]) -> dict:
    """What every row depends on (embed.json): a rerun must match it."""
    return {"backbone": {"spec": info["spec"], "kind": info["kind"], "fingerprint": info["fingerprint"]},
            "features": cfg.features, "clips": cfg.clips, "split": cfg.split, "phase_shape": phase_shape,
            "stream": {"num_frames": stream.num_frames, "stride": stream.stride, "size": stream.size},
            "shards": str(Path(cfg.shards).resolve())}


def _check_meta(out: Path, settings: dict) -> None:
    """Write embed.json, or refuse a rerun whose settings differ from those recorded."""
    path = out / META
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in settings if k != "shards" and old.get(k) != settings[k]]
        if diff:
            raise UserError(f"{path}: this folder holds embeddings made with other {', '.join(diff)} "
                            f"({', '.join(f'{k}={old.get(k)}' for k in diff)}); use another --out")
        return
    tmp = out / f".{META}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(settings, indent=1))
    tmp.replace(path)  # every rank writes the same content: the last rename wins harmlessly


def _rows(batch: dict, emb: torch.Tensor, phase: torch.Tensor) -> list[dict]:
    """One row per clip of the batch (embeddings moved to the CPU as float32)."""
    emb, phase = emb.float().cpu().numpy(), phase.float().flatten(1).cpu().numpy()
    rows = []
    for i, m in enumerate(batch["meta"]):
        rows.append({"key": m["key"], "clip": int(m.get("clip_index", 0)), "patient": m.get("patient"),
                     "study": m.get("study"), "view": m.get("view"), "split": m.get("split"),
                     "labels": json.dumps(m.get("labels") or {}, sort_keys=True),
                     "embedding": emb[i], "phase": phase[i]})
    return rows


class PartWriter:
    """Rows -> part-<rank>-<n>.parquet files of `part_rows` rows (rounded down to whole
    samples; the last part fewer), each written under a temporary name and renamed into
    place; only samples with all their clips are written."""

    def __init__(self, out: Path, rank: int, clips: int, part_rows: int, meta: dict) -> None:
        self.out, self.rank, self.clips, self.part_rows = out, rank, clips, part_rows
        self.meta = {b"echofm": json.dumps(meta).encode()}
        taken = [int(p.stem.split("-")[2]) for p in out.glob(f"part-{rank}-*.parquet")]
        self.next = max(taken, default=-1) + 1
        for stale in out.glob(f".part-{rank}-*.tmp"):  # left by a killed run of this rank
            stale.unlink(missing_ok=True)
        self.pending: dict[str, list[dict]] = {}
        self.ready: list[dict] = []
        self.samples = 0

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            clips = self.pending.setdefault(r["key"], [])
            clips.append(r)
            if len(clips) == self.clips:
                self.ready += sorted(self.pending.pop(r["key"]), key=lambda x: x["clip"])
                self.samples += 1
        cut = max(self.part_rows // self.clips, 1) * self.clips  # whole samples per part
        while len(self.ready) >= cut:
            self._write(self.ready[:cut])
            self.ready = self.ready[cut:]

    def flush(self) -> None:
        """Write the complete samples still held (the end of the run)."""
        if self.ready:
            self._write(self.ready)
            self.ready = []

    def _write(self, rows: list[dict]) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {c: [r[c] for r in rows] for c in COLUMNS}
        arrays = {c: pa.array(v, pa.int32() if c == "clip" else pa.string()) for c, v in cols.items()
                  if c not in ("embedding", "phase")}
        for c in ("embedding", "phase"):
            flat = pa.array(np.stack(cols[c]).astype(np.float32, copy=False).reshape(-1), pa.float32())
            arrays[c] = pa.FixedSizeListArray.from_arrays(flat, len(cols[c][0]))
        table = pa.table([arrays[c] for c in COLUMNS], names=list(COLUMNS)).replace_schema_metadata(self.meta)
        name = f"part-{self.rank}-{self.next:05d}.parquet"
        tmp = self.out / f".{name}.tmp"
        pq.write_table(table, tmp)
        tmp.replace(self.out / name)
        self.next += 1


def embed(cfg: EmbedConfig, recipe=None, log=print) -> dict:
    """Embed cfg.split of cfg.shards with cfg.backbone into cfg.out (this rank's part).

    recipe: builds a 'random' or VideoMAE backbone and gives the stream settings (stride);
    default: the default recipe with the clip length and size of the loaded backbone.
    Returns {"rank", "world", "samples" (this rank's), "written" (rows now), "skipped"
    (samples already in parts), "seconds", "clips_per_s"}."""
    from .downstream import backbone as backbones
    from .downstream.data import list_samples
    from .downstream.features import stream_config

    cfg.validate()
    rank, world = rank_world()
    samples = list_samples(cfg.shards, cfg.split)  # a bad shard folder fails before anything is written
    if not samples:
        raise UserError(f"{cfg.shards}: split {cfg.split!r} has no samples")
    mine = rank_keys([m["key"] for m in samples], rank, world)
    device = embed_device(cfg.device)
    recipe = _recipe_for(cfg, recipe)
    model, info = backbones.load_backbone(cfg.backbone, recipe)
    stream = dataclasses.replace(recipe.data, num_frames=model.cfg.num_frames, size=model.cfg.img_size)
    stream = stream_config(stream, cfg.split, cfg.clips, batch=cfg.batch or (64 if device.type == "cuda" else 8),
                           seg=False)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, info, stream, [model.cfg.t_grid, model.cfg.embed_dim])
    _check_meta(out, settings)
    done = written_keys(out)
    todo = [k for k in mine if k not in done]
    writer = PartWriter(out, rank, cfg.clips, cfg.part_rows, settings)
    t0, clips = time.time(), 0
    if todo:
        clips = _run(model, stream, todo, device, cfg, writer, rank)
    writer.flush()
    secs = time.time() - t0
    res = {"rank": rank, "world": world, "samples": len(mine), "written": writer.samples,
           "skipped": len(mine) - len(todo), "seconds": round(secs, 2),
           "clips_per_s": round(clips / secs, 2) if clips and secs > 0 else None}
    log(f"embed rank {rank}/{world}: {writer.samples} sample(s) written, {res['skipped']} already in {out}"
        + (f", {res['clips_per_s']} clips/s" if res["clips_per_s"] else ""))
    return res


def _run(model, stream, todo: list[str], device: torch.device, cfg: EmbedConfig, writer: PartWriter,
         rank: int) -> int:
    """Forward `todo`'s clips (bf16 autocast on CUDA, fp32 on the CPU) into `writer`; -> clips."""
    from tqdm import tqdm

    from .downstream import backbone as backbones
    from .downstream.features import forward_batches

    def forward(m, video):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return backbones.embed(m, video, cfg.features)

    bar = tqdm(total=len(todo) * cfg.clips, unit="clip", desc=f"embed rank {rank}", file=sys.stderr,
               disable=not cfg.progress, dynamic_ncols=True)
    n = 0
    for batch, (emb, phase) in forward_batches(model, stream, device=device, forward=forward, keys=todo):
        writer.add(_rows(batch, emb, phase))
        n += len(batch["meta"])
        bar.update(len(batch["meta"]))
    bar.close()
    return n


# ---------------------------------------------------------------- reading back


def load(embed_dir: str | Path, columns: list[str] | None = None):
    """Every part of an embed folder -> one pyarrow Table (rows in part order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(Path(embed_dir).glob(PART_GLOB))
    if not parts:
        raise UserError(f"{embed_dir}: no {PART_GLOB} files (not an `echofm embed` output folder)")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])


def matrix(table, column: str = "embedding"):
    """A fixed-size-list column -> float32 numpy [rows, dim] (a writable copy)."""
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).copy()


def neighbours(embed_dir: str | Path, key: str, k: int = 10) -> list[dict]:
    """The k rows nearest (cosine) to sample `key` (the mean of its clips' embeddings),
    other samples only. -> [{key, clip, patient, study, view, split, cosine}], nearest first."""
    import numpy as np

    t = load(embed_dir, ["key", "clip", "patient", "study", "view", "split", "embedding"])
    keys = np.asarray(t.column("key").to_pylist())
    x = matrix(t)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    own = keys == key
    if not own.any():
        raise UserError(f"{embed_dir}: no sample {key!r} in the embeddings")
    q = x[own].mean(0)
    q /= max(float(np.linalg.norm(q)), 1e-12)
    cos = x @ q
    cos[own] = -np.inf
    order = np.argsort(-cos, kind="stable")[:min(k, int((~own).sum()))]
    cols = {c: t.column(c).to_pylist() for c in ("key", "clip", "patient", "study", "view", "split")}
    return [{**{c: cols[c][i] for c in cols}, "cosine": float(cos[i])} for i in order]
