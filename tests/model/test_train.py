"""The trainer under real torchrun (2 gloo ranks, FSDP2) on a tiny SigLIP + tied-Llama model over real shards."""

import copy
import gzip
import itertools
import json
import math
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from beni_model.chat import IGNORE_INDEX, build_example, load_tokenizer, pack_batch, pad_batch
from beni_model.config import BeniConfig
from beni_model.data import DataPosition, DataSettings, DevicePixels, make_loader
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import BeniProcessor, load_processor
from beni_model.train import torchrun_command
from beni_model.training.config import PARTS, TrainConfig
from beni_model.training.metrics import PROFILE_AFTER, Reporter, read_metrics
from beni_model.training.optim import lr_factor, param_groups
from beni_model.training.parallel import shard, transformer_blocks
from beni_model.training.step import cross_entropy, fused_cross_entropy, train_step
from tests.model.test_data import write_toy_shards


def rows(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")  # complete lines only: the trainer may be writing the next


def launch(config_path: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(config_path, 2), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def kill_rank(torchrun: subprocess.Popen, rank: str) -> None:
    """SIGKILL the trainer process of `rank` (a direct child of torchrun's agent; its loader workers die with it)."""
    for child in psutil.Process(torchrun.pid).children():
        if child.environ().get("RANK") == rank:
            child.send_signal(signal.SIGKILL)
            return
    raise AssertionError(f"no rank {rank} under torchrun")


def toy_run(shards: Path, out: Path, parts: dict, **settings) -> dict:
    """A training config on toy shards: the tiny SigLIP + Llama, a quarter of the steps text-only."""
    base = {
        "vision_model": parts["siglip"],
        "text_model": parts["llama"],
        "batch_size": 8,
        "lr": 3e-3,
        "max_length": 128,
        "text_fraction": 0.25,
    }
    return {"shards": str(shards), "output_dir": str(out), **base, **settings}


@pytest.mark.slow
def test_loss_falls_and_a_killed_run_resumes_on_the_same_curve(tmp_path, parts):
    shards = write_toy_shards(tmp_path / "shards", samples=256, per_shard=32, text_every=4)
    out = tmp_path / "run"
    config = toy_run(shards, out, parts, max_steps=60, warmup_steps=3, save_every=10, workers=1)
    config_path = tmp_path / "train.json"
    config_path.write_text(json.dumps(config))

    first = launch(config_path, tmp_path / "first.log")
    while len(rows(out)) < 25 and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    kill_rank(first, "1")
    assert first.wait(timeout=120) != 0
    before = {r["step"]: r for r in rows(out)}
    resumed_from = int(max((out / "checkpoints").glob("step_*")).name.split("_")[1])
    assert 20 <= resumed_from < max(before) < 60

    second = subprocess.run(torchrun_command(config_path, 2), check=False, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from step_{resumed_from:07d} at step {resumed_from}" in second.stdout

    after = rows(out)
    assert [r["step"] for r in after] == list(range(1, 61))
    for r in after[resumed_from : max(before)]:  # steps redone after the kill: the same data and weights
        assert r["loss"] == pytest.approx(before[r["step"]]["loss"], rel=1e-4), r["step"]
        assert r["lr"] == pytest.approx(before[r["step"]]["lr"])
    losses = [r["loss"] for r in after]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.5
    assert {r["modality"] for r in after} == {"image", "text"}
    assert all((r["images"] == 0) == (r["modality"] == "text") for r in after)

    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_0000050", "step_0000060"]  # two kept, no temp folders left
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["final_loss"] == pytest.approx(losses[-1])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    model = BeniForConditionalGeneration.from_pretrained(out / "final")
    settings = DataSettings(shards=str(shards), batch_size=8, image_size=32, max_length=128)
    processor = load_processor(out / "final")
    batch = next(iter(make_loader(settings, processor, 0, 1, DataPosition(), workers=0, pin_memory=False)))
    pixels = DevicePixels(processor.image_processor, torch.device("cpu"))(batch["pixel_values"])
    with torch.no_grad():
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, pixel_values=pixels).loss
    assert loss.item() < losses[0] - 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(config_path: Path, logs: Path, run_id: str) -> list[subprocess.Popen]:
    """Two torchrun agents of one process each, as two hosts would start them, meeting at a c10d rendezvous on 127.0.0.1."""
    command = torchrun_command(config_path, 1, nodes=2, rendezvous=f"127.0.0.1:{free_port()}", run_id=run_id)
    command.insert(3, "--local-addr=127.0.0.1")  # each node's address for the others: the loopback here
    return [subprocess.Popen(command, stdout=open(logs / f"{run_id}-{n}.log", "w"), stderr=subprocess.STDOUT) for n in range(2)]


@pytest.mark.slow
def test_two_nodes_train_through_a_c10d_rendezvous_and_resume_after_a_kill(tmp_path, parts, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the ranks' own traffic stays on the loopback too
    shards = write_toy_shards(tmp_path / "shards", samples=128, per_shard=16, text_every=4)
    out = tmp_path / "run"
    config_path = tmp_path / "train.json"
    config_path.write_text(json.dumps(toy_run(shards, out, parts, max_steps=30, warmup_steps=3, save_every=10, workers=1)))

    first = launch_two_nodes(config_path, tmp_path, "first")
    while len(rows(out)) < 14 and all(node.poll() is None for node in first):
        time.sleep(0.05)
    assert all(node.poll() is None for node in first), (tmp_path / "first-0.log").read_text()[-3000:]
    (trainer,) = [c for c in psutil.Process(first[1].pid).children() if "beni_model.train" in c.cmdline()]
    trainer.send_signal(signal.SIGKILL)  # the second host's trainer dies: the first one's collectives fail, and both agents stop
    assert [node.wait(timeout=120) != 0 for node in first] == [True, True]
    before = {r["step"]: r for r in rows(out)}
    resumed_from = int(max((out / "checkpoints").glob("step_*")).name.split("_")[1])
    assert 10 <= resumed_from < max(before) < 30

    second = launch_two_nodes(config_path, tmp_path, "second")
    assert [node.wait(timeout=300) for node in second] == [0, 0], (tmp_path / "second-0.log").read_text()[-3000:]
    logs = "".join((tmp_path / f"second-{n}.log").read_text() for n in range(2))
    assert f"resuming from step_{resumed_from:07d} at step {resumed_from} of 30 on 2 x cpu" in logs
    after = rows(out)
    assert [r["step"] for r in after] == list(range(1, 31))
    for r in after[resumed_from : max(before)]:  # steps redone after the kill: the same data and weights
        assert r["loss"] == pytest.approx(before[r["step"]]["loss"], rel=1e-4), r["step"]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_several_nodes_need_a_rendezvous_endpoint(tmp_path):
    with pytest.raises(ValueError, match="Training on 2 nodes needs a rendezvous endpoint"):
        torchrun_command(tmp_path / "train.json", 1, nodes=2)
    assert "--standalone" in torchrun_command(tmp_path / "train.json", 2)


def test_config_errors_are_one_clear_sentence(tmp_path):
    shards = write_toy_shards(tmp_path / "shards", samples=8, per_shard=8)
    base = {"shards": str(shards), "output_dir": str(tmp_path / "out"), "text_model": "x", "vision_model": "y"}
    (tmp_path / "a.json").write_text(json.dumps({**base, "learning_rate": 1.0}))
    with pytest.raises(ValueError, match=r"Unknown training config keys \['learning_rate'\]"):
        TrainConfig.from_json(tmp_path / "a.json")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            TrainConfig(**base, device="cuda").validate()
    with pytest.raises(ValueError, match="stage 'pretrain' is not one of.*LoRA"):
        TrainConfig(**base, stage="pretrain", lora_rank=8).validate()
    with pytest.raises(ValueError, match=r"part_lr names \['vision'\]"):
        TrainConfig(**base, part_lr={"vision": 1e-3}).validate()
    with pytest.raises(ValueError, match="cuda_graphs captures the compiled blocks: set compile too"):
        TrainConfig(**base, cuda_graphs=True).validate()
    with pytest.raises(ValueError, match="the encoder stage learns from images only"):
        TrainConfig(**base, stage="encoder", text_fraction=0.25).validate()
    with pytest.raises(ValueError, match="the encoder stage trains the vision tower on the extensions' losses: name one"):
        TrainConfig(**base, stage="encoder", extensions={"ocr": {"weight": 0.0}}).validate()
    with pytest.raises(ValueError, match="an extension's loss trains the vision tower: use stage 'finetune' with vision_tower"):
        TrainConfig(**base, extensions={"ocr": {}}, train_parts=["connector", "language_model"]).validate()
    with pytest.raises(ValueError, match=r"The ocr extension has no settings \['colour'\]: use .*; Unknown extension 'glyphs'"):
        TrainConfig(**base, extensions={"ocr": {"colour": True}, "glyphs": {}}).validate()
    with pytest.raises(FileNotFoundError, match="materialize training_shards first"):
        TrainConfig(**{**base, "shards": str(tmp_path)}).validate()


def test_a_resumed_run_drops_a_half_written_metrics_line(tmp_path):
    """A run killed while appending to metrics.jsonl leaves a fragment; the resumed run keeps the complete rows up
    to its checkpoint and drops the rest."""
    rows_written = [{"step": step, "loss": 1.0 / step} for step in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_written) + '{"step": 5, "lo')
    reporter = Reporter(TrainConfig(shards="", output_dir=str(tmp_path)), tmp_path, start_step=3)
    assert reporter.rows == rows_written[:3]
    assert rows(tmp_path) == rows_written[:3]


def test_lr_warms_up_then_decays_to_the_floor():
    config = TrainConfig(shards="", output_dir="", max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(step, config) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[100] == pytest.approx(0.1)


def test_part_lr_gives_a_part_its_own_step_size(build):
    """One AdamW step moves each weight by about its group's lr (Adam's first step is lr * sign(grad)): the vision
    tower by part_lr's 1e-2, the rest by lr's 1e-4; biases and norms get no weight decay."""
    model, tokenizer = build()
    model.train()
    config = TrainConfig(shards="", output_dir="", lr=1e-4, part_lr={"vision_tower": 1e-2}, weight_decay=0.1)
    groups = param_groups(model, config)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == sum(p.requires_grad for p in model.parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim < 2 for p in g["params"]))
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    before = {part: state(getattr(model, part)) for part in PARTS}
    ids = torch.tensor([build_example(PACKED_CONVERSATIONS[0], BeniProcessor.for_model(model.config, tokenizer)).input_ids])
    model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids).loss.backward()
    optimizer.step()
    for part, lr in (("vision_tower", 1e-2), ("connector", 1e-4), ("language_model", 1e-4)):
        after = getattr(model, part).state_dict()
        moved = max((after[k] - v).abs().max().item() for k, v in before[part].items() if v.is_floating_point())
        assert lr * 0.5 < moved < lr * 1.5, (part, moved)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.slow
def test_align_then_lora_finetune_train_only_their_parts(tmp_path, parts):
    """Stage 1 (align) moves the connector alone; stage 2 (LoRA from stage 1's model) moves the connector and,
    once merged into the saved model, the LLM's adapted projections, never the vision tower or the embeddings."""
    shards = write_toy_shards(tmp_path / "shards", samples=64, per_shard=16)
    base = {
        "shards": str(shards),
        "max_steps": 6,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 1,
        "save_every": 6,
        "workers": 0,
        "max_length": 64,
    }
    stages = {
        "align": {**base, "stage": "align", "vision_model": parts["siglip"], "text_model": parts["llama"]},
        "lora": {**base, "stage": "finetune", "lora_rank": 4, "init_from": str(tmp_path / "align" / "final")},
    }
    for name, config in stages.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**config, "output_dir": str(tmp_path / name)}))
        run = subprocess.run(torchrun_command(tmp_path / f"{name}.json", 2), check=False, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    torch.manual_seed(0)  # the trainer's seed: the same initial weights, the connector's included
    config = BeniConfig(vision_model=parts["siglip"], text_model=parts["llama"])
    initial = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"]))
    start = {part: state(getattr(initial, part)) for part in PARTS}
    align, lora = (
        {part: state(getattr(m, part)) for part in PARTS}
        for m in (BeniForConditionalGeneration.from_pretrained(tmp_path / name / "final") for name in stages)
    )

    assert changed(start["connector"], align["connector"])
    assert not changed(start["vision_tower"], align["vision_tower"])
    assert not changed(start["language_model"], align["language_model"])
    assert not changed(align["vision_tower"], lora["vision_tower"])
    assert changed(align["connector"], lora["connector"])
    moved = changed(align["language_model"], lora["language_model"])
    assert moved and all(".layers." in k and "_proj" in k for k in moved)
    assert not any("embed_tokens" in k or "norm" in k for k in moved)


def test_a_step_with_a_non_finite_gradient_is_skipped(tmp_path, build):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, tokenizer = build()
        shards = write_toy_shards(tmp_path / "shards", samples=16, per_shard=16)
        settings = DataSettings(shards=str(shards), batch_size=4, image_size=32, max_length=64)
        processor = BeniProcessor.for_model(model.config, tokenizer)
        batch = next(iter(make_loader(settings, processor, 0, 1, DataPosition(), workers=0, pin_memory=False)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2, fused=True)
        weight = model.connector.state_dict()
        name = next(k for k in weight if k.endswith("weight"))
        with torch.no_grad():
            model.connector.get_parameter(name)[0, 0] = float("inf")
        before = {k: v.clone() for k, v in model.state_dict().items()}

        pixels = DevicePixels(processor.image_processor, torch.device("cpu"))
        stats = train_step(model.train(), [batch], optimizer, trainable, 1.0, model.config, torch.device("cpu"), pixels).host()
        assert stats["skipped"] and not math.isfinite(stats["grad_norm"])
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # inf stays, no NaN spread
        assert all(p.grad is None for p in trainable)
        assert all(float(state["step"]) == 0 for state in optimizer.state.values())  # skipped on the device, Adam's count too

        with torch.no_grad():
            model.connector.get_parameter(name)[0, 0] = 0.0
        stats = train_step(model, [batch], optimizer, trainable, 1.0, model.config, torch.device("cpu"), pixels).host()
        assert not stats["skipped"] and math.isfinite(stats["grad_norm"])
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())
        assert all(float(state["step"]) == 1 for state in optimizer.state.values())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 block inputs and the compiled loss are the GPU's")
def test_one_gpu_feeds_its_blocks_bf16_and_its_fused_loss_equals_the_fp32_one(tmp_path, build):
    dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for rows in (300, 123):  # a second row count: the compiled loss takes any number of label tokens
            logits = torch.randn(rows, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            targets = torch.randint(0, 1000, (rows,), device="cuda")
            targets[::7] = IGNORE_INDEX
            losses = [fn(logits, targets) for fn in (cross_entropy, fused_cross_entropy)]
            grads = [torch.autograd.grad(loss, logits)[0] for loss in losses]
            assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
            torch.testing.assert_close(grads[1], grads[0])

        model, tokenizer = build()
        shards = write_toy_shards(tmp_path / "shards", samples=8, per_shard=8)
        settings = DataSettings(shards=str(shards), batch_size=8, image_size=32, max_length=64)
        processor = BeniProcessor.for_model(model.config, tokenizer)
        batch = next(iter(make_loader(settings, processor, 0, 1, DataPosition(), workers=0, pin_memory=False)))
        on_cpu = copy.deepcopy(model).train()
        model = shard(model.train(), torch.device("cuda"), 1)
        seen = []

        def record(block, args, kwargs):  # registered after shard's own hook: sees what the block gets
            seen.extend(x.dtype for x in (*args, *kwargs.values()) if torch.is_tensor(x) and x.is_floating_point())

        for block in transformer_blocks(model):
            block.register_forward_pre_hook(record, with_kwargs=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.0, fused=True)
        finish = {kind: DevicePixels(processor.image_processor, torch.device(kind)) for kind in ("cuda", "cpu")}
        gpu = train_step(model, [batch], optimizer, trainable, 1.0, model.config, torch.device("cuda"), finish["cuda"]).host()
        assert len(seen) >= len(transformer_blocks(model)) and set(seen) == {torch.bfloat16}
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights stay fp32
        cpu_trainable = [p for p in on_cpu.parameters() if p.requires_grad]
        cpu = train_step(
            on_cpu,
            [batch],
            torch.optim.SGD(cpu_trainable, lr=0.0, fused=True),
            cpu_trainable,
            1.0,
            on_cpu.config,
            torch.device("cpu"),
            finish["cpu"],
        ).host()
        assert gpu["loss"] == pytest.approx(cpu["loss"], rel=2e-2) and cpu["loss"] > 1.0
    finally:
        dist.destroy_process_group()


PACKED_CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat is written in the image?"}, {"from": "gpt", "value": "The sign says open."}],
    [{"from": "human", "value": "How many cats are there?"}, {"from": "gpt", "value": "There are two cats."}],
    [
        {"from": "human", "value": "<image> <image>\nCompare them."},
        {"from": "gpt", "value": "A red car parked next to a blue house."},
        {"from": "human", "value": "Read the text: hello world 123."},
        {"from": "gpt", "value": "The answer is yes."},
    ],
    [{"from": "human", "value": "Describe the picture. <image>"}, {"from": "gpt", "value": "Thank you, that is correct!"}],
    [{"from": "human", "value": "Read the text."}, {"from": "gpt", "value": "hello world"}],
]


def test_packed_rows_give_the_loss_of_one_sample_per_row(build):
    """The same samples, packed or padded one per row (to the longest, or wider), through train_step: equal losses
    prove the per-sample attention blocks, positions and boundary labels (fp32, images in reading order across rows),
    and that right padding needs no attention mask."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, tokenizer = build()
        processor = BeniProcessor.for_model(model.config, tokenizer)
        examples = [build_example(c, processor) for c in PACKED_CONVERSATIONS]
        finish = DevicePixels(processor.image_processor, torch.device("cpu"))
        ids, labels = [e.input_ids for e in examples], [e.labels for e in examples]
        pixels = torch.randint(0, 256, (sum(e.num_images for e in examples), 3, 32, 32), dtype=torch.uint8)
        max_length = max(map(len, ids))  # the longest sample fills a row, the shorter ones share rows
        padded = {**pad_batch(ids, tokenizer.pad_token_id, labels=labels), "pixel_values": pixels}
        packed = {**pack_batch(ids, labels, max_length, tokenizer.pad_token_id), "pixel_values": pixels}
        wide = {**pad_batch(ids, tokenizer.pad_token_id, labels=labels, multiple_of=64), "pixel_values": pixels}
        assert 1 < len(packed["input_ids"]) < len(examples)
        assert wide["input_ids"].shape[1] % 64 == 0 and wide["input_ids"].shape[1] > padded["input_ids"].shape[1]

        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, fused=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        steps = [
            train_step(model.train(), [b], optimizer, trainable, 1.0, model.config, torch.device("cpu"), finish).host()
            for b in (padded, packed, wide)
        ]
        assert steps[1]["loss"] == pytest.approx(steps[0]["loss"], abs=1e-5)
        assert steps[2]["loss"] == pytest.approx(steps[0]["loss"], abs=1e-5)  # more padding on the right changes nothing
        assert steps[1]["samples"] == steps[0]["samples"] == len(examples) and steps[1]["tokens"] == steps[0]["tokens"]
        assert steps[0]["loss"] > 1.0  # a real loss of a random model, not an empty sum
    finally:
        dist.destroy_process_group()


def test_packed_training_under_torchrun_lowers_the_loss_and_profiles_its_steps(tmp_path, parts):
    shards = write_toy_shards(tmp_path / "shards", samples=64, per_shard=16, text_every=4)
    out = tmp_path / "run"
    config = toy_run(shards, out, parts, max_steps=20, warmup_steps=2, save_every=20, workers=0, pack=True, profile_steps=3)
    (tmp_path / "train.json").write_text(json.dumps(config))
    run = subprocess.run(torchrun_command(tmp_path / "train.json", 2), check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    losses = [r["loss"] for r in rows(out)]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.8
    profile = (out / "profile.txt").read_text()
    assert profile.startswith(f"steps {PROFILE_AFTER + 1}-{PROFILE_AFTER + 3} of this launch") and "aten::mm" in profile
    with gzip.open(out / "profile_trace.json.gz") as f:
        steps = [e for e in json.load(f)["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")]
    assert [e["name"] for e in steps] == [f"ProfilerStep#{PROFILE_AFTER + i}" for i in range(3)]


@pytest.mark.parametrize("engine", [False, True])
def test_an_encoder_stage_then_the_ocr_extensions_weight_train_the_reading_head_under_torchrun(tmp_path, parts, engine):
    """The recipe's order, with the heads' transcripts handed to the LLM as tokens (the line head's trained on the
    documents' lines, the axes head on turned copies), and the recipe's compiled blocks and CUDA graphs, which FSDP's
    two processes turn off; with `engine`, each image's lines after its tokens too, and the saved processor reads."""
    shards = write_toy_shards(tmp_path / "shards", samples=64, per_shard=16, text_every=4, lines=True)
    recipe = {"compile": True, "cuda_graphs": True}
    stages = {
        "encoder": toy_run(
            shards,
            tmp_path / "encoder",
            parts,
            stage="encoder",
            text_fraction=0.0,
            max_steps=12,
            max_length=16,  # under any sample's length: the encoder stage never runs the LLM, so never refuses a sample
            extensions={"ocr": {"tokens": True, "lines": True, "upright": True, "engine": engine}},
            **recipe,
        ),
        "finetune": {
            **toy_run(shards, tmp_path / "finetune", parts, max_steps=12, extensions={"ocr": {"weight": 1.0}}, max_length=320),
            "init_from": str(tmp_path / "encoder" / "final"),
        },
    }
    for name, config in stages.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**config, "warmup_steps": 2, "save_every": 12, "workers": 0}))
        run = subprocess.run(torchrun_command(tmp_path / f"{name}.json", 2), check=False, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert ("cuda_graphs off: they need one process, and this run has 2 (FSDP)" in run.stdout) == (name == "encoder")
    read = rows(tmp_path / "encoder")
    assert all(r["loss"] == r["extension_loss"] and r["tokens_per_s"] == 0 for r in read)  # the LLM never ran
    # The axes head's loss (from 2 log 36 = 7.2, the reading heads' ~11) learns slowest in a few steps.
    assert sum(r["loss"] for r in read[-3:]) < sum(r["loss"] for r in read[:3]) / 1.5
    finetune = rows(tmp_path / "finetune")
    assert all(("extension_loss" in r) == (r["modality"] == "image") for r in finetune) and any(r["modality"] == "text" for r in finetune)
    first = next(r for r in finetune if r["modality"] == "image")
    assert first["extension_loss"] < read[0]["extension_loss"] / 1.4  # the heads came over from the encoder stage
    model = BeniForConditionalGeneration.from_pretrained(tmp_path / "finetune" / "final")
    ocr = model.extensions["ocr"]
    assert ocr.reading_head.classify.weight.abs().sum() > 0
    encoder = BeniForConditionalGeneration.from_pretrained(tmp_path / "encoder" / "final")
    # The blank follows the connector: frozen in the encoder stage, trained in the finetune stage.
    fresh = BeniForConditionalGeneration(encoder.config)
    assert ocr.options.tokens and not torch.equal(ocr.blank, encoder.extensions["ocr"].blank)
    lines = [m.extensions["ocr"].line_head.classify.weight for m in (fresh, encoder, model)]
    assert ocr.options.lines and not torch.equal(lines[0], lines[1]) and not torch.equal(lines[1], lines[2])
    axes = [m.extensions["ocr"].axes_head.predict[-1].weight for m in (fresh, encoder, model)]
    assert ocr.options.upright and not torch.equal(axes[0], axes[1]) and not torch.equal(axes[1], axes[2])
    assert ocr.options.engine == engine == bool(load_processor(tmp_path / "finetune" / "final").extensions["ocr"]["engine"])
