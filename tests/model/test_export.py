import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor, pipeline

from beni_model.chat import load_tokenizer, prompt_text
from beni_model.config import BeniConfig
from beni_model.export import export_llava
from beni_model.modeling import BeniForConditionalGeneration
from tests.model.conftest import VISION, images, pictures, processor_of
from tests.model.test_modeling import TEXT_ONLY, TWO_IMAGES, batch_for


@pytest.mark.parametrize(
    "vision, text, layer, extensions",
    [("clip", "llama", -2, {}), ("siglip", "qwen2", -1, {"ocr": {"lines": True}}), ("dinov2", "llama", -1, {})],
)
def test_llava_export_gives_the_same_logits(build, tmp_path, vision, text, layer, extensions):
    model, tokenizer = build(vision, text, "mlp2x_gelu", vision_feature_layer=layer, extensions=extensions)
    export_llava(model, tmp_path, processor_of(model, tokenizer))
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = batch_for(model, tokenizer, [TWO_IMAGES, TEXT_ONLY])
    batch.pop("labels")
    with torch.no_grad():
        ours = model(**batch, pixel_values=images(2)).logits
        theirs = llava(**batch, pixel_values=images(2)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert llava.config.tie_word_embeddings == model.config.tie_word_embeddings


@pytest.mark.parametrize(
    "vision, connector, kwargs, message",
    [
        ("clip", "pixelshuffle2_mlp", {}, "needs the mlp2x connector"),
        ("siglip", "mlp2x_gelu", {"image_size": 48}, "does not interpolate"),
        (
            "siglip",
            "mlp2x_gelu",
            {"extensions": {"ocr": {"tokens": True}}},
            r"no place for the image tokens that the extensions \['ocr'\] add",
        ),
        (
            "siglip",
            "mlp2x_gelu",
            {"extensions": {"ocr": {"engine": True}}},
            r"LLaVA's processor has no place for the text that the extensions \['ocr'\] read from each image",
        ),
    ],
)
def test_llava_export_refuses_what_llava_cannot_hold(build, tmp_path, vision, connector, kwargs, message):
    model, _ = build(vision, "llama", connector, **kwargs)
    with pytest.raises(ValueError, match=message):
        export_llava(model, tmp_path)


def test_llava_export_refuses_a_conv_stem(parts, tmp_path):
    config = BeniConfig(vision_config={"model_type": "siglip_vision_model", **VISION}, text_model=parts["llama"], vision_stem="conv")
    model = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"], config.image_token))
    with pytest.raises(ValueError, match="needs the encoder's own patch embedding"):
        export_llava(model, tmp_path)


def test_llava_export_refuses_registers_that_llava_would_feed_the_llm(parts, tmp_path):
    vision = {"model_type": "dinov2_with_registers", **VISION, "num_register_tokens": 4}
    config = BeniConfig(vision_config=vision, text_model=parts["llama"])
    model = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"], config.image_token))
    with pytest.raises(ValueError, match="LLaVA drops at most one token before the patches"):
        export_llava(model, tmp_path)


def test_a_weight_llava_has_no_place_for_is_named(build, tmp_path):
    model, _ = build("siglip", "llama")
    model.adapter = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="The weight 'adapter.weight' has no place in LLaVA's layout"):
        export_llava(model, tmp_path)


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_auto_classes_generate_and_pipeline_answer_alike_on_the_beni_model_and_its_llava_export(build, tmp_path, vision):
    """What a transformers user does with either folder: AutoProcessor, AutoModelForImageTextToText, generate, and the
    image-text-to-text pipeline; the same prompt ids, pixel values and answers from both."""
    model, tokenizer = build(vision, "llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that the answers depend on the image and the question
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5, generator=generator)
    processor = processor_of(model, tokenizer)
    model.save_pretrained(tmp_path / "beni")
    processor.save_pretrained(tmp_path / "beni")
    export_llava(model, tmp_path / "llava", processor)
    image = pictures(2, size=(48, 40))
    questions = ["What is written in the image?", "Describe it."]
    answers = {}
    for name in ("beni", "llava"):
        folder = tmp_path / name
        loaded_processor, loaded = AutoProcessor.from_pretrained(folder), AutoModelForImageTextToText.from_pretrained(folder).eval()
        assert isinstance(loaded_processor, LlavaProcessor) == isinstance(loaded, LlavaForConditionalGeneration) == (name == "llava")
        texts = [
            prompt_text([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], loaded_processor)
            for q in questions
        ]
        inputs = loaded_processor(text=texts, images=image, padding=True, padding_side="left", return_tensors="pt")
        new = loaded.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        reader = pipeline("image-text-to-text", model=str(folder))
        messages = [{"role": "user", "content": [{"type": "image", "image": image[0]}, {"type": "text", "text": questions[0]}]}]
        said = reader(text=messages, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
        answers[name] = (inputs["input_ids"], inputs["pixel_values"], new, said)
    (beni_ids, beni_pixels, beni_new, beni_said), (ids, pixels, new, said) = answers["beni"], answers["llava"]
    assert torch.equal(ids, beni_ids) and torch.equal(pixels, beni_pixels)
    assert torch.equal(new, beni_new) and len({tuple(row) for row in new.tolist()}) == 2
    assert said == beni_said == tokenizer.decode(beni_new[0], skip_special_tokens=True) and said
