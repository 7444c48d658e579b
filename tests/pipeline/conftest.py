import shutil
from pathlib import Path

import dagster as dg
import pytest

from beni_pipeline.definitions import RESOURCES

REPO = Path(__file__).parents[2]


@pytest.fixture
def instance(tmp_path, monkeypatch):
    """A Dagster instance on a temp DAGSTER_HOME with the project's dagster.yaml, and BENI_DATA beside it."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("BENI_DATA", str(tmp_path / "data"))
    with dg.DagsterInstance.get() as instance:
        yield instance


def materialize(assets: list, **kwargs) -> dg.ExecuteInProcessResult:
    """dg.materialize with the project's resources (the data layout, the Pipes client), as the code location has them."""
    return dg.materialize(assets, resources=RESOURCES, **kwargs)


def run_check(asset, check, instance) -> dg.AssetCheckEvaluation:
    """One asset check run alone against the asset as it stands (the asset is not rematerialized)."""
    result = materialize([asset, check], instance=instance, selection=dg.AssetSelection.checks(check), raise_on_error=False)
    [evaluation] = result.get_asset_check_evaluations()
    return evaluation
