"""The processor and the model as a transformers generator: AutoProcessor, generate, pipeline."""

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    SiglipImageProcessorPil,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    pipeline,
)

from beni_model.chat import build_example, load_tokenizer, prompt_text
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import BeniProcessor
from tests.model.conftest import IMAGE_SIZE, IMAGENET_MEAN, VISION, pictures, processor_of

QUESTION = "What is written in the image?"
LLAVA_TURN = [{"from": "human", "value": f"<image>\n{QUESTION}"}]
TYPED = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def test_processor_expands_each_image_and_preprocesses_as_the_encoders_processor(build):
    model, tokenizer = build("siglip", "llama", "pixelshuffle2_mlp")
    processor = processor_of(model, tokenizer)
    image = pictures(1, size=(50, 40))[0]
    inputs = processor(text=prompt_text(LLAVA_TURN, processor), images=[image], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.num_image_tokens() == 4
    expected = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(inputs["pixel_values"], expected)


def test_an_encoder_that_keeps_the_aspect_is_resized_and_cropped_with_its_own_statistics(build, parts):
    model, tokenizer = build("dinov2", "llama", image_size=48)
    image_processor = processor_of(model, tokenizer).image_processor
    assert list(image_processor.image_mean) == IMAGENET_MEAN  # from the folder's preprocessor_config.json, not a table
    assert image_processor.crop_size == {"height": 48, "width": 48} and image_processor.size == {"shortest_edge": 56}
    wide = pictures(1, size=(120, 60))[0]
    own = AutoImageProcessor.from_pretrained(parts["dinov2"], size={"shortest_edge": 56}, crop_size={"height": 48, "width": 48})
    assert torch.equal(image_processor(wide, return_tensors="pt")["pixel_values"], own(wide, return_tensors="pt")["pixel_values"])


def test_an_encoder_trained_from_scratch_gets_its_familys_processor(parts):
    config = BeniConfig(vision_config={"model_type": "vit", **VISION}, text_model=parts["llama"], image_token_id=0)
    image_processor = BeniProcessor.for_model(config, load_tokenizer(parts["llama"])).image_processor
    assert type(image_processor).__name__ == "ViTImageProcessorPil" and list(image_processor.image_mean) == [0.5, 0.5, 0.5]


def test_typed_messages_and_llava_turns_give_the_same_inputs(build):
    model, tokenizer = build()
    processor = processor_of(model, tokenizer)
    image = pictures(1)[0]
    llava = processor(text=prompt_text(LLAVA_TURN, processor), images=[image], return_tensors="pt")
    typed = processor(text=prompt_text(TYPED, processor), images=[image], return_tensors="pt")
    with_image = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    templated = processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    for inputs in (typed, templated):
        assert torch.equal(inputs["input_ids"], llava["input_ids"]) and torch.equal(inputs["pixel_values"], llava["pixel_values"])


def test_images_last_puts_each_user_turns_images_after_its_text_in_every_path(build, tmp_path):
    model, tokenizer = build(images_last=True)
    processor = processor_of(model, tokenizer)
    image, image_id = pictures(1)[0], model.config.image_token_id
    with_image = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    ids = [
        processor(text=prompt_text(LLAVA_TURN, processor), images=[image], return_tensors="pt")["input_ids"],
        processor(text=prompt_text(TYPED, processor), images=[image], return_tensors="pt")["input_ids"],
        processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")[
            "input_ids"
        ],
        torch.tensor([build_example(LLAVA_TURN + [{"from": "gpt", "value": "hi"}], processor).input_ids]),
    ]
    text = tokenizer.decode(ids[0][0])
    assert text.index(QUESTION) < text.index("<image>") and text.index("<image>") > text.rindex("<|im_start|>user")
    assert all(torch.equal(i[:, : ids[0].shape[1]], ids[0]) for i in ids)  # the same prompt, whichever way it came
    image_at = (ids[0][0] == image_id).nonzero().flatten()
    assert len(image_at) == model.config.num_image_tokens() and int(image_at[-1]) == ids[0].shape[1] - 1 - len(
        tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    )  # the image ends the turn: the answer starts a fixed distance after it
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.images_last and torch.equal(
        loaded(text=prompt_text(LLAVA_TURN, loaded), images=[image], return_tensors="pt")["input_ids"], ids[0]
    )
    plain = processor_of(*build())
    plain_text = tokenizer.decode(plain(text=prompt_text(LLAVA_TURN, plain), images=[image])["input_ids"][0])
    assert plain_text.index("<image>") < plain_text.index(QUESTION)  # off, as the prompt puts them


@pytest.fixture(scope="module")
def saved(build, tmp_path_factory):
    """A saved beni model with its processor, loaded back through the Auto classes."""
    folder = tmp_path_factory.mktemp("beni")
    model, tokenizer = build("siglip", "llama")
    model.save_pretrained(folder)
    processor_of(model, tokenizer).save_pretrained(folder)
    return folder


def test_auto_classes_load_the_saved_model_and_processor(saved):
    processor = AutoProcessor.from_pretrained(saved)
    model, info = AutoModelForImageTextToText.from_pretrained(saved, output_loading_info=True)
    assert isinstance(processor, BeniProcessor) and isinstance(model, BeniForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert processor.num_image_tokens == model.config.num_image_tokens()
    assert model.can_generate() and model.generation_config is not None
    config = (saved / "config.json").read_text()
    assert str(saved.parent.parent) not in config and '"AutoModelForImageTextToText": "beni_hf.BeniForConditionalGeneration"' in config


def generate_inputs(processor, n: int = 2):
    texts = [prompt_text(LLAVA_TURN, processor), prompt_text([{"from": "human", "value": "<image> <image> Describe both."}], processor)]
    return processor(text=texts[:n], images=pictures(3)[: 1 + 2 * (n > 1)], padding=True, padding_side="left", return_tensors="pt")


class VisionCalls:
    def __init__(self, model):
        self.calls = 0
        model.vision_tower.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_generate_greedy_sampling_beams_streamer_and_stopping(saved):
    processor = AutoProcessor.from_pretrained(saved)
    model = AutoModelForImageTextToText.from_pretrained(saved).eval()
    inputs = generate_inputs(processor)
    width = inputs["input_ids"].shape[1]
    vision = VisionCalls(model)
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert vision.calls == 1  # the images on the first step only
    assert greedy.shape == (2, width + 6) and torch.equal(greedy[:, :width], inputs["input_ids"])
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6, use_cache=False)
    assert torch.equal(greedy, uncached)
    static = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6, cache_implementation="static")
    assert torch.equal(greedy, static)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=50, temperature=5.0, min_new_tokens=6)
    assert sampled.shape == greedy.shape and not torch.equal(sampled, greedy)
    beams = model.generate(**inputs, max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False)
    assert len(beams) == 6

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((len(input_ids),), input_ids.shape[1] >= width + 2)

    stopped = model.generate(**inputs, max_new_tokens=6, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert torch.equal(stopped, greedy[:, : width + 2])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    one = generate_inputs(processor, n=1)
    single = model.generate(**one, max_new_tokens=6, do_sample=False, min_new_tokens=6, streamer=streamer)
    assert "".join(streamer) == processor.tokenizer.decode(single[0, one["input_ids"].shape[1] :])


def test_pipeline_answers_as_generate(saved):
    image = pictures(1)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    reader = pipeline("image-text-to-text", model=str(saved))
    answer = reader(text=messages, max_new_tokens=6, do_sample=False, min_new_tokens=6, return_full_text=False)[0]["generated_text"]
    processor, model = reader.processor, reader.model
    inputs = processor(text=prompt_text(LLAVA_TURN, processor), images=[image], return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, inputs["input_ids"].shape[1] :]
    assert answer == processor.decode(tokens, skip_special_tokens=True) and answer


def test_auto_classes_load_a_saved_folder_in_a_fresh_interpreter(saved):
    """Without any beni import, through the folder's auto_map (trust_remote_code); and after importing the config
    module alone, through the registration."""
    import subprocess
    import sys

    load = (
        "from transformers import AutoModelForImageTextToText, AutoProcessor;"
        f"m = AutoModelForImageTextToText.from_pretrained({str(saved)!r}{{trust}});"
        f"p = AutoProcessor.from_pretrained({str(saved)!r}{{trust}});"
        "print(type(m).__name__, type(p).__name__)"
    )
    for code in (load.format(trust=", trust_remote_code=True"), "import beni_model.config;" + load.format(trust="")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.stdout.split() == ["BeniForConditionalGeneration", "BeniProcessor"], out.stderr[-2000:]


def test_the_readme_example_runs_as_written(saved, monkeypatch):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Use the trained model with transformers") :]
    code = section[section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python\n") + 10)]
    assert 'folder = "data/datasets/demo/model/final"' in code  # where the demo publishes its model
    monkeypatch.chdir(saved.parent)
    (saved.parent / "data" / "datasets" / "demo" / "model").mkdir(parents=True, exist_ok=True)
    (saved.parent / "data" / "datasets" / "demo" / "model" / "final").symlink_to(saved)
    exec(compile(code, "README.md", "exec"), {})
