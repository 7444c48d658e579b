"""An exclusive lock on a folder's work, held by one process at a time and released by the kernel when it dies."""

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Busy(RuntimeError):
    pass


@contextmanager
def exclusive(path: Path, wait_s: float, busy: str) -> Iterator[int]:
    """Hold an flock on `path` (created if missing), waiting up to `wait_s` seconds for another holder; yields its fd.
    A holder still there after the wait raises Busy(`busy`, its "{pid}" replaced by the holder's).

    flock belongs to the open file, not to a path or a process: a kill -9 releases it (no stale lock to clean up),
    two threads opening the file exclude each other, and a child that inherits the fd holds it until it exits too.
    The file is never deleted: a holder of an unlinked file would exclude nobody who opens the path afresh.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                # a holder writes its pid just after it locks: an empty file gets a moment more, for the message
                if time.monotonic() >= deadline + (0 if holder else 1):
                    raise Busy(busy.replace("{pid}", holder or "unknown")) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message of whoever waits
        yield fd
    finally:
        os.close(fd)
