"""Which of the user's files an ingest rejected, by path, for the person who ran it.

The shard folder's `rejects.jsonl` names no file (the folder travels; paths can name
patients): it keys each reject by a keyed hash. The paths stay local instead: the console
lists the rejected files (relative to the current folder, the first `CONSOLE_CAP`, then a
count), and `<out>.rejects.jsonl`, beside the shard folder and outside it like the id key
(`<out>.idkey`), keeps the full list with reasons, one line per reject, appended by every
run (docs/shards.md#rejected-files).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SUFFIX = ".rejects.jsonl"
"""The local log's name: the shard folder's name plus this, in the folder that holds it."""
CONSOLE_CAP = 20
"""Rejected files listed on the console; the rest are counted (the log has them all)."""


@dataclass(frozen=True, slots=True)
class RejectedFile:
    """One rejected source file: where it is and why (never written into the shard folder)."""

    path: str
    """Absolute path of the file."""
    kind: str
    """The reject kind (rejects.jsonl `kind`)."""
    reason: str
    """One line: what was wrong."""
    transient: bool
    """True: retried by the next ingest (missing file, I/O error)."""
    source: str
    """The keyed hash that names this file in the shard folder's rejects.jsonl."""


def rejected_file(path: str, kind: str, reason: str, transient: bool, source: str) -> RejectedFile:
    return RejectedFile(path=os.path.abspath(path), kind=kind, reason=reason, transient=transient, source=source)


def log_path(out_dir: str | Path) -> Path:
    """`<out>.rejects.jsonl` beside the shard folder `out_dir`."""
    out = Path(out_dir).resolve()
    return out.with_name(out.name + SUFFIX)


def write_log(out_dir: str | Path, rejected: list[RejectedFile]) -> Path | None:
    """Append this run's rejects to the local log; None (nothing written) when there are none."""
    if not rejected:
        return None
    path = log_path(out_dir)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(path, "a") as f:
        for r in rejected:
            f.write(json.dumps({**asdict(r), "time": stamp}) + "\n")
    return path


def shown_path(path: str, cwd: str | None = None) -> str:
    """The path relative to the current folder when it lies under it, else absolute."""
    rel = os.path.relpath(path, cwd or os.getcwd())
    return path if rel.startswith("..") else rel


def console_lines(rejected: list[RejectedFile], log: Path | None, cap: int = CONSOLE_CAP) -> list[str]:
    """'rejected: PATH (kind: reason)' for the first `cap` files, then how many more and where
    the full list is."""
    lines = [f"rejected: {shown_path(r.path)} ({r.kind}: {r.reason})" for r in rejected[:cap]]
    rest = len(rejected) - cap
    where = f"; the full list with reasons: {log}" if log is not None else ""
    if rest > 0:
        lines.append(f"rejected: ... and {rest} more{where}")
    elif rejected and log is not None:
        lines.append(f"rejected files are listed in {log}")
    return lines
