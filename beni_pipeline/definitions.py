from pathlib import Path

import dagster as dg

from beni_pipeline.defs.engine import Engine
from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.defs.training.pipes import WholeLineMessageReader
from beni_pipeline.defs.training.resources import TrainingRecipe

RESOURCES = {
    "pipes": dg.PipesSubprocessClient(message_reader=WholeLineMessageReader()),
    "layout": DataLayout(),
    "recipe": TrainingRecipe(),
    "engine": Engine(),
}


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        # One process per run: a process per step would import torch and transformers again for each step
        # (seconds each), and the heavy steps run their own worker processes anyway.
        dg.Definitions(resources=RESOURCES, executor=dg.in_process_executor),
    )
