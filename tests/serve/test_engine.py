"""The engine on its own: a failed pass answers its sequences with an error and the engine goes on."""

import queue

from beni_pipeline.serve.engine import Engine, Sampling, Sequence


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
