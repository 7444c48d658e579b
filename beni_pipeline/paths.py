"""Where assets keep their files: one data root, `BENI_DATA` (default ./data)."""

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("BENI_DATA", "data")).resolve()


def trained_model_dir() -> Path:
    """The save_pretrained folder of the latest trained model: what `trained_model` publishes, evaluation reads."""
    return data_root() / "model" / "final"
