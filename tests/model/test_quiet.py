"""Importing the model stack prints no third-party line that reads as an error and is not one (beni_model/__init__.py)."""

import subprocess
import sys

from beni_model import INDUCTOR_NOTE, THIRD_PARTY_NOISE

IMPORT_AND_LOG = """
import logging
import beni_model
import bitsandbytes  # on a CPU with AVX512-BF16 it tries the hub for a 4-bit kernel
import transformers.quantizers  # imports torchao, which tries its C++ kernels
import torch
from bitsandbytes.autograd import _functions
_functions.logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
logging.getLogger("torchao").warning("a torchao warning beni did not expect")
import warnings  # as torch._inductor.lowering warns it
warnings.warn("\\nOnline softmax is disabled on the fly since Inductor decides to\\nsplit the reduction. Cut an issue to PyTorch if this is an\\nimportant use case and you want to speed it up with online\\nsoftmax.\\n")
warnings.warn("a UserWarning beni did not expect")
"""


def test_the_model_stack_imports_quietly_and_other_warnings_still_show():
    done = subprocess.run([sys.executable, "-c", IMPORT_AND_LOG], capture_output=True, text=True, timeout=300, check=True)
    output = done.stdout + done.stderr
    for text in THIRD_PARTY_NOISE.values():
        assert text not in output
    assert INDUCTOR_NOTE not in output
    assert "a torchao warning beni did not expect" in output and "a UserWarning beni did not expect" in output
