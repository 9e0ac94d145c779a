"""DALI pipeline from WebDataset shards to device-resident uint8 clip batches.

(Being built by the stream issue; the config below is the contract the recipe uses.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class StreamConfig:
    """Where clips come from and how they are sampled (DESIGN §3)."""

    shards: str = ""
    """Shard directory (holds manifest.json) written by `echofm ingest`."""
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
    """DALI CPU threads."""
    backend: Literal["auto", "cpu", "mixed"] = "auto"
    """Video decode backend: mixed = NVDEC on the GPU, cpu = DALI CPU; auto picks mixed with CUDA."""
    seed: int = 0
    """Base seed; shuffling and clip starts are deterministic given (seed, epoch, rank)."""
    shuffle: bool = True
    """Shuffle samples (training); evaluation reads in order."""
    shuffle_buffer: int = 256
    """DALI reader's shuffle buffer (initial_fill)."""
    random_resized_crop: tuple[float, float] | None = None
    """Area scale range for random-resized-crop (e.g. [0.8, 1.0]); None disables it."""
    flip: bool = False
    """Random horizontal flip (off by default: echo views are not mirror-symmetric)."""
    eval_clips: int = 1
    """Clips per video in evaluation mode (evenly spaced starts, for test-time averaging)."""
    segmentation: bool = False
    """Also yield `.seg.npy` masks aligned to the sampled frames."""
    on_error: Literal["raise", "skip"] = "raise"
    """A damaged sample: raise naming shard and key, or skip it and count it."""

    def validate(self) -> None:
        if self.num_frames < 1 or self.stride < 1:
            raise ValueError(f"num_frames and stride must be >= 1, got {self.num_frames}, {self.stride}")
        if self.size < 16 or self.batch_size < 1 or self.num_threads < 1:
            raise ValueError("size >= 16, batch_size >= 1 and num_threads >= 1 are required")
        if self.eval_clips < 1:
            raise ValueError(f"eval_clips must be >= 1, got {self.eval_clips}")
