"""The OCR extension: CTC reading heads on the vision tower, trained on transcripts, whose reads reach the LLM as
its own character embeddings.

Settings (`BeniConfig.extensions["ocr"]`):
- `tokens`: each image's tokens end with the reading head's soft transcript (`reading_embeddings`);
- `collapsed`: with `tokens`, that transcript after CTC's collapse: each read the collapse keeps as its best
  character's token (the gradient passing straight through to its probabilities), packed left, blanks after; one
  token per character, as the text itself would sit in a prompt, for an LLM that copies from its prompt;
- `teacher_reads`: with `collapsed`, while training with an image's transcript at hand the LLM is handed the
  transcript itself, one character a slot, instead of the head's reads (teacher forcing): it learns to copy clean
  reads while the head is still learning to make them, and at inference copies the head's;
- `lines`: a head that reads each row of patches as a text line (LineReadingHead), trained on documents' lines;
  with `tokens` its collapsed transcript follows (`line_embeddings`);
- `spell_lines`: with `tokens` and `lines`, a reply written on one of a document's lines (the whole line, or a run
  of its words, as a field's value is) trains one token per character too, as a transcript's reply does;
- `upright`: a head that tells which way an image's text runs (beni_model.ocr.upright), trained on the tower's view of
  turned copies of images whose text runs level; at inference an image whose text runs off level is set level and
  encoded again;
- `engine`: the processor runs a reading engine trained on real text (PP-OCRv4, beni_model.ocr.engine) on each image
  and its lines follow the image's tokens in the prompt, as plain text; training puts the sample's own `lines` (or
  its `transcript`) there in the same form. Replies are then tokenized as text, so that copying a read is copying
  its tokens (`reply_ids` spells none);
- `token_ids`: the LLM's token for each READING_ALPHABET character and the line break, set by `prepare`.
Its vision stems, `vision_stem: ocr.pplcnet` (or `ocr.pplcnet8` and `ocr.pplcnet16`, deeper) in the model's config, are
the first layers of a text recognizer trained on real text, frozen (beni_model.ocr.stem); a new model loads them in
`start`.
The loader's targets come from a sample's `transcript` and `lines` metadata; with `tokens`, a reply that is the
image's transcript trains one token per character (`reply_ids`).
"""

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from beni_model.extensions import Extension, register
from beni_model.ocr import engine, stem, upright
from beni_model.ocr.ctc import CudaGraphed, ctc_backward, ctc_forward, ctc_loss
from beni_model.ocr.heads import (
    LINE_TOKENS,
    READING_ALPHABET,
    READS_PER_COLUMN,
    LineReadingHead,
    ReadingHead,
    greedy_transcripts,
    line_targets,
    reading_targets,
)


@dataclass
class OcrSettings:
    tokens: bool = False
    collapsed: bool = False
    teacher_reads: bool = False
    lines: bool = False
    spell_lines: bool = False
    upright: bool = False
    engine: bool = False
    token_ids: list[int] | None = None


def ocr_settings(settings: dict) -> OcrSettings:
    if unknown := set(settings) - set(OcrSettings.__dataclass_fields__):
        raise ValueError(f"The ocr extension has no settings {sorted(unknown)}: use {sorted(OcrSettings.__dataclass_fields__)}.")
    options = OcrSettings(**settings)
    if options.collapsed and not options.tokens:
        raise ValueError("The ocr extension's collapsed setting shapes the reads handed to the LLM: set tokens too, or collapsed off.")
    if options.teacher_reads and not options.collapsed:
        raise ValueError("The ocr extension's teacher_reads hands the LLM a transcript one character a slot: set collapsed too.")
    if options.spell_lines and not (options.tokens and options.lines):
        raise ValueError("The ocr extension's spell_lines spells replies read off the line head's tokens: set tokens and lines too.")
    return options


@register("ocr")
class OcrExtension(Extension):
    batch_keys = ("reading_targets", "reading_lengths", "line_targets", "line_lengths")

    def __init__(self, config, settings: dict):
        super().__init__(config, settings)
        self.options = ocr_settings(settings)
        hidden = config.vision_config.hidden_size
        self.reading_head = ReadingHead(hidden)
        if self.options.lines:
            self.line_head = LineReadingHead(hidden)
        if self.options.upright:
            self.axes_head = upright.AxesHead(hidden)
        if self.options.tokens:
            if self.options.token_ids is None:
                raise ValueError("The ocr extension's tokens need the LLM's token of each character: build the model with from_parts.")
            # A learned blank, trained with the connector (part_of), for the reads that are no character.
            self.blank = nn.Parameter(torch.zeros(config.text_config.hidden_size))
            self.register_buffer("token_ids", torch.tensor(self.options.token_ids))
        self.ctc_passes = (ctc_forward, ctc_backward)  # to_device swaps in CUDA graphs of them

    # ------------------------------------------------------------ config and data

    @classmethod
    def check(cls, settings: dict, config) -> None:
        # Here, so that a training run stops before its first step, not at the eval after it.
        if ocr_settings(settings).engine and (absent := engine.missing()):
            raise ValueError(f"The ocr extension's engine needs {', '.join(absent)}, not installed: {engine.PACKAGES}")

    @classmethod
    def vision_stem(cls, name: str, vision_config) -> nn.Module:
        if name not in stem.CUTS:
            names = [f"'ocr.{cut}'" for cut in stem.CUTS]
            known = f"{', '.join(names[:-1])} or {names[-1]}"
            raise ValueError(f"The ocr extension has no vision stem {name!r}: use {known}.")
        return stem.TextStem(vision_config.patch_size, vision_config.hidden_size, name)

    @classmethod
    def image_tokens(cls, settings: dict, grid: int) -> int:
        options = ocr_settings(settings)
        return grid * READS_PER_COLUMN + (LINE_TOKENS if options.lines else 0) if options.tokens else 0

    @classmethod
    def prepare(cls, settings: dict, tokenizer) -> dict:
        options = ocr_settings(settings)
        if options.tokens:
            options.token_ids = character_token_ids(tokenizer)
        return asdict(options)

    @classmethod
    def collate(cls, settings: dict, grid: int, metas: list[dict]) -> dict[str, torch.Tensor]:
        targets = dict(zip(("reading_targets", "reading_lengths"), reading_targets([meta.get("transcript") for meta in metas])))
        if ocr_settings(settings).lines:
            targets.update(zip(("line_targets", "line_lengths"), line_targets([meta.get("lines") for meta in metas], grid)))
        return targets

    @classmethod
    def reply_ids(cls, settings: dict, meta: dict, reply: str, tokenizer) -> list[int] | None:
        """A reply that is exactly the image's transcript, one character at a time, as the reading head hands the
        LLM its transcript (`tokens`): copying it is then token for token, where a word token asks the LLM to know
        how it is spelled. With `spell_lines`, likewise a reply written on one of a document's lines. The model still
        writes any tokens it likes at inference; they decode to the same text."""
        options = ocr_settings(settings)
        if not options.tokens or options.engine or not reply:
            return None
        if reply != meta.get("transcript") and not (options.spell_lines and on_a_line(reply, meta.get("lines"))):
            return None
        return [i for c in reply for i in tokenizer.encode(c, add_special_tokens=False)]

    @classmethod
    def image_text(cls, settings: dict, meta: dict) -> str:
        """With `engine`: the sample's own lines (a document's `lines`, else its `transcript`) as the engine's reads
        would follow its image's tokens."""
        if not ocr_settings(settings).engine:
            return ""
        lines = [text for text, _ in meta.get("lines") or ()]
        return engine.reads_text(lines or ([meta["transcript"]] if meta.get("transcript") else []))

    @classmethod
    def read_images(cls, settings: dict, images: list) -> list[str] | None:
        """With `engine`: each image's lines as the engine reads them, to follow its image's tokens."""
        if not ocr_settings(settings).engine:
            return None
        return [engine.reads_text(lines) for lines in engine.read_lines(images)]

    # ------------------------------------------------------------ the model

    def part_of(self, name: str) -> str:
        return "connector" if name == "blank" else "vision_tower"

    def start(self, model) -> None:
        if isinstance(text_stem := model.vision_tower.stem(), stem.TextStem):
            text_stem.load_pretrained()
        if self.options.tokens:  # a blank starts as the mean character, not as a token of its own
            characters = self.token_ids[: len(READING_ALPHABET)]
            self.blank.data = model.get_input_embeddings()(characters).mean(0).detach().float()

    def to_device(self, device: torch.device, compile: bool) -> None:
        """Replay the heads' CTC passes as CUDA graphs (CudaGraphed): eager, their per-step recursions launch about a
        thousand small kernels a step, which cost the host more time than the GPU's whole encoder step."""
        if device.type == "cuda":
            self.ctc_passes = (CudaGraphed(ctc_forward), CudaGraphed(ctc_backward))

    def loss(self, model, features: torch.Tensor, targets: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor | None:
        if "reading_lengths" not in targets:
            return None
        loss = self.reading_loss(model, features, targets["reading_targets"], targets["reading_lengths"])
        if "line_lengths" in targets:
            loss = loss + self.line_loss(model, features, targets["line_targets"], targets["line_lengths"])
        if self.options.upright:
            loss = loss + self.axes_loss(model, pixel_values, targets)
        return loss

    def refine_features(self, model, pixel_values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """With `upright`, outside training: the images whose text the axes head finds off level, resampled level
        (upright.levelled) both ways up and encoded again, each going on as the way up its heads read more surely
        (`legibility`); the others' features as they were."""
        if not self.options.upright or self.training:
            return features
        tilted, axes = upright.off_level(self.axes_head(model.vision_tower.patch_grid(features)))
        if not tilted.any():  # a sync, at inference only: most images' text runs level and costs no second pass
            return features
        axes, n = axes[tilted], int(tilted.sum())
        again = model.vision_tower(upright.levelled(pixel_values[tilted].repeat(2, 1, 1, 1), torch.cat([axes, -axes])))
        legible = self.legibility(model, again).view(2, n)
        chosen = again.view(2, n, *again.shape[1:])[legible.argmax(0), torch.arange(n, device=again.device)]
        return features.index_put((tilted.nonzero().squeeze(1),), chosen.to(features.dtype))

    def legibility(self, model, features: torch.Tensor) -> torch.Tensor:
        """How surely the reading heads read each image: their reads' mean best probability (blanks included), the
        line head's too where there is one. Text the right way up reads surely; upside down, as glyphs never seen."""
        sureness = self.reading_scores(model, features).float().softmax(-1).amax(-1).mean(-1)
        if self.options.lines:
            sureness = sureness + self.line_scores(model, features).float().softmax(-1).amax(-1).mean((1, 2))
        return sureness

    def image_embeddings(self, model, features: torch.Tensor, targets: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        if not self.options.tokens:
            return None
        taught = targets if self.options.teacher_reads and targets and "reading_lengths" in targets else None
        reads = [self.reading_embeddings(model, features, taught)]
        reads += [self.line_embeddings(model, features)] if self.options.lines else []
        return torch.cat(reads, dim=1)

    def answers(self, model, features: torch.Tensor) -> list[str]:
        """The reading head's greedy transcript of each image; with a line head, followed by each row that reads
        something, a line break before each."""
        reads = greedy_transcripts(self.reading_scores(model, features))
        if not self.options.lines:
            return reads
        rows = self.line_scores(model, features)
        return [read + "".join(f"\n{line}" for line in greedy_transcripts(lines) if line) for read, lines in zip(reads, rows)]

    # ------------------------------------------------------------ the heads

    def reading_scores(self, model, features: torch.Tensor) -> torch.Tensor:
        """The reading head's logits, [batch, columns * READS_PER_COLUMN, 1 + len(READING_ALPHABET)], left to right."""
        grid = model.vision_tower.patch_grid(features)
        return self.reading_head(grid).view(len(grid), grid.shape[2] * READS_PER_COLUMN, -1)

    def line_scores(self, model, features: torch.Tensor) -> torch.Tensor:
        """The line head's logits, [batch, rows, columns * LINE_READS_PER_COLUMN, 1 + len(READING_ALPHABET)]."""
        return self.line_head(model.vision_tower.patch_grid(features))

    def reading_loss(self, model, features: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CTC loss of the reading head, as text recognisers train: each column of the patch grid (pooled over its
        rows, see ReadingHead) reads READS_PER_COLUMN characters or blanks, left to right. `targets` [images, width]
        holds each image's class ids (`reading_classes`) padded with 0, `lengths` their counts; images of length -1
        have no transcript (0: one that reads nothing).
        The loss (mean per character) ties each character to its place in the line, which the LLM's answer loss
        alone does not teach an encoder trained from scratch (bench/BENCHMARKS.md)."""
        scores = self.reading_scores(model, features)
        # A no-op for the trainer's targets, already on the device; pinned host tensors go over without waiting.
        targets, lengths = (t.to(scores.device, non_blocking=True) for t in (targets, lengths))
        return ctc_loss(scores.float().log_softmax(-1), targets, lengths, self.ctc_passes)

    def line_loss(self, model, features: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CTC loss of the line head, each row of each image one line (`line_targets`: targets [images, rows, width],
        lengths [images, rows]), averaged over the rows that have a target, as `reading_loss` over images."""
        scores = self.line_scores(model, features).flatten(0, 1)
        targets, lengths = (t.to(scores.device, non_blocking=True).flatten(0, 1) for t in (targets, lengths))
        return ctc_loss(scores.float().log_softmax(-1), targets, lengths, self.ctc_passes)

    def axes_loss(self, model, pixel_values: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """The axes head's cross-entropy on turned copies (upright.turned_copies) of an eighth of the batch's images,
        those with a transcript or lines first (their text runs level, so the copy's axes are the turn's). The head
        learns on what the tower sees for reading, the tower untouched: trained through it, the axes cost the reading
        heads half their reads (bench/BENCHMARKS.md). So the copies pass the tower without gradient, in eval mode
        (the conv stem's BatchNorm keeps the statistics of the images it reads), and eagerly (a second batch shape
        would cost the compiled blocks another graph capture each)."""
        level = targets["reading_lengths"] >= 0
        if "line_lengths" in targets:
            level = level | (targets["line_lengths"] >= 0).any(1)
        level = level.to(pixel_values.device)
        # The first images with level text: a fixed count whatever the batch holds, so the step never syncs.
        chosen = torch.argsort((~level).to(torch.int8), stable=True)[: max(1, len(level) // 8)]
        axes = upright.random_axes(len(chosen), pixel_values.device)
        tower, training = model.vision_tower, model.vision_tower.training
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            try:
                grid = tower.eval().patch_grid(tower(upright.turned_copies(pixel_values[chosen], axes)))
            finally:
                tower.train(training)
        logits = self.axes_head(grid)
        errors = nn.functional.cross_entropy(logits.flatten(0, 1), upright.angle_classes(axes).flatten(), reduction="none").view(-1, 2)
        return (errors.sum(1) * level[chosen]).sum() / level[chosen].sum().clamp(min=1)

    # ------------------------------------------------------------ the reads as LLM input

    def reading_embeddings(self, model, features: torch.Tensor, targets: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The reading head's soft transcript as LLM input, [images, reads, text hidden]: each read's probabilities
        over blank and READING_ALPHABET weigh a learned blank and the LLM's own embedding of each character, so what
        the vision tower reads reaches the LLM as (nearly) the text's tokens, to copy as it copies a prompt. With
        `collapsed`, the token of each read CTC's collapse keeps, packed left (see `packed`), the slots after blank.
        Given `targets` (`teacher_reads`), an image with a transcript hands over the transcript instead, packed alike."""
        probs = self.reading_scores(model, features).float().softmax(-1)
        if self.options.collapsed:  # the best character's token; its probability's gradient passes straight through
            best = probs.argmax(-1)
            probs = nn.functional.one_hot(best, probs.shape[-1]).float() + probs - probs.detach()
            probs = packed(probs, kept_reads(best), probs.shape[1])
        if targets is not None:
            slots = probs.shape[1]
            classes = targets["reading_targets"].to(probs.device)[:, :slots]  # padded with 0, the blank
            classes = nn.functional.pad(classes, (0, slots - classes.shape[1]))
            transcribed = (targets["reading_lengths"].to(probs.device) >= 0)[:, None, None]
            probs = torch.where(transcribed, nn.functional.one_hot(classes, probs.shape[-1]).float(), probs)
        return probs @ self.reading_table(model)[:-1]

    def line_embeddings(self, model, features: torch.Tensor) -> torch.Tensor:
        """The line head's transcript as LLM input, [images, LINE_TOKENS, text hidden]: each row's reads after CTC's
        collapse (a read is kept where its best class is neither the blank nor the read before's), each row that
        keeps one ended by a line break, packed in reading order and cut at LINE_TOKENS; a kept read enters as its
        probabilities over the reading table (as `reading_embeddings`), the slots after the last as the blank. The
        shapes never depend on what was read, so the step needs no sync and graphs."""
        scores = self.line_scores(model, features).float()  # [images, rows, reads, classes]
        images, rows, _, classes = scores.shape
        kept = kept_reads(scores.argmax(-1))
        kept = torch.cat([kept, kept.any(-1, keepdim=True)], dim=2).flatten(1)  # each row's reads, then its line break
        # Slots over the table [blank, characters, line break]: the reads and a break per row.
        line_break = torch.eye(classes + 1, device=scores.device)[-1].expand(images, rows, 1, -1)
        slots = torch.cat([nn.functional.pad(scores.softmax(-1), (0, 1)), line_break], dim=2).flatten(1, 2)
        return packed(slots, kept, LINE_TOKENS) @ self.reading_table(model)

    def reading_table(self, model) -> torch.Tensor:
        """The reads' embeddings, [blank, READING_ALPHABET's characters, line break] x text hidden (float32)."""
        return torch.cat([self.blank[None], model.get_input_embeddings()(self.token_ids)]).float()


def kept_reads(best: torch.Tensor) -> torch.Tensor:
    """Where CTC's collapse keeps a read, given each read's best class [..., reads]: neither the blank nor the read
    before's class."""
    return (best != 0) & (best != nn.functional.pad(best, (1, 0))[..., :-1])


def packed(slots: torch.Tensor, kept: torch.Tensor, width: int) -> torch.Tensor:
    """The `kept` [images, n] of each image's `slots` [images, n, classes] packed left in order into `width` slots, the
    slots after the last a one-hot blank (class 0), those kept past `width` cut. The shapes never depend on what was
    kept, so the step needs no sync and graphs."""
    images, n, classes = slots.shape
    slots = torch.cat([slots, torch.eye(classes, device=slots.device)[0].expand(images, 1, -1)], dim=1)
    place = torch.where(kept, kept.cumsum(1) - 1, width).clamp(max=width)
    source = torch.full((images, width + 1), n, device=slots.device)
    source.scatter_(1, place, torch.arange(n, device=slots.device).expand(images, -1))
    return slots.gather(1, source[:, :width, None].expand(-1, -1, classes))


def character_token_ids(tokenizer) -> list[int]:
    """The token of each READING_ALPHABET character and of the line break, alone; an error if one takes more than
    one token."""
    characters = READING_ALPHABET + "\n"
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in characters]
    if split := [c for c, i in zip(characters, ids) if len(i) != 1]:
        raise ValueError(
            f"The ocr extension's tokens need one token per printable character; this tokenizer splits {split[:5]}: set tokens off."
        )
    return [i[0] for i in ids]


def on_a_line(text: str, lines: list | None) -> bool:
    """Whether `text` is written on one of a document's `lines` ([text, height] pairs), whole words of it, in any case
    (a sign may be written in capitals, its name asked as written)."""
    pattern = re.compile(rf"(?<!\w){re.escape(text)}(?!\w)", re.IGNORECASE)
    return any(pattern.search(line) for line, _ in lines or ())
