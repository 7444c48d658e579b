"""The run queue and run monitoring of the project's dagster.yaml, as the daemon reads them."""

import logging
import os
import signal
import subprocess
import sys
import time

import dagster as dg
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG, PARTITION_NAME_TAG
from dagster._core.utils import make_new_run_id
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon


def test_a_second_run_of_one_partition_queues(instance):
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("beni"), "__repository__"), "__ASSET_JOB")

    def add(status: dg.DagsterRunStatus, **tags: str) -> str:
        run = dg.DagsterRun(job_name="__ASSET_JOB", run_id=make_new_run_id(), status=status, tags=tags, remote_job_origin=origin)
        instance.add_run(run)
        return run.run_id

    add(dg.DagsterRunStatus.STARTED, **{PARTITION_NAME_TAG: "00003"})
    same = add(dg.DagsterRunStatus.QUEUED, **{PARTITION_NAME_TAG: "00003"})
    other = add(dg.DagsterRunStatus.QUEUED, **{PARTITION_NAME_TAG: "00004"})
    unpartitioned = add(dg.DagsterRunStatus.QUEUED)
    ranged = add(dg.DagsterRunStatus.QUEUED, **{ASSET_PARTITION_RANGE_START_TAG: "00000", ASSET_PARTITION_RANGE_END_TAG: "00005"})

    daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
    dequeued = {run.run_id for run in daemon._get_runs_to_dequeue(instance, instance.get_concurrency_config(), None)}
    assert dequeued == {other, unpartitioned, ranged}
    assert same not in dequeued


SLOW_RUN = """
import time
import dagster as dg

@dg.asset
def slow():
    print("running", flush=True)
    time.sleep(120)

with dg.DagsterInstance.get() as instance:
    dg.materialize([slow], instance=instance, tags={"dagster/max_runtime": "1"})
"""


def test_run_monitoring_fails_a_run_killed_with_minus_9(instance):
    """A run executed in its caller's process (as `beni demo` runs) and killed -9 stays STARTED until the monitoring
    daemon's runtime limit fails it (the default run launcher cannot probe its process)."""
    assert instance.run_monitoring_enabled  # else the daemon never runs the iteration below
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "running\n"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (run,) = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.STARTED
    time.sleep(1.5)  # past the run's one-second limit

    with WorkspaceProcessContext(instance, EmptyWorkspaceTarget()) as workspace:
        list(execute_run_monitoring_iteration(workspace, logging.getLogger("test")))
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
