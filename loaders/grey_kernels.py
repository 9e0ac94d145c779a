"""numba kernels for grey frames on the host decode path (host_decode.py): the luma of a
4:2:0 frame whose chroma is neutral, and grey -> three equal channels.

Why numba: per frame, the numpy version of "check both chroma planes, map luma to full
range" is a dozen small calls (~19 us at 112^2, as much Python as work); one compiled call
over the plane buffers is ~4 us. For the batch's grey -> RGB copy numpy's strided stores run at
~3 GB/s (2 ms per 8 x 16 x 112^2 batch) and cv2.cvtColor runs on cv2's process-wide thread
pool, after which a forked process hangs in cv2 (tests/test_host_decode.py); a compiled
loop is 0.13 ms, on the calling thread. Compiled on first use, cached on disk (cache=True).
Every kernel releases the GIL: the stream's decode threads run them in parallel.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def luma_if_neutral(y: np.ndarray, y_stride: int, u: np.ndarray, v: np.ndarray, c_stride: int,
                    c_height: int, c_width: int, lut: np.ndarray, out: np.ndarray) -> bool:
    """Planes of one 8-bit 4:2:0 frame as flat uint8 buffers with their row strides (bytes);
    out: uint8 [H, W]. When every chroma sample is within 1 of neutral (127..129), writes
    lut[Y] into out and returns True; else returns False (out undefined)."""
    for i in range(c_height):
        row = i * c_stride
        for j in range(c_width):
            a, b = u[row + j], v[row + j]
            if a < 127 or a > 129 or b < 127 or b > 129:
                return False
    h, w = out.shape
    for i in range(h):
        row = i * y_stride
        for j in range(w):
            out[i, j] = lut[y[row + j]]
    return True


@numba.njit(cache=True, nogil=True)
def grey_to_rgb_into(src: np.ndarray, dst: np.ndarray) -> None:
    """src: uint8 [N] (a contiguous grey batch, flattened); dst: uint8 [N * 3] <- R = G = B."""
    for i in range(src.size):
        g = src[i]
        dst[3 * i] = g
        dst[3 * i + 1] = g
        dst[3 * i + 2] = g
