import dagster as dg

evaluate_job = dg.define_asset_job(
    "evaluate",
    selection=dg.AssetSelection.groups("evaluation"),
    description="Score the latest trained model on the eval sets (each made once) and check the report.",
)
