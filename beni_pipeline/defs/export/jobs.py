import dagster as dg

export_job = dg.define_asset_job(
    "export",
    selection=dg.AssetSelection.groups("export"),
    description="Quantize the latest trained model with each scheme, load every export back and re-score it.",
)
