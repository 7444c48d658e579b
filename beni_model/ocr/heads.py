"""The reading heads on the vision tower's patch grid, their alphabet, targets and greedy decoding."""

import string

import torch
from torch import nn

READING_ALPHABET = string.printable[:95]  # digits, letters, punctuation, space: what the reading head emits
READS_PER_COLUMN = 2  # a column of 16 px patches may hold more than one narrow glyph
LINE_READS_PER_COLUMN = 3  # documents' text is smaller: a 16 px column may hold three glyphs of a line
LINE_TOKENS = 192  # LLM positions per image for the line head's collapsed transcript (a receipt's ~200 characters)


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


def greedy_transcripts(scores: torch.Tensor) -> list[str]:
    """CTC's greedy decoding of reading scores [batch, reads, classes]: each read's best class, repeats merged,
    blanks dropped."""
    return [
        "".join(READING_ALPHABET[k - 1] for i, k in enumerate(row) if k and (i == 0 or k != row[i - 1]))
        for row in scores.argmax(-1).tolist()
    ]


def reading_classes(transcript: str | None) -> list[int] | None:
    """The reading head's class ids for a transcript (0 is CTC's blank); None where there is none or a character
    lies outside READING_ALPHABET."""
    if transcript is None or any(c not in READING_ALPHABET for c in transcript):
        return None
    return [1 + READING_ALPHABET.index(c) for c in transcript]


def reading_targets(transcripts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """`OcrExtension`'s reading targets for a batch's transcripts (None: an image without one, "": one that
    reads nothing): every image's class ids padded with 0, [images, longest], and their counts (-1 where None)."""
    classes = [reading_classes(t) for t in transcripts]
    width = max((len(ids) for ids in classes if ids), default=0)
    rows = [(ids or []) + [0] * (width - len(ids or [])) for ids in classes]
    targets = torch.tensor(rows, dtype=torch.long).view(len(classes), width)  # one copy, not one per row
    return targets, torch.tensor([-1 if ids is None else len(ids) for ids in classes], dtype=torch.long)


def line_targets(documents: list[list | None], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`OcrExtension`'s line targets for a batch's images from their `lines` ([text, centre as a fraction of the
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
