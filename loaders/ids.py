"""Keyed hashes for everything that could identify a patient: patient ids and source paths.

A plain sha256 of a medical record number is brute-forced in seconds (the id space is
small), so ingest uses HMAC-SHA256 with a per-corpus secret key. The key lives outside the
shard directory (default: `<out>.idkey` next to it; or a file the user names with
`--id-key`), is created with 32 random bytes on the first ingest, and must be kept: the same
patient then hashes to the same id in every later run (splits stay by patient), and only its
holder can link a sample back to a patient or file. The manifest records a fingerprint of
the key (an HMAC of a fixed string, which reveals nothing about it) so that a resume with
another key is refused.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .errors import DataError

KEY_SUFFIX = ".idkey"
_CHECK = b"echofm id key check v1"


def default_key_path(out_dir: str | Path) -> Path:
    """`<out>.idkey` beside the shard directory (outside it: copying the shards leaves it behind)."""
    out = Path(out_dir).resolve()
    return out.with_name(out.name + KEY_SUFFIX)


def load_key(path: str | Path, *, create: bool) -> tuple[bytes, bool]:
    """The key in `path` (hex text) -> (key bytes, created). Creates it (mode 0600, 32 random
    bytes) when missing and `create`; raises DataError naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise DataError(f"{path}: the corpus's id key is missing; pass the original with --id-key "
                            "(a new key would give every patient a new id and break by-patient splits)")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created meanwhile by a concurrent run: use that one
            return load_key(path, create=False)[0], False
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        return load_key(path, create=False)[0], True
    try:
        text = path.read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable id key ({e}); expected hex text") from e
    if len(key) < 16:
        raise DataError(f"{path}: id key too short ({len(key)} bytes; use at least 16, e.g. `openssl rand -hex 32`)")
    return key, False


def fingerprint(key: bytes) -> str:
    """16 hex chars identifying the key (for the manifest) without revealing it."""
    return hmac.new(key, _CHECK, hashlib.sha256).hexdigest()[:16]


def keyed(key: bytes, text: str, n: int = 16) -> str:
    """n hex chars of HMAC-SHA256(key, text). A file name that is not valid UTF-8 reaches
    here with surrogate escapes (os.fsdecode): they encode back to the name's own bytes."""
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:n]


def patient_hash(key: bytes, dataset: str, patient: str) -> str:
    """The only patient identity that reaches keys, json, manifest and reports."""
    return keyed(key, f"patient:{dataset}:{patient}")


def study_hash(key: bytes, dataset: str, patient: str, study: str) -> str:
    """An exam's identity, keyed like the patient. `study` is the source's study id in
    clear (DICOM StudyInstanceUID, a CSV `study` cell); '' for a source that records none:
    then the patient has one study (EchoNet, CAMUS, loose files), hashed from the patient."""
    return keyed(key, f"study:{dataset}:{patient}:{study}")


def path_hash(key: bytes, rel_path: str) -> str:
    """A source path (relative to the root the user named) as it appears in json and rejects."""
    return keyed(key, f"path:{rel_path}")
