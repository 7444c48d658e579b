"""Where assets keep their files: one data root, `BENI_DATA` (default ./data)."""

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("BENI_DATA", "data")).resolve()
