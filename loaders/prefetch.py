"""Batches in flight: what the stream has read on the host and handed to DALI, and the running
pipeline that decodes them ahead of the consumer (docs/data.md).

`ClipStream` (stream.py) decides which batch comes next and reads it (`HostBatch`); a
`Prefetcher` keeps `prefetch` of them queued in a DALI pipeline, across the end of an epoch
in training, and says which batch each output belongs to. With host decoding
(host_decode.py) a batch is read `lookahead` batches before DALI takes it, its clips
decoding on the stream's threads meanwhile, and the stream `settle`s it (waits for its
clips, deals with the ones that failed) just before DALI takes it. `find_bad` decodes the
samples of a batch DALI failed on one by one to name the damaged ones.

A Prefetcher holds no reference to its stream (no cycle keeps DALI's threads alive): the
stream hands it, on each call, `plan_len(epoch) -> batches` and `read(epoch, b) -> HostBatch`.
"""
from __future__ import annotations

import bisect
import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .pipeline import GraphSpec, build_pipeline, decoder_reason

__all__ = ["BatchFailed", "HostBatch", "Prefetcher", "find_bad"]


@dataclass(slots=True)
class HostBatch:
    """One batch as handed to DALI, plus what the consumer needs alongside."""

    epoch: int
    pos: int
    """Epoch and position of the batch in that epoch's plan."""
    items: list[int]
    """Sample (video) indices in the corpus, in batch order."""
    meta: list[dict]
    inputs: dict[str, list]
    """Per-input lists, keyed by `GraphSpec.inputs()` names."""
    index: np.ndarray
    """int64 [B, T] source frame of every clip frame."""
    decoded: int = 0
    """Frames the decoder produces for this batch (decoded fps)."""
    dropped: int = 0
    """Damaged samples left out of this batch (on_error='skip')."""
    settled: bool = True
    """False while inputs["video"] holds host decodes still running (Futures)."""


class BatchFailed(Exception):
    """DALI could not process `batch` (`err`: its error); the pipeline is gone."""

    def __init__(self, batch: HostBatch, err: BaseException) -> None:
        super().__init__(str(err))
        self.batch, self.err = batch, err


PlanLen = Callable[[int], int]
"""epoch -> this rank's batches in it."""
Read = Callable[[int, int], HostBatch]
"""(epoch, batch position) -> the batch read on the host."""
Settle = Callable[[HostBatch], None]
"""Make a batch final in place: its host decodes done, failed samples dropped (or raise)."""


class Prefetcher:
    """A running pipeline: batches prepared on the host (`feed`), handed to DALI (`inflight`),
    and the next (epoch, position) to prepare. Training runs on into the next epochs
    (`one_pass=False`); evaluation stops at the end of its epoch.

        pf = Prefetcher(epoch, pos, spec, one_pass=not train)
        if pf.start(plan_len, read, settle, cuda_stream):  # False: nothing left in this epoch
            out = pf.pipe.outputs(pf.cuda_stream)      # the outputs of pf.inflight[0]
            hb = pf.inflight.popleft(); pf.prepare(plan_len, read)
            pf.settle(1, settle, plan_len, read); pf.pipe.schedule_run()

    `release()` drops the pipeline at once."""

    def __init__(self, epoch: int, pos: int, spec: GraphSpec, *, one_pass: bool, lookahead: int = 0) -> None:
        self.spec, self.one_pass, self.lookahead = spec, one_pass, lookahead
        self.feed: collections.deque[HostBatch] = collections.deque()
        self.inflight: collections.deque[HostBatch] = collections.deque()
        self.emptied: list[tuple[int, int, int]] = []  # (epoch, pos, dropped) of batches left empty
        self.next = (epoch, pos)
        self.expect = (epoch, pos)
        """The (epoch, position) of the next batch the consumer takes: a later loop from there reuses us."""
        self.pipe = None
        self.cuda_stream = None

    def source(self) -> tuple:  # called by DALI's schedule_run, in the consumer's thread
        if not self.feed:
            raise StopIteration
        hb = self.feed.popleft()
        if not hb.settled:
            raise RuntimeError(f"batch {hb.pos} of epoch {hb.epoch} reached DALI before its decodes settled")
        self.inflight.append(hb)
        return tuple(hb.inputs.values())

    def prepare(self, plan_len: PlanLen, read: Read) -> None:
        """Read and queue the next batch that has samples left (at most into the next epoch)."""
        crossed = False
        while True:
            epoch, b = self.next
            if b >= plan_len(epoch):
                if self.one_pass or crossed:  # evaluation is one pass
                    return
                self.next, crossed = (epoch + 1, 0), True
                continue
            hb = read(epoch, b)
            self.next = (epoch, b + 1)
            if hb.items:
                self.feed.append(hb)
                return
            bisect.insort(self.emptied, (epoch, b, hb.dropped))

    def settle(self, n: int, fix: Settle, plan_len: PlanLen, read: Read) -> None:
        """Settle the next `n` queued batches (the ones DALI's next run takes); one left with
        no samples is counted as emptied and replaced by the next batch read."""
        i = 0
        while i < min(n, len(self.feed)):
            hb = self.feed[i]
            fix(hb)
            if hb.items:
                i += 1
                continue
            del self.feed[i]
            bisect.insort(self.emptied, (hb.epoch, hb.pos, hb.dropped))
            self.prepare(plan_len, read)

    def count_emptied(self, before: tuple[int, int]) -> int:
        """The drops of the empty batches the consumer has now passed (each counted once)."""
        n = 0
        while self.emptied and self.emptied[0][:2] < before:
            n += self.emptied.pop(0)[2]
        return n

    def start(self, plan_len: PlanLen, read: Read, settle: Settle, cuda_stream: Any = None) -> bool:
        """Queue `spec.prefetch` (+ `lookahead`) batches and start decoding them; False (and no
        pipeline) when the epoch has nothing left to decode. cuda_stream: torch's stream the
        outputs are bound to (the mixed backend: no host sync), None on the CPU."""
        for _ in range(self.spec.prefetch + self.lookahead):
            self.prepare(plan_len, read)
        self.settle(self.spec.prefetch, settle, plan_len, read)  # DALI's first run takes `prefetch`
        if not self.feed:
            return False
        self.pipe = build_pipeline(self.spec, self.source)
        self.cuda_stream = cuda_stream
        self.pipe.schedule_run()
        return True

    def release(self) -> None:
        self.pipe = None  # the pipeline <-> source cycle is broken: DALI's threads stop now
        for hb in self.feed:  # host decodes nobody will collect
            if not hb.settled:
                for job in hb.inputs["video"]:
                    job.cancel()
        self.feed.clear()
        self.inflight.clear()


class _SingleBatch:
    """A DALI source that yields one batch, then ends."""

    def __init__(self, batch: tuple) -> None:
        self.batch = batch

    def __call__(self) -> tuple:
        if self.batch is None:
            raise StopIteration
        batch, self.batch = self.batch, None
        return batch


def find_bad(spec: GraphSpec, hb: HostBatch) -> dict[int, str]:
    """Decode each sample of a failed batch alone; returns the ones that fail, with the
    decoder's reason."""
    bad = {}
    for j, v in enumerate(hb.items):
        pipe = build_pipeline(spec, _SingleBatch(tuple([lst[j]] for lst in hb.inputs.values())))
        try:
            pipe.schedule_run()
            pipe.outputs()
        except RuntimeError as e:
            bad[v] = decoder_reason(e)
        del pipe
    return bad
