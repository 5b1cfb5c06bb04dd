"""Helpers shared by the apps of `cargo xtask bench peers` (xtask writes these files into
target/bench/apps; see xtask/src/bench_peers/).

Every app answers `GET /?burn_ms=N` (N ms of this thread's CPU time in a busy loop) and
`GET /?delay_ms=N` (a sleep that holds the request without CPU), and names the process that
served it in an `X-Pid` header, from which the benchmark computes each worker's share.
"""

import ctypes
import os
import time

PR_SET_PDEATHSIG = 1


def started():
    """Called once when an app module is imported, which is in the serving process: uvicorn and
    gunicorn import the app in each worker (no --preload), never in their master.

    - SIGKILL this process when its parent dies: the benchmark's guards stop each server's
      master or corral's agent, and a worker left behind (uvicorn's spawned workers do not
      watch their parent) would keep serving on the benchmark's port.
    - Write a marker file named by this pid into $BENCH_MARKERS: the benchmark's way to tell
      the serving processes from masters, arbiters and helpers.
    - Start a session of its own, as corral's workers do (each calls setsid): with the
      kernel's autogroups each session is one scheduling group, so every server's serving
      processes then compete for the CPUs the same way, each apart from the load generator's
      session. (A corral worker is a session leader already: setsid fails, nothing changes.)
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    try:
        os.setsid()
    except OSError:
        pass
    markers = os.environ.get("BENCH_MARKERS")
    if markers:
        with open(os.path.join(markers, str(os.getpid())), "w"):
            pass


def burn(ms):
    """Busy-loop until this thread has used `ms` milliseconds of CPU. Thread time, not process
    time: a sync FastAPI app burns in several threadpool threads of one process at once, and
    each request must cost its own N ms whatever the others do."""
    end = time.thread_time() + ms / 1000.0
    while time.thread_time() < end:
        pass


def pid():
    return str(os.getpid())
