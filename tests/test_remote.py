"""Shards on object storage (loaders/remote.py, loaders/cache.py): a real S3 server (moto's
server mode) and a real HTTP server on localhost; the real boto3 client, nothing mocked."""
from __future__ import annotations

import csv
import hashlib
import http.server
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from echofm.loaders.cache import PART, RemoteShards, ShardCache, cache_root, entry_name
from echofm.loaders.errors import DataError
from echofm.loaders.remote import open_store, pull, push
from echofm.loaders.shards import read_manifest
from echofm.loaders.stream import ClipStream, StreamConfig

LENGTHS = (9, 12, 17, 24, 31, 36, 39, 40, 33, 28)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on localhost; the standard AWS variables point boto3 at it."""
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    none = str(tmp_path_factory.mktemp("aws") / "none")
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": none, "AWS_SHARED_CREDENTIALS_FILE": none}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="echo")
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """10 ramp videos, one per shard (so a bounded cache must evict) -> local shard folder."""
    from echofm.loaders.ingest import IngestConfig, ingest
    from echofm.loaders.video_io import encode_video
    from test_stream import _ramp_video

    root = tmp_path_factory.mktemp("many")
    (root / "src/videos").mkdir(parents=True)
    with open(root / "src/labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient", "split", "view", "ef"])
        for i, n in enumerate(LENGTHS):
            frames, _ = _ramp_video(n)
            (root / f"src/videos/r{i}.avi").write_bytes(encode_video(frames, 30.0, "mjpeg", gop=1, quality=2))
            w.writerow([f"videos/r{i}.avi", f"p{i}", "train", "A4C", 50 + i])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size < 128 is intended for CPU tests
        report = ingest([root / "src"], root / "shards", IngestConfig(size=112, codec="vp9", sector=False,
                                                                      progress=False, shard_size=1))
    assert report.added == len(LENGTHS)
    return root / "shards"


@pytest.fixture(scope="module")
def pushed(s3, many_shards):
    assert push(many_shards, "s3://echo/ramp", log=lambda _m: None) == len(LENGTHS)
    return "s3://echo/ramp"


def _cfg(shards, **kw) -> StreamConfig:
    return StreamConfig(**(dict(shards=str(shards), num_frames=8, stride=2, size=64, batch_size=2, num_threads=1,
                                random_resized_crop=(0.6, 1.0), flip=True) | kw))


def _epochs(stream, n=2) -> list[dict]:
    return [b for _ in range(n) for b in stream]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [m["key"] for m in x["meta"]] == [m["key"] for m in y["meta"]]
        assert torch.equal(x["frames_index"], y["frames_index"])
        assert torch.equal(x["video"], y["video"])


def test_s3_batches_equal_local_batches(pushed, many_shards, tmp_path):
    """Same seed: the same keys, frame indices and pixels from s3:// as from the folder."""
    local = _epochs(ClipStream(_cfg(many_shards)))
    s = ClipStream(_cfg(pushed, cache_dir=str(tmp_path)))
    _same(_epochs(s), local)
    cache = s.samples.remote.cache
    m = read_manifest(many_shards)
    names = sorted(p.name for p in cache.root.iterdir() if not p.name.startswith("."))
    assert names == sorted(entry_name(e) for e in m["shards"])  # every shard once, no .part left
    for e in m["shards"]:  # each entry is the manifest's bytes
        assert hashlib.sha256((cache.root / entry_name(e)).read_bytes()).hexdigest() == e["sha256"]
    assert cache.downloads == len(LENGTHS)
    s.close()
    assert next(iter(s))["video"].shape[0] == 2  # a closed stream reopens when iterated
    s.close()
    # a second stream on the warm cache downloads nothing
    again = ClipStream(_cfg(pushed, cache_dir=str(tmp_path)))
    _same(_epochs(again, 1), local[: len(local) // 2])
    assert again.samples.remote.cache.downloads == 0
    again.close()


def test_bounded_cache_evicts_and_stays_within_its_limit(pushed, many_shards, tmp_path):
    m = read_manifest(many_shards)
    biggest = max(e["bytes"] for e in m["shards"])
    tight = dict(batch_size=1, prefetch=1, fetch_threads=1, fetch_ahead=0)  # 3 shards in use at once
    limit = 3 * biggest
    s = ClipStream(_cfg(pushed, cache_dir=str(tmp_path), cache_limit_gb=limit / 1e9, **tight))
    _same(_epochs(s), _epochs(ClipStream(_cfg(many_shards, **tight))))
    cache = s.samples.remote.cache
    assert 0 < cache.peak_bytes <= limit
    assert cache.downloads > len(LENGTHS)  # a full permutation through a 3-shard cache re-downloads
    assert cache.used_bytes() <= limit
    s.close()
    with pytest.raises(DataError, match="data.cache_limit_gb=.* is below"):
        ClipStream(_cfg(pushed, cache_dir=str(tmp_path), cache_limit_gb=2 * biggest / 1e9, **tight))


def test_pull_copies_verified_and_writes_the_manifest_last(pushed, many_shards, tmp_path, s3):
    import boto3

    n = pull(pushed, tmp_path / "copy", log=lambda _m: None)
    assert n == len(LENGTHS)
    listed = ["manifest.json"] + [e[k] for e in read_manifest(many_shards)["shards"] for k in ("tar", "idx", "samples_file")]
    for name in listed:
        assert (tmp_path / "copy" / name).read_bytes() == (many_shards / name).read_bytes(), name
    # a tar damaged in the store: pull stops at it, leaves no manifest (a reader sees no folder)
    client = boto3.client("s3")
    push(many_shards, "s3://echo/damaged", log=lambda _m: None)
    tar = read_manifest(many_shards)["shards"][3]["tar"]
    body = bytearray(client.get_object(Bucket="echo", Key=f"damaged/{tar}")["Body"].read())
    body[700] ^= 0xFF
    client.put_object(Bucket="echo", Key=f"damaged/{tar}", Body=bytes(body))
    with pytest.raises(DataError, match=f"damaged/{tar}: sha256 differs from the manifest"):
        pull("s3://echo/damaged", tmp_path / "bad", log=lambda _m: None)
    assert not (tmp_path / "bad/manifest.json").exists() and not (tmp_path / "bad" / tar).exists()
    # the stream refuses the damaged object too (never caches it)
    s = ClipStream(_cfg("s3://echo/damaged", cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="differs from the manifest's"):
        _epochs(s, 1)
    assert not any(p.name.endswith(tar) for p in s.samples.remote.cache.root.iterdir())
    s.close()
    # push of a damaged local folder: refused before its manifest is written
    bad = tmp_path / "bad_local"
    bad.mkdir()
    for p in many_shards.iterdir():
        if p.is_file():
            (bad / p.name).write_bytes(p.read_bytes())
    data = bytearray((bad / tar).read_bytes())
    data[700] ^= 0xFF
    (bad / tar).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{tar}: sha256 differs from the manifest"):
        push(bad, "s3://echo/bad_local", log=lambda _m: None)
    listed = client.list_objects_v2(Bucket="echo", Prefix="bad_local/").get("Contents", [])
    assert "bad_local/manifest.json" not in {o["Key"] for o in listed}
    with pytest.raises(DataError, match="no such object"):
        ClipStream(_cfg("s3://echo/bad_local", cache_dir=str(tmp_path / "c")))


class _SlowFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; .tar bodies in 4 KB pieces with `delay` s between them."""

    delay = 0.0
    sent: dict = {}

    def log_message(self, *a):
        pass

    def copyfile(self, source, outputfile):
        if not self.path.endswith(".tar") or not self.delay:
            return super().copyfile(source, outputfile)
        while chunk := source.read(4096):
            outputfile.write(chunk)
            outputfile.flush()
            self.sent[self.path] = self.sent.get(self.path, 0) + len(chunk)
            time.sleep(self.delay)


@pytest.fixture()
def http_shards(many_shards):
    handler = type("H", (_SlowFiles,), {"delay": 0.0, "sent": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a, **kw: handler(*a, directory=str(many_shards), **kw))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


KILLED = """
import sys
from echofm.loaders.cache import RemoteShards
r = RemoteShards(sys.argv[1], sys.argv[2], 10**9, 1)
r.cache.path([e for e in r.manifest["shards"] if e["tar"] == sys.argv[3]][0])
"""


def test_kill_9_during_a_download_leaves_no_entry_that_is_used(http_shards, many_shards, tmp_path):
    url, handler = http_shards
    m = read_manifest(many_shards)
    e = max(m["shards"], key=lambda s: s["bytes"])
    handler.delay = 0.05  # ~80 KB/s: the child is mid-download when it is killed
    child = subprocess.Popen([sys.executable, "-c", KILLED, url, str(tmp_path), e["tar"]])
    try:
        t0 = time.monotonic()
        while handler.sent.get("/" + e["tar"], 0) < 8192 and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        assert handler.sent.get("/" + e["tar"], 0) >= 8192, "the child never started downloading"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    root = cache_root(tmp_path, url) / "tars"
    final = root / entry_name(e)
    part = final.with_name(final.name + PART)
    assert part.exists() and not final.exists()  # the half file is only ever a .part
    assert handler.sent["/" + e["tar"]] < e["bytes"]
    handler.delay = 0.0
    r = RemoteShards(url, tmp_path, 10**9, 2)
    got = r.cache.path(e)  # the dead writer's .part is taken over and rewritten
    assert got == final and not part.exists()
    assert hashlib.sha256(final.read_bytes()).hexdigest() == e["sha256"]
    with open(final, "r+b") as f:  # an entry cut short on disk later is not used: fetched again
        f.truncate(e["bytes"] // 2)
    assert r.cache.path(e) == final and r.cache.downloads == 2
    assert hashlib.sha256(final.read_bytes()).hexdigest() == e["sha256"]
    r.close()
    # an http(s) store serves the same batches as the folder
    _same(_epochs(ClipStream(_cfg(url, cache_dir=str(tmp_path))), 1), _epochs(ClipStream(_cfg(many_shards)), 1))


def test_a_live_writer_is_waited_for_not_duplicated(http_shards, many_shards, tmp_path):
    """Two caches on one folder (two ranks of a node) asking for the same shard: one download."""
    url, handler = http_shards
    e = read_manifest(many_shards)["shards"][0]
    handler.delay = 0.01
    a = ShardCache(open_store(url), tmp_path, 10**9)
    b = ShardCache(open_store(url), tmp_path, 10**9)
    out = {}
    ts = [threading.Thread(target=lambda c=c, k=k: out.__setitem__(k, c.path(e))) for k, c in (("a", a), ("b", b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out["a"] == out["b"] and a.downloads + b.downloads == 1
    assert hashlib.sha256(out["a"].read_bytes()).hexdigest() == e["sha256"]
    a.close(), b.close()


def test_cli_push_and_pull(s3, many_shards, tmp_path, capsys):
    from echofm.engine.cli import main

    assert main(["shards", "push", str(many_shards), "s3://echo/cli"]) == 0
    assert main(["shards", "pull", "s3://echo/cli", str(tmp_path / "back")]) == 0
    assert "10 shard(s) copied and verified" in capsys.readouterr().out
    assert (tmp_path / "back/manifest.json").read_bytes() == (many_shards / "manifest.json").read_bytes()
    assert main(["shards", "pull", "s3://echo/nothing", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("echofm: error: s3://echo/nothing/manifest.json: no such object"), err
    assert main(["shards", "pull", "s3://nobucket/x", str(tmp_path / "none")]) == 2
    assert "no such bucket 'nobucket'" in capsys.readouterr().err


def test_want_does_not_deadlock_on_downloads_that_finish_at_once(tmp_path):
    """Regression: a prefetch done before its callback was added ran the callback under the
    (non-reentrant) queue lock, and the stream hung on its first batch."""
    c = ShardCache(open_store("https://example.invalid/x"), tmp_path, 10**9, threads=4)
    c._fetch = lambda s: None  # instant downloads: the race on every call
    fake = [{"tar": f"s{i}.tar", "sha256": f"{i:064x}", "bytes": 1} for i in range(200)]
    t = threading.Thread(target=c.want, args=(fake,), daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "want() deadlocked"
    c.close()
    assert not c._pending


def test_unwritable_cache_dir_is_one_named_error(pushed, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("")
    with pytest.raises(DataError, match="cannot create the shard cache"):
        ClipStream(_cfg(pushed, cache_dir=str(ro / "file")))
