"""Worker processes that die with their parent.

Every process pool of the project (the DICOM decode pool, the synthetic-data writers, stage-1
prepare, check-data, the engine's loader processes) starts its workers with
:func:`die_with_parent` as the initializer: on Linux the kernel then sends the worker SIGKILL
when the process that started it exits — also after ``kill -9`` of the command, when no Python
code runs to shut the pool down — so no orphan keeps decoding or writing cache files. (With the
forkserver start method the workers' parent is the fork server, which itself exits when the
command's process is gone.) Elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(owner: int | None = None, poll_s: float = 0.2) -> None:
    """Worker initializer: end this process when its parent, or ``owner`` (the pid of the
    process that made the pool; a forkserver worker's parent is the fork server), exits.

    The direct parent is covered by the kernel (``PR_SET_PDEATHSIG``, Linux); ``owner`` by a
    daemon thread that checks every ``poll_s`` seconds whether it still exists.
    """
    import threading
    import time

    if sys.platform.startswith("linux"):
        import ctypes

        parent = os.getppid()
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no glibc: the watch below still applies
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    if owner is None or owner == os.getppid():
        return

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # exists (another user's pid would be reuse; rare)
                pass

    threading.Thread(target=watch, name="die-with-owner", daemon=True).start()


def pool_initializer() -> tuple:
    """``initializer``/``initargs`` for a ``ProcessPoolExecutor`` made in this process."""
    return die_with_parent, (os.getpid(),)


def worker_context(preload: list[str]):
    """The multiprocessing context of every pool: forkserver on Linux (workers never inherit
    the caller's torch/OpenMP threads), with ``preload`` imported once in the server so workers
    start warm; spawn elsewhere.

    A script read from standard input (``python - <<EOF``) or given with ``-c`` has no main
    module file, yet ``__main__.__file__`` may be ``"<stdin>"``: every forkserver/spawn worker
    would then try to run that path and print a ``FileNotFoundError`` traceback. Such a
    non-file ``__file__`` is removed first, so the workers skip re-importing ``__main__``.
    """
    import multiprocessing

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is not None and path is not None and getattr(main, "__spec__", None) is None \
            and not os.path.isfile(path):
        del main.__file__
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
        return ctx
    return multiprocessing.get_context("spawn")
