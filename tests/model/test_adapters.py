import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from beni_model.adapters import add_lora, lora_targets
from beni_model.modeling import BeniForConditionalGeneration
from tests.model.conftest import images
from tests.model.test_modeling import TEXT_ONLY, TWO_IMAGES, batch_for


@pytest.mark.parametrize("dora, vision", [(False, False), (True, True)])
def test_lora_trains_adapters_and_connector_only_and_reloads(build, tmp_path, dora, vision):
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu")
    batch = batch_for(model, tokenizer, [TWO_IMAGES, TEXT_ONLY])
    peft_model = add_lora(model, rank=4, alpha=8, dropout=0.0, dora=dora, vision=vision, gradient_checkpointing=True)
    peft_model.train()
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "connector" in name for name in trainable)
    assert any("vision_tower" in name for name in trainable) == vision
    assert any("lora_magnitude_vector" in name for name in trainable) == dora
    assert not any("lm_head" in name for name in trainable)

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    before = peft_model(**batch, pixel_values=images(2)).loss
    before.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "language_model" in n)
    # Vision adapters after the feature layer or in the unused pooling head get none, the others do.
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "vision_tower" in n) == vision
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())  # every adapter placed gets a gradient
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(**batch, pixel_values=images(2)).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh, _ = build("siglip", "llama", "mlp2x_gelu")
    with torch.no_grad():
        assert not torch.allclose(fresh(**batch, pixel_values=images(2)).logits, tuned)
        reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        assert torch.allclose(reloaded(**batch, pixel_values=images(2)).logits, tuned, atol=1e-5)


def test_lora_targets_skip_the_output_head(build):
    model, _ = build("clip", "qwen2")
    targets = lora_targets(model, vision=False)
    assert "language_model.model.layers.0.self_attn.q_proj" in targets
    assert "language_model.lm_head" not in targets and not any(t.startswith("vision_tower") for t in targets)
    assert any(t.startswith("vision_tower") for t in lora_targets(model, vision=True))


def test_generation_through_peft(build):
    model, tokenizer = build("siglip", "llama")
    peft_model = add_lora(model, rank=4).eval()
    prompt = torch.tensor([tokenizer("hello")["input_ids"]])
    out = peft_model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, prompt.shape[1] + 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA (bitsandbytes 4-bit) needs a CUDA GPU")
def test_qlora_on_gpu(parts):
    from beni_model.chat import load_tokenizer
    from beni_model.config import BeniConfig

    config = BeniConfig(vision_model=parts["siglip"], text_model=parts["llama"])
    tokenizer = load_tokenizer(parts["llama"])
    model = BeniForConditionalGeneration.from_parts(config, tokenizer, dtype=torch.bfloat16, load_in_4bit=True)
    assert model.language_model.is_loaded_in_4bit
    peft_model = add_lora(model, rank=4, gradient_checkpointing=True)
    batch = {k: v.cuda() for k, v in batch_for(model, tokenizer, [TWO_IMAGES, TEXT_ONLY]).items()}
    loss = peft_model(**batch, pixel_values=images(2).cuda()).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_vision_adapters_skip_the_pooling_head_and_the_layers_after_the_feature_layer(build):
    model, _ = build("siglip", "llama", vision_feature_layer=-2)  # 2 layers: the second one's output is never read
    targets = [t for t in lora_targets(model, vision=True) if t.startswith("vision_tower.")]
    assert targets and all(".layers.0." in t for t in targets)
    assert not any(".head." in t for t in lora_targets(build("siglip", "llama")[0], vision=True))


@pytest.mark.slow
def test_the_qlora_bench_trains_saves_and_reloads_its_adapters_under_fsdp(tmp_path):
    """bench/qlora.py's plumbing on a CPU (the tiny LLM, LoRA without bitsandbytes), under torchrun's FSDP on one process:
    the gathered adapters save, reload onto a fresh base and give the trained model's logits."""
    root = Path(__file__).parents[2]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(root / "bench" / "qlora.py")]
    command += ["--tiny", "--variants", "lora", "--steps", "6", "--warmup", "1", "--fsdp", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = json.loads((tmp_path / "results_fsdp.json").read_text())
    assert result["fsdp"] and result["adapters_reload_identical"] and result["reloaded_logits_max_diff"] == 0.0
    assert result["loss_end"] < result["loss_start"] and result["steps_per_s"] > 0
    assert (tmp_path / "lora_fsdp" / "adapter_model.safetensors").is_file()
