"""Ingest: sources -> decode -> sector crop -> resize -> cardiac cycle -> encode -> shards.

    report = ingest(["/data/echonet", "/data/labels.csv"], "shards/", IngestConfig(size=224))

Plan (parent, here): discover the clips, hash every source's content (sha256, cached by
path, size and mtime), skip content the corpus already holds (resume is by content: a moved
or renamed tree adds nothing), record repeated content once, assign keys and by-patient
splits. Per clip (workers, `process_clip` in ingest_clip.py): decode frame by frame through
resize (memory bounded by the output size), reject damaged decodes, crop to the fan, measure
the cycle, encode, count the frames back. Write (parent, here, the single writer): one open
shard per split, rotated at `shard_size`; after each finished shard the manifest is replaced
atomically (shards.py). Settings, jobs and the report: ingest_config.py. Results come back
in source order, so the shards are the same for any worker count; a worker that dies (the
OOM killer) costs its clip a reject, not the run.

Nothing lost, nothing duplicated: every clip ends in a shard or in `rejects.jsonl` with the
reason; transient rejects (missing file, I/O error) are retried by the next run, others by
`retry_rejects`. An exclusive lock keeps a second ingest out of the same directory.

Privacy (ids.py): patient ids and source paths are HMAC'd with the corpus's secret id key,
which lives outside the shard directory. Keys are `<dataset>_<patient hmac>_<[tag-]content
sha256[:12]>`; the json's `source` is the HMAC of the path relative to the root the user
named; rejects.jsonl and the quality report hold the same hashes, never a path or a name.
"""
from __future__ import annotations

import itertools
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import ids
from .digest import sha256_file
from .errors import DataError
from .ingest_clip import GROWING, init_worker, process_clip, same_file
from .ingest_config import (HASH_CACHE, REJECTS, REPORT, RESUME_KEYS, SPLIT_ALIASES, ClipResult, IngestConfig,
                            IngestReport, Job, Kind, Reject)
from .quality import SPLITS, CorpusStats, QualityReport
from .reject_log import rejected_file, write_log
from .shards import (DirLock, SampleRecord, ShardWriter, add_shard, clean_orphans, new_manifest, read_manifest,
                     read_sample_records, write_manifest)
from .sources.base import Clip, Discovery, allowed_labels, safe_name
from .video_io import CODECS


# ---------------------------------------------------------------- planning (parent)


def hash_split(phash: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split of a patient from its (keyed) hash: uniform in [0, 1) -> train/val/test."""
    u = int(ids.keyed(b"split", phash, 12), 16) / 16**12
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def _source_split(c: Clip, ph: str, seen: dict[str, tuple[str, str]]) -> str | None:
    """The split a source names for this clip (normalised); DataError on an unknown name or on
    one patient named in two splits."""
    if not c.split:
        return None
    s = SPLIT_ALIASES.get(c.split.lower())
    where = c.rel_source or os.path.basename(c.source)
    if s is None:
        raise DataError(f"{where}: unknown split {c.split!r} (use train/val/test)")
    prev = seen.setdefault(ph, (s, where))
    if prev[0] != s:
        raise DataError(f"patient {ph} is in split {prev[0]!r} ({prev[1]}) and {s!r} ({where}): "
                        "splits must be by patient")
    return s


def plan(clips: list[Clip], shas: list[str], cfg: IngestConfig, existing: list[dict], key: bytes) -> list[Job]:
    """Keys and by-patient splits for clips with their content hashes; DataError when a source
    puts one patient in two splits (or contradicts the corpus)."""
    by_patient: dict[str, str] = {r["patient"]: r["split"] for r in existing}
    named: dict[str, tuple[str, str]] = {}
    jobs = []
    for c, sha in zip(clips, shas):
        ds = safe_name(cfg.dataset or c.dataset) or "data"  # the key's first part: no '_'
        ph = ids.patient_hash(key, ds, c.patient)
        study = ids.study_hash(key, ds, c.patient, c.study)
        if c.dataset_from_path and not cfg.dataset:
            ds = "d" + ids.keyed(key, f"dataset:{ds}", 8)  # a folder's name may name a patient
        s = _source_split(c, ph, named)
        if s and by_patient.get(ph, s) != s:
            raise DataError(f"patient {ph}: already ingested in split {by_patient[ph]!r}, "
                            f"{c.rel_source or os.path.basename(c.source)} says {s!r}")
        tag = (safe_name(c.clip_id) + "-") if c.clip_id else ""
        jobs.append(Job(clip=c, key=f"{ds}_{ph}_{tag}{sha[:12]}", phash=ph, study=study, split=s or "", sha256=sha,
                        source=ids.path_hash(key, c.rel_source or os.path.basename(c.source))))
    for j in jobs:
        j.split = by_patient.get(j.phash) or named.get(j.phash, (None,))[0] or hash_split(j.phash, cfg.split_fractions)
        by_patient[j.phash] = j.split
    return jobs


def _hash_sources(clips: list[Clip], cache_path: Path | None, key: bytes) -> list[list | Reject]:
    """[size, mtime_ns, sha256] of every clip's file (threads; cached by keyed path + size +
    mtime), or a transient Reject when the file is missing, unreadable or changed while read."""
    from concurrent.futures import ThreadPoolExecutor

    cache: dict = {}
    if cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}

    def one(c: Clip) -> tuple[str | None, list] | Reject:
        tag = ids.keyed(key, "abs:" + os.path.abspath(c.source))
        try:
            st = os.stat(c.source)
            hit = cache.get(tag)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                return tag, hit
            sha = sha256_file(c.source)
            if not same_file(st, os.stat(c.source)):
                return Reject(kind=Kind.GROWING, message=GROWING)
            return tag, [st.st_size, st.st_mtime_ns, sha]
        except FileNotFoundError:
            link = os.path.islink(c.source)
            return Reject(kind=Kind.MISSING, message="source file missing" + (" (dangling symlink)" if link else ""))
        except OSError as e:
            return Reject(kind=Kind.IO, message=f"cannot read source ({type(e).__name__}: {e.strerror or e})")

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(one, clips))
    fresh = {g[0]: g[1] for g in got if not isinstance(g, Reject)}
    if cache_path is not None and fresh != {k: cache.get(k) for k in fresh}:
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        tmp.write_text(json.dumps({**cache, **fresh}))
        os.replace(tmp, cache_path)
    return [g if isinstance(g, Reject) else g[1] for g in got]


# ---------------------------------------------------------------- the run (parent)


@dataclass(kw_only=True, slots=True)
class _ShardDir:
    """The shard directory as this run found it."""

    out_dir: Path
    manifest: dict
    key: bytes
    key_path: Path
    key_created: bool
    records: list[dict]
    done: set[str]
    """Content hashes the corpus holds."""
    rejected: set[str]
    """Content hashes rejected for good by earlier runs (skipped unless retry_rejects)."""


def _open_shard_dir(out_dir: Path, cfg: IngestConfig) -> _ShardDir:
    """Read (or start) the manifest, the id key, the sample records and the earlier rejects;
    refuse a resume with other settings or another key."""
    import secrets

    key_path = Path(cfg.id_key).resolve() if cfg.id_key else ids.default_key_path(out_dir)
    if key_path.parent == out_dir.resolve() or out_dir.resolve() in key_path.parents:
        warnings.warn(f"{key_path}: the id key is inside the shard directory {out_dir}: whoever gets a copy of "
                      "the shards can link samples back to patients; keep it elsewhere (--id-key)", stacklevel=4)
    if (out_dir / "manifest.json").exists():
        manifest = read_manifest(out_dir)
        old = manifest["settings"]
        if old.get("ids") != "hmac-sha256":
            raise DataError(f"{out_dir}: written by an older echofm with unkeyed patient hashes (brute-forceable); "
                            "ingest into a new --out")
        key, created = ids.load_key(key_path, create=False)
        new = cfg.settings(key)
        old.setdefault("fold_stride", 1)  # written before folding existed: every frame kept
        diff = [k for k in RESUME_KEYS if k in old and old[k] != new[k]]
        if "id_key" in diff:
            raise DataError(f"{key_path}: not the id key this corpus was ingested with (fingerprint {new['id_key']}, "
                            f"the manifest says {old['id_key']}); pass the original with --id-key")
        if diff:
            raise DataError(f"{out_dir}: shards were written with " + ", ".join(f"{k}={old[k]!r}" for k in diff)
                            + "; this run asks for " + ", ".join(f"{k}={new[k]!r}" for k in diff)
                            + " (use a new --out directory)")
        records = read_sample_records(out_dir, manifest)
    else:
        if out_dir.is_dir() and any(p.suffix in (".tar", ".idx") for p in out_dir.glob("shard-*")):
            raise DataError(f"{out_dir}: holds shard files but no manifest.json; ingest into an empty "
                            "directory (or one written by `echofm ingest`)")
        if cfg.dry_run and not key_path.exists():
            key, created = secrets.token_bytes(32), False  # a dry run writes nothing, not even a key
        else:
            key, created = ids.load_key(key_path, create=True)
        manifest = new_manifest(codec=cfg.codec, video_ext=CODECS[cfg.codec].ext, height=cfg.size,
                                width=cfg.size, settings=cfg.settings(key))
        records = []
        if not cfg.dry_run:
            # written before any shard: from here on every shard file not listed in it is a
            # leftover of an interrupted run, safe to remove
            write_manifest(out_dir, manifest)
    if not cfg.dry_run:
        clean_orphans(out_dir, manifest)
    rejected = set() if cfg.retry_rejects else _permanent_rejects(out_dir)
    return _ShardDir(out_dir=out_dir, manifest=manifest, key=key, key_path=key_path, key_created=created,
                   records=records, done={r["source_sha256"] for r in records}, rejected=rejected)


def _permanent_rejects(out_dir: Path) -> set[str]:
    """Content hashes of the earlier rejects that are not transient (a missing file is retried)."""
    p = out_dir / REJECTS
    if not p.exists():
        return set()
    out = set()
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not r.get("transient") and r.get("source_sha256"):
            out.add(r["source_sha256"])
    return out


def _select(clips: list[Clip], shard_dir: _ShardDir, cfg: IngestConfig, report: IngestReport):
    """Jobs for the new content; skipped / duplicates counted; unreadable sources -> early rejects."""
    uniq, paths = [], set()
    for c in clips:  # a file named twice (a folder and a CSV listing it) is one source
        a = os.path.abspath(c.source)
        report.skipped += a in paths
        if a not in paths:
            paths.add(a)
            uniq.append(c)
    hashed = _hash_sources(uniq, None if cfg.dry_run else shard_dir.out_dir / HASH_CACHE, shard_dir.key)
    # one source = dataset + patient + path (relative to the root named); two sites' `clip1.mp4`
    # under one --dataset differ by patient
    held = {(r["key"].split("_", 1)[0], r["patient"], r["source"]): r["key"] for r in shard_dir.records}
    early, todo, todo_sha, seen, stat = [], [], [], set(), {}
    for c, got in zip(uniq, hashed):
        h = got if isinstance(got, Reject) else got[2]
        src = ids.path_hash(shard_dir.key, c.rel_source or os.path.basename(c.source))
        if isinstance(h, Reject):
            stub = Job(clip=c, key="", phash="", study="", split="", sha256="", source=src)
            early.append(ClipResult(job=stub, reject=h))
        elif h in shard_dir.done or h in shard_dir.rejected:
            report.skipped += 1
        elif h in seen:
            report.duplicates += 1
            report.quality.duplicates.append(ids.path_hash(shard_dir.key, c.rel_source or os.path.basename(c.source)))
        else:
            seen.add(h)
            todo.append(c)
            todo_sha.append(h)
            stat[h] = got[:2]
    jobs = []
    for j in plan(todo, todo_sha, cfg, shard_dir.records, shard_dir.key):
        j.size, j.mtime_ns = stat[j.sha256]
        old = held.get((j.key.split("_", 1)[0], j.phash, j.source))
        if old is None:
            jobs.append(j)
        else:  # a file rewritten (or finished growing) after it was ingested: one sample per source
            early.append(ClipResult(job=j, reject=Reject(kind=Kind.CHANGED, message=(
                f"the corpus holds other content of this source as {old}; not ingested twice (ingest the new "
                "version into a new --out, or rename it if it is another clip)"))))
    return jobs, early


def _results(jobs: list[Job], cfg: IngestConfig) -> Iterator[ClipResult]:
    """process_clip over jobs, in job order; with workers > 1 in supervised processes, where a
    worker that dies turns its clip into a reject."""
    from .workers import WorkerDied, imap_supervised

    fn = partial(process_clip, cfg=cfg)  # looked up now: tests may swap process_clip
    if cfg.workers == 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    for job, r in zip(jobs, imap_supervised(fn, jobs, cfg.workers, init=init_worker, timeout=cfg.clip_timeout)):
        if isinstance(r, WorkerDied):
            r = ClipResult(job=job, reject=Reject(kind=Kind.TIMEOUT if r.timeout else Kind.WORKER, message=r.reason))
        yield r


class _Writer:
    """The single writer: one open shard per split, its stats, the rejects file."""

    def __init__(self, shard_dir: _ShardDir, cfg: IngestConfig, report: IngestReport) -> None:
        self.shard_dir, self.cfg, self.report = shard_dir, cfg, report
        self.shards: dict[str, tuple[ShardWriter, CorpusStats]] = {}
        self.next_index = max((int(s["tar"][6:12]) for s in shard_dir.manifest["shards"]), default=-1) + 1
        self.rejects = None if cfg.dry_run else open(shard_dir.out_dir / REJECTS, "a")

    def take(self, r: ClipResult) -> None:
        rep, q = self.report, self.report.quality
        rep.input_bytes += r.job.size
        if r.reject is not None:
            rep.rejected += 1
            q.rejected[r.reject.kind] = q.rejected.get(r.reject.kind, 0) + 1
            self._reject(r)
            return
        rep.added += 1
        rep.frames += r.frames
        q.run.add(r.stats)
        q.splits[r.job.split] = q.splits.get(r.job.split, 0) + self.cfg.dry_run
        if not self.cfg.dry_run:
            self._add(r)

    def _reject(self, r: ClipResult) -> None:
        j = r.job
        self.report.rejected_files.append(rejected_file(j.clip.source, r.reject.kind, r.reject.message,
                                                        r.reject.transient, j.source))
        if self.rejects is None:
            return
        self.rejects.write(json.dumps({
            "source": j.source, "source_sha256": j.sha256 or None, "dataset": j.key.split("_", 1)[0] or None,
            "kind": r.reject.kind, "reason": r.reject.message, "transient": r.reject.transient,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        self.rejects.flush()

    def _add(self, r: ClipResult) -> None:
        j = r.job
        if j.split not in self.shards:
            self.shards[j.split] = (ShardWriter(out_dir=self.shard_dir.out_dir, index=self.next_index, split=j.split),
                                    CorpusStats())
            self.next_index += 1
        w, stats = self.shards[j.split]
        rec = SampleRecord(key=j.key, source=j.source, source_sha256=j.sha256, patient=j.phash, study=j.study,
                           split=j.split, frames=r.frames)
        try:
            w.add(j.key, r.components, rec)
        except BaseException:
            self.shards.pop(j.split)[0].abort()  # a half-written sample: drop the shard
            raise
        stats.add(r.stats)
        if w.bytes >= self.cfg.shard_size:
            self.finish(j.split)

    def finish(self, split: str) -> None:
        w, stats = self.shards.pop(split)
        entry = w.finalize()
        entry["stats"] = stats.to_dict()
        add_shard(self.shard_dir.manifest, entry)
        write_manifest(self.shard_dir.out_dir, self.shard_dir.manifest)
        self.report.shards.append(entry["tar"])
        self.report.output_bytes += entry["bytes"]

    def close(self) -> None:
        """Complete samples are kept on any exit (Ctrl-C included); kill -9 leaves only *.tmp
        files, which the next run removes."""
        for split in list(self.shards):
            if self.shards[split][0].samples:
                self.finish(split)
            else:
                self.shards.pop(split)[0].abort()
        if self.rejects is not None:
            self.rejects.close()


def ingest(sources: list[str | Path], out_dir: str | Path, cfg: IngestConfig | None = None) -> IngestReport:
    """Ingest every clip of `sources` into shards under `out_dir`; resumable and idempotent by
    content. With cfg.dry_run nothing is written; the report says what a run would do."""
    cfg = cfg or IngestConfig()
    cfg.validate()
    if cfg.size < 128:
        warnings.warn(f"ingest size {cfg.size} < 128: NVDEC (the GPU decoder) needs at least 128x128; "
                      "fine for CPU tests and demos only", stacklevel=2)
    out_dir = Path(out_dir)
    try:
        if cfg.dry_run:
            return _run(sources, out_dir, cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        with DirLock(out_dir):
            return _run(sources, out_dir, cfg)
    except OSError as e:  # a full disk, a read-only --out: the shards written so far stay valid
        where = os.fsdecode(e.filename) if e.filename else str(out_dir)
        raise DataError(f"{where}: {e.strerror or e} (ingest stopped; the complete shards so far are kept "
                        "and a rerun resumes)") from None


def _run(sources: list[str | Path], out_dir: Path, cfg: IngestConfig) -> IngestReport:
    from tqdm import tqdm

    from .sources import discover

    t0 = time.perf_counter()
    shard_dir = _open_shard_dir(out_dir, cfg)
    found = Discovery()
    for s in sources:
        found.extend(_keep_labels(discover(s, dataset=cfg.dataset), s, cfg))
    report = IngestReport(id_key=str(shard_dir.key_path), id_key_created=shard_dir.key_created)
    report.quality = QualityReport(dry_run=cfg.dry_run, unlisted=len(found.unlisted), renamed=len(found.renamed),
                                   ignored=dict(found.ignored))
    jobs, early = _select(found.clips, shard_dir, cfg, report)
    writer = _Writer(shard_dir, cfg, report)
    bar = tqdm(total=len(jobs) + len(early), unit="clip", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for r in itertools.chain(early, _results(jobs, cfg)):  # streamed: results hold encoded videos
            writer.take(r)
            bar.update(1)
            bar.set_postfix_str(f"{report.input_bytes / 2**20 / (time.perf_counter() - t0):.1f} MB/s, "
                                f"rejects {report.rejected}")
    finally:
        writer.close()
        bar.close()
        if not cfg.dry_run:
            write_log(out_dir, report.rejected_files)  # paths stay outside the shard folder
    report.seconds = time.perf_counter() - t0
    report.quality.added, report.quality.skipped = report.added, report.skipped
    _finish_quality(report.quality, shard_dir, cfg)
    return report


def _keep_labels(found: Discovery, source, cfg: IngestConfig) -> Discovery:
    """Only allowlisted labels reach the sample json (docs/shards.md#labels); a warning names
    the columns dropped, and those that look like identifiers are never written."""
    dropped, identifying = set(), set()
    for c in found.clips:
        c.labels, d, i = allowed_labels(c.labels, tuple(cfg.label_columns))
        dropped |= d
        identifying |= i
    if identifying:
        warnings.warn(f"{os.fsdecode(source)}: column(s) {', '.join(sorted(identifying))} look like patient "
                      "identifiers: not written into the shards", stacklevel=3)
    if dropped:
        warnings.warn(f"{os.fsdecode(source)}: column(s) {', '.join(sorted(dropped))} are not labels echofm "
                      "knows (docs/shards.md#labels): dropped; keep one with --label NAME", stacklevel=3)
    return found


def _finish_quality(q: QualityReport, shard_dir: _ShardDir, cfg: IngestConfig) -> None:
    """Corpus figures from the manifest's shard stats (a dry run: the existing corpus plus what
    it would add); warnings; the JSON next to the manifest (not for a dry run)."""
    m = shard_dir.manifest
    for s in m["shards"]:
        if "stats" in s:
            q.corpus.merge(s["stats"])
        else:
            q.shards_without_stats += 1
    run_splits = dict(q.splits)
    q.splits = {s: m["splits"].get(s, 0) + run_splits.get(s, 0) for s in SPLITS}
    if cfg.dry_run:
        q.corpus.merge(q.run.to_dict())
    q.finish()
    if not cfg.dry_run:
        tmp = shard_dir.out_dir / (REPORT + ".tmp")
        tmp.write_text(json.dumps(q.to_dict(), indent=1) + "\n")
        os.replace(tmp, shard_dir.out_dir / REPORT)
