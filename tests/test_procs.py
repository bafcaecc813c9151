"""Worker pools die with their parent: after ``kill -9`` of the process that started them, no
worker is alive a second later (common/procs.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import sys, time
from common.dicom_decode import get_pool
from cspine.batch import _context
from concurrent.futures import ProcessPoolExecutor
from common.procs import pool_initializer
if __name__ == "__main__":
    decode = get_pool(2)
    init, args = pool_initializer()
    loader = ProcessPoolExecutor(2, mp_context=_context(), initializer=init, initargs=args)
    busy = [p.submit(time.sleep, 60) for p in (decode, decode, loader, loader)]
    time.sleep(3)
    pids = list(decode._processes) + list(loader._processes)
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_workers_die_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=os.getcwd())
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 4 and all(_alive(p) for p in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        time.sleep(1.0)
        assert [p for p in pids if _alive(p)] == []
    finally:
        if parent.poll() is None:
            parent.kill()
