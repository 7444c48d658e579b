import os
import signal
import subprocess
import sys

import pytest

from beni_pipeline.prep.locks import Busy, exclusive

HOLDER = """
import sys, time
from pathlib import Path
from beni_pipeline.prep.locks import exclusive
with exclusive(Path(sys.argv[1]), 0, "busy"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with (
            pytest.raises(Busy, match=rf"^chunk x is held by pid {holder.pid}; wait$"),
            exclusive(path, 0.3, "chunk x is held by pid {pid}; wait"),
        ):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with exclusive(path, 0, "unused") as fd:
        assert os.pread(fd, 32, 0) == f"{os.getpid()}\n".encode()
