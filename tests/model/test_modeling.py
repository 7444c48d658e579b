import shutil

import pytest
import torch
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageTextToText, SiglipImageProcessorPil

from beni_model.chat import build_example, load_tokenizer, pad_batch, prompt_text
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import BeniProcessor
from beni_model.vision import ConvStem
from tests.model.conftest import VISION, images, pictures

TWO_IMAGES = [
    {"from": "human", "value": "What is written?"},
    {"from": "gpt", "value": "The sign says open."},
    {"from": "human", "value": "<image>\nAnd here? <image>"},
    {"from": "gpt", "value": "hello world"},
]
TEXT_ONLY = [{"from": "human", "value": "How many cats are there?"}, {"from": "gpt", "value": "There are two cats."}]


def batch_for(model, tokenizer, conversations, image_size=None):
    """Padded training rows; `image_size`: expand each image to the token count of that size, not the model's."""
    processor = BeniProcessor(SiglipImageProcessorPil(), tokenizer, num_image_tokens=model.config.num_image_tokens(image_size))
    examples = [build_example(c, processor) for c in conversations]
    return pad_batch([e.input_ids for e in examples], tokenizer.pad_token_id, labels=[e.labels for e in examples])


COMBOS = [
    ("siglip", "llama", "mlp2x_gelu"),
    ("clip", "qwen2", "mlp2x_gelu"),
    ("dinov2", "llama", "mlp2x_gelu"),
    ("siglip", "qwen2", "pixelshuffle2_mlp"),
    ("clip", "llama", "perceiver_8x2_h4_kv2"),
    ("dinov2", "qwen2", "perceiver_4x1"),
]


@pytest.mark.parametrize("vision, text, connector", COMBOS)
def test_forward_backward_reaches_every_part(build, vision, text, connector):
    model, tokenizer = build(vision, text, connector)
    batch = batch_for(model, tokenizer, [TWO_IMAGES, TEXT_ONLY])
    out = model(**batch, pixel_values=images(2))
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.vision_tower, model.connector, model.language_model):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and sum(g.abs().sum() for g in grads if g is not None) > 0, type(part).__name__


def test_images_land_on_their_tokens_and_only_there(build):
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu")
    batch = batch_for(model, tokenizer, [TWO_IMAGES, TEXT_ONLY])
    image_positions = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    first_block, second_block = int(image_positions[0]), int(image_positions[model.config.num_image_tokens()])
    with torch.no_grad():
        base = model(**batch, pixel_values=images(2)).logits
        second_changed = model(**batch, pixel_values=torch.cat([images(1), images(1, seed=7)])).logits
        alone = model(**batch_for(model, tokenizer, [TEXT_ONLY])).logits
    # Causal LM: a changed second image alters the logits from its own block on, nothing before it.
    assert first_block > 0 and second_block > first_block
    assert torch.equal(base[0, :second_block], second_changed[0, :second_block])
    assert not torch.allclose(base[0, second_block:], second_changed[0, second_block:])
    # The text-only sample is unaffected by its neighbour's images.
    torch.testing.assert_close(base[1, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-4)


def test_labels_mask_user_turns_images_and_padding(build):
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu")
    batch = batch_for(model, tokenizer, [TWO_IMAGES, TEXT_ONLY])
    labels, ids = batch["labels"], batch["input_ids"]
    assert (labels[ids == model.config.image_token_id] == -100).all()
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    trained = tokenizer.decode(ids[0][labels[0] != -100])
    assert trained == "The sign says open.<|im_end|>\nhello world<|im_end|>\n"


def test_token_image_mismatch_is_a_clear_error(build):
    model, tokenizer = build()
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    with pytest.raises(ValueError, match="32 image tokens but 1 images of 16 tokens"):
        model(**batch, pixel_values=images(1))
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(**batch)


@pytest.mark.parametrize("vision", ["clip", "siglip", "dinov2"])
def test_higher_resolution_interpolates_position_embeddings(build, vision):
    model, tokenizer = build(vision, "llama", "mlp2x_gelu", image_size=48)
    assert model.config.num_image_tokens() == 36
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    out = model(**batch, pixel_values=images(2, size=48))
    assert torch.isfinite(out.loss)


def test_batched_left_padded_generation_matches_one_by_one(build):
    model, tokenizer = build("clip", "llama", "pixelshuffle2_mlp")
    processor = BeniProcessor.for_model(model.config, tokenizer)
    conversations = [
        [{"from": "human", "value": "<image>\nWhat is written in the image?"}],
        [{"from": "human", "value": "hello"}],
        [{"from": "human", "value": "<image> <image> Describe both."}],
    ]
    prompts = [
        processor(text=prompt_text(c, processor), images=pictures(n) or None)["input_ids"][0] for c, n in zip(conversations, (1, 0, 2))
    ]
    pixels = images(3)
    per_prompt_pixels = [pixels[:1], None, pixels[1:]]
    batch = pad_batch(prompts, tokenizer.pad_token_id, padding_side="left")
    batched = model.generate(**batch, pixel_values=pixels, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    assert (batched[:, :width] == batch["input_ids"]).all()
    for i, prompt in enumerate(prompts):
        single = model.generate(
            torch.tensor([prompt]),
            pixel_values=per_prompt_pixels[i],
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert batched[i, width:].tolist() == single[0, len(prompt) :].tolist()
    uncached = model.generate(
        **batch, pixel_values=pixels, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=tokenizer.pad_token_id
    )
    assert torch.equal(batched, uncached)


@pytest.mark.parametrize("vision, text, connector", [("siglip", "llama", "perceiver_8x1"), ("clip", "qwen2", "mlp2x_gelu")])
def test_save_and_reload_offline_without_the_part_folders(parts, tmp_path, vision, text, connector):
    vision_dir, text_dir = shutil.copytree(parts[vision], tmp_path / "v"), shutil.copytree(parts[text], tmp_path / "t")
    config = BeniConfig(vision_model=str(vision_dir), text_model=str(text_dir), connector=connector, freeze_vision=True)
    tokenizer = load_tokenizer(str(text_dir))
    model = BeniForConditionalGeneration.from_parts(config, tokenizer).eval()
    model.save_pretrained(tmp_path / "beni")
    tokenizer.save_pretrained(tmp_path / "beni")
    shutil.rmtree(vision_dir), shutil.rmtree(text_dir)

    assert sorted(p.name for p in (tmp_path / "beni").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "beni").glob("*.bin"))
    loaded = BeniForConditionalGeneration.from_pretrained(tmp_path / "beni").eval()
    tokenizer = load_tokenizer(str(tmp_path / "beni"))
    assert loaded.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())
    batch = batch_for(loaded, tokenizer, [TWO_IMAGES, TEXT_ONLY])
    with torch.no_grad():
        assert torch.equal(model(**batch, pixel_values=images(2)).logits, loaded(**batch, pixel_values=images(2)).logits)


def test_tied_embeddings_stay_tied_through_resize_save_and_load(build, tmp_path):
    model, tokenizer = build("siglip", "llama")  # the llama part ties lm_head to its embeddings
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)  # grown for the image token
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "language_model.lm_head.weight" not in set(f.keys())
    loaded = BeniForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)
    untied, _ = build("siglip", "qwen2")
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight


def test_freeze_flags(build):
    model, _ = build("siglip", "llama", freeze_vision=True, freeze_text=True)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert all(p.requires_grad for p in model.connector.parameters())


def test_conv_stem_trains_saves_and_reloads(parts, tmp_path):
    vision = {"model_type": "siglip_vision_model", **VISION}
    config = BeniConfig(vision_config=vision, text_model=parts["llama"], vision_stem="conv")
    tokenizer = load_tokenizer(parts["llama"], config.image_token)
    torch.manual_seed(0)
    model = BeniForConditionalGeneration.from_parts(config, tokenizer)
    stem = model.vision_tower.encoder.embeddings.patch_embedding
    assert isinstance(stem, ConvStem) and len([m for m in stem if isinstance(m, torch.nn.MaxPool2d)]) == 3  # 8 px patches
    batch = batch_for(model, tokenizer, [TWO_IMAGES, TEXT_ONLY])
    model(**batch, pixel_values=images(2)).loss.backward()
    assert stem[0].weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = BeniForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.vision_tower.encoder.embeddings.patch_embedding, ConvStem)
    with torch.no_grad():  # eval mode: BatchNorm's running statistics were saved with the weights
        assert torch.equal(model.eval()(**batch, pixel_values=images(2)).logits, loaded(**batch, pixel_values=images(2)).logits)


def test_conv_stem_flops_match_torch_count():
    stem = ConvStem(patch_size=16, hidden_size=48)
    with FlopCounterMode(display=False) as counter:
        assert stem(torch.zeros(1, 3, 64, 64)).shape == (1, 48, 4, 4)
    assert 3 * counter.get_total_flops() == stem.flops(64)  # training: the forward and a backward of twice its cost


def test_a_model_from_a_bare_config_says_how_to_get_its_image_token(build):
    model, _ = build()
    config = model.config.to_dict() | {"image_token_id": None}
    for make in (BeniForConditionalGeneration, AutoModelForImageTextToText.from_config):
        with pytest.raises(ValueError, match="image_token_id is not set: build a new model with BeniForConditionalGeneration.from_parts"):
            make(BeniConfig(**config))


def test_from_parts_loads_the_parts_as_they_are_and_leaves_the_callers_config_alone(parts):
    config = BeniConfig(vision_model=parts["siglip"], text_model=parts["llama"], extensions={"ocr": {"tokens": True}})
    before = config.to_dict()
    model = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"]))
    assert config.to_dict() == before and config.image_token_id is None and config.extensions == {"ocr": {"tokens": True}}
    assert model.config.image_token_id is not None and model.config.extensions["ocr"]["token_ids"]
    for part, folder in ((model.vision_tower.encoder, parts["siglip"]), (model.language_model.model, parts["llama"])):
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            saved = {name.split(".", 1)[1] if name.startswith("model.") else name: f.get_tensor(name) for name in f.keys()}
        state = part.state_dict()
        compared = [k for k in saved if k in state and state[k].shape == saved[k].shape]
        assert len(compared) > 10 and all(torch.equal(state[k], saved[k]) for k in compared)
    vocab = len(saved["embed_tokens.weight"])  # the embeddings grew by the image token; the LLM's own rows stay
    assert torch.equal(model.get_input_embeddings().weight[:vocab], saved["embed_tokens.weight"])


def test_pixel_values_with_inputs_embeds_are_refused(build):
    model, tokenizer = build()
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    embeds = model.embed(batch["input_ids"], images(2))
    with pytest.raises(ValueError, match="pixel_values were given with inputs_embeds"):
        model(inputs_embeds=embeds, pixel_values=images(2))


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "perceiver_8x1"])
def test_images_of_the_wrong_size_are_named_as_such(build, connector):
    model, tokenizer = build("siglip", "llama", connector)
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    with pytest.raises(ValueError, match=r"pixel_values are \[2, 3, 48, 48\] but this model takes \[images, 3, 32, 32\]"):
        model(**batch, pixel_values=images(2, size=48))


def test_a_training_loaders_uint8_pixels_are_named_as_such(build):
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu")
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    stored = images(2).mul(127.5).add(127.5).clamp(0, 255).to(torch.uint8)  # as the loader hands them over
    with pytest.raises(ValueError, match="pixel_values are torch.uint8, not the normalized floats.*DevicePixels"):
        model(**batch, pixel_values=stored)


def test_output_loading_info_gives_the_model_and_its_info(build, tmp_path):
    model, _ = build()
    model.save_pretrained(tmp_path)
    loaded, info = BeniForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, BeniForConditionalGeneration) and not info["missing_keys"] and not info["unexpected_keys"]


def test_a_misspelled_input_is_named(build):
    model, tokenizer = build()
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    with pytest.raises(TypeError, match="forward\\(\\) got 'pixel_value', which it does not take: did you mean 'pixel_values'\\?"):
        model(input_ids=batch["input_ids"], pixel_value=images(2))
