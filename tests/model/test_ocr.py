"""The ocr extension (beni_model.ocr): reading heads, their CTC loss, targets and reads handed to the LLM."""

import itertools
import random

import pytest
import torch

from beni_model.chat import load_tokenizer
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.ocr.ctc import CudaGraphed, ctc_backward, ctc_forward, ctc_loss
from beni_model.ocr.heads import (
    LINE_READS_PER_COLUMN,
    LINE_TOKENS,
    READING_ALPHABET,
    READS_PER_COLUMN,
    ReadingHead,
    line_targets,
    reading_classes,
    reading_targets,
)
from tests.model.conftest import VISION, images
from tests.model.test_modeling import TWO_IMAGES, batch_for

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
    config = BeniConfig(vision_config=vision, text_model=parts["llama"], extensions={"ocr": {}})
    torch.manual_seed(0)
    model = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"], config.image_token))
    lines = ["".join(p) for n in (2, 3) for p in itertools.product("ABCD", repeat=n) if all(a != b for a, b in itertools.pairwise(p))]
    random.Random(0).shuffle(lines)
    train, held_out = lines[:-8], lines[-8:]
    tower, ocr, rng = model.vision_tower, model.extensions["ocr"], random.Random(0)
    optimizer = torch.optim.AdamW([*tower.parameters(), *ocr.parameters()], lr=1e-3)
    for _ in range(900):  # the held-out reads take off at ~400-500 steps; 700 left one seed of four short
        batch = rng.sample(train, 16)
        loss = ocr.reading_loss(model, tower(torch.stack([striped(line) for line in batch])), *reading_targets(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pixels = torch.stack([striped(line) for line in held_out])
    with torch.no_grad():
        reads = model.eval().extension_answers(pixels)
        assert sum(r == line for r, line in zip(reads, held_out)) >= 6, list(zip(held_out, reads))
        model.save_pretrained(tmp_path)
        assert BeniForConditionalGeneration.from_pretrained(tmp_path).eval().extension_answers(pixels) == reads


def test_reading_loss_comes_with_the_llm_loss_and_skips_lines_without_transcript(build):
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu", extensions={"ocr": {}})
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    targets = dict(zip(("reading_targets", "reading_lengths"), reading_targets([None, "open"])))
    out = model(**batch, pixel_values=images(2), extension_targets=targets)
    assert out.loss is not None and out.extension_losses["ocr"] > 0
    out.extension_losses["ocr"].backward()
    assert model.extensions["ocr"].reading_head.classify.weight.grad.abs().sum() > 0
    assert model(**batch, pixel_values=images(2)).extension_losses is None
    none = dict(zip(("reading_targets", "reading_lengths"), reading_targets([None, None])))
    assert model(**batch, pixel_values=images(2), extension_targets=none).extension_losses["ocr"] == 0
    assert reading_classes("é") is reading_classes(None) is None and reading_classes("") == []


def test_reading_tokens_hand_the_heads_transcript_to_the_llm_in_its_own_embeddings(build, tmp_path):
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu", extensions={"ocr": {"tokens": True}})
    grid = model.config.image_size // model.config.patch_size
    assert model.config.num_image_tokens() == grid * grid + grid * READS_PER_COLUMN
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    model(**batch, pixel_values=images(2)).loss.backward()  # the answer's loss reaches the head and the blank
    ocr = model.extensions["ocr"]
    assert ocr.reading_head.classify.weight.grad.abs().sum() > 0 and ocr.blank.grad.abs().sum() > 0
    head = ocr.reading_head.classify
    with torch.no_grad():  # a head sure that every read is "a": its tokens are the LLM's embedding of "a"
        head.weight.zero_()
        head.bias.fill_(-30).view(READS_PER_COLUMN, -1)[:, 1 + READING_ALPHABET.index("a")] = 30
        reads = ocr.reading_embeddings(model, model.vision_tower(images(2)))
        a = model.get_input_embeddings().weight[tokenizer.encode("a", add_special_tokens=False)[0]]
        torch.testing.assert_close(reads, a.expand_as(reads))
        model.save_pretrained(tmp_path)
        reloaded = BeniForConditionalGeneration.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(**batch, pixel_values=images(2)).logits, model(**batch, pixel_values=images(2)).logits)
    with pytest.raises(ValueError, match=r"The ocr extension has no settings \['colour'\]"):
        BeniConfig(**{**model.config.to_dict(), "extensions": {"ocr": {"colour": True}}})


def test_collapsed_reads_hand_the_llm_each_kept_reads_token_packed_left_then_blanks(build):
    """Columns 0 and 2 read "b" twice, columns 1 and 3 "a" twice: the LLM gets the tokens of b, a, b, a, then blanks;
    the answer's gradient still reaches the head."""
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu", extensions={"ocr": {"tokens": True, "collapsed": True}})
    ocr, grid, classes = model.extensions["ocr"], model.config.image_size // model.config.patch_size, 1 + len(READING_ALPHABET)
    table = ocr.reading_table(model)
    a, b = (1 + READING_ALPHABET.index(c) for c in "ab")
    features = torch.zeros(1, grid * grid, ocr.reading_head.pool.shape[0])
    features.view(1, grid, grid, -1)[:, :, [0, 2], 0] = 100.0
    with torch.no_grad():
        head = ocr.reading_head.classify
        head.weight.zero_().view(READS_PER_COLUMN, classes, -1)[:, b, 0] = 1.0
        head.bias.zero_().view(READS_PER_COLUMN, classes)[:, a] = 50.0
        reads = ocr.reading_embeddings(model, features)[0]
    torch.testing.assert_close(reads, table[[b, a, b, a] + [0] * (grid * READS_PER_COLUMN - 4)])
    model(**batch_for(model, tokenizer, [TWO_IMAGES]), pixel_values=images(2)).loss.backward()
    assert ocr.reading_head.classify.weight.grad.abs().sum() > 0 and ocr.blank.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="collapsed setting shapes the reads handed to the LLM: set tokens too"):
        BeniConfig(**{**model.config.to_dict(), "extensions": {"ocr": {"collapsed": True}}})


def test_teacher_reads_hand_the_llm_the_transcript_while_training_and_the_heads_reads_after(build):
    settings = {"tokens": True, "collapsed": True, "teacher_reads": True}
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu", extensions={"ocr": settings})
    ocr, slots = model.extensions["ocr"], (model.config.image_size // model.config.patch_size) * READS_PER_COLUMN
    table = ocr.reading_table(model)
    features = model.vision_features(images(3))
    targets, lengths = reading_targets(["ab1", None, "x" * (slots + 5)])  # one image without a transcript, one too long
    embeddings = ocr.image_embeddings(model, features, {"reading_targets": targets, "reading_lengths": lengths})
    head = ocr.image_embeddings(model, features)  # inference: no transcript at hand
    classes = [1 + READING_ALPHABET.index(c) for c in "ab1"]
    torch.testing.assert_close(embeddings[0], table[classes + [0] * (slots - 3)])
    torch.testing.assert_close(embeddings[1], head[1])  # no transcript: the head's reads
    torch.testing.assert_close(embeddings[2], table[[1 + READING_ALPHABET.index("x")] * slots])  # cut at the slots
    assert not torch.allclose(head[0], embeddings[0])
    with pytest.raises(ValueError, match="teacher_reads hands the LLM a transcript one character a slot: set collapsed too"):
        BeniConfig(**{**model.config.to_dict(), "extensions": {"ocr": {"tokens": True, "teacher_reads": True}}})


def test_the_line_head_reads_rows_and_hands_the_llm_their_collapsed_transcript(build):
    """Rows 1 and 3 of a 16 x 16 grid carry text (feature 0), which the head reads as one "a" per column between
    blanks: the LLM gets each of those rows as 16 a's and a line break, then blanks. A head reading "ab" at every
    column of every row fills all LINE_TOKENS slots, cut in the middle of a row."""
    model, tokenizer = build("siglip", "llama", "mlp2x_gelu", image_size=128, extensions={"ocr": {"tokens": True, "lines": True}})
    grid, classes = 16, 1 + len(READING_ALPHABET)
    assert model.config.num_image_tokens() == grid * grid + grid * READS_PER_COLUMN + LINE_TOKENS
    ocr = model.extensions["ocr"]
    head, table = ocr.line_head, ocr.reading_table(model)
    token = {c: table[1 + READING_ALPHABET.index(c)] for c in "ab"} | {"\n": table[-1], "": table[0]}
    features = torch.zeros(1, grid * grid, head.pool.shape[0])
    features.view(1, grid, grid, -1)[:, [1, 3], :, 0] = 100.0
    with torch.no_grad():
        head.offset.copy_(torch.tensor([[-100.0], [0.0], [-100.0]]))  # each row's read is its own patch
        head.classify.weight.zero_()
        head.classify.weight.view(LINE_READS_PER_COLUMN, classes, -1)[0, 1 + READING_ALPHABET.index("a"), 0] = 1.0
        head.classify.bias.zero_().view(LINE_READS_PER_COLUMN, classes)[0, 1 + READING_ALPHABET.index("a")] = -50
        expected = ["a"] * grid + ["\n"] + ["a"] * grid + ["\n"] + [""] * (LINE_TOKENS - 2 * grid - 2)
        torch.testing.assert_close(ocr.line_embeddings(model, features)[0], torch.stack([token[c] for c in expected]))
        head.classify.bias.fill_(-30).view(LINE_READS_PER_COLUMN, classes)[[0, 2], [1 + READING_ALPHABET.index(c) for c in "ab"]] = 30
        head.classify.bias.view(LINE_READS_PER_COLUMN, classes)[1, 0] = 30
        expected = (["a", "b"] * grid + ["\n"]) * (LINE_TOKENS // (2 * grid + 1) + 1)
        torch.testing.assert_close(ocr.line_embeddings(model, features)[0], torch.stack([token[c] for c in expected[:LINE_TOKENS]]))
        assert model.extension_answers(images(1, 128))[0].split("\n")[1:] == ["ab" * grid] * grid
    batch = batch_for(model, tokenizer, [TWO_IMAGES])
    targets = dict(zip(("reading_targets", "reading_lengths"), reading_targets([None, "open"])))
    targets |= dict(zip(("line_targets", "line_lengths"), line_targets([[["open", 0.3], ["now", 0.7]], None], grid)))
    out = model(**batch, pixel_values=images(2, 128), extension_targets=targets)
    (out.loss + out.extension_losses["ocr"]).backward()
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
    model, _ = build("siglip", "llama", "mlp2x_gelu", extensions={"ocr": {}})
    head = model.extensions["ocr"].reading_head
    assert isinstance(head, ReadingHead) and not head.pool.any()  # transformers' weight init leaves the pool at zero
    grid = torch.randn(2, 4, 4, head.pool.shape[0])
    with torch.no_grad():
        torch.testing.assert_close(head(grid), head.classify(grid.mean(1)))
        grid[:, 2, :, 0] = 10.0  # the text's row stands out along one direction, which this pool scores
        head.pool.zero_()[0] = 5.0
        torch.testing.assert_close(head(grid), head.classify(grid[:, 2]), atol=1e-3, rtol=1e-3)


def test_lines_too_long_for_the_head_are_left_out_of_the_reading_loss(build):
    model, _ = build("siglip", "llama", "mlp2x_gelu", extensions={"ocr": {}})  # 4 columns: 8 reads
    features, ocr = model.vision_tower(images(3)), model.extensions["ocr"]
    alone = ocr.reading_loss(model, features[2:], *reading_targets(["ab"]))
    mixed = ocr.reading_loss(model, features, *reading_targets(["abcdefghi", None, "ab"]))
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
