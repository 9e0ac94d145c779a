"""Shards -> device-resident uint8 clip batches (docs/data.md): the PyTorch-facing `ClipStream`.

The DALI graph (`pipeline.py`) does the heavy work on its own threads: decode (NVDEC with
the "mixed" backend) of exactly the clip's frames (`frames=`), then crop/resize/flip. On
the CPU the clips are decoded by this stream's own threads (host_decode.py: libavcodec,
grey clips kept as luma, no RGB conversion) and the graph only crops, resizes and flips;
`data.cpu_decoder: dali` keeps DALI's CPU decoder, the GPU graph's twin.

This module owns what must be exact and cheap to checkpoint: which samples form which
batch, each clip's frame indices, and every random number. The host work per clip is
small: a few `os.pread`s at the offsets of the shards' DALI index files, a json parse, the
WebM's frame table (trim.scan_frames, ~0.1 ms), and for DALI's decoders the video cut to
the GOPs the clip needs (trim.cut_clip: DALI's CPU decoder would otherwise decode from
frame 0 to the clip start).

Why the order lives here and not in `fn.readers.webdataset`: DALI cannot checkpoint a
pipeline that contains `fn.decoders.video` (DALI 2.4), and its reader only shuffles
within a buffer whose state depends on every earlier epoch. Instead, each epoch's order is
a full permutation of the split drawn from (seed, epoch), cut into global batches of
batch_size x world_size; rank r takes part r of each, and a global batch's random numbers
come from (seed, epoch, its first position). The loader state is then just (epoch, global
cursor): resume is exact by construction, also at another world size or batch size
(elastic, docs/data.md), `set_epoch` can jump to any epoch without replaying earlier ones, and there is no second pipeline to run (the
verified two-pipeline workaround costs ~11%). A full permutation also shuffles better
than a reader's shuffle buffer; the price is random reads within shards (page cache /
SSD friendly; each read is one clip of tens of KB; shards at a URL are read whole into a
node-local cache first: cache.py). Those decisions are pure functions in
`sampling.py` (tested without DALI); this module reads the bytes and runs the graph.

Usage, as engine/trainer.py runs it (each rank its own part of every global batch):

    s = ClipStream(cfg, train=True, rank=r, world_size=w, device=torch.device("cuda", r))
    s.load_state_dict(rank_state["stream"])  # optional: exact resume, also at another world size
    it = iter(s)
    while training:
        try:
            batch = next(it)                 # batch["video"]: uint8 [B, T, H, W, 3] on the device
        except StopIteration:                # epoch done: the stream is on the next one
            it = iter(s)
            batch = next(it)
        ...
        rank_state["stream"] = s.state_dict()  # with each checkpoint

Modules, one job each: stream_config.py (the settings), sample_table.py (which bytes are
each sample's, checked on first read), sampling.py (the order and the random numbers),
host_decode.py (the CPU decoder), prefetch.py (batches in flight in the DALI pipeline),
pipeline.py (the DALI graph); this module reads each batch on the host and
hands out torch tensors.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Collection
from typing import Any

import numpy as np

from .cache import RemoteShards, default_cache_dir
from .errors import DataError
from .fold import folded_stride, stream_stride
from .host_decode import DecodeFailed, HostDecoder, grey_to_rgb, uniform_channels
from .pipeline import GraphSpec, require_nvdec
from .prefetch import BatchFailed, HostBatch, Prefetcher, find_bad
from .remote import is_url
from .sample_table import SampleTable
from .stream_config import StreamConfig
from .sampling import Position, Sampling, batch_draws, clip_frames, epoch_plan, items_digest
from .trim import NotCuttable, cut_clip, scan_frames

CPU_CODECS = ("vp9", "vp8", "mjpeg")
"""Codecs DALI's CPU video decoder reads; H.264/HEVC/AV1 need the mixed (GPU) backend."""

__all__ = ["CPU_CODECS", "ClipStream", "StreamConfig"]


# ---------------------------------------------------------------- the stream


class ClipStream:
    """Iterate shards as clip batches (docs/data.md) on `device`.

    Yields dicts: "video" uint8 [B, T, H, W, 3] on `device`, "frames_index" int64 [B, T]
    (source frame of each clip frame; indices wrap on videos shorter than the clip span),
    "meta" (B parsed json dicts plus "key", "shard" and, in evaluation, "clip_index"), and
    with `cfg.segmentation` "seg" uint8 [B, T, H, W] (label maps of the same frames, same
    crop/resize (nearest)/flip).

    Iteration continues from the current position: a fresh `for` over the stream after a
    `break`, or after `load_state_dict`, resumes where it stopped; finishing an epoch moves
    to the next one.
    """

    def __init__(self, cfg: StreamConfig, *, train: bool = True, rank: int = 0, world_size: int = 1,
                 device: Any = None, keys: Collection[str] | None = None) -> None:
        """keys: read only these samples of the split (e.g. a fine-tune's labelled patients);
        None: every sample. Ranks and epochs are planned over them."""
        import torch

        cfg.validate()
        if not cfg.shards:
            raise DataError("data.shards is not set: point it at a directory written by `echofm ingest`")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg, self.train, self.rank, self.world_size = cfg, train, rank, world_size
        self.device = torch.device(device if device is not None else "cpu")
        self.backend = self._resolve_backend()
        manifest_path = f"{str(cfg.shards).rstrip('/')}/manifest.json"
        self.samples = self._open_samples()
        m = self.samples.manifest
        self._codec = self._check_codec(str(m["codec"]).lower(), manifest_path)
        self.fold = folded_stride(m)
        """Source frames per shard frame (ingest's fold_stride, loaders/fold.py): the stream samples
        shard frames at data.stride / fold; `frames_index` counts shard frames."""
        self._cuttable = cfg.cut_gops and self._codec in ("vp9", "vp8") and m["video_ext"] == "webm"
        crop = train and cfg.random_resized_crop is not None
        self._spec = self._graph_spec(m, crop)
        self._items = self._select(keys)
        self._items_digest = items_digest([self.samples.keys[i] for i in self._items])
        self._sampling = self._make_sampling(stream_stride(cfg.stride, self.fold, manifest_path), crop)
        self.epoch = 0
        self._pos = 0
        self._start = (0, 0)  # (epoch, global position) its plan starts from: an elastic resume's cursor
        self.resume_notes: list[str] = []
        """The layout changes the last `load_state_dict` accepted ("world size 2 -> 1")."""
        self._plan_cache: dict[tuple[int, int], list[np.ndarray]] = {}
        self._live: Prefetcher | None = None
        self._decoder: HostDecoder | None = None  # the host decode threads, started on first use
        self._bad: dict[int, str] = {}  # sample -> why it was skipped
        self.stats: dict[str, int] = {"batches": 0, "clips": 0, "frames": 0, "decoded_frames": 0,
                                      "skipped": 0}
        """clips/frames delivered (sampled), decoded_frames (frames the decoder produced, from
        the first frame of the stream it was given to the last needed one), skipped damaged
        samples."""
        if self.samples.remote is not None:
            self._check_cache_limit(self.samples.remote)
        if train and len(self) == 0:  # (an evaluation rank may legitimately get nothing)
            raise DataError(f"{manifest_path}: split {cfg.split!r} has {len(self._items)} samples"
                            f"{'' if keys is None else ' selected'}, too few for {world_size} rank(s) x "
                            f"batch_size {cfg.batch_size}")

    def _open_samples(self) -> SampleTable:
        """The split's sample table; shards at a URL are read through the node's cache."""
        cfg, remote = self.cfg, None
        if is_url(cfg.shards):
            remote = RemoteShards(cfg.shards, cfg.cache_dir or default_cache_dir(), int(cfg.cache_limit_gb * 1e9),
                                  cfg.fetch_threads)
        return SampleTable(cfg.shards, cfg.split, cfg.segmentation, cfg.verify, remote=remote)

    def _check_codec(self, codec: str, manifest_path: str) -> str:
        if self.backend == "cpu" and codec not in CPU_CODECS:
            raise DataError(
                f"{manifest_path}: the shards hold {codec} video, which DALI's CPU backend cannot "
                f"decode (it reads {', '.join(CPU_CODECS)}; {codec} needs NVDEC). Re-ingest with "
                f"`echofm ingest ... --codec vp9` (or mjpeg), or run on a CUDA GPU "
                f"(data.backend=auto or mixed)."
            )
        return codec

    def _graph_spec(self, m: dict, crop: bool) -> GraphSpec:
        """The DALI graph for shards of `m`'s frame size (manifest) and this stream's settings."""
        cfg = self.cfg
        return GraphSpec(
            size=cfg.size,
            in_height=int(m["height"]), in_width=int(m["width"]), crop=crop,
            flip=self.train and cfg.flip, segmentation=cfg.segmentation,
            decoder="host" if self.backend == "cpu" and cfg.cpu_decoder == "host" else self.backend,
            batch_size=cfg.batch_size, num_threads=cfg.num_threads,
            device_id=self._device_index() if self.backend == "mixed" else None,
            prefetch=cfg.prefetch,
        )

    def _make_sampling(self, stride: int, crop: bool) -> Sampling:
        """Which clips, frames and random numbers this rank draws (sampling.py); `stride` in shard frames."""
        cfg = self.cfg
        return Sampling(seed=cfg.seed, train=self.train, rank=self.rank, world_size=self.world_size,
                        batch_size=cfg.batch_size, num_frames=cfg.num_frames, stride=stride,
                        shuffle=cfg.shuffle, drop_last=cfg.drop_last, eval_clips=cfg.eval_clips,
                        crop_scale=cfg.random_resized_crop if crop else None,
                        frame=(self._spec.in_height, self._spec.in_width))

    def _check_cache_limit(self, remote: RemoteShards) -> None:
        """DataError naming data.cache_limit_gb when the node's cache cannot hold the shards in
        use at once (each batch may touch batch_size shards; every rank of the node reads and
        prefetches its own), unless the whole split fits."""
        cfg, entries = self.cfg, self.samples.entries
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        in_use = cfg.fetch_threads + (cfg.fetch_ahead + cfg.prefetch + 1) * cfg.batch_size
        need = min(sum(e["bytes"] for e in entries),
                   local_ranks * min(in_use, len(entries)) * max(e["bytes"] for e in entries))
        if need > remote.cache.limit:
            raise DataError(f"data.cache_limit_gb={cfg.cache_limit_gb:g} is below the {need / 1e9:.2f} GB the "
                            f"shards in use at once take ({local_ranks} rank(s) x up to {in_use} shards: "
                            "fetch_threads + (fetch_ahead + prefetch + 1) x batch_size); raise it, or lower those")

    def _select(self, keys: Collection[str] | None) -> np.ndarray:
        """int64 [n]: corpus indices of the samples to read, in corpus order."""
        if keys is None:
            return np.arange(len(self.samples))
        index = {k: i for i, k in enumerate(self.samples.keys)}
        missing = sorted(set(keys) - set(index))
        if missing:
            raise DataError(f"{self.cfg.shards}: {len(missing)} selected sample(s) are not in split "
                            f"{self.cfg.split!r}, e.g. {missing[0]}")
        return np.asarray(sorted(index[k] for k in keys), dtype=np.int64)

    # -- bookkeeping ------------------------------------------------------------------

    def _device_index(self) -> int:
        import torch

        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _resolve_backend(self) -> str:
        b = self.cfg.backend
        if b == "auto":
            b = "mixed" if self.device.type == "cuda" else "cpu"
        elif b == "mixed" and self.device.type != "cuda":
            raise DataError("data.backend=mixed decodes on the GPU: give the stream a CUDA device, "
                            "or set data.backend=cpu (or auto)")
        if b == "mixed":
            require_nvdec()
        return b

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return len(self._plan(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch; a no-op when already in that epoch, so a
        resumed stream keeps its mid-epoch position when the trainer calls it."""
        if epoch != self.epoch:
            self.epoch, self._pos = int(epoch), 0

    def _position(self) -> Position:
        if self._pos >= len(self) > 0:  # the epoch's last batch was taken: the state is the next epoch's start
            epoch, pos, start = self.epoch + 1, 0, 0
        else:
            epoch, pos, start = self.epoch, self._pos, self._start_of(self.epoch)
        return Position(epoch=epoch, position=pos, start=start, seed=self.cfg.seed, rank=self.rank,
                        world_size=self.world_size, batch_size=self.cfg.batch_size, shuffle=self.cfg.shuffle,
                        train=self.train, items=self._items_digest)

    def _start_of(self, epoch: int) -> int:
        return self._start[1] if self._start[0] == epoch else 0

    def state_dict(self) -> dict:
        """Picklable loader state: the next batch is batch `position` of `epoch` (sampling.py
        makes that the same batch after a resume), plus the damaged samples and counters."""
        return {**self._position().state_dict(), "bad_keys": sorted(self.damaged), "bad_reasons": self.damaged,
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        at = self._position()
        self.resume_notes = at.load_state_dict(state)
        self.epoch, self._pos, self._start = at.epoch, at.position, (at.epoch, at.start)
        index = {k: i for i, k in enumerate(self.samples.keys)}
        reasons = state.get("bad_reasons", {})
        self._bad = {index[k]: reasons.get(k, "damaged") for k in state.get("bad_keys", []) if k in index}
        self.stats.update(state.get("stats", {}))

    @property
    def damaged(self) -> dict[str, str]:
        """Samples found damaged so far (and skipped with on_error=skip): key -> the reason."""
        return {self.samples.keys[i]: why for i, why in sorted(self._bad.items())}

    def check_dropped(self, damaged: int | None = None) -> None:
        """Raise DataError when more than data.max_dropped of the split was found damaged.

        damaged: the count over all ranks (the trainer sums them); default this stream's."""
        n = len(self._bad) if damaged is None else damaged
        total = len(self._items)
        if n > self.cfg.max_dropped * total:
            raise DataError(f"{self.cfg.shards}: {n} of the {total} samples of split {self.cfg.split!r} "
                            f"were damaged and skipped ({n / total:.0%}), more than data.max_dropped="
                            f"{self.cfg.max_dropped:g}; repair the shards (`echofm shards verify "
                            f"{self.cfg.shards}` names the samples) or raise data.max_dropped")

    def close(self) -> None:
        """Stop the pipeline (DALI's threads, the decode threads) and close the shard files;
        iterating reopens."""
        self._drop_live()
        if getattr(self, "_decoder", None) is not None:
            self._decoder.close()
            self._decoder = None
        self.samples.close()
        if self.samples.remote is not None:
            self.samples.remote.close()

    def __del__(self) -> None:
        if hasattr(self, "samples"):
            self.close()

    # -- the epoch plan ---------------------------------------------------------------

    def _plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of `epoch`: int64 [b, 3] rows (position, corpus index, clip)."""
        key = (epoch, self._start_of(epoch))
        if key in self._plan_cache:
            return self._plan_cache[key]
        plan = epoch_plan(len(self._items), epoch, self._sampling, start=key[1])
        for rows in plan:
            rows[:, 1] = self._items[rows[:, 1]]
        self._plan_cache = {k: p for k, p in self._plan_cache.items() if k[0] == epoch - 1} | {key: plan}
        return plan

    def _host_batch(self, epoch: int, b: int) -> HostBatch:
        """Read batch b's components, choose its clips and draw its random numbers (all from
        (seed, epoch, rank, b): sampling.py, so a batch is the same whenever it is made)."""
        cfg, spec = self.cfg, self._spec
        plan = self._plan(epoch)
        rows = plan[b]
        if self.samples.remote is not None:  # this batch first, then the next ones' shards
            ahead = plan[b:b + 1 + self.cfg.fetch_ahead]
            self.samples.prefetch(np.concatenate([r[:, 1] for r in ahead]))
        draws = batch_draws(self._sampling, epoch, rows)
        hb = HostBatch(epoch=epoch, pos=b, items=[], meta=[], inputs={n: [] for n in spec.inputs()},
                        index=np.empty((0, cfg.num_frames), dtype=np.int64))
        index = []
        for j, (_, v, clip) in enumerate(rows.tolist()):
            if v in self._bad:
                hb.dropped += 1
                continue
            try:
                video, nframes, meta, seg = self._read_sample(v)
                scanned = self._scan(v, video, nframes)
            except DataError as e:
                if cfg.on_error == "raise":
                    raise
                self._bad[v] = str(e)
                hb.dropped += 1
                continue
            idx = clip_frames(nframes, self._sampling, u=draws.u[j], clip=clip)  # wraps: a short video loops
            if not self.train:
                meta["clip_index"] = clip
            hb.items.append(v)
            hb.meta.append(meta)
            index.append(idx)
            ins = hb.inputs
            if spec.decoder == "host":  # decoding starts now, on the decode threads (_settle collects)
                ins["video"].append(self._host_decoder().submit(
                    video, scanned if scanned is not None and len(scanned) == nframes else None, idx,
                    self._codec, (spec.in_height, spec.in_width)))
                hb.settled = False
            else:
                data, local, decoded = self._cut(video, scanned, idx, nframes)
                hb.decoded += decoded
                ins["video"].append(data)
                ins["frames"].append(local.astype(np.int32))
            if spec.crop:
                ins["roi"].append(draws.rois[j])
            if spec.flip:
                ins["flip"].append(np.array(int(draws.flips[j]), dtype=np.int32))
            if spec.segmentation:
                ins["seg"].append(seg[idx, ..., None])  # FHWC, C=1: the layout resize/flip take
        if index:
            hb.index = np.stack(index)
        return hb

    def _host_decoder(self) -> HostDecoder:
        if self._decoder is None:
            self._decoder = HostDecoder(self.cfg.num_threads)
        return self._decoder

    def _settle(self, hb: HostBatch) -> None:
        """Wait for a batch's host decodes: the clips replace their Futures, a clip that failed
        to decode is an error naming its sample (on_error=raise) or is left out and counted."""
        if hb.settled:
            return
        keep, clips = [], []
        for j, (v, job) in enumerate(zip(hb.items, hb.inputs["video"])):
            try:
                clip, decoded = job.result()
            except DecodeFailed as e:
                why = f"{self.samples.where(v)}: the video cannot be decoded ({e})"
                if self.cfg.on_error == "raise":
                    raise DataError(f"{why}; re-ingest it, or set data.on_error=skip to skip and "
                                    "count such samples") from None
                self._bad[v] = why
                hb.dropped += 1
                continue
            keep.append(j)
            clips.append(clip)
            hb.decoded += decoded
        if len(keep) < len(hb.items):
            hb.items, hb.meta = [hb.items[j] for j in keep], [hb.meta[j] for j in keep]
            hb.inputs = {n: [lst[j] for j in keep] for n, lst in hb.inputs.items()}
            hb.index = hb.index[keep]
        hb.inputs["video"] = uniform_channels(clips)
        hb.settled = True

    def _scan(self, v: int, video: bytes, nframes: int) -> np.ndarray | None:
        """The WebM's frame table (trim.scan_frames) when the video can be cut, else None.
        A video holding fewer frames than `.nframes` says is a DataError (the decoder would
        only fail on it, with a vaguer message)."""
        if not self._cuttable:
            return None
        try:
            frames = scan_frames(video)
        except NotCuttable:
            return None
        if len(frames) < nframes:
            raise DataError(f"{self.samples.where(v)}: .nframes says {nframes} frames but the video holds "
                            f"{len(frames)} (a wrong frame count); re-ingest the sample")
        return frames

    def _cut(self, video: bytes, frames: np.ndarray | None, idx: np.ndarray,
             nframes: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The bytes to decode, the frame indices into them, and the frames the decoder will
        produce. DALI's CPU decoder decodes from the stream start up to the first requested
        frame (trim.py), so a clip gets only its GOPs (`frames`: `_scan`'s table), one span per
        increasing run of a clip that wraps around (trim.cut_clip)."""
        if frames is not None and len(frames) == nframes:
            cut, local = cut_clip(video, frames, idx, self._codec, self._spec.in_height, self._spec.in_width)
            return np.frombuffer(cut, dtype=np.uint8), local, int(local[-1]) + 1
        runs = np.split(idx, np.flatnonzero(np.diff(idx) < 0) + 1)
        return np.frombuffer(video, dtype=np.uint8), idx, int(sum(r[-1] + 1 for r in runs))

    def _read_sample(self, v: int) -> tuple[bytes, int, dict, np.ndarray | None]:
        corpus = self.samples
        video = corpus.read(v, "video")
        raw = corpus.read(v, "nframes")
        if len(raw) != 4:
            raise DataError(f"{corpus.where(v)}: .nframes is {len(raw)} bytes, not an int32")
        nframes = int(np.frombuffer(raw, dtype="<i4")[0])
        try:
            meta = json.loads(corpus.read(v, "json"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{corpus.where(v)}: .json component is not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            raise DataError(f"{corpus.where(v)}: .json component is not a JSON object")
        if nframes < 1:
            raise DataError(f"{corpus.where(v)}: .nframes says {nframes} frames")
        if meta.get("frames", nframes) != nframes:
            raise DataError(f"{corpus.where(v)}: .nframes says {nframes} frames but its .json says "
                            f"{meta.get('frames')}; re-ingest the sample")
        meta.update(key=corpus.keys[v], shard=corpus.tars[corpus.shard[v]].name)
        seg = None
        if self._spec.segmentation:
            try:
                seg = np.load(io.BytesIO(corpus.read(v, "seg")), allow_pickle=False)
            except ValueError as e:
                raise DataError(f"{corpus.where(v)}: .seg.npy is unreadable ({e})") from e
            if seg.ndim != 3 or seg.dtype != np.uint8 or seg.shape[0] < nframes:
                raise DataError(f"{corpus.where(v)}: .seg.npy is {seg.dtype} {list(seg.shape)}, "
                                f"expected uint8 [F>={nframes}, H, W]")
        return video, nframes, meta, seg

    # -- iteration --------------------------------------------------------------------

    def __iter__(self):
        if 0 < len(self) <= self._pos:  # an earlier loop took the epoch's last batch, then stopped
            self.epoch, self._pos = self.epoch + 1, 0
        while self._pos < len(self):
            try:
                for batch, pos in self._run():
                    self._pos = pos + 1
                    yield batch
            except BatchFailed as f:  # (DALI invalidates a pipeline after an operator error)
                bad = find_bad(self._spec, f.batch)  # {sample: decoder message}
                if not bad:
                    keys = ", ".join(self.samples.keys[v] for v in f.batch.items)
                    raise DataError(f"{self.cfg.shards}: DALI failed on a batch of samples {keys}, "
                                    f"none of which fails alone ({str(f.err).splitlines()[0]})") from f.err
                if self.cfg.on_error == "raise":
                    v, why = next(iter(bad.items()))
                    raise DataError(f"{self.samples.where(v)}: the video cannot be decoded ({why}); "
                                    f"re-ingest it, or set data.on_error=skip to skip and "
                                    f"count such samples") from None
                self._bad.update({v: f"{self.samples.where(v)}: the video cannot be decoded ({why})"
                                  for v, why in bad.items()})  # retry from the failed batch without them
                self._pos = f.batch.pos
                continue
            break
        self.epoch, self._pos = self.epoch + 1, 0

    def _run(self):
        """Yield (batch dict, position) from the current position to the end of the epoch.

        The pipeline outlives the epoch in training: it is already decoding the next
        epoch's first batches when this one ends, and a later `for` that continues from
        the same (epoch, position) reuses it. Anything else (set_epoch to another epoch,
        load_state_dict elsewhere, an error) starts a fresh one. Raises BatchFailed for a
        batch DALI could not process.
        """
        live = self._live
        if live is None or live.expect != (self.epoch, self._pos):
            self._drop_live()
            lookahead = self.cfg.prefetch if self._spec.decoder == "host" else 0  # clips decode meanwhile
            live = Prefetcher(self.epoch, self._pos, self._spec, one_pass=not self.train, lookahead=lookahead)
            if not live.start(self._batches_in, self._host_batch, self._settle, self._cuda_stream()):
                self.stats["skipped"] += live.count_emptied((self.epoch + 1, -1))  # nothing left to decode
                return
            self._live = live
        while True:
            try:
                out = live.pipe.outputs(live.cuda_stream)
            except StopIteration:
                self.stats["skipped"] += live.count_emptied((self.epoch + 1, -1))
                self._drop_live()
                return
            except RuntimeError as e:
                failed = live.inflight[0]
                self._drop_live()
                raise BatchFailed(failed, e) from None
            hb = live.inflight.popleft()
            batch = self._to_torch(out, hb)
            self.stats["skipped"] += live.count_emptied((hb.epoch, hb.pos))
            live.prepare(self._batches_in, self._host_batch)
            live.settle(1, self._settle, self._batches_in, self._host_batch)  # the one DALI takes next
            live.pipe.schedule_run()
            nxt = live.inflight[0] if live.inflight else None
            last = nxt is None or nxt.epoch != hb.epoch  # this is the epoch's last batch
            if last:
                self.stats["skipped"] += live.count_emptied((hb.epoch + 1, -1))
            live.expect = (hb.epoch + 1, 0) if last else (hb.epoch, hb.pos + 1)
            if nxt is None:
                self._drop_live()
            yield batch, hb.pos
            if last:
                return

    def _batches_in(self, epoch: int) -> int:
        return len(self._plan(epoch))

    def _cuda_stream(self):
        """torch's stream the mixed backend's outputs are bound to (no host sync); None on the CPU."""
        if self.backend != "mixed":
            return None
        import torch

        return torch.cuda.current_stream(self.device)

    def _drop_live(self) -> None:
        if getattr(self, "_live", None) is not None:
            self._live.release()
            self._live = None

    def _to_torch(self, out, hb: HostBatch) -> dict:
        import torch
        from nvidia.dali.backend import TensorListGPU
        from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_type

        def convert(tl, rgb: bool = False) -> torch.Tensor:
            t = tl.as_tensor()  # dense view of the batch; DALI reuses its buffer afterwards
            if isinstance(tl, TensorListGPU):  # torch's caching allocator, async copy on its stream
                x = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
                feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device))
                return x
            # host: numpy's copy reuses warm memory; a fresh torch.empty page-faults ~5 ms/batch
            a = np.asarray(t)
            a = grey_to_rgb(a) if rgb and a.shape[-1] == 1 else np.array(a)  # grey clips: 3 channels
            return torch.from_numpy(a).to(self.device, non_blocking=True)

        batch = {"video": convert(out[0], rgb=True), "frames_index": torch.from_numpy(hb.index), "meta": hb.meta}
        if self._spec.segmentation:
            batch["seg"] = convert(out[1])[..., 0]
        B, T = hb.index.shape
        st = self.stats
        st["batches"] += 1
        st["clips"] += B
        st["frames"] += B * T
        st["decoded_frames"] += hb.decoded
        st["skipped"] += hb.dropped
        return batch
