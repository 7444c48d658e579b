"""Photos of the corpus's images: what a phone camera does to a page, a label or a sign, drawn for a share of the
corpus's samples (CorpusSettings.photos) so the reader learns text through perspective, blur, uneven light, sensor
noise and heavy compression, not only as drawn: such effects, not fonts, are what make the unseen-renderer set hard
even for a reader of any font (bench/BENCHMARKS.md), and the corpus drew none of them.

Its own models of each effect, not the unseen renderer's camera (unseen_eval.py), which must share nothing visual
with training: a keystone rather than free corners, a light field of a few random control points and a cast shadow
rather than one spot, blur along any angle, noise in colour, a lost resolution. The keystone keeps the top and bottom
edges horizontal, so every text line stays level and its height maps to one new height: the documents' `lines`
targets stay exact.
"""

import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def keystone(size: tuple[int, int], rng: random.Random, strength: float) -> np.ndarray:
    """The 3 x 3 homography taking the image's corners to a quad inside it whose top and bottom edges stay level: one
    edge narrower than the other by up to `strength` of the width a side (the camera tilted up or down), the quad a
    little off centre and short of the frame."""
    w, h = size
    narrow, skew = rng.uniform(0.02, strength), rng.uniform(-0.5, 0.5)  # the narrow edge off centre: the camera also turned aside
    edges = [(narrow * (1 + skew), narrow * (1 - skew)), (rng.uniform(0, strength / 4), rng.uniform(0, strength / 4))]
    (top_left, top_right), (bottom_left, bottom_right) = edges if rng.random() < 0.5 else edges[::-1]
    y0, y1 = rng.uniform(0, strength / 2) * h, h - rng.uniform(0, strength / 2) * h
    quad = [(top_left * w, y0), ((1 - top_right) * w, y0), ((1 - bottom_right) * w, y1), (bottom_left * w, y1)]
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    # Each correspondence gives two rows of the linear system in H's first eight entries (H[2, 2] = 1).
    system = []
    for (x, y), (u, v) in zip(corners, quad):
        system += [[x, y, 1, 0, 0, 0, -u * x, -u * y, u], [0, 0, 0, x, y, 1, -v * x, -v * y, v]]
    system = np.array(system, float)
    return np.append(np.linalg.solve(system[:, :8], system[:, 8]), 1).reshape(3, 3)


def warp(image: Image.Image, forward: np.ndarray, surface: tuple[int, int, int]) -> Image.Image:
    """`image` as `forward` (input to output pixels) places it, on `surface` where the quad leaves the frame empty."""
    inverse = np.linalg.inv(forward)
    inverse /= inverse[2, 2]
    return image.transform(
        image.size, Image.Transform.PERSPECTIVE, tuple(inverse.flatten()[:8]), Image.Resampling.BILINEAR, fillcolor=surface
    )


def level_height(forward: np.ndarray, width: int, y: float) -> float:
    """Where `forward` takes height `y`: the same for every x, as the keystone keeps horizontal lines level."""
    u, v, z = forward @ np.array([width / 2, y, 1.0])
    return v / z


def light(size: tuple[int, int], rng: random.Random) -> np.ndarray:
    """A gain per pixel [h, w, 1]: brightness varying smoothly between a few random control points, and sometimes the
    soft-edged shadow of something between the lamp and the page."""
    w, h = size
    points = rng.randint(2, 4)
    grid = np.array([[rng.uniform(0.6, 1.1) for _ in range(points)] for _ in range(points)], np.float32)
    gain = np.asarray(Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC), np.float32)
    if rng.random() < 0.3:
        shadow = Image.new("L", size, 255)
        x0, x1 = rng.uniform(-0.2, 1.2) * w, rng.uniform(-0.2, 1.2) * w
        ImageDraw.Draw(shadow).polygon(
            [(x0, -h), (x1, 2 * h), (2 * w if x1 > x0 else -w, 2 * h)], fill=round(255 * rng.uniform(0.55, 0.85))
        )
        shadow = shadow.filter(ImageFilter.GaussianBlur(rng.uniform(2, 12)))
        gain = gain * np.asarray(shadow, np.float32) / 255
    return gain.clip(0.3, 1.2)[..., None]


def motion_kernel(rng: random.Random) -> ImageFilter.Kernel:
    """A 5 x 5 line of 3 to 5 pixels at any angle: the camera moved while the shutter was open."""
    angle, length = rng.uniform(0, np.pi), rng.uniform(2, 4)
    line = Image.new("L", (5, 5))
    dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
    ImageDraw.Draw(line).line([(2 - dx, 2 - dy), (2 + dx, 2 + dy)], fill=255)
    weights = np.asarray(line, np.float32).flatten()
    return ImageFilter.Kernel((5, 5), (weights / weights.sum()).tolist(), 1)


def photograph(image: Image.Image, rng: random.Random, strength: float = 0.1) -> tuple[Image.Image, np.ndarray]:
    """`image` as a phone camera takes it, and the homography (input to output pixels) that moved its content."""
    w, h = image.size
    forward = keystone(image.size, rng, strength)
    surface = tuple(rng.randint(20, 200) for _ in range(3))
    image = warp(image, forward, surface)
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)) if rng.random() < 0.6 else motion_kernel(rng))
    if rng.random() < 0.3:  # a small sensor, or a photo taken from afar: resolution lost, then scaled back
        scale = rng.uniform(0.45, 0.8)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR).resize(
            (w, h), Image.Resampling.BILINEAR
        )
    cast = np.array([rng.uniform(0.85, 1.1) for _ in range(3)], np.float32)  # white balance
    pixels = np.asarray(image, np.float32) * light(image.size, rng) * cast
    if rng.random() < 0.7:
        noise = np.random.default_rng(rng.getrandbits(64))
        sigma = rng.uniform(2, 10)
        pixels += sigma * noise.standard_normal((h, w, 1), np.float32) + sigma / 2 * noise.standard_normal((h, w, 3), np.float32)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=rng.randint(20, 80))
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB"), forward


def photographed_lines(lines: list[tuple[str, float]], forward: np.ndarray, size: tuple[int, int]) -> list[tuple[str, float]]:
    """A document's `lines` (text, centre height as a fraction of the image's) where `photograph` moved them."""
    w, h = size
    return [(text, round(float(level_height(forward, w, y * h)) / h, 4)) for text, y in lines]
