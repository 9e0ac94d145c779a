"""A stopped rank (SIGSTOP) on the watcher's host is named and killed, so the launcher ends
the job at once instead of waiting its SIGTERM grace period (issue 29)."""
import json
import signal
import socket
import subprocess
import sys
import time

from echofm.engine.heartbeat import EXIT_STALLED, _stopped, beat_file


def test_a_stopped_rank_on_this_host_is_named_and_killed(tmp_path):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        victim.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not _stopped(victim.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _stopped(victim.pid)
        folder = tmp_path / "heartbeat"
        folder.mkdir()
        beat_file(folder, 1).write_text(json.dumps({"rank": 1, "pid": victim.pid, "host": socket.gethostname(),
                                                    "beat": 7, "done": False}))
        code = ("import time; from echofm.engine.heartbeat import Heartbeat; "
                f"Heartbeat({str(folder)!r}, rank=0, world_size=2, timeout_s=1.0).start(); time.sleep(30)")
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert res.returncode == EXIT_STALLED and time.monotonic() - t0 < 20
        assert (f"echofm: error: rank 1 (pid {victim.pid} on {socket.gethostname()}), stopped (SIGSTOP) and now "
                "killed, sent no heartbeat for") in res.stderr
        assert victim.wait(timeout=5) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.wait()


def test_only_stopped_processes_count_as_stopped():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not _stopped(p.pid) and not _stopped(None) and not _stopped(2**22 + 12345)
    finally:
        p.kill()
        p.wait()
