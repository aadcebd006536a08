"""Stopping a server started in its own session, with every process it started."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session (a process started with start_new_session=True, whose
    id is the session's): sdserve, its Ray GCS and raylet, every replica."""
    for _ in range(20):
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # Fields 3 and 6 of /proc/PID/stat: the state (Z: dead, not yet reaped), the session.
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    raise RuntimeError(f"processes of session {sid} survive SIGKILL: {pids}")
