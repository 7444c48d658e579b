"""Every module of the product imports on its own, first, in a fresh interpreter: what a user's script or a worker
process does when it needs one piece (an import cycle shows only in that order)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One interpreter loads the third-party libraries once, then forks a child per module, which imports that module
# first: the children see no beni module already loaded, and the test takes seconds, not minutes.
CHILDREN = """
import importlib, os, sys, traceback
import dagster, datasketch, httpx, numpy, peft, PIL.Image, pyarrow, torch, torch.distributed.fsdp, webdataset  # noqa: F401
from transformers import AutoModel, AutoProcessor, GenerationMixin, LlamaForCausalLM, PreTrainedModel, SiglipVisionModel  # noqa: F401
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        failed.append(name)
print("failed:", " ".join(failed))
"""


def modules() -> list[str]:
    names = []
    for package in ("beni_model", "beni_pipeline"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = modules()
    assert "beni_model.vision" in names and "beni_pipeline.defs.training.assets" in names
    result = subprocess.run([sys.executable, "-c", CHILDREN, *names], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "failed:", result.stderr[-3000:]
