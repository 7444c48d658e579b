"""The vision tower: any transformers image encoder that maps pixel_values to hidden states."""

import inspect
import math
import warnings

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from beni_model.config import LINE_READS_PER_COLUMN, READING_ALPHABET, READS_PER_COLUMN, BeniConfig


class ConvStem(nn.Sequential):
    """A patch embedding that learns from scratch in few steps: per halving of the resolution a 3x3 conv,
    BatchNorm, ReLU and a 2x max-pool (channels 32, 64, ...), then a 1x1 conv to the encoder's width. A ViT's
    linear 16 px patchify sees a glyph moved by a few pixels as a new input; measured on one printed character
    per image (36 classes, 150 steps of 32 on a CPU), a 1-layer SigLIP ViT reached 12% held-out accuracy with
    its own patchify and 68% with this stem."""

    def __init__(self, patch_size: int, hidden_size: int):
        channels = stem_channels(patch_size)
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        super().__init__(*layers, nn.Conv2d(channels[-1], hidden_size, 1))

    @property
    def weight(self) -> torch.Tensor:  # encoders read the patch embedding's dtype from its weight
        return self[-1].weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # its own code: torch.compile skips nn.Sequential's
        return super().forward(pixels)


def stem_channels(patch_size: int) -> list[int]:
    return [3] + [32 * 2**i for i in range(patch_size.bit_length() - 1)]


def conv_stem_flops(patch_size: int, hidden_size: int, image_size: int) -> float:
    """A ConvStem's forward FLOPs for one image (2 per multiply-add)."""
    channels = stem_channels(patch_size)
    convs = sum(2 * 9 * c_in * c_out * (image_size >> i) ** 2 for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])))
    return convs + 2 * channels[-1] * hidden_size * (image_size // patch_size) ** 2


def vision_encoder_from_config(vision_config: PretrainedConfig, stem: str | None = None) -> PreTrainedModel:
    """A randomly initialised encoder; `stem="conv"` swaps its linear patchify for a `ConvStem`."""
    encoder = AutoModel.from_config(vision_config)
    if stem == "conv":
        embeddings = getattr(encoder, "embeddings", None) or getattr(getattr(encoder, "vision_model", None), "embeddings", None)
        if not isinstance(getattr(embeddings, "patch_embedding", None), nn.Conv2d):
            raise ValueError(f"vision_stem='conv' replaces a CLIP/SigLIP-style patch_embedding, which {type(encoder).__name__} lacks.")
        embeddings.patch_embedding = ConvStem(vision_config.patch_size, vision_config.hidden_size)
    return encoder


def vision_encoder_from_pretrained(vision_model: str, vision_config: PretrainedConfig, **kwargs) -> PreTrainedModel:
    # The class comes from the (vision) config, so a full CLIP/SigLIP checkpoint loads as its vision model only.
    encoder_class = AutoModel._model_mapping[type(vision_config)]
    return encoder_class.from_pretrained(vision_model, config=vision_config, **kwargs)


class ReadingHead(nn.Module):
    """Reads each column of the patch grid [batch, rows, columns, dim] as READS_PER_COLUMN characters or blanks:
    an attention pool down the column (a learned score per patch, softmax over the rows) picks the rows the text
    is on, then a linear layer classifies. The scores start at zero, so the pool starts as the column mean."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.pool = nn.Parameter(torch.zeros(hidden_size))
        self.classify = nn.Linear(hidden_size, READS_PER_COLUMN * (1 + len(READING_ALPHABET)))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        weights = (grid @ self.pool.to(grid.dtype)).softmax(1)
        return self.classify((weights.unsqueeze(-1) * grid).sum(1))


class LineReadingHead(nn.Module):
    """Reads each row of the patch grid [batch, rows, columns, dim] as a text line, LINE_READS_PER_COLUMN characters
    or blanks per column: a row's read at a column pools that patch and the ones above and below it (a learned score
    per patch plus one per offset, softmax over the three), so a line across two rows or drifting with a tilt stays
    in reach; then a linear layer classifies. The scores start at zero, so the pool starts as the mean."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.pool = nn.Parameter(torch.zeros(hidden_size))
        self.offset = nn.Parameter(torch.zeros(3, 1))
        self.classify = nn.Linear(hidden_size, LINE_READS_PER_COLUMN * (1 + len(READING_ALPHABET)))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        batch, rows, columns, _ = grid.shape
        padded = nn.functional.pad(grid, (0, 0, 0, 0, 1, 1))
        window = torch.stack([padded[:, i : i + rows] for i in range(3)], dim=2)  # [batch, rows, 3, columns, dim]
        weights = (window @ self.pool.to(grid.dtype) + self.offset.to(grid.dtype)).softmax(2)
        return self.classify((weights.unsqueeze(-1) * window).sum(2)).view(batch, rows, columns * LINE_READS_PER_COLUMN, -1)


class VisionTower(nn.Module):
    """Runs the encoder, picks `vision_feature_layer`, drops the CLS/register tokens unless `keep_cls`."""

    def __init__(self, config: BeniConfig, encoder: PreTrainedModel):
        super().__init__()
        self.encoder = encoder
        self.feature_layer = config.vision_feature_layer
        self.keep_cls = config.keep_cls
        self.patch_size = config.patch_size
        self.native_size = config.vision_config.image_size
        self.takes_interpolate_flag = "interpolate_pos_encoding" in inspect.signature(encoder.forward).parameters
        self.num_prefix_tokens = config.num_prefix_tokens if config.keep_cls else 0
        if config.reading_head:
            self.reading_head = ReadingHead(config.vision_config.hidden_size)
        if config.reading_lines:
            self.line_head = LineReadingHead(config.vision_config.hidden_size)
        self.ctc_passes = (ctc_forward, ctc_backward)  # graph_ctc swaps in CUDA graphs of them

    def compile_stem(self) -> None:
        """torch.compile a conv stem, as the trainer compiles the transformer blocks: eager, its BatchNorms, ReLUs and
        pools were 18 of the encoder step's 46 GPU ms, compiled the step's GPU time is 38 ms (bench/BENCHMARKS.md)."""
        stem = getattr(getattr(self.encoder, "embeddings", None), "patch_embedding", None)
        if isinstance(stem, ConvStem):
            stem.compile()

    def graph_ctc(self) -> None:
        """Replay the heads' CTC passes as CUDA graphs (CudaGraphed): eager, their per-step recursions launch about a
        thousand small kernels a step, which cost the host more time than the GPU's whole encoder step."""
        self.ctc_passes = (CudaGraphed(ctc_forward), CudaGraphed(ctc_backward))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        kwargs = {}
        if (height, width) != (self.native_size, self.native_size) and self.takes_interpolate_flag:
            kwargs["interpolate_pos_encoding"] = True  # encoders without the flag (DINOv2) always interpolate
        dtype = next(self.encoder.parameters()).dtype
        outputs = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True, **kwargs)
        features = outputs.hidden_states[self.feature_layer]
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        if self.keep_cls:
            return features
        return features[:, features.shape[1] - num_patches :]

    def patch_grid(self, features: torch.Tensor) -> torch.Tensor:
        patches = features[:, self.num_prefix_tokens :]
        batch, n, dim = patches.shape
        grid = math.isqrt(n)
        return patches.reshape(batch, grid, grid, dim)

    def reading_scores(self, features: torch.Tensor) -> torch.Tensor:
        """The reading head's logits, [batch, columns * READS_PER_COLUMN, 1 + len(READING_ALPHABET)], left to right."""
        grid = self.patch_grid(features)
        return self.reading_head(grid).view(len(grid), grid.shape[2] * READS_PER_COLUMN, -1)

    def line_scores(self, features: torch.Tensor) -> torch.Tensor:
        """The line head's logits, [batch, rows, columns * LINE_READS_PER_COLUMN, 1 + len(READING_ALPHABET)]."""
        return self.line_head(self.patch_grid(features))

    def read(self, pixel_values: torch.Tensor) -> list[str]:
        """The reading head's greedy transcript of each image; with a line head, followed by each row that reads
        something, a line break before each."""
        features = self(pixel_values)
        reads = greedy_transcripts(self.reading_scores(features))
        if not hasattr(self, "line_head"):
            return reads
        return [read + "".join(f"\n{line}" for line in greedy_transcripts(rows) if line) for read, rows in zip(reads, self.line_scores(features))]

    def line_loss(self, features: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CTC loss of the line head, each row of each image one line (`line_targets`: targets [images, rows, width],
        lengths [images, rows]), averaged over the rows that have a target, as `reading_loss` over images."""
        scores = self.line_scores(features).flatten(0, 1)
        targets, lengths = (t.to(scores.device, non_blocking=True).flatten(0, 1) for t in (targets, lengths))
        return ctc_loss(scores.float().log_softmax(-1), targets, lengths, self.ctc_passes)

    def reading_loss(self, features: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CTC loss of the reading head, as text recognisers train: each column of the patch grid (pooled over its
        rows, see ReadingHead) reads READS_PER_COLUMN characters or blanks, left to right. `targets` [images, width]
        holds each image's class ids (`reading_classes`) padded with 0, `lengths` their counts; images of length -1
        have no transcript (0: one that reads nothing).
        The loss (mean per character) ties each character to its place in the line, which the LLM's answer loss
        alone does not teach an encoder trained from scratch (bench/BENCHMARKS.md)."""
        scores = self.reading_scores(features)
        # A no-op for the trainer's targets, already on the device; pinned host tensors go over without waiting.
        targets, lengths = (t.to(scores.device, non_blocking=True) for t in (targets, lengths))
        return ctc_loss(scores.float().log_softmax(-1), targets, lengths, self.ctc_passes)


NEVER = -1e30  # the log-probability of an impossible path: finite, so no gradient becomes NaN


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, passes: tuple | None = None) -> torch.Tensor:
    """CTC's loss per character (class 0 is the blank), averaged over the lines that have a transcript and fit in
    the steps; log_probs [batch, steps, classes], targets [batch, width] padded, lengths [batch] (-1: no transcript,
    so no loss; 0: an empty one, all blanks, its loss taken per step). The values of
    `nn.functional.ctc_loss(..., zero_infinity=True)` on those lines (and its gradients at the logits of a
    log_softmax), computed on the device without waiting on it (PyTorch's CUDA kernel copies offsets from host
    memory with a blocking copy in forward and in backward) and with a hand-written backward: autograd through the
    per-step recursion cost the host more than the step's GPU work (bench/BENCHMARKS.md). `passes`: the forward and
    backward functions (default ctc_forward, ctc_backward; VisionTower.graph_ctc replays them as CUDA graphs). The
    targets are padded or cut to one width, the steps, so the passes see one shape per head: a line longer than the
    steps cannot be aligned, and is left out either way."""
    steps = log_probs.shape[1]
    targets = nn.functional.pad(targets, (0, steps - targets.shape[1]))  # a negative pad cuts
    lengths = lengths.masked_fill(lengths > steps, -1)
    return _CTC.apply(log_probs, targets, lengths, passes or (ctc_forward, ctc_backward))


def ctc_forward(log_probs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CTC's loss, then what ctc_backward takes from it."""
    batch, steps, _ = log_probs.shape
    labels = targets.new_zeros(batch, 2 * targets.shape[1] + 1)  # blank, c1, blank, c2, ..., blank
    labels[:, 1::2] = targets
    emit = log_probs.gather(2, labels.unsqueeze(1).expand(-1, steps, -1)).transpose(0, 1)  # [steps, batch, width]
    may_skip = torch.zeros_like(labels, dtype=torch.bool)  # from the character two back, past the blank between
    may_skip[:, 2:] = (labels[:, 2:] != 0) & (labels[:, 2:] != labels[:, :-2])
    skip_cost = torch.where(may_skip, 0.0, NEVER)
    # Log-probability of the paths up to step t that end in each position, after two positions no path reaches
    # (so the shifts are views): four kernels a step.
    alpha = emit.new_full((steps, batch, emit.shape[2] + 2), NEVER)
    alpha[0, :, 2:4] = emit[0, :, :2]
    for t in range(1, steps):
        prev = alpha[t - 1]
        torch.add(torch.logaddexp(torch.logaddexp(prev[:, 2:], prev[:, 1:-1]), prev[:, :-2] + skip_cost), emit[t], out=alpha[t, :, 2:])
    alpha = alpha[:, :, 2:]
    # Paths end on the last character or the blank after it; an empty transcript's on the one blank.
    ends = torch.stack([2 * lengths, 2 * lengths - 1], 1).clamp(min=0)
    at_ends = alpha[-1].gather(1, ends)
    at_ends[:, 1].masked_fill_(lengths <= 0, NEVER)
    likelihood = at_ends.logsumexp(1)
    counted = (lengths >= 0) & (likelihood > NEVER / 2)
    weight = counted / torch.where(lengths > 0, lengths, steps) / counted.sum().clamp(min=1)
    return -(likelihood * weight).sum(), emit, alpha, labels, skip_cost, ends, likelihood, weight


def ctc_backward(emit, alpha, labels, skip_cost, ends, likelihood, weight, grad_output: torch.Tensor, classes: int) -> torch.Tensor:
    """The loss's gradient at log_probs [batch, steps, classes], from what ctc_forward returned."""
    steps, batch, width = emit.shape
    # Log-probability of the paths from each position at step t to the end, before two positions none leaves from.
    beta = emit.new_full((steps, batch, width + 2), NEVER)
    beta[-1, :, :width].scatter_(1, ends, emit[-1].gather(1, ends))
    skip_from = nn.functional.pad(skip_cost, (0, 2), value=NEVER)[:, 2:]  # whether position s + 2 may be reached from s
    for t in range(steps - 2, -1, -1):
        after = beta[t + 1]
        torch.add(torch.logaddexp(torch.logaddexp(after[:, :-2], after[:, 1:-1]), after[:, 2:] + skip_from), emit[t], out=beta[t, :, :width])
    beta = beta[:, :, :width]
    posterior = (alpha + beta - emit - likelihood[None, :, None]).exp().transpose(0, 1)  # [batch, steps, width]
    scale = -(grad_output * weight)[:, None, None]
    grad = emit.new_zeros(batch, steps, classes)
    return grad.scatter_add_(2, labels.unsqueeze(1).expand(-1, steps, -1), posterior * scale)


class CudaGraphed:
    """`fn` (tensors and constants in, a tensor or a tuple of them out, no waiting on the device) replayed as one CUDA
    graph per shape of its inputs: captured on first use after a warm-up run; each call copies its inputs into the
    graph's buffers, launches the graph once and hands back copies of its outputs."""

    def __init__(self, fn):
        self.fn, self.graphs = fn, {}

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in self.graphs:
            try:
                self.graphs[key] = self.capture(args)
            except RuntimeError as error:  # a capture CUDA refuses costs launches, not the run
                warnings.warn(f"{self.fn.__name__} runs eagerly at {key}: its CUDA graph capture failed: {error}", stacklevel=2)
                self.graphs[key] = None
        if self.graphs[key] is None:
            return self.fn(*args)
        graph, inputs, outputs = self.graphs[key]
        for buffer, arg in zip(inputs, args):
            if isinstance(arg, torch.Tensor):
                buffer.copy_(arg)
        graph.replay()
        return outputs.clone() if isinstance(outputs, torch.Tensor) else tuple(o.clone() for o in outputs)

    def capture(self, args: tuple) -> tuple:
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may allocate while the backward pass captures in autograd's
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.fn(*inputs)
        return graph, inputs, outputs


class _CTC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs, targets, lengths, passes):
        loss, *saved = passes[0](log_probs, targets, lengths)
        ctx.save_for_backward(*saved)
        ctx.backward_pass, ctx.classes = passes[1], log_probs.shape[2]
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.backward_pass(*ctx.saved_tensors, grad_output, ctx.classes), None, None, None


def greedy_transcripts(scores: torch.Tensor) -> list[str]:
    """CTC's greedy decoding of reading scores [batch, reads, classes]: each read's best class, repeats merged,
    blanks dropped."""
    return ["".join(READING_ALPHABET[k - 1] for i, k in enumerate(row) if k and (i == 0 or k != row[i - 1])) for row in scores.argmax(-1).tolist()]


def reading_classes(transcript: str | None) -> list[int] | None:
    """The reading head's class ids for a transcript (0 is CTC's blank); None where there is none or a character
    lies outside READING_ALPHABET."""
    if transcript is None or any(c not in READING_ALPHABET for c in transcript):
        return None
    return [1 + READING_ALPHABET.index(c) for c in transcript]


def reading_targets(transcripts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """`VisionTower.reading_loss`'s targets for a batch's transcripts (None: an image without one, "": one that
    reads nothing): every image's class ids padded with 0, [images, longest], and their counts (-1 where None)."""
    classes = [reading_classes(t) for t in transcripts]
    width = max((len(ids) for ids in classes if ids), default=0)
    rows = [(ids or []) + [0] * (width - len(ids or [])) for ids in classes]
    targets = torch.tensor(rows, dtype=torch.long).view(len(classes), width)  # one copy, not one per row
    return targets, torch.tensor([-1 if ids is None else len(ids) for ids in classes], dtype=torch.long)


def line_targets(documents: list[list | None], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`VisionTower.line_loss`'s targets for a batch's images from their `lines` ([text, centre as a fraction of the
    height], as the corpus gives documents'; None: an image without): each row of patches reads the line whose centre
    lies in it, and nothing where none does; an image without lines has no target in any row, nor has a row that two
    lines share. [images, rows, longest] and [images, rows]."""
    transcripts = []
    for lines in documents:
        row_texts = [None if lines is None else ""] * rows
        for text, centre in lines or ():
            row = min(rows - 1, int(centre * rows))
            row_texts[row] = text if row_texts[row] == "" else None
        transcripts += row_texts
    targets, lengths = reading_targets(transcripts)
    return targets.view(len(documents), rows, -1), lengths.view(len(documents), rows)
