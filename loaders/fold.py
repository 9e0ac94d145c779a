"""Stride folding: shards that hold every s-th frame, so the stream decodes only what it samples.

A clip of T frames at stride s over a video covers the source frames k, k + s, ...,
k + (T-1)s. At stride s a sequential decoder (any inter-coded video: VP9, H.264) must
decode every frame between them, s times the frames the model gets. Ingest with
`fold_stride = s` keeps the source frames 0, s, 2s, ... (a video at f fps becomes one at
f/s), so the same clip is T consecutive frames of the shard's video and the stream reads
it at stride 1: the frames decoded are the frames sampled (plus the few from the keyframe
before the clip start). Encoding also handles 1/s of the frames: ingest is faster too.

What changes for training: a clip still covers the same source moments (the same
instants, the same spacing); its start can only fall on a multiple of s in the source
(one phase of the s it could take before). The sample json records `"stride_folded": s`,
`"fps"` (the shard video's rate, f/s) and `"source_fps"` (f): shard frame i is source frame
i * s. Period, ED/ES and segmentation frames in the json are shard frames, like the stream's
`frames_index` (docs/shards.md).

A stream asking for stride S from shards folded by s samples at S / s; S not a multiple of
s cannot be served (DataError naming both). Shards without the setting are unfolded (s = 1).
"""
from __future__ import annotations

import numpy as np

from .errors import DataError


def fold_frames(frames: np.ndarray, seg: np.ndarray | None, seg_frames: list[int],
                stride: int) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """Keep source frames 0, s, 2s, ... of `frames` [F, ...] -> (frames [ceil(F/s), ...], masks,
    annotated frames). An annotated frame that is dropped moves to the nearest kept frame
    (its mask with it), so no annotation is lost."""
    if stride == 1:
        return frames, seg, seg_frames
    kept = frames[::stride]
    if seg is None:
        return kept, None, seg_frames
    new = np.zeros((len(kept),) + seg.shape[1:], np.uint8)
    moved = {min(int(np.floor(t / stride + 0.5)), len(kept) - 1): t for t in seg_frames}
    for i, t in moved.items():
        new[i] = seg[t]
    return kept, new, sorted(moved)


def folded_stride(manifest: dict) -> int:
    """The stride folded into a shard set (1: unfolded, also for shards written before it existed)."""
    return int(manifest.get("settings", {}).get("fold_stride", 1) or 1)


def stream_stride(stride: int, folded: int, where: str) -> int:
    """The stride the stream samples shard frames at, for a requested source stride -> int.

    DataError (one line naming `where`, the manifest) when `stride` is not a multiple of `folded`."""
    if stride % folded:
        raise DataError(f"{where}: the shards were ingested with fold_stride={folded} (every {folded}th "
                        f"source frame kept), so data.stride must be a multiple of {folded}, got {stride}; "
                        f"use data.stride={folded * max(1, stride // folded)} or ingest without --fold-stride")
    return stride // folded
