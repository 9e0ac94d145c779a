"""The node-local shard cache: whole shards from a remote store, bounded, shared (docs/data.md).

`ShardCache.path(entry)` returns a local file holding a shard tar whose sha256 equals the
manifest's, downloading it first when needed. The cache:

- is bounded: before a download reserves its bytes, least-recently-used entries are
  removed until entries + downloads in flight fit `limit` (bytes). Use is the file's
  mtime (touched on each `path` call), so the ranks of a node share one LRU order;
- is shared by the processes of a node: `<dir>/.lock` (flock) guards eviction and
  reservation; each download writes `<entry>.part`, flocked by its writer for as long as
  it writes, so another process waits for it instead of downloading it twice, and a
  `.part` whose lock is free is a dead writer's leftover (kill -9): reused or removed;
- never serves a damaged entry: a download is hashed while it streams and renamed into
  place only when its sha256 equals the manifest's (a killed download leaves only a
  `.part`); an entry's name carries its sha256, so a shard replaced in the bucket is
  a different entry; its size is checked before use.

Prefetch: `want(entries)` queues downloads on `threads` background threads (the stream
passes the shards of its next batches, in the plan's order).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from .errors import DataError
from .remote import Store, open_store, read_remote_manifest

PART = ".part"


def entry_name(shard: dict) -> str:
    """Cache file name of a manifest shard entry: sha256 prefix + tar name."""
    return f"{shard['sha256'][:16]}-{shard['tar']}"


class ShardCache:
    """Shard tars of one store in folder `root`, at most `limit` bytes (module docstring)."""

    def __init__(self, store: Store, root: str | Path, limit: int, threads: int = 4) -> None:
        self.store, self.root, self.limit = store, Path(root), int(limit)
        self.root.mkdir(parents=True, exist_ok=True)
        self.peak_bytes = self.used_bytes()
        """Largest bytes (entries + reserved downloads) this process saw in the folder."""
        self.downloads = 0
        self.downloaded_bytes = 0
        self.threads = max(threads, 1)
        self._pool: ThreadPoolExecutor | None = None  # started on the first `want` (again after close)
        self._pending: dict[str, Future] = {}
        self._mu = threading.RLock()  # (a future already done runs its callback, which takes it, at once)

    # -- use ------------------------------------------------------------------------

    def path(self, shard: dict) -> Path:
        """Local path of the verified shard tar of manifest entry `shard` (downloaded if absent)."""
        final = self.root / entry_name(shard)
        if not self._ready(final, shard):
            with self._mu:
                fut = self._pending.get(final.name)
            if fut is not None:
                try:
                    fut.result()
                except (DataError, CancelledError):
                    pass  # (a failed or cancelled prefetch) fetched again below: a second failure is raised
            if not self._ready(final, shard):
                self._fetch(shard)
        try:
            os.utime(final)  # the LRU clock
        except FileNotFoundError:  # evicted by another rank since: fetch again
            return self.path(shard)
        return final

    def want(self, shards: list[dict]) -> None:
        """Download these entries in the background (in order), unless present or queued."""
        for s in shards:
            name = entry_name(s)
            with self._mu:
                if name in self._pending:
                    continue
                try:
                    os.utime(self.root / name)  # present: keep it (it is about to be read)
                    continue
                except FileNotFoundError:
                    pass
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="echofm-fetch")
                fut = self._pool.submit(self._fetch, s)
                self._pending[name] = fut
                fut.add_done_callback(lambda _, n=name: self._done(n))

    def _done(self, name: str) -> None:
        with self._mu:
            self._pending.pop(name, None)

    def close(self) -> None:
        """Stop the background downloads (queued ones are dropped, running ones finish)."""
        with self._mu:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _ready(final: Path, shard: dict) -> bool:
        try:
            return final.stat().st_size == shard["bytes"]
        except FileNotFoundError:
            return False

    # -- download -------------------------------------------------------------------

    def _fetch(self, shard: dict) -> None:
        """Download one entry: reserve room, write `.part` under its lock, verify, rename.
        Prefetch errors surface when the reader asks for the shard (it fetches again)."""
        final = self.root / entry_name(shard)
        part = final.with_name(final.name + PART)
        size = int(shard["bytes"])
        if size > self.limit:
            raise DataError(f"{self.store.where(shard['tar'])}: {size / 1e9:.2f} GB, larger than the whole cache "
                            f"(data.cache_limit_gb={self.limit / 1e9:g})")
        try:
            self._download(shard, part, final)
        except OSError as e:  # the cache's own disk: full, read-only, gone
            raise DataError(f"{self.root}: cannot write the shard cache ({e.strerror or e}); set data.cache_dir "
                            "to a writable local disk with room for data.cache_limit_gb") from None

    def _download(self, shard: dict, part: Path, final: Path) -> None:
        size = int(shard["bytes"])
        fd = self._reserve(part, final, size)
        if fd is None:
            return  # present now (another process or thread finished it)
        try:
            with os.fdopen(os.dup(fd), "r+b") as f:
                f.seek(0)
                digest = self.store.read(shard["tar"], f)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            if digest != shard["sha256"]:
                with self._locked():
                    part.unlink(missing_ok=True)
                raise DataError(f"{self.store.where(shard['tar'])}: sha256 {digest[:16]}... differs from the "
                                f"manifest's {shard['sha256'][:16]}... (the object changed or was damaged "
                                "after the manifest was written); not cached")
            with self._locked():  # (a listing never misses a file being renamed: the count stays exact)
                os.replace(part, final)
            self.downloads += 1
            self.downloaded_bytes += size
        finally:
            os.close(fd)  # releases the .part lock

    def _reserve(self, part: Path, final: Path, size: int) -> int | None:
        """Take `part`'s lock (waiting for a live writer), make room for `size` bytes and
        size the .part to them (others count it); returns its fd, or None when the entry
        appeared meanwhile."""
        while True:
            with self._locked():
                if final.exists():
                    if final.stat().st_size == size:
                        return None
                    final.unlink()  # damaged since (its size is wrong): download it again
                fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    busy = True
                else:
                    busy = False
                    if os.fstat(fd).st_nlink == 0:  # renamed/removed between open and lock
                        os.close(fd)
                        continue
                    self._evict(size - os.fstat(fd).st_size, keep=part.name)
                    os.ftruncate(fd, size)  # sparse: reserves the bytes in everyone's count
                    self._note_peak()
                    return fd
            if busy:  # another writer: wait for it outside the folder lock, then look again
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.close(fd)
                if final.exists():
                    return None

    @contextmanager
    def _locked(self):
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _entries(self) -> list[tuple[float, int, Path, bool]]:
        """(mtime, bytes, path, is_part) of every file in the folder (lock held)."""
        out = []
        for p in self.root.iterdir():
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p, p.name.endswith(PART)))
        return out

    def used_bytes(self) -> int:
        return sum(b for _, b, _, _ in self._entries())

    def _evict(self, need: int, keep: str) -> None:
        """Remove dead writers' .part files, then least-recently-used entries, until `need`
        more bytes fit the limit (lock held)."""
        entries = self._entries()
        for e in [e for e in entries if e[3] and e[2].name != keep]:
            if _stale(e[2]):
                e[2].unlink(missing_ok=True)
                entries.remove(e)
        used = sum(b for _, b, _, _ in entries)
        for mtime, b, p, is_part in sorted(entries, key=lambda e: e[0]):
            if used + need <= self.limit:
                break
            if not is_part:
                p.unlink(missing_ok=True)  # a reader holding it open keeps reading its bytes
                used -= b
        if used + need > self.limit:
            raise DataError(f"{self.root}: the shard cache cannot fit {need / 1e6:.1f} MB more within "
                            f"data.cache_limit_gb={self.limit / 1e9:g} (downloads in flight hold the rest); "
                            "raise data.cache_limit_gb")

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.used_bytes())


def _stale(part: Path) -> bool:
    """A .part whose writer is gone (its lock is free)."""
    try:
        fd = os.open(part, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def cache_root(base: str | Path, url: str) -> Path:
    """The cache folder of shard URL `url` under `base` (one per URL)."""
    return Path(base) / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """$ECHOFM_CACHE/shards, else ~/.cache/echofm/shards (node-local disk on most clusters;
    set data.cache_dir to the node's scratch SSD otherwise)."""
    return Path(os.environ.get("ECHOFM_CACHE", Path.home() / ".cache" / "echofm")) / "shards"


class RemoteShards:
    """A shard folder at a URL, as the stream reads it: the manifest (fetched at start), local
    copies of the small per-shard files (DALI index, sample list: `meta_dir`, keyed by the
    manifest's sha256) and the tars through a bounded `ShardCache`."""

    def __init__(self, url: str, cache_dir: str | Path, limit: int, threads: int = 4) -> None:
        self.url, self.store = url, open_store(url)
        self.manifest, raw = read_remote_manifest(self.store)
        root = cache_root(cache_dir, url)
        self.meta_dir = root / "meta" / hashlib.sha256(raw).hexdigest()[:16]
        try:
            self.meta_dir.mkdir(parents=True, exist_ok=True)
            (root / "tars").mkdir(exist_ok=True)
        except OSError as e:
            raise DataError(f"{root}: cannot create the shard cache ({e.strerror or e}); set data.cache_dir "
                            "to a writable local disk") from None
        names = [n for s in self.manifest["shards"]
                 for n in (s["idx"], s.get("samples_file", s["tar"].replace(".tar", ".samples.jsonl")))]
        with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
            list(pool.map(self._fetch_meta, [n for n in names if not (self.meta_dir / n).exists()]))
        self.cache = ShardCache(self.store, root / "tars", limit, threads)

    def _fetch_meta(self, name: str) -> None:
        tmp = self.meta_dir / f".{name}.{os.getpid()}.{threading.get_ident()}{PART}"
        try:
            with open(tmp, "wb") as f:
                self.store.read(name, f)
        except DataError:
            tmp.unlink(missing_ok=True)
            if name.endswith(".idx"):
                raise
            return  # an older ingest wrote no sample list: read unchecked (the stream warns)
        os.replace(tmp, self.meta_dir / name)

    def close(self) -> None:
        self.cache.close()
