"""The ocr extension's vision stem: a text recognizer's first layers (PP-OCRv4, from the rapidocr_onnxruntime wheel),
frozen, then a learned patchify."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from beni_model.chat import load_tokenizer
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.ocr import stem
from beni_model.ocr.heads import reading_targets
from tests.model.conftest import VISION

SIGLIP = {**VISION, "model_type": "siglip_vision_model", "image_size": 64, "patch_size": 8}


def test_the_stem_computes_what_the_recognizer_computes_on_rgb():
    """The recognizer's own runtime on its graph, cut at the stem's last layer; it was trained on BGR, the stem takes RGB."""
    graph = onnx.load(str(stem.model_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(stem.LAST, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    rgb = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 160)).astype(np.float32)
    expected = session.run([stem.LAST], {"x": np.ascontiguousarray(rgb[:, ::-1])})[0]
    text_stem = stem.TextStem(patch_size=8, hidden_size=32)
    text_stem.load_pretrained()
    text_stem.patchify = torch.nn.Identity()
    with torch.no_grad():
        features = text_stem(torch.from_numpy(rgb)).numpy()
    assert features.shape == expected.shape == (2, 240, 12, 40)
    np.testing.assert_allclose(features, expected, atol=1e-4 * np.abs(expected).max())


def test_a_model_on_the_stem_trains_its_patchify_alone_and_reloads_without_the_recognizer(parts, tmp_path, monkeypatch):
    config = BeniConfig(vision_config=SIGLIP, text_model=parts["llama"], vision_stem="ocr.pplcnet", extensions={"ocr": {}})
    torch.manual_seed(0)
    model = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"], config.image_token))
    text_stem = model.vision_tower.stem()
    pretrained = stem.pretrained_weights()
    assert all(torch.equal(getattr(text_stem, name), value) for name, value in pretrained.items())
    trainable = {name for name, p in text_stem.named_parameters() if p.requires_grad}
    assert trainable == {"patchify.weight", "patchify.bias"}

    tower, ocr = model.vision_tower, model.extensions["ocr"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    patchify = text_stem.patchify.weight.detach().clone()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    loss = ocr.reading_loss(model, tower(pixels), *reading_targets(["ab", "c"]))
    loss.backward()
    optimizer.step()
    assert not torch.equal(text_stem.patchify.weight, patchify)
    assert all(torch.equal(getattr(text_stem, name), value) for name, value in pretrained.items())

    model.save_pretrained(tmp_path)

    def unreachable():
        raise AssertionError("a saved model's stem loads from its own weights")

    monkeypatch.setattr(stem, "pretrained_weights", unreachable)
    loaded = BeniForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.vision_tower(pixels), model.vision_tower(pixels))


def test_the_stems_flops_are_what_a_training_pass_runs():
    text_stem = stem.TextStem(patch_size=8, hidden_size=32)
    with FlopCounterMode(display=False) as counter:
        text_stem(torch.zeros(1, 3, 64, 64)).sum().backward()
    assert counter.get_total_flops() == text_stem.flops(64)


def test_an_unknown_stem_of_the_extension_fails_at_config_time(parts):
    with pytest.raises(ValueError, match="The ocr extension has no vision stem 'resnet': use 'ocr.pplcnet'"):
        BeniConfig(vision_config=SIGLIP, text_model=parts["llama"], vision_stem="ocr.resnet", extensions={"ocr": {}})
    with pytest.raises(ValueError, match="the patch size must be a multiple of 4, not 6"):
        BeniConfig(
            vision_config={**SIGLIP, "patch_size": 6, "image_size": 60},
            text_model=parts["llama"],
            vision_stem="ocr.pplcnet",
            extensions={"ocr": {}},
        )
