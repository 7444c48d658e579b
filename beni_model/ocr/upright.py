"""Text at any angle: a head that tells which way an image's text runs, and the resampling that sets it level.

The reading heads read a patch grid's columns and rows, so text turned past ~35 degrees reads as nothing (the eval's
rotated text scored 0-8% with them). The AxesHead predicts, from the vision tower's patches, the two directions of the
image's text in the model's square input: the line its baseline runs along and the line its letters stand along. Two
directions, not one angle: the processor squashes every image to a square, so text turned in a tall or wide image
arrives turned and sheared, and undoing a turn alone would leave it slanted. At inference an image whose text runs off
level is resampled through the inverse of those axes, both ways up, and the way the reading heads read more surely
goes on (`OcrExtension.refine_features`). The head tells lines, not which end reads first: a line's slant shows in any
patch of it, which way it reads only in its letters' shapes, which the reading heads know best. It learns on turned
copies of a batch's images whose text runs level: each copy the image through a random turn and squash, the targets
that map's axes.

Axes are 2x2 matrices in the image's normalized coordinates (x right, y down, each -1..1): the columns are where the
text frame's x and y axes (its baseline's direction, its letters' downward direction) point in the image.
"""

import math

import torch
from torch import nn

ANGLE_BINS = 36  # of a half turn: 5 degrees each
MAX_SQUASH = 0.4  # log of the widest squash of a copy (1.5x): the processor's squash of a tall or wide image
LEVEL_COSINE = math.cos(math.radians(15))  # text within 15 degrees of level is read as it is: the heads learn such tilts
MIN_CONFIDENCE = 0.5  # the least probability within 10 degrees of a line's best class to go by it
MIN_SINE = 0.3  # axes closer than ~17 degrees to each other are no text frame: left as they are


class AxesHead(nn.Module):
    """The text's axes from the patch grid [batch, rows, columns, dim]: an attention pool over every patch (a learned
    score per patch, softmax over the image, so the text's patches can outweigh the background's), then a small MLP to
    each line's angle class (its angle modulo a half turn), [batch, 2 (the baseline's, the letters'), ANGLE_BINS]
    logits."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.pool = nn.Parameter(torch.zeros(hidden_size))
        self.predict = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 2 * ANGLE_BINS))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        patches = grid.flatten(1, 2)
        weights = (patches @ self.pool.to(grid.dtype)).softmax(1)
        return self.predict((weights.unsqueeze(-1) * patches).sum(1)).float().view(-1, 2, ANGLE_BINS)


def angle_classes(axes: torch.Tensor) -> torch.Tensor:
    """Each direction's line's angle class [n, 2] of axes [n, 2, 2] (columns the directions)."""
    angles = torch.atan2(axes[:, 1], axes[:, 0])  # [n, 2]
    return (angles / math.pi * ANGLE_BINS).round().long() % ANGLE_BINS


def predicted_axes(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(axes [n, 2, 2], confidence [n, 2]) from AxesHead's logits: each line's angle the probability-weighted mean of
    the angles within two classes of its best one (averaged as doubled angles, so a half turn's two ends meet), its
    confidence their probability; the letters' direction the one that makes a frame of the baseline's handedness,
    so the axes turn text but never mirror it. Which way the baseline reads is left to the caller: these or their
    negation."""
    probs = logits.float().softmax(-1)
    window = torch.arange(-2, 3, device=logits.device)
    near = (probs.argmax(-1, keepdim=True) + window) % ANGLE_BINS  # [n, 2, 5]
    weights = probs.gather(-1, near)
    doubled = near * (2 * math.pi / ANGLE_BINS)
    angles = torch.atan2((weights * doubled.sin()).sum(-1), (weights * doubled.cos()).sum(-1)) / 2  # [n, 2]
    axes = torch.stack([angles.cos(), angles.sin()], 1)  # [n, 2 (x, y), 2 (baseline, letters)]
    flip = torch.where(determinant(axes) < 0, -1.0, 1.0)
    return torch.stack([axes[:, :, 0], axes[:, :, 1] * flip[:, None]], 2), weights.sum(-1)


def random_axes(n: int, device: torch.device) -> torch.Tensor:
    """[n, 2, 2] axes of a turn by any angle then a squash along x or y of up to exp(MAX_SQUASH), as the processor
    squashes a turned image that was tall or wide; columns normalized."""
    angle = (torch.rand(n, device=device) * 2 - 1) * math.pi
    squash = (torch.rand(n, device=device) * 2 - 1) * MAX_SQUASH
    cos, sin = angle.cos(), angle.sin()
    turn = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    axes = torch.diag_embed(torch.stack([squash.exp(), (-squash).exp()], -1)) @ turn
    return axes / axes.norm(dim=1, keepdim=True)


def turned_copies(pixels: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """`pixels` [n, 3, H, W] seen through `axes`: level text becomes text along them. Each copy is enlarged until the
    frame holds no pixel from outside the image, so no filled corner's edge gives the turn away."""
    return resampled(pixels, inverse(axes) / reach(axes)[:, None, None])


def levelled(pixels: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """`pixels` whose text runs along `axes`, resampled so it runs level; shrunk until the whole image stays in the
    frame, the edges' pixels carried out into the corners."""
    return resampled(pixels, axes * reach(axes)[:, None, None])


def reach(axes: torch.Tensor) -> torch.Tensor:
    """[n]: how far outside the image (in its -1..1 coordinates) the frame's corners land when taken back through
    `axes`: the scale that keeps a turned copy inside the image, or the whole image inside a levelled frame. A corner
    (+-1, +-1) lands at each coordinate at most the sum of that row's magnitudes, and one corner reaches it."""
    return inverse(axes).abs().sum(2).amax(1)


def determinant(axes: torch.Tensor) -> torch.Tensor:
    """[n] determinants of [n, 2, 2] matrices, in closed form."""
    return axes[:, 0, 0] * axes[:, 1, 1] - axes[:, 0, 1] * axes[:, 1, 0]


def inverse(axes: torch.Tensor) -> torch.Tensor:
    """[n, 2, 2] inverses in closed form: torch.linalg.inv waits for the GPU to check for singular matrices, a stall
    in every training step (the axes here are unit columns at least ~17 degrees apart, never singular)."""
    adjugate = torch.stack([torch.stack([axes[:, 1, 1], -axes[:, 0, 1]], -1), torch.stack([-axes[:, 1, 0], axes[:, 0, 0]], -1)], -2)
    return adjugate / determinant(axes)[:, None, None]


def resampled(pixels: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """Each output pixel at normalized p taken from the input at `linear` @ p (bilinear, the border carried out)."""
    theta = nn.functional.pad(linear.float(), (0, 1))
    grid = nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
    return nn.functional.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(pixels.dtype)


def off_level(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(which images to level, their axes) from AxesHead's logits: those whose text runs or stands more than 15 degrees
    off level (or off plumb, a half turn either way alike), its baseline predicted with at least MIN_CONFIDENCE. The
    letters stand as predicted where that is as sure and makes a frame with the baseline, else square to it."""
    axes, confidence = predicted_axes(logits)
    square = torch.stack([-axes[:, 1, 0], axes[:, 0, 0]], 1)  # the baseline turned a quarter, y down
    framed = (confidence[:, 1] >= MIN_CONFIDENCE) & (determinant(axes).abs() >= MIN_SINE)
    axes = torch.stack([axes[:, :, 0], torch.where(framed[:, None], axes[:, :, 1], square)], 2)
    tilted = (axes[:, 0, 0].abs() < LEVEL_COSINE) | (axes[:, 1, 1].abs() < LEVEL_COSINE)
    return (confidence[:, 0] >= MIN_CONFIDENCE) & tilted, axes
