"""Plain files: a video file, a DICOM file, or a folder searched recursively for both.

Videos: the extensions in `VIDEO_EXTS` (any codec PyAV reads). The patient is the file's
stem (a folder of loose videos carries no patient identity; use a CSV manifest with a
`patient` column when clips share patients). DICOM files (`.dcm`, or any file starting with
the DICM preamble) go through the DICOM adapter.

Nothing is skipped without a word: a file with another extension is sniffed (its first bytes);
a video or DICOM under an unexpected name (`clip.txt`) is ingested and reported as renamed,
everything else is counted by extension as ignored.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import VIDEO_EXTS, Clip, Discovery, safe_name

# Container signatures: (offset, bytes). Enough to tell a video from a text or image file.
_VIDEO_MAGIC = ((4, b"ftyp"), (8, b"AVI "), (0, b"\x1aE\xdf\xa3"), (0, b"\x00\x00\x01\xba"),
                (0, b"\x00\x00\x01\xb3"), (0, b"OggS"), (0, b"FLV"), (0, b"GIF8"),
                (0, b"0&\xb2u\x8ef\xcf\x11"))
# Files that are part of a dataset's layout, not clips (no need to report them).
_QUIET = {".csv", ".cfg", ".json", ".txt", ".md", ".npy", ".npz", ".gz", ".nii"}


def sniff(path: Path) -> str | None:
    """'video', 'dicom' or None from a file's first bytes (never trusts the extension)."""
    try:
        with open(path, "rb") as f:
            head = f.read(188 * 2 + 1)
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return "dicom"
    if any(head[o:o + len(m)] == m for o, m in _VIDEO_MAGIC):
        return "video"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:  # MPEG transport stream
        return "video"
    return None


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def discover(path: str | Path, dataset: str | None = None) -> Discovery:
    root = Path(path)
    # a dangling symlink is listed too: as a video it becomes a `missing_file` reject, else it is ignored
    paths = [root] if root.is_file() else sorted(q for q in root.rglob("*") if q.is_file() or _dangling(q))
    base = root.parent if root.is_file() else root
    ds = dataset or safe_name(base.resolve().name) or "files"
    found, dicoms = Discovery(), []
    for q in paths:
        rel = str(q.relative_to(base))
        ext = q.suffix.lower()
        kind = "video" if ext in VIDEO_EXTS else "dicom" if ext in (".dcm", ".dicom") else sniff(q)
        if kind == "video":
            found.clips.append(Clip(source=str(q), rel_source=rel, reader="video", dataset=ds, patient=q.stem,
                                    dataset_from_path=dataset is None))
        elif kind == "dicom":
            dicoms.append(q)
        else:
            what = "(dangling symlink)" if _dangling(q) else ext or "(none)"
            if ext not in _QUIET or root.is_file() or _dangling(q):
                found.ignored[what] = found.ignored.get(what, 0) + 1
            continue
        if ext not in VIDEO_EXTS and ext not in (".dcm", ".dicom", ""):
            found.renamed.append(rel)
    if dicoms:
        from .dicom import discover_files

        found.clips += discover_files(dicoms, base, ds, from_path=dataset is None)
    if not found.clips and root.is_file():
        raise DataError(f"{root}: not a video ({', '.join(VIDEO_EXTS)}), DICOM, or CSV file")
    return found
