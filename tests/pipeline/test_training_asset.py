import base64
import re
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.defs.training.assets import TRAINING_TAGS, trained_model, training_job
from tests.model.test_data import write_toy_shards
from tests.pipeline.conftest import materialize


def train(instance, **config):
    return materialize(
        [trained_model],
        instance=instance,
        run_config={"ops": {"trained_model": {"config": config}}},
    )


def logs(instance, result) -> str:
    return "\n".join(e.user_message for e in instance.all_logs(result.run_id))


@pytest.mark.slow
def test_trained_model_streams_metrics_and_resumes_when_rematerialized(instance, tmp_path, capfd):
    write_toy_shards(DataLayout().shards, samples=96, per_shard=24)
    first = train(instance, max_steps=12, save_every=6)
    out, err = capfd.readouterr()
    step_lines = [line for line in (out + err).splitlines() if re.search(r"\bstep=\d+ loss=", line)]
    assert len(step_lines) == 2 * 12  # the tiny recipe's two stages, each step once: the run's log, not the trainer's stdout too
    assert first.success
    metadata = {k: v.value for k, v in first.asset_materializations_for_node("trained_model")[0].metadata.items()}
    assert metadata["steps"] == 12 and metadata["world_size"] == 2 and metadata["device"] == "cpu"
    assert metadata["final_loss"] > 0 and metadata["tokens_per_s"] > 0
    assert metadata["checkpoint"].endswith("step_0000012") and Path(metadata["final_model"], "model.safetensors").is_file()
    png = base64.b64decode(metadata["loss_curve"].split("base64,")[1].rstrip(")"))
    assert png == Path(metadata["loss_curve_path"]).read_bytes()
    assert metadata["serve"].endswith(f"`beni serve {DataLayout().final_model}`")  # what to run to chat with it
    streamed = logs(instance, first)
    assert "step=12 loss=" in streamed and "starting at step 0 of 12 on 2 x cpu" in streamed

    second = train(instance, max_steps=16, save_every=6)  # a longer run picks up the 12 steps done
    assert second.success
    streamed = logs(instance, second)
    assert "resuming from step_0000012 at step 12 of 16" in streamed and "step=1 loss=" not in streamed
    rows = (DataLayout().training("tiny") / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 16


@pytest.mark.slow
def test_trained_model_on_two_nodes_waits_for_the_other_node_it_logs_the_command_of(instance, tmp_path, monkeypatch):
    """The other host, played by a thread: it runs each command the step logs, as a person would on a second machine."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    write_toy_shards(DataLayout().shards, samples=48, per_shard=12)
    done, others = threading.Event(), []

    def other_node():
        seen = set()
        while not done.is_set():
            for run in instance.get_runs(limit=1):
                for message in (e.user_message for e in instance.all_logs(run.run_id)):
                    if "on each, run: " in message and message not in seen:
                        seen.add(message)
                        command = shlex.split(message.split("on each, run: ")[1])
                        others.append(subprocess.run(command, capture_output=True, text=True, timeout=300))
            time.sleep(0.2)

    thread = threading.Thread(target=other_node)
    thread.start()
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = train(instance, max_steps=12, save_every=6, nodes=2, processes_per_node=1, rendezvous=f"127.0.0.1:{port}")
    finally:
        done.set()
        thread.join()
    assert result.success and others and all(o.returncode == 0 for o in others), [o.stdout[-2000:] for o in others]
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("trained_model")[0].metadata.items()}
    assert metadata["steps"] == 12 and metadata["world_size"] == 2
    assert "step=12 loss=" in logs(instance, result)


def test_several_nodes_without_a_rendezvous_fail_in_one_sentence(instance, tmp_path):
    result = materialize(
        [trained_model], instance=instance, raise_on_error=False, run_config={"ops": {"trained_model": {"config": {"nodes": 2}}}}
    )
    assert not result.success
    assert "nodes is 2 but rendezvous is empty; give the host:port of one node that every node can reach" in str(
        result.get_step_failure_events()[0].step_failure_data.error
    )


def test_training_runs_are_queued_one_per_gpu_set_with_a_time_limit():
    assert training_job.tags == TRAINING_TAGS
    assert set(TRAINING_TAGS) == {"beni/gpu", "dagster/max_runtime"}
    assert trained_model.op.pool == "gpu"


def test_unknown_recipe_fails_with_one_sentence(instance, tmp_path):
    write_toy_shards(DataLayout().shards, samples=8, per_shard=8)
    result = materialize(
        [trained_model],
        instance=instance,
        raise_on_error=False,
        run_config={"resources": {"recipe": {"config": {"name": "huge"}}}},
    )
    assert not result.success
    assert "Unknown recipe 'huge': pick one of ['smollm2-siglip', 'tiny'] or give the path of a recipe .yaml file." in str(
        result.get_step_failure_events()[0].step_failure_data.error
    )


def test_too_few_shards_for_the_processes_fail_with_one_sentence(instance):
    write_toy_shards(DataLayout().shards, samples=8, per_shard=8)  # one shard, as 30 rows of a user's make
    config = {"ops": {"trained_model": {"config": {"processes_per_node": 2}}}}
    result = materialize([trained_model], instance=instance, raise_on_error=False, run_config=config)
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    assert error.cls_name == "Failure" and error.cause is None
    assert "1 training shards cannot feed 2 training processes (each reads its own): re-materialize training_shards with a smaller" in (
        error.message
    )
