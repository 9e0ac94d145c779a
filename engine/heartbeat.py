"""Heartbeats between the ranks of a run, so that a stalled rank is named, not waited for.

A collective (all-reduce, barrier) with a rank that is stopped (SIGSTOP, swapped out, a hung
node) blocks every other rank until the process group's timeout, and even then the error
does not say which rank is at fault. Here each rank's thread writes a counter to
`<run>/heartbeat/rank_NNNNN.json` every `interval` seconds; rank 0 watches every rank, the
other ranks watch rank 0 (O(world) file reads per interval, not O(world^2)). A watched rank
whose counter has not changed for `timeout_s` (measured on the watcher's own clock, so
clocks of different nodes need not agree) is reported with its pid and host, and the
watcher exits with status `EXIT_STALLED`: the launcher (torchrun / deepspeed) then ends the
whole run. Checkpoints are written atomically, so the last complete one stays intact.
A stalled rank on the watcher's own host that is stopped (SIGSTOP: state T) is killed
first: torchrun would otherwise wait its 30 s SIGTERM grace period on a process that cannot
handle SIGTERM before it ends the job (docs/failures.md).

The thread runs beside the training loop, which keeps it beating through long steps and
checkpoint writes (torch and file I/O release the GIL); only a process that does not run at
all stops beating. The folder must be on a filesystem every node sees (as the run folder is).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

EXIT_STALLED = 3


def beat_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank_{rank:05d}.json"


def read_beat(folder: str | Path, rank: int) -> dict | None:
    """The last beat rank `rank` wrote ({"rank", "pid", "host", "beat", "done"}), None if unreadable."""
    try:
        return json.loads(beat_file(folder, rank).read_text())
    except (OSError, ValueError):
        return None


class Heartbeat:
    """Beat for this rank and watch the peers; call `start()` once, `stop()` at the end.

    hint(): extra words for the report (e.g. the last complete checkpoint), called once.
    """

    def __init__(self, folder: str | Path, *, rank: int, world_size: int, timeout_s: float,
                 hint: Callable[[], str] = lambda: "") -> None:
        self.folder, self.rank, self.world, self.timeout = Path(folder), rank, world_size, timeout_s
        self.interval = max(0.05, min(1.0, timeout_s / 5))
        self.hint = hint
        self.watched = list(range(1, world_size)) if rank == 0 else [0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echofm-heartbeat", daemon=True)
        self._count = 0

    def start(self) -> Heartbeat:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and say so: a rank that finished first is never reported by a peer
        that is still finishing."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self._beat(done=True)
        except OSError:
            pass

    def _beat(self, done: bool = False) -> None:
        self._count += 1
        path = beat_file(self.folder, self.rank)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(),
                                   "beat": self._count, "done": done}))
        os.replace(tmp, path)  # a reader sees the old or the new beat, never half of one

    def _run(self) -> None:
        seen = {r: (None, time.monotonic()) for r in self.watched}  # rank -> (last beat, when it changed)
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except OSError:
                pass  # a full or flaky disk must not kill training; peers will judge
            now = time.monotonic()
            for r in self.watched:
                beat = read_beat(self.folder, r)
                value = beat.get("beat") if beat else None
                if value != seen[r][0] or (beat and beat.get("done")):
                    seen[r] = (value, now)
                elif now - seen[r][1] > self.timeout:
                    self._report(r, beat, now - seen[r][1])

    def _report(self, r: int, beat: dict | None, silent: float) -> None:
        who = f"rank {r}" + (f" (pid {beat['pid']} on {beat['host']})" if beat else "")
        if beat and beat.get("host") == socket.gethostname() and _stopped(beat.get("pid")):
            os.kill(beat["pid"], signal.SIGKILL)  # SIGTERM stays pending in a stopped process
            who += ", stopped (SIGSTOP) and now killed,"
        hint = self.hint()
        sys.stdout.flush()
        sys.stderr.write(f"echofm: error: {who} sent no heartbeat for {silent:.0f} s "
                         f"(train.heartbeat_timeout_s={self.timeout:g}): it is stopped, hung or dead; "
                         f"rank {self.rank} ends the run{'; ' + hint if hint else ''}\n")
        sys.stderr.flush()
        os._exit(EXIT_STALLED)  # the main thread may be blocked in a collective: no clean exit exists


def _stopped(pid) -> bool:
    """True when `pid` is a process of this host in the stopped state (T / t in /proc)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] in (["T"], ["t"])
