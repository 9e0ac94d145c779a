"""The trainer's numbers: per-step and per-interval sums, MFU, memory, dropped samples.

`StepStats` gathers one optimizer step, `IntervalStats` the steps since the last log line (and
the run's totals) and turns them into the logged metrics (`summary`: clips and frames summed
over ranks, times averaged, MFU from flops.py, docs/mfu.md); `Drops` counts the damaged samples
the stream skipped. engine/logging.py writes what these compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .flops import device_peak, mfu
from .step import MicroRead

__all__ = ["Drops", "IntervalStats", "StepStats", "grad_norm", "memory_gib", "peak_flops"]


def peak_flops(cfg) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s of one device, where the figure came from: train.peak_tflops, else
    flops.PEAK_BF16_TFLOPS by device name); None on CPU or an unknown device."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12, "train.peak_tflops"
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    peak = device_peak(name)
    return (peak, f"table:{name}") if peak else (None, f"unknown device {name!r}: set train.peak_tflops")


def memory_gib(device: torch.device) -> float:
    """CUDA: the peak allocated memory since the last call (or the run's start), GiB: each call
    reads the peak, then resets it. CPU: the process's resident memory now, GiB."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    """`values` summed over the `world` ranks (one float64 all-reduce; as is for one rank)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _add_terms(into: dict[str, float], terms: dict[str, float], n: int) -> None:
    """into[k] += terms[k] / n for every loss term (x / 1 == x exactly: a step's sums are unchanged)."""
    for k, v in terms.items():
        into[k] = into.get(k, 0.0) + v / n


@dataclass(kw_only=True, slots=True)
class _Sums:
    """Seconds (all, waiting for data), clips (delivered; trained: of finite micro-batches) and
    loss sums, the bookkeeping a step and an interval share."""

    time: float = 0.0
    wait: float = 0.0
    clips: int = 0
    trained: int = 0
    loss: float = 0.0
    terms: dict = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class StepStats(_Sums):
    """One optimizer step: its lr, times, clips and loss sums (rank sums) over its `n` finite
    micro-batches."""

    lr: float
    n: int = 0
    batch: dict | None = None
    out: dict | None = None

    def add(self, read: MicroRead, clips: int) -> None:
        self.n += 1
        self.trained += clips
        self.loss += read.loss
        _add_terms(self.terms, read.terms, 1)


@dataclass(kw_only=True, slots=True)
class IntervalStats(_Sums):
    """Sums since the last log line (this rank's times and clips; losses already summed
    over ranks), plus run totals."""

    steps: int = 0
    decoded0: int = 0
    total_time: float = 0.0
    total_wait: float = 0.0
    total_clips: int = 0

    def add(self, s: StepStats) -> None:
        self.steps += 1
        self.time += s.time
        self.wait += s.wait
        self.clips += s.clips
        self.trained += s.trained
        self.loss += s.loss / s.n
        _add_terms(self.terms, s.terms, s.n)
        self.total_time += s.time
        self.total_wait += s.wait
        self.total_clips += s.clips

    def summary(self, decoded: int, frames: int, device: torch.device, world: int, *,
                flops_per_clip: float | None = None, peak: float | None = None) -> dict:
        """Interval metrics: clips and frames summed over ranks, losses and times averaged; MFU
        (flops.mfu, docs/mfu.md) from the clips that completed a training step, all ranks together,
        over `world` devices of `peak` FLOP/s (None without both)."""
        vals = all_sum([self.time, self.wait, float(self.clips), float(self.trained), float(decoded - self.decoded0)],
                        device, world)
        t, wait, clips, trained, dec = vals[0] / world, vals[1] / world, vals[2], vals[3], vals[4]
        n = max(self.steps, 1)
        return {"loss": self.loss / world / n,
                **{f"loss_{k}": self.terms[k] / world / n for k in sorted(self.terms)},
                "step_time_s": t / n, "data_wait_s": wait / n, "compute_s": (t - wait) / n,
                "data_wait_fraction": wait / t if t else None,
                "clips_per_s": clips / t if t else None,
                "sampled_fps": clips * frames / t if t else None,
                "decoded_fps": dec / t if t else None,
                # frames the decoder produced per frame the model got (loaders/fold.py: ~1.1 folded)
                "decode_waste": dec / (clips * frames) if clips else None,
                "mfu": mfu(flops_per_clip, trained / t, peak, world) if flops_per_clip and peak and t else None}

    def reset(self, decoded: int) -> None:
        self.steps, self.time, self.wait, self.clips, self.trained, self.loss = 0, 0.0, 0.0, 0, 0, 0.0
        self.terms = {}
        self.decoded0 = decoded


class Drops:
    """Damaged samples the stream skipped (data.on_error=skip): each rank prints its own as
    they are found; every micro-batch's host read sums the counts over ranks, and all ranks
    stop together beyond data.max_dropped."""

    def __init__(self, stream, rank: int) -> None:
        self.stream, self.rank = stream, rank
        self.announced = set(stream.damaged)
        self.counts = {"dropped_total": 0, "damaged_samples": 0}

    def announce(self, log) -> None:
        damaged = self.stream.damaged
        for key in [k for k in damaged if k not in self.announced]:
            line = f"[echofm] rank {self.rank}: skipped damaged sample: {damaged[key]}"
            log.message(line) if self.rank == 0 else print(line, flush=True)
            self.announced.add(key)

    def local(self) -> list[float]:
        """This rank's [damaged samples, dropped reads]."""
        return [float(len(self.stream.damaged)), float(self.stream.stats["skipped"])]

    def update(self, *, damaged: int, dropped: int) -> None:
        """The counts summed over ranks; DataError beyond data.max_dropped."""
        self.counts = {"dropped_total": dropped, "damaged_samples": damaged}
        self.stream.check_dropped(damaged)

    def summary_line(self) -> str:
        c = self.counts
        return (f"[echofm] data.on_error=skip: {c['damaged_samples']} damaged sample(s) skipped "
                f"({c['dropped_total']} reads dropped); `echofm shards verify` names them all")


def grad_norm(module: torch.nn.Module) -> torch.Tensor | float:
    """Global L2 norm of the gradients (before clipping), left on the device."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else 0.0
