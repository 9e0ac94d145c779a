"""The records source adapters produce: `Clip` (what to ingest), `Discovery` (what a source
holds), `Decoded` (a clip's pixels).

An adapter turns its layout into `Clip`s (cheap: paths + labels, no decoding). Ingest
workers call `load.load_clip` to decode the pixels (and masks); a Clip is small and
picklable so it travels to worker processes. This module imports no adapter (they import it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np


@dataclass(kw_only=True, slots=True)
class SegSpec:
    """Where a clip's segmentation comes from (label maps 0 bg, 1 LV, 2 myocardium, 3 LA)."""

    kind: Literal["npy", "nifti", "polygons"]
    """npy: uint8 [F, H, W] file; nifti: CAMUS `_gt` volume; polygons: {frame: [(x, y), ...]}."""
    path: str = ""
    """File for npy / nifti."""
    polygons: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    """Frame index -> polygon vertices in source pixel coordinates (filled with label 1)."""
    frames: list[int] | None = None
    """Annotated frame indices (None: every frame with a non-zero label)."""


@dataclass(kw_only=True, slots=True)
class Clip:
    """One source clip: where its pixels are and what is known about it."""

    source: str
    """Path of the file holding the pixels (resume identity; hashed into source_sha256)."""
    reader: Literal["video", "dicom", "nifti"]
    """Which decoder reads `source`."""
    dataset: str
    """Short dataset name, first part of the sample key ([A-Za-z0-9-])."""
    dataset_from_path: bool = False
    """`dataset` is a folder's name (files, CSV layouts): ingest writes only a keyed hash of it
    (folder names can name patients) and uses it in clear only to keep patient ids of
    different folders apart."""
    patient: str
    """Patient id in clear text; ingest hashes it before anything is written."""
    study: str = ""
    """Study (exam) id in clear text (DICOM StudyInstanceUID, a CSV `study` column); ingest
    hashes it with the patient. '' : the source records none, one study per patient."""
    clip_id: str = ""
    """Non-identifying tag for the key (e.g. the CAMUS view "2CH"); never a file name, which
    often embeds patient ids. Ingest appends a hash of the source path."""
    split: str | None = None
    """Source split (train/val/test) if the layout gives one; else ingest hashes the patient."""
    view: str | None = None
    labels: dict = field(default_factory=dict)
    """Task labels for the json, e.g. {"ef": 55.0, "grade": 1}."""
    fps: float | None = None
    """Frame rate from the layout (overrides what the file says when set)."""
    seg: SegSpec | None = None
    rel_source: str = ""
    """`source` relative to the root the user named (what the json records)."""


@dataclass(kw_only=True, slots=True)
class Decoded:
    """A clip's pixels after decoding (before sector cropping), at the kept size."""

    frames: np.ndarray
    """uint8 [F, h, w, 3] RGB, or [F, h, w] for grey sources."""
    fps: float
    seg: np.ndarray | None = None
    """uint8 [F, h, w] label maps (0 on frames without annotation) or None."""
    seg_frames: list[int] = field(default_factory=list)
    source_size: tuple[int, int] = (0, 0)
    """(H, W) of the source frames (frames may be smaller: see `scale`)."""
    scale: float = 1.0
    """Kept size / source size (decoding shrinks large sources frame by frame)."""
    problems: str = ""
    """Damage met while decoding ('12 of 111 frames corrupt'); '' when clean."""


@dataclass(kw_only=True, slots=True)
class Discovery:
    """What a source argument holds: its clips, and the files it saw but does not ingest as
    listed, so nothing is skipped without a word."""

    clips: list[Clip] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    """Videos / DICOM files in a CSV manifest's folder that the manifest does not list
    (relative paths; not ingested)."""
    renamed: list[str] = field(default_factory=list)
    """Files whose content is a video or DICOM but whose extension says otherwise (relative
    paths; ingested)."""
    ignored: dict[str, int] = field(default_factory=dict)
    """Extension -> number of files that are neither video nor DICOM (not ingested)."""

    def extend(self, other: "Discovery") -> None:
        self.clips += other.clips
        self.unlisted += other.unlisted
        self.renamed += other.renamed
        for k, v in other.ignored.items():
            self.ignored[k] = self.ignored.get(k, 0) + v


VIDEO_EXTS = (".mp4", ".avi", ".webm", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".ogv", ".flv",
              ".3gp", ".m2ts", ".mts", ".gif")


def reader_for(path: str | Path) -> Literal["video", "dicom", "nifti"]:
    """Pick the decoder from the file name (DICOM files often have no extension)."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(VIDEO_EXTS):
        return "video"
    return "dicom"


def safe_name(s: str, max_len: int = 48) -> str:
    """Keep [A-Za-z0-9-] (underscore separates key parts), collapse the rest to '-'."""
    import re

    out = re.sub(r"[^A-Za-z0-9-]+", "-", s).strip("-")
    return out[:max_len]


LABEL_KEYS = frozenset({"ef", "esv", "edv", "grade", "as_grade", "image_quality", "ed_true", "es_true", "period_true"})
"""The labels a sample json may carry (docs/shards.md#labels): the downstream tasks' targets
(`ef`, `grade`; `view` is a top-level field) and the public datasets' documented measurements.
Any other column of a source is dropped with a warning unless the ingest names it
(IngestConfig.label_columns); a column that looks like an identifier is never written."""

_IDENTIFYING = re.compile(
    r"name|mrn|medical.?rec|record.?(no|num|id)|birth|dob|date|accession|address|street|city|zip|post.?code|"
    r"postal|phone|mobile|fax|e.?mail|ssn|social|insurance|nhs|passport|licen[cs]e|account|\bip\b|url|"
    r"serial|contact|guardian|initials|signature|physician|doctor", re.IGNORECASE)


def looks_identifying(column: str) -> bool:
    """A column name that suggests a direct patient identifier (name, MRN, date of birth,
    accession, address, phone, ...): such values never reach a shard file."""
    return bool(_IDENTIFYING.search(column.replace("_", " ")))


def allowed_labels(labels: dict, extra: tuple[str, ...] | frozenset = ()) -> tuple[dict, set[str], set[str]]:
    """labels -> (the allowed ones, dropped label names, dropped identifier-like names)."""
    keep, dropped, identifying = {}, set(), set()
    for k, v in labels.items():
        if looks_identifying(k):
            identifying.add(k)
        elif k in LABEL_KEYS or k in extra:
            keep[k] = v
        else:
            dropped.add(k)
    return keep, dropped, identifying
