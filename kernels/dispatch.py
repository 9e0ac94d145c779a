"""Which attention kernel runs a `tube_attention(..., backend="auto")` call: measured, not guessed.

The table `kernels/attention_table.json` is written by `benchmarks/kernels.py --table` on a
GPU and committed. Each row holds one measured key and its winners:

    mode        joint | slice | tube
    dh          head dim
    bucket      the group length L (tokens attending to each other: joint T*K, slice K,
                tube T) rounded up to a power of two, at least 8: 393 -> 512, 161 -> 256,
                1569 -> 2048, 50 -> 64, 8 -> 8
    dtype       "bfloat16" | "float16" | "float32"
    capability  "9.0" (torch.cuda.get_device_capability of the device)
    train       fastest backend for forward + backward (when a gradient is needed)
    infer       fastest backend for the forward alone (no_grad / inference)

plus what was measured (times per backend, shape, device, versions).

Fallback rule for a call (`choose`), first match wins:

1. Not a CUDA tensor: "sdpa". Triton needs a GPU (an explicit `backend="triton"` still
   runs CPU tensors under TRITON_INTERPRET=1, as the tests do).
2. float64, or Dh > 128: "sdpa" (the Triton kernels are built for half / fp32, Dh <= 128).
3. A row with the call's key: its `train` or `infer` backend.
4. Rows with the same mode, Dh and capability and the call's dtype (float16 uses the
   bfloat16 rows when it has none of its own: the same kernels at the same speed): the
   row of the nearest bucket, in powers of two; a tie goes to the larger bucket.
5. Otherwise (another GPU, fp32, an unmeasured head dim): joint -> "sdpa" (torch picks
   among its fused kernels), slice / tube -> "triton" (the measured winner on the H200:
   SDPA sees thousands of short sequences there).

The table is read once, when this module is imported (a few rows of JSON): a read-only
constant, so that the lookup is plain dict work that torch.compile traces without a break.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

TABLE_PATH = Path(__file__).resolve().parent / "attention_table.json"
MODES = ("joint", "slice", "tube")
# Backends a table row may name (explicit-only ones, xformers and math, are never chosen).
CHOOSABLE = ("triton", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient")
DTYPES = ("bfloat16", "float16", "float32")
SCHEMA = 1
MIN_BUCKET = 8


def bucket(length: int) -> int:
    """Group length -> its power-of-two bucket (at least MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())


@dataclass(frozen=True, slots=True)
class Row:
    """One measured key and its winners."""

    mode: str
    dh: int
    bucket: int
    dtype: str
    capability: str
    train: str
    infer: str

    @property
    def key(self) -> tuple[str, int, int, str, str]:
        return (self.mode, self.dh, self.bucket, self.dtype, self.capability)


@dataclass(frozen=True, slots=True)
class AttentionTable:
    """Measured rows, indexed by key (`load_table`, `from_rows`)."""

    rows: dict[tuple[str, int, int, str, str], Row]

    @classmethod
    def from_rows(cls, rows: list[Row], where: str = "attention table") -> AttentionTable:
        index: dict[tuple[str, int, int, str, str], Row] = {}
        for r in rows:
            if r.key in index:
                raise ValueError(f"{where}: two rows for {r.key}")
            index[r.key] = r
        return cls(index)

    def lookup(self, mode: str, dh: int, length: int, dtype: str, capability: str) -> Row | None:
        """Rules 3 and 4 of the module docstring: the exact row, else the nearest bucket's."""
        want = bucket(length)
        for dt in (dtype, "bfloat16") if dtype == "float16" else (dtype,):
            row = self.rows.get((mode, dh, want, dt, capability))
            if row is not None:
                return row
            near = [r for r in self.rows.values() if (r.mode, r.dh, r.dtype, r.capability) == (mode, dh, dt, capability)]
            if near:
                # Distance in powers of two; -bucket breaks a tie towards the larger one.
                return min(near, key=lambda r: (abs(math.log2(r.bucket) - math.log2(want)), -r.bucket))
        return None


def parse_row(d: dict, where: str) -> Row:
    """A JSON row -> Row, with an error naming the file, the row and the field at fault."""
    try:
        row = Row(mode=d["mode"], dh=int(d["dh"]), bucket=int(d["bucket"]), dtype=d["dtype"],
                  capability=str(d["capability"]), train=d["train"], infer=d["infer"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: row needs mode, dh, bucket, dtype, capability, train, infer ({e!r}): {d}") from e
    checks = [(row.mode in MODES, f"mode {row.mode!r} is not one of {MODES}"),
              (row.dtype in DTYPES, f"dtype {row.dtype!r} is not one of {DTYPES}"),
              (row.bucket == bucket(row.bucket), f"bucket {row.bucket} is not a power of two >= {MIN_BUCKET}"),
              (row.dh > 0, f"dh {row.dh} must be > 0"),
              (row.train in CHOOSABLE and row.infer in CHOOSABLE,
               f"backends {row.train!r} / {row.infer!r} must be among {CHOOSABLE}")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"{where}: {msg} in row {d}")
    return row


def load_table(path: str | Path = TABLE_PATH) -> AttentionTable:
    """Read a table file (schema 1). A missing file is an empty table (static defaults apply)."""
    path = Path(path)
    if not path.is_file():
        return AttentionTable({})
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: expected {{'schema': {SCHEMA}, 'rows': [...]}}")
    return AttentionTable.from_rows([parse_row(d, str(path)) for d in data["rows"]], str(path))


def static_default(mode: str) -> str:
    """Rule 5: the backend for a call no row covers."""
    return "sdpa" if mode == "joint" else "triton"


def choose(table: AttentionTable, *, mode: str, dh: int, length: int, dtype: str, capability: str | None,
           train: bool) -> str:
    """The backend for one call (rules 1-5 of the module docstring). capability None: not CUDA."""
    if capability is None or dtype not in DTYPES or dh > 128:
        return "sdpa"
    row = table.lookup(mode, dh, length, dtype, capability)
    if row is None:
        return static_default(mode)
    return row.train if train else row.infer


TABLE = load_table()
"""The committed table, read once at import."""
