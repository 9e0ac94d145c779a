"""Multi-node launch (docs/multinode.md): two torchrun "nodes" on localhost (--nnodes 2,
--node_rank 0 / 1, one process each, rendezvous on 127.0.0.1) pretrain from s3:// shards on a
local S3 server, each node through its own shard cache, into one shared run folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from echofm.engine import checkpoint as ckpt
from echofm.loaders.cache import cache_root
from echofm.loaders.remote import push
from echofm.loaders.shards import read_manifest

sys.path.insert(0, str(Path(__file__).parent))
from test_remote import _free_port, s3  # noqa: E402,F401  (s3: the moto server fixture)
from test_trainer import ROOT, TINY, _env, _overrides  # noqa: E402


def test_two_nodes_on_localhost_train_from_s3(s3, tiny_shards, tmp_path):
    push(tiny_shards, "s3://echo/tiny", log=lambda _m: None)
    port = _free_port()
    procs = []
    for node in (0, 1):
        sets = _overrides("s3://echo/tiny", tmp_path / "runs", "train.steps=2", "train.checkpoint_every=2",
                          "name=twonode", f"data.cache_dir={tmp_path / f'node{node}'}", "data.fetch_threads=2")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "echofm.engine.cli", "pretrain", TINY, *sum((["--set", o] for o in sets), [])]
        procs.append(subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    run = tmp_path / "runs/twonode"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [1, 2]
    meta = json.loads((ckpt.find_checkpoint(run) / "meta.json").read_text())
    assert meta["world_size"] == 2 and {"rank_00000.pt", "rank_00001.pt"} <= set(meta["files"])
    # each node filled its own cache, only with verified shards of the manifest
    names = {f"{e['sha256'][:16]}-{e['tar']}" for e in read_manifest(tiny_shards)["shards"]}
    for node in (0, 1):
        cached = {p.name for p in (cache_root(tmp_path / f"node{node}", "s3://echo/tiny") / "tars").iterdir()
                  if not p.name.startswith(".")}
        assert cached and cached <= names, cached
