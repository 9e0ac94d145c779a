"""What a `ClipStream` reads and how it samples: `StreamConfig`, the recipe's `data:` section
(docs/data.md, docs/recipes.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class StreamConfig:
    """Where clips come from and how they are sampled (docs/data.md)."""

    shards: str = ""
    """Shard folder (holds manifest.json) written by `echofm ingest`: a local path, or a URL
    (s3://bucket/prefix, https://...; docs/data.md), read through the node-local cache."""
    split: str = "train"
    """Manifest split to read ('train', 'val', 'test', or 'all')."""
    num_frames: int = 16
    """Frames per clip delivered to the model."""
    stride: int = 2
    """Temporal stride between sampled frames (in source frames)."""
    size: int = 112
    """Output height = width in pixels."""
    batch_size: int = 8
    """Clips per batch per rank."""
    num_threads: int = 2
    """CPU threads of DALI's pipeline, and as many again for the host decoder (`cpu_decoder`)."""
    backend: Literal["auto", "cpu", "mixed"] = "auto"
    """Video decode backend: mixed = NVDEC on the GPU, cpu = on the CPU (`cpu_decoder`); auto
    picks mixed with CUDA."""
    cpu_decoder: Literal["host", "dali"] = "host"
    """backend=cpu: host = libavcodec on the stream's `num_threads` threads, grey clips as luma
    without an RGB conversion (1.15x / 1.4x less CPU per clip at 112^2 / 224^2; docs/data.md); dali = DALI's CPU video
    decoder (RGB), the same graph as the mixed backend's."""
    seed: int = 0
    """Base seed; shuffling and clip starts are deterministic given (seed, epoch, rank)."""
    shuffle: bool = True
    """Shuffle samples (training): a full permutation of the split per epoch; evaluation reads in order."""
    drop_last: bool = True
    """Training: drop the last incomplete batch of each rank (every step sees batch_size clips)."""
    random_resized_crop: tuple[float, float] | None = None
    """Area scale range for random-resized-crop (e.g. [0.8, 1.0]); None disables it."""
    flip: bool = False
    """Random horizontal flip (off by default: echo views are not mirror-symmetric)."""
    eval_clips: int = 1
    """Clips per video in evaluation mode (evenly spaced starts, for test-time averaging)."""
    segmentation: bool = False
    """Also yield `.seg.npy` masks aligned to the sampled frames."""
    on_error: Literal["raise", "skip"] = "raise"
    """A damaged sample: raise naming shard and key, or skip it, count it and report it."""
    max_dropped: float = 0.01
    """on_error=skip: the largest fraction of the split's samples that may be found damaged
    and skipped; beyond it `check_dropped` (the trainer calls it every step) stops the run."""
    verify: bool = True
    """Check each sample, the first time this process reads it, against the per-member sha256s
    recorded at ingest (sha256 at ~1.2 GB/s: ~0.9 ms for a 1 MB clip, once): bytes damaged
    after ingest are an error naming the member (or skipped), never decoded into silently
    corrupt frames."""
    prefetch: int = 2
    """Batches DALI works ahead of the consumer; with the host decoder, also the batches
    decoding ahead of DALI."""
    cut_gops: bool = True
    """WebM (VP8/VP9) shards: decode only from the keyframe before each part of the clip, by
    the video's frame table (trim.py says why); false decodes from the video's first frame."""
    cache_dir: str = ""
    """Remote shards: the node-local cache folder ("" = $ECHOFM_CACHE/shards or
    ~/.cache/echofm/shards); the ranks of a node share it."""
    cache_limit_gb: float = 100.0
    """Remote shards: the most the node's cache holds (GB, 1e9 bytes); least-recently-used
    shards are removed to stay within it."""
    fetch_threads: int = 8
    """Remote shards: concurrent shard downloads per rank."""
    fetch_ahead: int = 4
    """Remote shards: batches ahead of the decoder whose shards are downloaded in the background."""

    def validate(self) -> None:
        if self.num_frames < 1 or self.stride < 1:
            raise ValueError(f"num_frames and stride must be >= 1, got {self.num_frames}, {self.stride}")
        if self.size < 16 or self.batch_size < 1 or self.num_threads < 1:
            raise ValueError("size >= 16, batch_size >= 1 and num_threads >= 1 are required")
        if self.eval_clips < 1:
            raise ValueError(f"eval_clips must be >= 1, got {self.eval_clips}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if self.random_resized_crop is not None:
            lo, hi = self.random_resized_crop
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"random_resized_crop must satisfy 0 < lo <= hi <= 1, got {self.random_resized_crop}")
        if self.backend not in ("auto", "cpu", "mixed"):
            raise ValueError(f"backend must be auto, cpu or mixed, got {self.backend!r}")
        if self.cpu_decoder not in ("host", "dali"):
            raise ValueError(f"cpu_decoder must be host or dali, got {self.cpu_decoder!r}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be raise or skip, got {self.on_error!r}")
        if not 0.0 <= self.max_dropped <= 1.0:
            raise ValueError(f"max_dropped is a fraction of the split in [0, 1], got {self.max_dropped}")
        if self.cache_limit_gb <= 0 or self.fetch_threads < 1 or self.fetch_ahead < 0:
            raise ValueError("cache_limit_gb > 0, fetch_threads >= 1 and fetch_ahead >= 0 are required")
