"""Training processes report through Pipes: a message the reader meets half-written arrives whole, and so does all
that follows it (a real subprocess, a real Dagster run)."""

import sys

import dagster as dg

from tests.pipeline.conftest import materialize

# The child writes one log message in two parts, a pause between, as a writer that the reader catches mid-line would,
# then reports its materialization the usual way.
CHILD = """
import json, time
from dagster_pipes import PIPES_PROTOCOL_VERSION, PIPES_PROTOCOL_VERSION_FIELD, PipesEnvVarParamsLoader, open_dagster_pipes

with open_dagster_pipes() as pipes:
    path = PipesEnvVarParamsLoader().load_messages_params()["path"]
    message = {PIPES_PROTOCOL_VERSION_FIELD: PIPES_PROTOCOL_VERSION, "method": "log", "params": {"message": "written in two parts", "level": "INFO"}}
    line = json.dumps(message) + "\\n"
    with open(path, "a") as f:
        f.write(line[:25])
        f.flush()
        time.sleep(0.5)
        f.write(line[25:])
    pipes.log.info("after the cut")
    pipes.report_asset_materialization(metadata={"steps": 3})
"""


@dg.asset
def reported(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    return pipes.run(command=[sys.executable, "-c", CHILD], context=context).get_materialize_result()


def test_a_message_read_half_written_arrives_whole_with_everything_after_it(instance):
    result = materialize([reported], instance=instance)
    assert result.success
    [materialization] = result.asset_materializations_for_node("reported")
    assert materialization.metadata["steps"].value == 3
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("written in two parts" in m for m in messages) and any("after the cut" in m for m in messages)
    assert not any("reader" in m and "Error" in m for m in messages)
