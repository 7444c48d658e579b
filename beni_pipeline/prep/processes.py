"""Worker processes for the prep steps."""

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager


@contextmanager
def process_pool(processes: int) -> Iterator[ProcessPoolExecutor]:
    """Spawned worker processes that end by finishing: on an error in the caller or a task, the tasks already running
    finish, the queued ones are dropped, and the error goes on.

    Not multiprocessing.Pool: its exit stops workers with SIGTERM and waits for them, and wherever SIGINT is ignored (a
    background job, a service) Dagster leaves SIGTERM ignored too (it maps SIGTERM to SIGINT's handler), the workers
    inherit that, and the wait never ended (seen in CI). An executor's workers leave when told to, with no signal.
    """
    # spawn: the caller (a Dagster run, a torch process) holds threads that a fork would copy mid-flight.
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()
