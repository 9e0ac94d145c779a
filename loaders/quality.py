"""How a corpus came out: per-clip measurements summed per shard, and the ingest report.

Each finished shard's manifest entry carries `stats` (a `CorpusStats` as a dict: clip and
frame counts, how many have a period and ED/ES, the crop fraction, source resolution / fps /
length histograms). They are sums, so the corpus's figures are the sum over the manifest's
shards (the manifest stays the single source of truth, and a crashed run's unlisted shards
do not count). `QualityReport` adds what this run saw (added, skipped, duplicates, rejects by
reason, files not ingested) and warnings; `echofm ingest` prints it and writes it as JSON
(`quality_report.json`) next to the manifest. Numbers and hashed ids only: no path, no name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")
LENGTH_BINS = (16, 32, 64, 128, 256, 512)
"""Upper bounds (frames, exclusive) of the length histogram's bins; the last bin is open."""
LOW_PERIOD = 0.5
"""Warn when fewer than this fraction of clips have a period (cropping or fps may be off)."""


@dataclass(kw_only=True, slots=True)
class ClipStats:
    """One ingested clip's measurements (what the worker hands the writer)."""

    source_size: tuple[int, int]
    """(H, W) of the source frames."""
    fps: float
    frames: int
    """Frames in the shard."""
    period: bool
    ed_es: bool
    crop_fraction: float
    """Fraction of the source frame outside the sector's box (0: no crop)."""


def length_bin(frames: int) -> str:
    lo = 0
    for hi in LENGTH_BINS:
        if frames < hi:
            return f"{lo}-{hi - 1}"
        lo = hi
    return f">={lo}"


@dataclass(kw_only=True, slots=True)
class CorpusStats:
    """Sums over clips; `merge` adds another (e.g. a shard's manifest `stats`)."""

    clips: int = 0
    frames: int = 0
    with_period: int = 0
    with_ed_es: int = 0
    crop_sum: float = 0.0
    crop_max: float = 0.0
    resolution: dict[str, int] = field(default_factory=dict)
    """'WxH' of the source -> clips."""
    fps: dict[str, int] = field(default_factory=dict)
    """Source frame rate (rounded to 0.1) -> clips."""
    length: dict[str, int] = field(default_factory=dict)
    """Length bin (frames in the shard) -> clips."""

    def add(self, c: ClipStats) -> None:
        self.clips += 1
        self.frames += c.frames
        self.with_period += c.period
        self.with_ed_es += c.ed_es
        self.crop_sum += c.crop_fraction
        self.crop_max = max(self.crop_max, c.crop_fraction)
        for d, k in ((self.resolution, f"{c.source_size[1]}x{c.source_size[0]}"),
                     (self.fps, f"{c.fps:.1f}"), (self.length, length_bin(c.frames))):
            d[k] = d.get(k, 0) + 1

    def merge(self, d: dict) -> None:
        for k in ("clips", "frames", "with_period", "with_ed_es", "crop_sum"):
            setattr(self, k, getattr(self, k) + d.get(k, 0))
        self.crop_max = max(self.crop_max, d.get("crop_max", 0.0))
        for k in ("resolution", "fps", "length"):
            mine = getattr(self, k)
            for kk, v in d.get(k, {}).items():
                mine[kk] = mine.get(kk, 0) + v

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> dict:
        """Rates and the distributions' most common values (what the report shows)."""
        n = max(self.clips, 1)
        top = lambda d, k=8: dict(sorted(d.items(), key=lambda kv: -kv[1])[:k])  # noqa: E731
        return {"clips": self.clips, "frames": self.frames,
                "period_found_pct": round(100 * self.with_period / n, 1),
                "ed_es_found_pct": round(100 * self.with_ed_es / n, 1),
                "crop_fraction_mean": round(self.crop_sum / n, 4), "crop_fraction_max": round(self.crop_max, 4),
                "resolution": top(self.resolution), "fps": top(self.fps),
                "length": dict(sorted(self.length.items(), key=lambda kv: int(kv[0].lstrip(">=").split("-")[0])))}


@dataclass(kw_only=True, slots=True)
class QualityReport:
    """The end-of-ingest report: this run, the corpus, warnings."""

    dry_run: bool = False
    added: int = 0
    skipped: int = 0
    """Sources whose content is already in the corpus (or a permanent reject of an earlier run)."""
    duplicates: list[str] = field(default_factory=list)
    """Hashed sources whose content another source of this run already holds (recorded once)."""
    rejected: dict[str, int] = field(default_factory=dict)
    """This run's rejects by kind."""
    unlisted: int = 0
    renamed: int = 0
    ignored: dict[str, int] = field(default_factory=dict)
    run: CorpusStats = field(default_factory=CorpusStats)
    """This run's clips."""
    corpus: CorpusStats = field(default_factory=CorpusStats)
    """Every clip in the corpus (the manifest's shards; a dry run: what it would add)."""
    splits: dict[str, int] = field(default_factory=dict)
    shards_without_stats: int = 0
    warnings: list[str] = field(default_factory=list)

    def finish(self) -> None:
        """Derive the warnings from the numbers."""
        w = self.warnings
        for s in SPLITS:
            if not self.splits.get(s):
                w.append(f"split {s!r} is empty")
        c = self.corpus
        if c.clips and c.with_period < LOW_PERIOD * c.clips:
            w.append(f"a period was found in only {c.with_period} of {c.clips} clips (check fps and sector crop)")
        if self.duplicates:
            w.append(f"{len(self.duplicates)} source(s) repeat content already in this run (recorded once)")
        if self.unlisted:
            w.append(f"{self.unlisted} video(s) in a CSV manifest's folder are not listed in it (not ingested)")
        if self.renamed:
            w.append(f"{self.renamed} video(s) have an unexpected file extension (ingested)")
        if self.rejected:
            w.append(f"{sum(self.rejected.values())} source(s) rejected" + (" (by kind above)" if self.dry_run
                                                                          else ": see rejects.jsonl"))
        if self.shards_without_stats:
            w.append(f"{self.shards_without_stats} shard(s) from an older ingest carry no stats (not in the figures)")

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "run": {"added": self.added, "skipped": self.skipped,
                "duplicates": len(self.duplicates), "duplicate_sources": self.duplicates,
                "rejected": self.rejected, "unlisted_files": self.unlisted, "renamed_files": self.renamed,
                "ignored_files": self.ignored, "clips": self.run.summary()},
                "corpus": {**self.corpus.summary(), "splits": self.splits}, "warnings": self.warnings}

    def lines(self) -> list[str]:
        """The printed summary."""
        c, r = self.corpus.summary(), self.run.summary()
        head = "dry run (nothing written)" if self.dry_run else "corpus"
        verb = "would be added" if self.dry_run else "added"
        out = [f"this run: {self.added} {verb}, {self.skipped} already in the corpus, {len(self.duplicates)} duplicate(s), "
               f"{sum(self.rejected.values())} rejected" + (f" ({_kv(self.rejected)})" if self.rejected else ""),
               f"  its clips: period found {r['period_found_pct']}%, ED/ES {r['ed_es_found_pct']}%, "
               f"crop {100 * r['crop_fraction_mean']:.1f}% (max {100 * r['crop_fraction_max']:.1f}%)",
               f"{head}: {c['clips']} clips, {c['frames']} frames, splits {_kv({s: self.splits.get(s, 0) for s in SPLITS})}",
               f"  period found {c['period_found_pct']}%, ED/ES {c['ed_es_found_pct']}%, crop fraction mean "
               f"{100 * c['crop_fraction_mean']:.1f}% (max {100 * c['crop_fraction_max']:.1f}%)",
               f"  source resolution {_kv(c['resolution'])}; fps {_kv(c['fps'])}; length {_kv(c['length'])}"]
        return out + [f"WARNING: {x}" for x in self.warnings]


def _kv(d: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"
