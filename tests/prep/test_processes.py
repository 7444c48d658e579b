"""Prep's process pools end, on success and on a failed task, even where the parent ignores SIGTERM (as Dagster leaves
it wherever SIGINT is ignored: a background job, a service)."""

import subprocess
import sys

CHILD = """
import signal, time
from beni_pipeline.prep.processes import process_pool

def task(i):
    if i == 99:
        raise ValueError("task 99 fails")
    time.sleep(0.01)
    return i

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))  # what dagster's interrupt handling does
    for _ in range(3):
        with process_pool(2) as pool:
            print(sum(pool.map(task, range(20))), flush=True)
    for _ in range(20):
        try:
            with process_pool(2) as pool:
                list(pool.map(task, [1, 99] + list(range(40))))
        except ValueError as e:
            print(e, flush=True)
"""


def test_pools_end_where_the_parent_ignores_sigterm(tmp_path):
    script = tmp_path / "child.py"  # a file: spawned workers import the task from it
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["190"] * 3 + ["task 99 fails"] * 20
