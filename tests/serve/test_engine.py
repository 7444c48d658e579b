"""The engine on its own: a failed pass answers its sequences with an error and the engine goes on."""

import queue

import torch
from transformers import Qwen2Config

from beni_model.chat import load_tokenizer
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_pipeline.serve.engine import Engine, Sampling, Sequence
from tests.model.conftest import TEXT


def test_a_failed_prefill_answers_with_an_error_and_the_engine_goes_on(loaded):
    model, processor = loaded
    tokenizer = processor.tokenizer
    engine = Engine(model, tokenizer, max_batch=4, max_waiting=4)
    try:
        events = queue.Queue()
        # Image tokens without the image: the model's own check refuses the pass.
        broken = tokenizer(f"{model.config.image_token * model.config.num_image_tokens()} hello", add_special_tokens=False)["input_ids"]
        engine.submit(Sequence(broken, None, Sampling(max_tokens=4), events.put))
        assert "image tokens" in events.get(timeout=30)["error"]
        fine = queue.Queue()
        engine.submit(Sequence(tokenizer("hello")["input_ids"], None, Sampling(max_tokens=4), fine.put))
        while "finish" not in (event := fine.get(timeout=30)):
            assert "text" in event
        assert event["completion_tokens"] >= 1
    finally:
        engine.stop()


def test_tokens_that_generate_suppresses_are_never_picked(loaded):
    """A beni model's generation config suppresses its image token; the engine follows whatever the config names."""
    model, processor = loaded
    tokenizer = processor.tokenizer
    ids = tokenizer("Read the text: hello", add_special_tokens=False)["input_ids"]

    def answer() -> list[int]:
        engine, events = Engine(model, tokenizer, max_batch=2, max_waiting=2), queue.Queue()
        try:
            sequence = Sequence(ids, None, Sampling(max_tokens=8), events.put)
            engine.submit(sequence)
            while "finish" not in events.get(timeout=30):
                pass
            return sequence.tokens
        finally:
            engine.stop()

    suppressed = list(model.generation_config.suppress_tokens or [])
    first = answer()[0]
    try:
        model.generation_config.suppress_tokens = suppressed + [first]
        tokens = answer()
        prompt = torch.tensor([ids])
        expected = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()  # fmt: skip
    finally:
        model.generation_config.suppress_tokens = suppressed
    assert first not in tokens and tokens == [t for t in expected if t != tokenizer.eos_token_id]


def test_a_sliding_window_llm_is_refused_in_one_sentence(parts):
    """Its cache keeps a window per layer, which the engine's left padding would shift: refused, not answered wrong."""
    config = BeniConfig(
        vision_model=parts["siglip"],
        text_config=Qwen2Config(**TEXT, vocab_size=400, use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention"] * 2),
    )
    tokenizer = load_tokenizer(parts["qwen2"], config.image_token)
    model = BeniForConditionalGeneration.from_parts(config, tokenizer).eval()
    engine, events = Engine(model, tokenizer, max_batch=2, max_waiting=2), queue.Queue()
    try:
        engine.submit(Sequence(tokenizer("hello")["input_ids"], None, Sampling(max_tokens=4), events.put))
        assert "full attention in every layer" in events.get(timeout=30)["error"]
    finally:
        engine.stop()
