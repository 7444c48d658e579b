import itertools
import random
import shutil

import pytest
import torch
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode

from beni_model.chat import build_example, build_prompt, load_tokenizer, pad_batch
from beni_model.config import LINE_READS_PER_COLUMN, LINE_TOKENS, BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.vision import (
    READING_ALPHABET,
    READS_PER_COLUMN,
    ConvStem,
    CudaGraphed,
    ReadingHead,
    conv_stem_flops,
    ctc_backward,
    ctc_forward,
    ctc_loss,
    line_targets,
    reading_classes,
    reading_targets,
)
from tests.model.conftest import VISION, images

TWO_IMAGES = [
    {"from": "human", "value": "What is written?"},
    {"from": "gpt", "value": "The sign says open."},
    {"from": "human", "value": "<image>\nAnd here? <image>"},
    {"from": "gpt", "value": "hello world"},
]
TEXT_ONLY = [{"from": "human", "value": "How many cats are there?"}, {"from": "gpt", "value": "There are two cats."}]


def batch_for(model, tokenizer, conversations, image_size=None):
    n = model.config.num_image_tokens(image_size)
    examples = [build_example(c, tokenizer, n) for c in conversations]
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
    n = model.config.num_image_tokens()
    prompts = [
        build_prompt([{"from": "human", "value": "<image>\nWhat is written in the image?"}], tokenizer, n),
        build_prompt([{"from": "human", "value": "hello"}], tokenizer, n),
        build_prompt([{"from": "human", "value": "<image> <image> Describe both."}], tokenizer, n),
    ]
    pixels = images(3)
    per_prompt_pixels = [pixels[:1], None, pixels[1:]]
    batch = pad_batch(prompts, tokenizer.pad_token_id, padding_side="left")
    batched = model.generate(**batch, pixel_values=pixels, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    assert (batched[:, :width] == batch["input_ids"]).all()
    for i, prompt in enumerate(prompts):
        single = model.generate(torch.tensor([prompt]), pixel_values=per_prompt_pixels[i], max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert batched[i, width:].tolist() == single[0, len(prompt) :].tolist()
    uncached = model.generate(**batch, pixel_values=pixels, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=tokenizer.pad_token_id)
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
    assert counter.get_total_flops() == conv_stem_flops(16, 48, 64)


COLOURS = {"A": (220, 30, 30), "B": (30, 200, 40), "C": (30, 40, 220), "D": (230, 220, 30)}


def striped(line: str, size: int = 64) -> torch.Tensor:
    """A normalized image whose vertical stripes, left to right, are the colours of `line`'s letters."""
    image = torch.zeros(3, size, size)
    width = size // len(line)
    for i, letter in enumerate(line):
        image[:, :, i * width : (i + 1) * width] = torch.tensor(COLOURS[letter]).view(3, 1, 1) / 127.5 - 1
    return image


def test_reading_head_learns_the_order_of_a_line_and_reloads(parts, tmp_path):
    """Lines of 2-3 coloured stripes, with their reverse orders among them: only a head that reads the columns
    in order can transcribe the held-out lines."""
    vision = {**VISION, "model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "image_size": 64}
    config = BeniConfig(vision_config=vision, text_model=parts["llama"], reading_head=True)
    torch.manual_seed(0)
    model = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"], config.image_token))
    lines = ["".join(p) for n in (2, 3) for p in itertools.product("ABCD", repeat=n) if all(a != b for a, b in itertools.pairwise(p))]
    random.Random(0).shuffle(lines)
    train, held_out = lines[:-8], lines[-8:]
    tower, rng = model.vision_tower, random.Random(0)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-3)
    for _ in range(700):  # the held-out reads take off at ~400-500 steps (seeds 0-2: 7, 8, 7 of 8 right at 700)
        batch = rng.sample(train, 16)
        loss = tower.reading_loss(tower(torch.stack([striped(line) for line in batch])), *reading_targets(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pixels = torch.stack([striped(line) for line in held_out])
    with torch.no_grad():
        reads = model.eval().vision_tower.read(pixels)
        assert sum(r == line for r, line in zip(reads, held_out)) >= 6, list(zip(held_out, reads))
        model.save_pretrained(tmp_path)
        assert BeniForConditionalGeneration.from_pretrained(tmp_path).eval().vision_tower.read(pixels) == reads


def test_reading_loss_comes_with_the_llm_loss_and_skips_lines_without_transcript(build):
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu", reading_head=True)
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    kwargs = dict(zip(("reading_targets", "reading_lengths"), reading_targets([None, "open"])))
    out = model(**batch, pixel_values=images(2), **kwargs)
    assert out.loss is not None and out.reading_loss > 0
    out.reading_loss.backward()
    assert model.vision_tower.reading_head.classify.weight.grad.abs().sum() > 0
    assert model(**batch, pixel_values=images(2)).reading_loss is None
    assert model(**batch, pixel_values=images(2), **dict(zip(("reading_targets", "reading_lengths"), reading_targets([None, None])))).reading_loss == 0
    assert reading_classes("é") is reading_classes(None) is None and reading_classes("") == []


def test_reading_tokens_hand_the_heads_transcript_to_the_llm_in_its_own_embeddings(build, tmp_path):
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu", reading_head=True, reading_tokens=True)
    grid = model.config.image_size // model.config.patch_size
    assert model.config.num_image_tokens() == grid * grid + grid * READS_PER_COLUMN
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    model(**batch, pixel_values=images(2)).loss.backward()  # the answer's loss reaches the head and the blank
    assert model.vision_tower.reading_head.classify.weight.grad.abs().sum() > 0 and model.connector.reading_blank.grad.abs().sum() > 0
    head = model.vision_tower.reading_head.classify
    with torch.no_grad():  # a head sure that every read is "a": its tokens are the LLM's embedding of "a"
        head.weight.zero_()
        head.bias.fill_(-30).view(READS_PER_COLUMN, -1)[:, 1 + READING_ALPHABET.index("a")] = 30
        reads = model.reading_embeddings(model.vision_tower(images(2)))
        a = model.get_input_embeddings().weight[tokenizer.encode("a", add_special_tokens=False)[0]]
        torch.testing.assert_close(reads, a.expand_as(reads))
        model.save_pretrained(tmp_path)
        reloaded = BeniForConditionalGeneration.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(**batch, pixel_values=images(2)).logits, model(**batch, pixel_values=images(2)).logits)
    with pytest.raises(ValueError, match="set reading_head=True too"):
        BeniConfig(**{**model.config.to_dict(), "reading_head": False})


def test_the_line_head_reads_rows_and_hands_the_llm_their_collapsed_transcript(build):
    """Rows 1 and 3 of a 16 x 16 grid carry text (feature 0), which the head reads as one "a" per column between
    blanks: the LLM gets each of those rows as 16 a's and a line break, then blanks. A head reading "ab" at every
    column of every row fills all LINE_TOKENS slots, cut in the middle of a row."""
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu", image_size=128, reading_head=True, reading_tokens=True, reading_lines=True)
    grid, classes = 16, 1 + len(READING_ALPHABET)
    assert model.config.num_image_tokens() == grid * grid + grid * READS_PER_COLUMN + LINE_TOKENS
    head, table = model.vision_tower.line_head, model.reading_table()
    token = {c: table[1 + READING_ALPHABET.index(c)] for c in "ab"} | {"\n": table[-1], "": table[0]}
    features = torch.zeros(1, grid * grid, head.pool.shape[0])
    features.view(1, grid, grid, -1)[:, [1, 3], :, 0] = 100.0
    with torch.no_grad():
        head.offset.copy_(torch.tensor([[-100.0], [0.0], [-100.0]]))  # each row's read is its own patch
        head.classify.weight.zero_()
        head.classify.weight.view(LINE_READS_PER_COLUMN, classes, -1)[0, 1 + READING_ALPHABET.index("a"), 0] = 1.0
        head.classify.bias.zero_().view(LINE_READS_PER_COLUMN, classes)[0, 1 + READING_ALPHABET.index("a")] = -50
        expected = ["a"] * grid + ["\n"] + ["a"] * grid + ["\n"] + [""] * (LINE_TOKENS - 2 * grid - 2)
        torch.testing.assert_close(model.line_embeddings(features)[0], torch.stack([token[c] for c in expected]))
        head.classify.bias.fill_(-30).view(LINE_READS_PER_COLUMN, classes)[[0, 2], [1 + READING_ALPHABET.index(c) for c in "ab"]] = 30
        head.classify.bias.view(LINE_READS_PER_COLUMN, classes)[1, 0] = 30
        expected = (["a", "b"] * grid + ["\n"]) * (LINE_TOKENS // (2 * grid + 1) + 1)
        torch.testing.assert_close(model.line_embeddings(features)[0], torch.stack([token[c] for c in expected[:LINE_TOKENS]]))
        assert model.vision_tower.read(images(1, 128))[0].split("\n")[1:] == ["ab" * grid] * grid
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    out = model(**batch, pixel_values=images(2, 128), **dict(zip(("reading_targets", "reading_lengths"), reading_targets([None, "open"]))),
                **dict(zip(("line_targets", "line_lengths"), line_targets([[["open", 0.3], ["now", 0.7]], None], grid))))
    (out.loss + out.reading_loss).backward()
    assert head.classify.weight.grad.abs().sum() > 0 and head.offset.grad.abs().sum() > 0


def test_line_targets_give_each_row_its_line_and_leave_shared_rows_out():
    targets, lengths = line_targets([[["ab", 0.1], ["c", 0.6], ["d", 0.65]], [["e", 0.99]], None], rows=4)
    assert lengths.tolist() == [[2, 0, -1, 0], [0, 0, 0, 1], [-1] * 4]
    assert targets[0, 0, :2].tolist() == reading_classes("ab") and targets[1, 3, 0].item() == reading_classes("e")[0]


def test_ctc_loss_of_an_empty_transcript_is_the_all_blank_path():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 1 + len(READING_ALPHABET))
    loss = ctc_loss(logits.log_softmax(-1), *reading_targets([""]))
    torch.testing.assert_close(loss, -logits.log_softmax(-1)[0, :, 0].mean())


def test_the_reading_head_starts_as_the_column_mean_and_reads_the_rows_its_pool_scores(build):
    model, _ = build("siglip", "llama", "mlp2x_gelu", reading_head=True)
    head = model.vision_tower.reading_head
    assert isinstance(head, ReadingHead) and not head.pool.any()  # transformers' weight init leaves the pool at zero
    grid = torch.randn(2, 4, 4, head.pool.shape[0])
    with torch.no_grad():
        torch.testing.assert_close(head(grid), head.classify(grid.mean(1)))
        grid[:, 2, :, 0] = 10.0  # the text's row stands out along one direction, which this pool scores
        head.pool.zero_()[0] = 5.0
        torch.testing.assert_close(head(grid), head.classify(grid[:, 2]), atol=1e-3, rtol=1e-3)


def test_lines_too_long_for_the_head_are_left_out_of_the_reading_loss(build):
    model, _ = build("siglip", "llama", "mlp2x_gelu", reading_head=True)  # 4 columns: 8 reads
    features = model.vision_tower(images(3))
    alone = model.vision_tower.reading_loss(features[2:], *reading_targets(["ab"]))
    mixed = model.vision_tower.reading_loss(features, *reading_targets(["abcdefghi", None, "ab"]))
    assert torch.allclose(alone, mixed) and alone > 0


def test_ctc_loss_matches_pytorchs_on_lines_that_fit():
    """Repeats (which need a blank between them), a line that just fits, one without transcript and one that cannot
    be aligned in the steps."""
    torch.manual_seed(0)
    lines = ["aab", "abcabcab", None, "abcd", "aaaaa"]  # 8 steps: "aaaaa" needs 9
    targets, lengths = reading_targets(lines)
    logits = torch.randn(len(lines), 8, 1 + len(READING_ALPHABET), requires_grad=True)
    log_probs = logits.log_softmax(-1)
    fits = [0, 1, 3]
    reference = torch.nn.functional.ctc_loss(
        log_probs[fits].transpose(0, 1), targets[fits], torch.full((3,), 8), lengths[fits], zero_infinity=True
    )
    ours = ctc_loss(log_probs, targets, lengths)
    assert torch.allclose(ours, reference)
    # PyTorch's kernel hands back the gradient for log_softmax'd inputs, which both match at the logits
    grad, reference_grad = (torch.autograd.grad(loss, logits, retain_graph=True)[0] for loss in (ours, reference))
    assert torch.allclose(grad, reference_grad, atol=1e-6) and grad[[2, 4]].abs().sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_ctc_passes_replayed_as_cuda_graphs_give_the_eager_loss_and_gradient():
    """Two shapes (the reading head's and the line head's), each captured on first use, then replayed on new values."""
    torch.manual_seed(0)
    rng = random.Random(0)
    passes = (CudaGraphed(ctc_forward), CudaGraphed(ctc_backward))
    for batch, steps in ((4, 8), (6, 12), (4, 8), (6, 12)):
        lines = ["".join(rng.choices("abc", k=rng.randint(0, steps))) for _ in range(batch - 1)] + [None]
        targets, lengths = (t.cuda() for t in reading_targets(lines))
        logits = torch.randn(batch, steps, 1 + len(READING_ALPHABET), device="cuda", requires_grad=True)
        losses = [ctc_loss(logits.log_softmax(-1), targets, lengths, p) for p in (None, passes)]
        grads = [torch.autograd.grad(loss, logits)[0] for loss in losses]
        torch.testing.assert_close(losses[1], losses[0])
        torch.testing.assert_close(grads[1], grads[0])
    assert [sum(graph is not None for graph in p.graphs.values()) for p in passes] == [2, 2]  # captured, not run eagerly


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the capture fails: one without CUDA")
def test_a_pass_whose_cuda_graph_capture_fails_runs_eagerly_and_says_so():
    torch.manual_seed(0)
    targets, lengths = reading_targets(["ab", "c", None])
    logits = torch.randn(3, 6, 1 + len(READING_ALPHABET), requires_grad=True)
    passes = (CudaGraphed(ctc_forward), CudaGraphed(ctc_backward))
    with pytest.warns(UserWarning, match="ctc_forward runs eagerly .* CUDA graph capture failed"):
        loss = ctc_loss(logits.log_softmax(-1), targets, lengths, passes)
    with pytest.warns(UserWarning, match="ctc_backward runs eagerly"):
        grad = torch.autograd.grad(loss, logits)[0]
    eager = ctc_loss(logits.log_softmax(-1), targets, lengths)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, torch.autograd.grad(eager, logits)[0])
