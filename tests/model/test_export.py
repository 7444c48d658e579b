import pytest
import torch
from transformers import LlavaForConditionalGeneration

from beni_model.chat import load_tokenizer
from beni_model.config import BeniConfig
from beni_model.export import export_llava
from beni_model.modeling import BeniForConditionalGeneration
from tests.model.conftest import VISION, images
from tests.model.test_modeling import TEXT_ONLY, TWO_IMAGES, batch_for


@pytest.mark.parametrize("vision, text, layer, extensions", [("clip", "llama", -2, {}), ("siglip", "qwen2", -1, {"ocr": {"lines": True}})])
def test_llava_export_gives_the_same_logits(build, tmp_path, vision, text, layer, extensions):
    model, tokenizer = build(vision, text, "mlp2x_gelu", vision_feature_layer=layer, extensions=extensions)
    export_llava(model, tmp_path, tokenizer)
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
        ("dinov2", "mlp2x_gelu", {}, "needs a CLIP or SigLIP vision tower"),
        ("clip", "pixelshuffle2_mlp", {}, "needs the mlp2x connector"),
        ("siglip", "mlp2x_gelu", {"image_size": 48}, "does not interpolate"),
        (
            "siglip",
            "mlp2x_gelu",
            {"extensions": {"ocr": {"tokens": True}}},
            r"no place for the image tokens that the extensions \['ocr'\] add",
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
