"""Decoding encoded video bytes back to frames, what the tests compare an encoder's output with."""
from __future__ import annotations

import io

import numpy as np


def decode_bytes(data: bytes) -> np.ndarray:
    """Decode encoded video bytes to uint8 [F, H, W, 3] RGB."""
    import av

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
