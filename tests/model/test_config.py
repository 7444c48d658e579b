import pytest
from transformers import SiglipVisionConfig

from beni_model.config import BeniConfig
from beni_model.connectors import ConnectorSpec, parse_connector
from tests.model.conftest import TEXT


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("mlp2x_gelu", ConnectorSpec("mlp", "gelu", mlp_depth=2)),
        ("mlp1x", ConnectorSpec("mlp", "gelu", mlp_depth=1)),
        ("mlp3x_gelu_pytorch_tanh", ConnectorSpec("mlp", "gelu_pytorch_tanh", mlp_depth=3)),
        ("pixelshuffle2_mlp", ConnectorSpec("pixelshuffle", "gelu", mlp_depth=2, shuffle_factor=2)),
        ("pixelshuffle4_mlp1x_silu", ConnectorSpec("pixelshuffle", "silu", mlp_depth=1, shuffle_factor=4)),
        ("perceiver_64x2", ConnectorSpec("perceiver", "gelu", latents=64, blocks=2)),
        ("perceiver_16x1_h8_kv2_silu", ConnectorSpec("perceiver", "silu", latents=16, blocks=1, heads=8, kv_heads=2)),
    ],
)
def test_parse_connector(spec, expected):
    assert parse_connector(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("linear", "Unknown connector spec 'linear'"),
        ("mlp2x_gleu", "'gleu', which is not in transformers' ACT2FN"),
        ("mlp2xgelu", "Unknown connector spec"),
        ("mlp0x", "must be at least 1"),
        ("perceiver_64", "Unknown connector spec"),
    ],
)
def test_bad_connector_specs_fail_with_one_sentence(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        BeniConfig(connector=spec)
    assert str(error.value).count(". ") == 0 and "\n" not in str(error.value)


def test_token_counts_per_connector(parts):
    # 32px images, 8px patches: a 4x4 grid; CLIP adds a CLS token.
    siglip = dict(vision_model=parts["siglip"], text_model=parts["llama"])
    assert BeniConfig(connector="mlp2x_gelu", **siglip).num_image_tokens() == 16
    assert BeniConfig(connector="pixelshuffle2_mlp", **siglip).num_image_tokens() == 4
    assert BeniConfig(connector="perceiver_8x1", **siglip).num_image_tokens() == 8
    assert BeniConfig(connector="mlp2x_gelu", **siglip).num_image_tokens(image_size=64) == 64
    clip = dict(vision_model=parts["clip"], text_model=parts["llama"])
    assert BeniConfig(**clip).num_image_tokens() == 16
    assert BeniConfig(keep_cls=True, **clip).num_image_tokens() == 17
    assert BeniConfig(keep_cls=True, vision_model=parts["siglip"], text_model=parts["llama"]).num_image_tokens() == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"connector": "pixelshuffle3_mlp"}, "4x4 patch grid divisible by 3"),
        ({"connector": "pixelshuffle2_mlp", "keep_cls": True, "vision": "clip"}, "set keep_cls=False"),
        ({"image_size": 36}, "not a multiple of the encoder's patch size 8"),
        ({"vision_feature_layer": 5}, "out of range for an encoder with 2 layers"),
        ({"connector": "perceiver_8x1_h3"}, "3 heads must divide the LLM width 64"),
        ({"connector": "perceiver_8x1_h4_kv3"}, "3 kv heads must divide 4"),
        ({"vision_stem": "conv"}, "for an encoder trained from scratch"),
        ({"vision_stem": "resnet"}, "vision_stem 'resnet' is unknown"),
        ({"vision_stem": "ocr.pplcnet"}, "vision_stem 'ocr.pplcnet' is unknown: use 'conv', an extension's stem"),
        ({"vision_stem": "ocr.pplcnet", "extensions": {"ocr": {}}}, "for an encoder trained from scratch; .* has its own patch embedding"),
    ],
)
def test_invalid_combinations_fail_at_config_time(parts, kwargs, message):
    vision = parts[kwargs.pop("vision", "siglip")]
    with pytest.raises(ValueError, match=message):
        BeniConfig(vision_model=vision, text_model=parts["llama"], **kwargs)


def test_nested_configs_resolved_from_paths_and_round_trip(parts, tmp_path):
    config = BeniConfig(vision_model=parts["clip"], text_model=parts["llama"], connector="pixelshuffle2_mlp", vision_feature_layer=-2)
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.text_config.hidden_size == TEXT["hidden_size"] and config.tie_word_embeddings
    config.save_pretrained(tmp_path)
    again = BeniConfig.from_pretrained(tmp_path)
    for part in ("vision_config", "text_config"):  # all but the folders they came from (see the next test)
        assert {**getattr(again, part).to_dict(), "_name_or_path": ""} == {**getattr(config, part).to_dict(), "_name_or_path": ""}
    assert (again.connector, again.vision_feature_layer, again.image_size) == ("pixelshuffle2_mlp", -2, 32)


def test_a_saved_config_names_no_local_folder(parts, tmp_path):
    config = BeniConfig(vision_model=parts["clip"], text_model=parts["llama"])
    config.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert str(parts["clip"]) not in saved and str(parts["llama"]) not in saved
    assert config.vision_model == parts["clip"]  # the config in memory still knows where its parts are


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"conector": "mlp2x_gelu"}, "BeniConfig has no setting 'conector': did you mean 'connector'?"),
        ({"freeze_vison": True}, "did you mean 'freeze_vision'?"),
        ({"vision_config": {"hidden_size": 32, "image_size": 32, "patch_size": 8}}, "vision_config has no model_type"),
        ({"vision_config": {"model_type": "siglip2_vision_model"}}, "'siglip2_vision_model' has no image_size: beni needs a ViT-like"),
    ],
)
def test_wrong_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BeniConfig(**kwargs)


def test_default_config_runs_without_any_path():
    config = BeniConfig(
        vision_config=SiglipVisionConfig(image_size=64, patch_size=16), text_config={"model_type": "qwen2", "hidden_size": 64}
    )
    assert config.num_image_tokens() == 16 and config.text_config.model_type == "qwen2"
