import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from beni_pipeline.prep import photo, synthetic

BARS = (60, 150, 240)  # heights of three dark lines across a white page


def dark_centre(column: np.ndarray, near: float, within: int = 8) -> float:
    """The ink-weighted centre of the dark pixels of `column` within `within` rows of `near`."""
    low, high = max(0, round(near) - within), min(len(column), round(near) + within + 1)
    ink = 255 - column[low:high].astype(float)
    return low + (ink * np.arange(high - low)).sum() / ink.sum()


def test_the_keystone_keeps_lines_level_and_moves_them_to_the_heights_it_reports():
    page = Image.new("L", (400, 300), 255)
    for y in BARS:
        ImageDraw.Draw(page).rectangle((0, y - 1, 399, y + 1), fill=0)
    for seed in range(8):
        forward = photo.keystone(page.size, random.Random(seed), 0.15)
        pixels = np.asarray(photo.warp(page, forward, 255))
        for y in BARS:
            predicted = photo.level_height(forward, page.width, y)
            # Across the quad's middle half, each bar lies at one height: where level_height says.
            centres = [dark_centre(pixels[:, x], predicted) for x in range(100, 300, 25)]
            assert max(abs(c - predicted) for c in centres) < 0.75, (seed, y, predicted, centres)
        moved = photo.photographed_lines([(str(y), y / page.height) for y in BARS], forward, page.size)
        assert [text for text, _ in moved] == [str(y) for y in BARS]
        assert [f * page.height for _, f in moved] == pytest.approx([photo.level_height(forward, page.width, y) for y in BARS], abs=0.05)


def test_the_keystone_keeps_the_page_inside_the_frame():
    page = Image.new("L", (320, 240), 255)
    for seed in range(20):
        forward = photo.keystone(page.size, random.Random(seed), 0.1)
        pixels = np.asarray(photo.warp(page, forward, 0))
        # The page shrinks into the frame: the surface shows at some edge, and no page pixel is lost past one.
        assert (pixels == 0).any()
        corners = forward @ np.array([[0, 320, 320, 0], [0, 0, 240, 240], [1, 1, 1, 1]])
        x, y = corners[:2] / corners[2]
        assert (x >= -1e-6).all() and (x <= 320 + 1e-6).all() and (y >= -1e-6).all() and (y <= 240 + 1e-6).all()


def test_photos_change_only_the_photographed_samples_and_keep_every_text():
    kinds = {"word": 1, "memo": 1, "digits": 1}
    drawn = [synthetic.make_sample(4, i, kinds) for i in range(24)]
    shot = [synthetic.make_sample(4, i, kinds, photos=0.5) for i in range(24)]
    assert [(s.kind, s.qa, s.transcript) for s in drawn] == [(s.kind, s.qa, s.transcript) for s in shot]
    assert [s.image.size for s in drawn] == [s.image.size for s in shot]
    changed = [a.image.tobytes() != b.image.tobytes() for a, b in zip(drawn, shot)]
    assert 4 <= sum(changed) <= 20  # about half
    for a, b, moved in zip(drawn, shot, changed):
        if a.lines:
            assert [t for t, _ in a.lines] == [t for t, _ in b.lines] and (a.lines != b.lines) == moved
    again = [synthetic.make_sample(4, i, kinds, photos=0.5) for i in range(24)]
    assert [s.image.tobytes() for s in again] == [s.image.tobytes() for s in shot]  # a pure function of seed and index
    assert all(
        a.image.tobytes() != b.image.tobytes() for a, b in zip(drawn, [synthetic.make_sample(4, i, kinds, photos=1.0) for i in range(24)])
    )
