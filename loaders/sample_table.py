"""The samples of one split of a shard directory, as a table the stream reads from: each
sample's key, shard and the (offset, size) of each component (from the shards' DALI index
files), read with `os.pread` and checked against the sha256s recorded at ingest on first read.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from .cache import RemoteShards
from .errors import DataError
from .shards import read_index, read_manifest, read_member_hashes

__all__ = ["SampleTable"]


class _Url(str):
    """A remote shard's URL, shown in messages where a local shard shows its path."""

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]


class SampleTable:
    """The samples of one split: key, shard and (offset, size) of each component.

    Reads only the manifest, the DALI index files and (verify=True) the per-member sha256s
    of the shards' sample lists; component bytes are fetched on demand with `os.pread` (no
    tar parsing, no seeks shared between threads).
    """

    COMPONENTS = ("video", "nframes", "json", "seg")
    DIGEST = 16
    """Bytes of each member's sha256 kept in memory (64 B per sample for 4 members): ample to
    detect damage, 18 MB for a 290k-clip corpus."""

    FDS_REMOTE = 16
    """Remote shards: open shard files kept per process (an evicted one stays readable while open)."""

    def __init__(self, shard_dir: str | Path, split: str, segmentation: bool, verify: bool = True,
                 remote: RemoteShards | None = None) -> None:
        self.remote = remote
        self.dir = remote.meta_dir if remote is not None else Path(shard_dir)
        self.manifest = remote.manifest if remote is not None else read_manifest(self.dir)
        m = self.manifest
        shards = [s for s in m["shards"] if split == "all" or s["split"] == split]
        if not shards:
            raise DataError(f"{shard_dir}/manifest.json: no shards of split {split!r} "
                            f"(splits there: {m['splits']})")
        self.entries = shards
        exts = {"video": m["video_ext"], "nframes": "nframes", "json": "json", "seg": "seg.npy"}
        self.tars: list[Path] = []
        self.keys: list[str] = []
        shard_of, table, digests = [], [], []
        for s in shards:
            idx_path = self.dir / s["idx"]
            try:
                entries = read_index(idx_path)
            except (OSError, ValueError) as e:
                raise DataError(f"{idx_path}: unreadable DALI index ({e})") from e
            hashes = read_member_hashes(self.dir, s) if verify else {}
            si = len(self.tars)
            self.tars.append(Path(self.dir / s["tar"]) if remote is None else _Url(remote.store.where(s["tar"])))
            for comps in entries:
                by_ext = {ext: (off, size) for ext, off, size, _ in comps}
                key = comps[0][3][: -len(comps[0][0]) - 1]
                row = []
                for c in self.COMPONENTS:
                    if exts[c] in by_ext:
                        row += by_ext[exts[c]]
                    elif c == "seg" and not segmentation:
                        row += (-1, -1)
                    else:
                        hint = (" (ingest the masks, or set data.segmentation=false)" if c == "seg"
                                else " (re-run `echofm ingest` into a fresh directory)")
                        raise DataError(f"{self.tars[si]}: sample {key} has no .{exts[c]} component{hint}")
                self.keys.append(key)
                shard_of.append(si)
                table.append(row)
                digests.append(self._digests(hashes.get(key), exts))
        self.shard = np.asarray(shard_of, dtype=np.int32)
        self.table = np.asarray(table, dtype=np.int64).reshape(-1, len(self.COMPONENTS), 2)
        self.exts = exts
        C = len(self.COMPONENTS)
        self.digest = np.frombuffer(b"".join(d for d, _ in digests), np.uint8).reshape(-1, C, self.DIGEST)
        # [N, C] bool: member not yet checked in this process (False: checked, or no hash
        # recorded by an older ingest). First touch only: a sample is hashed once per process
        # (page-cache reads of bytes already checked are trusted), so later epochs pay nothing.
        self.unchecked = np.asarray([h for _, h in digests], dtype=bool).reshape(-1, C)
        if verify and len(self.keys) and not self.unchecked.any():
            warnings.warn(f"{self.dir}: the shards record no per-member sha256 (written by an older "
                          "ingest): samples are read unchecked; re-ingest to have damage detected", stacklevel=3)
        elif verify and len(self.keys) and not self.unchecked.any(axis=1).all():
            some = [self.keys[i] for i in np.flatnonzero(~self.unchecked.any(axis=1))]
            warnings.warn(f"{self.dir}: {len(some)} sample(s) record no per-member sha256 (e.g. {some[0]}): they "
                          "are read unchecked; `echofm shards verify` lists them", stacklevel=3)
        self._fds: dict[int, int] = {}

    def _digests(self, members: dict | None, exts: dict) -> tuple[bytes, list[bool]]:
        out, has = b"", []
        for c in self.COMPONENTS:
            h = (members or {}).get(exts[c])
            has.append(h is not None)
            out += bytes.fromhex(h)[: self.DIGEST] if h is not None else bytes(self.DIGEST)
        return out, has

    def check(self, i: int, component: str, data: bytes) -> None:
        """On the first read of a member: raise DataError when `data` (component of sample i)
        differs from its ingest sha256."""
        c = self.COMPONENTS.index(component)
        if not self.unchecked[i, c]:
            return
        if hashlib.sha256(data).digest()[: self.DIGEST] != self.digest[i, c].tobytes():
            raise DataError(f"{self.where(i)}: .{self.exts[component]} differs from the sha256 recorded at "
                            "ingest (the shard was damaged or changed since); `echofm shards verify "
                            f"{self.dir}` lists every damaged sample")
        self.unchecked[i, c] = False

    def __len__(self) -> int:
        return len(self.keys)

    def where(self, i: int) -> str:
        """'<tar path>: sample <key>' for messages."""
        return f"{self.tars[self.shard[i]]}: sample {self.keys[i]}"

    def read(self, i: int, component: str) -> bytes:
        c = self.COMPONENTS.index(component)
        off, size = (int(v) for v in self.table[i, c])
        si = int(self.shard[i])
        fd = self._fds.get(si)
        if fd is None:
            fd = self._fds[si] = self._open(si)
        data = os.pread(fd, size, off)
        if len(data) != size:
            raise DataError(f"{self.where(i)}: component .{component} is truncated "
                            f"({len(data)} of {size} bytes at offset {off}; the shard file is damaged)")
        self.check(i, component, data)
        return data

    def _open(self, si: int) -> int:
        if self.remote is None:
            try:
                return os.open(self.tars[si], os.O_RDONLY)
            except OSError as e:
                raise DataError(f"{self.tars[si]}: cannot open shard ({e.strerror})") from e
        while len(self._fds) >= self.FDS_REMOTE:  # the oldest opened: bounded disk held past eviction
            os.close(self._fds.pop(next(iter(self._fds))))
        for _ in range(3):  # another rank may evict it between the download and the open
            try:
                return os.open(self.remote.cache.path(self.entries[si]), os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise DataError(f"{self.tars[si]}: the cached shard keeps being evicted before it is read; "
                        "raise data.cache_limit_gb")

    def prefetch(self, items: np.ndarray) -> None:
        """Remote shards: download the shards of these samples (corpus indices, in reading order)."""
        if self.remote is not None and len(items):
            si = list(dict.fromkeys(self.shard[items].tolist()))
            self.remote.cache.want([self.entries[i] for i in si])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
