"""Shard folders on object storage: `s3://bucket/prefix` and `http(s)://` URLs (docs/data.md).

A `Store` reads (and for S3 writes) the files of one shard folder by name. S3 goes through
boto3, which takes the endpoint, region and credentials from the standard AWS environment
and config files (`AWS_ENDPOINT_URL` points it at MinIO, Ceph or any S3-compatible store);
http(s) is a plain GET per file (a static web server or a presigned-URL gateway; read-only).

`push` and `pull` copy a whole shard folder with verification: every tar is hashed against
the manifest's sha256 (before upload; after download, before it is renamed into place),
every uploaded object's size is checked, and the manifest is written last, so a reader
never sees a manifest that lists a shard not yet (or not wholly) copied.
"""
from __future__ import annotations

import abc

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import DataError
from .digest import sha256_file
from .shards import MANIFEST, read_manifest

SCHEMES = ("s3://", "http://", "https://")
CHUNK = 1 << 20


def is_url(where: str | os.PathLike) -> bool:
    """True for a shard location the stores read (s3://, http://, https://)."""
    return isinstance(where, str) and where.startswith(SCHEMES)


class Store(abc.ABC):
    """One shard folder on a remote store; files are addressed by their name in the folder."""

    url: str

    def where(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    @abc.abstractmethod
    def read(self, name: str, out: BinaryIO) -> str:
        """Stream file `name` into `out`; returns its sha256 hex. DataError when unreadable."""

    def get(self, name: str) -> bytes:
        import io

        buf = io.BytesIO()
        self.read(name, buf)
        return buf.getvalue()

    def write(self, name: str, path: Path) -> None:
        raise DataError(f"{self.url}: this store is read-only (push shards to s3:// URLs)")


class S3Store(Store):
    """s3://bucket/prefix through boto3 (one client, thread-safe, shared by the fetch threads)."""

    def __init__(self, url: str) -> None:
        self.url = url
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise DataError(f"{url}: no bucket in the URL (expected s3://bucket/prefix)")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise DataError(f"{url}: reading s3:// needs boto3 (pip install 'echofm[s3]')") from None
        self.client = boto3.client("s3", config=Config(max_pool_connections=32, retries={"max_attempts": 5}))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _error(self, name: str, e: Exception) -> DataError:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(e, NoCredentialsError):
            return DataError(f"{self.where(name)}: no AWS credentials (set AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return DataError(f"{self.where(name)}: no such object")
            if code == "NoSuchBucket":
                return DataError(f"{self.where(name)}: no such bucket {self.bucket!r}")
        return DataError(f"{self.where(name)}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:160]})")

    def read(self, name: str, out: BinaryIO) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        h = hashlib.sha256()
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
            for chunk in body.iter_chunks(CHUNK):
                h.update(chunk)
                out.write(chunk)
        except (BotoCoreError, ClientError) as e:
            raise self._error(name, e) from None
        return h.hexdigest()

    def write(self, name: str, path: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_file(str(path), self.bucket, self.key(name))
            size = self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ContentLength"]
        except (BotoCoreError, ClientError) as e:
            raise self._error(name, e) from None
        if size != path.stat().st_size:
            raise DataError(f"{self.where(name)}: uploaded {size} bytes of {path.stat().st_size} ({path})")


class HttpStore(Store):
    """http(s)://host/path: one GET per file (read-only)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def read(self, name: str, out: BinaryIO) -> str:
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(self.where(name), timeout=60) as r:
                while chunk := r.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as e:
            raise DataError(f"{self.where(name)}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"{self.where(name)}: cannot read ({str(e)[:160]})") from None
        return h.hexdigest()


def open_store(url: str) -> Store:
    if url.startswith("s3://"):
        return S3Store(url)
    if url.startswith(("http://", "https://")):
        return HttpStore(url)
    raise DataError(f"{url}: not a shard URL (expected s3://bucket/prefix or https://...)")


def read_remote_manifest(store: Store) -> tuple[dict, bytes]:
    """(manifest, its bytes) of the folder at `store`, checked like a local one."""
    raw = store.get(MANIFEST)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # one parser and one set of checks for both
        Path(tmp, MANIFEST).write_bytes(raw)
        try:
            m = read_manifest(tmp)
        except DataError as e:
            raise DataError(str(e).replace(str(Path(tmp, MANIFEST)), store.where(MANIFEST))) from None
    return m, raw


def _files(shard: dict) -> list[str]:
    return [shard["idx"], shard.get("samples_file", shard["tar"].replace(".tar", ".samples.jsonl")), shard["tar"]]


def push(local: str | Path, url: str, log: Callable[[str], None] = print) -> int:
    """Copy the shard folder `local` to `url`: each tar hashed against the manifest first,
    each object's size checked after upload, the manifest last. Returns the shard count."""
    local = Path(local)
    m = read_manifest(local)
    store = open_store(url)
    for i, s in enumerate(m["shards"]):
        tar = local / s["tar"]
        if not tar.is_file():
            raise DataError(f"{tar}: listed in the manifest but missing; nothing pushed past it")
        if sha256_file(tar) != s["sha256"]:
            raise DataError(f"{tar}: sha256 differs from the manifest (damaged); `echofm shards verify "
                            f"{local}` names the samples; nothing pushed past it")
        for name in _files(s):
            if (local / name).is_file() or name == s["tar"]:
                store.write(name, local / name)
        log(f"  {i + 1}/{len(m['shards'])} {s['tar']} ({s['bytes'] / 1e6:.1f} MB) verified")
    store.write(MANIFEST, local / MANIFEST)
    return len(m["shards"])


def pull(url: str, local: str | Path, log: Callable[[str], None] = print) -> int:
    """Copy the shard folder at `url` into `local`: each file into a temp name, each tar's
    sha256 checked against the manifest before it is renamed into place, the manifest last.
    Returns the shard count."""
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    store = open_store(url)
    m, raw = read_remote_manifest(store)
    for i, s in enumerate(m["shards"]):
        for name in _files(s):
            dst, tmp = local / name, local / f".{name}.part"
            try:
                with open(tmp, "wb") as f:
                    digest = store.read(name, f)
                    f.flush()
                    os.fsync(f.fileno())
            except DataError:
                tmp.unlink(missing_ok=True)
                if name != s["tar"]:
                    continue  # an older ingest wrote no sample list
                raise
            if name == s["tar"] and digest != s["sha256"]:
                tmp.unlink()
                raise DataError(f"{store.where(name)}: sha256 differs from the manifest (damaged in the "
                                "store); nothing pulled past it")
            os.replace(tmp, dst)
        log(f"  {i + 1}/{len(m['shards'])} {s['tar']} ({s['bytes'] / 1e6:.1f} MB) verified")
    tmp = local / f".{MANIFEST}.part"
    tmp.write_bytes(raw)
    os.replace(tmp, local / MANIFEST)
    return len(m["shards"])
