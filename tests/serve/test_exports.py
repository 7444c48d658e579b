"""Quantized and LLaVA exports serve through the same server, their answers equal to their own greedy generate."""

import pytest
import torch
from openai import OpenAI

from beni_model.evaluate import placement
from beni_model.export import export_llava
from beni_model.quantize import export_quantized, unavailable
from beni_pipeline.serve.app import load_model
from tests.conftest import jpeg_bytes
from tests.serve.conftest import serve
from tests.serve.test_api import ask, greedy

QUESTION = "What is written in the image?"


def answer(loaded, image: bytes) -> str:
    served = serve(loaded)
    try:
        client = OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
        return (
            client.chat.completions.create(model="final", messages=ask(QUESTION, image), max_tokens=12, temperature=0)
            .choices[0]
            .message.content
        )
    finally:
        served.stop()


def test_a_llava_export_answers_as_the_beni_model(loaded, tmp_path):
    image = jpeg_bytes(64, 48, seed=5)
    model, processor = loaded
    export_llava(model, tmp_path / "llava", processor)
    llava = load_model(tmp_path / "llava", "cpu")
    assert type(llava[0]).__name__ == "LlavaForConditionalGeneration"
    assert answer(llava, image) == answer(loaded, image) == greedy(llava, QUESTION, image, 12)


@pytest.mark.parametrize("scheme", ["nf4", "torchao-int8"])
def test_a_quantized_export_answers_as_its_greedy_generate(model_dir, tmp_path, scheme):
    if reason := unavailable(scheme, "cpu"):
        pytest.skip(reason)
    quantized = load_model(export_quantized(model_dir, tmp_path / scheme, scheme, "cpu"), "cpu")
    image = jpeg_bytes(64, 48, seed=6)
    assert answer(quantized, image) == greedy(quantized, QUESTION, image, 12)


def test_bfloat16_serving_loads_bf16_weights_and_answers_as_their_greedy_generate(model_dir):
    model, processor = bf16 = load_model(model_dir, "cpu", "bfloat16")
    assert placement(model)[1] == torch.bfloat16
    image = jpeg_bytes(64, 48, seed=7)
    assert answer(bf16, image) == greedy(bf16, QUESTION, image, 12)
    with pytest.raises(ValueError, match="Unknown dtype 'float16'"):
        load_model(model_dir, "cpu", "float16")
