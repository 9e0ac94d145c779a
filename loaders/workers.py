"""A process pool that notices when a worker dies.

`multiprocessing.Pool.imap` waits forever for the result of a worker the OOM killer took;
`ProcessPoolExecutor` breaks the whole pool and cannot say which task killed it. Here each
worker holds one task at a time through its own pipe, and the parent waits on both the pipes
and the process sentinels: a dead worker's task gets a `WorkerDied` result (with the exit
code), a fresh worker takes its place, and the run goes on. A worker that holds one task
longer than `timeout` seconds (hung, or stopped by SIGSTOP: no exit, no answer) is killed and
its task gets a WorkerDied too.

Results come back in task order (a bounded window of tasks in flight), so what the parent
writes does not depend on the worker count.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait


@dataclass(frozen=True, slots=True)
class WorkerDied:
    """The result of a task whose worker process ended without answering."""

    exitcode: int | None
    timeout: float | None = None
    """Set when the worker was killed for holding its task longer than this many seconds."""

    @property
    def reason(self) -> str:
        if self.timeout is not None:
            return f"no answer after {self.timeout:g} s (worker hung or stopped); worker killed"
        code = self.exitcode
        how = ("killed by SIGKILL (out of memory?)" if code == -9 else
               f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        return f"worker process died while processing it ({how})"


def _serve(conn, fn: Callable, init: Callable | None) -> None:
    if init is not None:
        init()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        i, task = msg
        conn.send((i, fn(task)))


class _Worker:
    def __init__(self, ctx, fn: Callable, init: Callable | None) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, init), daemon=True)
        self.proc.start()
        child.close()
        self.task: int | None = None
        self.since = 0.0
        """time.monotonic() when `task` was sent."""

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def imap_supervised(fn: Callable, tasks: Iterable, workers: int, *, init: Callable | None = None,
                    window: int | None = None, context: str = "forkserver", timeout: float | None = None) -> Iterator:
    """fn(task) for every task, in task order, computed by `workers` processes; a task whose
    worker dies (or holds it over `timeout` seconds: killed) yields WorkerDied. `fn` must be picklable (a module-level function or a
    partial of one); exceptions inside fn are fn's to turn into results."""
    tasks = list(tasks)
    ctx = mp.get_context(context)
    window = window or 4 * workers
    pool = [_Worker(ctx, fn, init) for _ in range(min(workers, max(len(tasks), 1)))]
    done: dict[int, object] = {}
    nxt = out = 0
    try:
        while out < len(tasks):
            for k, w in enumerate(pool):  # keep every idle worker busy, within the reorder window
                if w.task is None and not w.proc.is_alive():  # died after its last answer
                    w.stop()
                    pool[k] = w = _Worker(ctx, fn, init)
                if w.task is None and nxt < len(tasks) and nxt < out + window:
                    w.task, w.since = nxt, time.monotonic()
                    w.conn.send((nxt, tasks[nxt]))
                    nxt += 1
            busy = [w for w in pool if w.task is not None]
            left = None if timeout is None else max(0.0, min((w.since for w in busy), default=time.monotonic()) + timeout - time.monotonic())
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=left))
            for k, w in enumerate(pool):
                if w.task is None:
                    continue
                if timeout is not None and w.conn not in ready and time.monotonic() - w.since >= timeout:
                    w.proc.kill()  # SIGKILL ends a stopped process too
                    w.proc.join()
                    done[w.task] = WorkerDied(w.proc.exitcode, timeout=timeout)
                    w.conn.close()
                    pool[k] = _Worker(ctx, fn, init)
                    continue
                if w.conn in ready:
                    try:
                        i, res = w.conn.recv()
                        done[i], w.task = res, None
                        continue
                    except (EOFError, OSError):
                        pass  # died while answering
                elif w.proc.sentinel not in ready:
                    continue
                w.proc.join()
                done[w.task] = WorkerDied(w.proc.exitcode)
                w.conn.close()
                pool[k] = _Worker(ctx, fn, init)
            while out in done:
                yield done.pop(out)
                out += 1
    finally:
        for w in pool:
            w.stop()
