import logging
import os
import warnings

# transformers (5.25 and later) loads models with `use_kernels` on by default, which fetches kernels from the hub at
# load time: offline that fails (or asks to trust remote code). beni runs offline, so hub kernels are off unless the
# user turns them on (USE_HUB_KERNELS=1).
os.environ.setdefault("USE_HUB_KERNELS", "0")

# Third-party log lines that read as errors but are not, dropped by logger and text so that any other line still shows:
# - transformers imports torchao whenever it is installed, and torchao then tries to load C++ kernels built for other
#   Pythons and GPUs (MX fp8, CUTLASS sm90a) and, on a CPU machine, notes that triton is missing; beni's torchao scheme
#   is int8 weight-only in plain PyTorch, which needs neither;
# - torchao registers its enums with torch's pytree, which this torch supports natively and warns about;
# - bitsandbytes, on a CPU with AVX512-BF16, tries to fetch a 4-bit kernel from the hub when imported, which offline (or
#   untrusted) fails; it then uses its own CPU kernel, as it does on every other CPU;
# - bitsandbytes' LLM.int8() casts its inputs to fp16 by design, and says so on every matmul of every forward.
THIRD_PARTY_NOISE = {
    "torchao": "Failed to load ",
    "torchao.kernel.intmm": "Detected no triton",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
}


class _DropLines(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


for _logger, _text in THIRD_PARTY_NOISE.items():
    logging.getLogger(_logger).addFilter(_DropLines(_text))

# torch.compile's inductor notes, as a UserWarning ending "Cut an issue to PyTorch", that it split a long reduction
# and so left its online softmax out: a detail of the kernels it chose, printed in every compiled training run.
INDUCTOR_NOTE = "Online softmax is disabled on the fly"
warnings.filterwarnings("ignore", message=rf"\s*{INDUCTOR_NOTE}", category=UserWarning)
