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


@pytest.mark.parametrize("cut,shape", [("pplcnet", (2, 240, 12, 40)), ("pplcnet8", (2, 480, 6, 40)), ("pplcnet16", (2, 480, 3, 40))])
def test_the_stem_computes_what_the_recognizer_computes_on_rgb(cut, shape):
    """The recognizer's own runtime on its graph, cut at the stem's last layer; it was trained on BGR, the stem takes RGB."""
    last = stem.CUTS[cut].last
    graph = onnx.load(str(stem.model_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    rgb = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 160)).astype(np.float32)
    expected = session.run([last], {"x": np.ascontiguousarray(rgb[:, ::-1])})[0]
    text_stem = stem.TextStem(patch_size=16, hidden_size=32, cut=cut)
    text_stem.load_pretrained()
    text_stem.patchify = torch.nn.Identity()
    with torch.no_grad():
        features = text_stem(torch.from_numpy(rgb)).numpy()
    assert features.shape == expected.shape == shape
    np.testing.assert_allclose(features, expected, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("cut", stem.CUTS)
def test_a_model_on_the_stem_trains_its_patchify_alone_and_reloads_without_the_recognizer(parts, tmp_path, monkeypatch, cut):
    patch = max(8, *stem.CUTS[cut].stride)
    vision = {**SIGLIP, "patch_size": patch, "image_size": 8 * patch}
    config = BeniConfig(vision_config=vision, text_model=parts["llama"], vision_stem=f"ocr.{cut}", extensions={"ocr": {}})
    torch.manual_seed(0)
    model = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"], config.image_token))
    text_stem = model.vision_tower.stem()
    pretrained = stem.pretrained_weights(stem.CUTS[cut])
    assert all(torch.equal(getattr(text_stem, name), value) for name, value in pretrained.items())
    trainable = {name for name, p in text_stem.named_parameters() if p.requires_grad}
    assert trainable == {"patchify.weight", "patchify.bias"}

    tower, ocr = model.vision_tower, model.extensions["ocr"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    patchify = text_stem.patchify.weight.detach().clone()
    pixels = torch.rand(2, 3, 8 * patch, 8 * patch) * 2 - 1
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
    saved, reloaded = model.vision_tower.state_dict(), loaded.vision_tower.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    # Buffers read from safetensors sit at unaligned addresses, which reorders oneDNN's sums (~1e-6 apart a layer,
    # ~4e-5 after the whole backbone's 29 layers).
    with torch.no_grad():
        torch.testing.assert_close(loaded.vision_tower(pixels), model.vision_tower(pixels), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cut", stem.CUTS)
def test_the_stems_flops_are_what_a_training_pass_runs(cut):
    text_stem = stem.TextStem(patch_size=16, hidden_size=32, cut=cut)
    with FlopCounterMode(display=False) as counter:
        text_stem(torch.zeros(1, 3, 64, 64)).sum().backward()
    assert counter.get_total_flops() == text_stem.flops(64)


@pytest.mark.parametrize(
    "stem_name,patch_size,message",
    [
        ("ocr.resnet", 8, "The ocr extension has no vision stem 'resnet': use 'ocr.pplcnet', 'ocr.pplcnet8' or 'ocr.pplcnet16'."),
        ("ocr.pplcnet", 6, "vision_stem 'ocr.pplcnet' ends at stride 4: the patch size must be a multiple of 4, not 6."),
        (
            "ocr.pplcnet8",
            12,
            "vision_stem 'ocr.pplcnet8' ends at stride 8 down and 4 across: the patch size must be a multiple of 8, not 12.",
        ),
    ],
)
def test_a_stem_the_extension_cannot_build_fails_at_config_time_in_one_sentence(parts, stem_name, patch_size, message):
    vision = {**SIGLIP, "patch_size": patch_size, "image_size": 5 * patch_size}
    with pytest.raises(ValueError) as error:
        BeniConfig(vision_config=vision, text_model=parts["llama"], vision_stem=stem_name, extensions={"ocr": {}})
    assert message in str(error.value)
