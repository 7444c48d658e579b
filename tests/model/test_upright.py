"""Text at any angle (beni_model.ocr.upright): the axes of turned copies, the levelling that undoes them, the axes
head learning them, and a model that encodes an image again once its text is set level."""

import math

import pytest
import torch

from beni_model.chat import load_tokenizer
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.ocr import upright
from beni_model.ocr.heads import reading_targets
from tests.model.conftest import VISION, images


def turn(degrees: float, squash: float = 0.0) -> torch.Tensor:
    """Axes of a turn then a squash (as upright.random_axes draws them), columns normalized."""
    a = math.radians(degrees)
    axes = torch.diag(torch.tensor([math.exp(squash), math.exp(-squash)])) @ torch.tensor(
        [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    )
    return axes / axes.norm(dim=0, keepdim=True)


def bar(size: int, horizontal: bool) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    if horizontal:
        image[..., size // 2 - 1 : size // 2 + 1, size // 4 : 3 * size // 4] = 1
    else:
        image[..., size // 4 : 3 * size // 4, size // 2 - 1 : size // 2 + 1] = 1
    return image


def principal_direction(image: torch.Tensor) -> torch.Tensor:
    """The main axis of an image's bright pixels, in normalized (x, y) coordinates."""
    size = image.shape[-1]
    centres = (torch.arange(size) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    weights = image[0, 0].clamp(min=0).flatten()
    points = torch.stack([x.flatten(), y.flatten()], 1)
    mean = (weights[:, None] * points).sum(0) / weights.sum()
    spread = ((points - mean) * weights[:, None]).T @ (points - mean) / weights.sum()
    return torch.linalg.eigh(spread).eigenvectors[:, -1]


def test_a_turned_copy_runs_along_its_axes_and_levelling_undoes_it():
    for degrees, squash in [(0, 0.3), (35, 0.0), (90, -0.2), (-60, 0.4), (150, 0.1), (-120, -0.35)]:
        axes = turn(degrees, squash)[None]
        for column, horizontal in ((0, True), (1, False)):
            copy = upright.turned_copies(bar(96, horizontal), axes)
            assert abs(principal_direction(copy) @ axes[0, :, column]) > 0.99, (degrees, squash, column)
        # Levelling a copy by its axes gives the image back wherever the copy saw it.
        size = 48
        y, x = torch.meshgrid(*(torch.linspace(-1, 1, size),) * 2, indexing="ij")
        smooth = torch.stack([torch.sin(2 * x + y), torch.cos(3 * y - x), x * y])[None]
        back = upright.levelled(upright.turned_copies(smooth, axes), axes)
        reach = upright.reach(axes)[0]
        centres = (torch.arange(size) + 0.5) / size * 2 - 1
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        seen = (axes[0] @ torch.stack([cx.flatten(), cy.flatten()]) * reach).abs().amax(0).view(size, size) < 0.9
        error = (back - smooth).abs()[0].amax(0)
        assert seen.float().mean() > 0.15 and error[seen].max() < 0.15, (degrees, squash, error[seen].max())


def test_the_closed_forms_match_torch_linalg_and_reach_is_the_farthest_corner():
    axes = upright.random_axes(64, torch.device("cpu")).double()
    torch.testing.assert_close(upright.determinant(axes), torch.linalg.det(axes))
    torch.testing.assert_close(upright.inverse(axes), torch.linalg.inv(axes))
    corners = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [-1.0, 1.0, -1.0, 1.0]], dtype=axes.dtype)
    torch.testing.assert_close(upright.reach(axes), (torch.linalg.inv(axes) @ corners).abs().amax(dim=(1, 2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a wait on the GPU is a CUDA thing")
def test_the_axes_loss_never_waits_for_the_gpu(build):
    """The training step runs ahead of the GPU (its kernels launched as CUDA graphs); a wait in the loss would cost
    the step its lead."""
    model, _ = build(extensions={"ocr": {"upright": True}})
    model.cuda().train()
    targets = {k: v.cuda() for k, v in zip(("reading_targets", "reading_lengths"), reading_targets(["open", None] * 8))}
    pixels = images(16).cuda()
    model.extensions["ocr"].axes_loss(model, pixels, targets)  # first calls may initialize CUDA libraries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model.extensions["ocr"].axes_loss(model, pixels, targets)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.detach().cpu())


def logits_of(axes: torch.Tensor, sure: float = 8.0) -> torch.Tensor:
    """AxesHead logits [n, 2, ANGLE_BINS] peaked at each direction's angle class, by `sure`."""
    return sure * torch.nn.functional.one_hot(upright.angle_classes(axes), upright.ANGLE_BINS).float()


def test_text_is_levelled_only_where_the_head_is_sure_it_runs_off_level():
    frames = torch.stack([turn(0), turn(10), turn(60), turn(-90, 0.3), turn(60), turn(-75, 0.3), turn(-75)])
    logits = logits_of(frames)
    logits[4, 0] /= 8  # an unsure baseline: about 4% on its best angle class
    logits[5, 1] = logits[5, 0]  # the letters standing along the baseline: no text frame
    logits[6, 1] /= 8  # unsure letters
    tilted, axes = upright.off_level(logits)
    assert tilted.tolist() == [False, False, True, True, False, True, True]
    # Letters that are unsure or make no frame stand square to the baseline.
    assert torch.allclose(axes[6], turn(-75), atol=1e-3) and torch.allclose(axes[5, :, 1], torch.stack([-axes[5, 1, 0], axes[5, 0, 0]]))
    # Lines, not which way they read: the axes or their negation, never mirrored.
    assert torch.allclose(axes[2], turn(60), atol=1e-3)
    assert min((axes[3] - sign * turn(-90, 0.3)).abs().max() for sign in (1, -1)) < 1e-3
    assert (torch.linalg.det(axes) > 0).all()
    # The best class's neighbours pull the angle their way (classes of 5 degrees: 12 is 60, 13 is 65).
    pulled = torch.zeros(1, 2, upright.ANGLE_BINS)
    pulled[0, :, 12], pulled[0, 0, 13] = 8.0, 7.0
    assert 60.5 < math.degrees(math.atan2(*upright.predicted_axes(pulled)[0][0, :, 0].flip(0))) < 62.5


def marks(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Images of one level 'line' each: a bar whose left end carries a dot above it and whose right end a tick below,
    so its turn can be told over the whole circle; random place, length and brightness."""
    pictures = torch.full((n, 3, size, size), -1.0)
    for image in pictures:
        length = int(torch.randint(size // 3, size // 2, (1,), generator=generator))
        left = int(torch.randint(size // 8, size - length - size // 8, (1,), generator=generator))
        row = int(torch.randint(size // 3, 2 * size // 3, (1,), generator=generator))
        ink = float(torch.rand(1, generator=generator)) * 0.5 + 0.5
        image[:, row : row + 3, left : left + length] = ink
        image[:, row - 8 : row - 2, left : left + 6] = ink
        image[:, row + 3 : row + 7, left + length - 3 : left + length] = ink
    return pictures


def test_the_axes_head_learns_the_turn_of_copies_and_the_model_levels_what_it_finds_turned(parts, tmp_path):
    vision = {**VISION, "model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "image_size": 64}
    config = BeniConfig(vision_config=vision, text_model=parts["llama"], extensions={"ocr": {"upright": True}})
    torch.manual_seed(0)
    model = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"], config.image_token))
    ocr, generator = model.extensions["ocr"], torch.Generator().manual_seed(0)
    tower = [t.clone() for t in model.vision_tower.state_dict().values()]
    optimizer = torch.optim.AdamW([*model.vision_tower.parameters(), *ocr.parameters()], lr=3e-3)
    # Two images in eight have no transcript: the copies are taken from the others.
    targets = dict(zip(("reading_targets", "reading_lengths"), reading_targets(["x"] * 6 + [None] * 2)))
    losses = []
    for _ in range(700):
        loss = ocr.axes_loss(model, marks(8 * 16, 64, generator), {k: v.repeat(16, *[1] * (v.ndim - 1)) for k, v in targets.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) < sum(losses[:20]) / 1.25, (losses[:5], losses[-5:])
    # The head learned on the tower's view alone: the tower, its buffers too, as it was.
    assert all(torch.equal(a, b) for a, b in zip(tower, model.vision_tower.state_dict().values())) and model.vision_tower.training
    truth = torch.stack([turn(d, s) for d, s in [(0, 0), (5, 0.2), (70, 0), (-80, -0.3), (130, 0.1), (-45, 0.35), (180, 0)]])
    # How well the head tells them apart is the GPU recipe's to measure (bench/BENCHMARKS.md): a random tiny tower's
    # view says little.
    held_out = upright.turned_copies(marks(len(truth), 64, torch.Generator().manual_seed(1)), truth)
    model.eval()
    with torch.no_grad():
        features = model.vision_tower(held_out)
        logits = ocr.axes_head(model.vision_tower.patch_grid(features))
        tilted, axes = upright.off_level(logits)
        # The three within 15 degrees of level (upside down counts as level) are left as they are.
        assert tilted.any() and not (tilted[0] or tilted[1] or tilted[6]), tilted
        # The model goes on with the levelled images' features where the head found the text turned, the way up its
        # reading head reads more surely, and trains as the tower sees it.
        ways = [model.vision_tower(upright.levelled(held_out[tilted], sign * axes[tilted])) for sign in (1, -1)]
        surer = ocr.legibility(model, ways[0]) >= ocr.legibility(model, ways[1])
        refined = model.vision_features(held_out)
        assert torch.allclose(refined[tilted], torch.where(surer[:, None, None], *ways), atol=1e-5)
        assert torch.equal(refined[~tilted], features[~tilted])
        assert torch.equal(model.train().vision_features(held_out), features)
        model.save_pretrained(tmp_path)
        reloaded = BeniForConditionalGeneration.from_pretrained(tmp_path).eval()
        assert torch.allclose(reloaded.vision_features(held_out), refined, atol=1e-5)


def test_the_axes_loss_comes_with_the_reading_loss_and_reaches_the_head(build):
    model, _ = build(extensions={"ocr": {"upright": True}})
    targets = dict(zip(("reading_targets", "reading_lengths"), reading_targets(["open", None] * 8)))
    loss = model.train()(pixel_values=images(16), extension_targets=targets).extension_losses["ocr"]
    loss.backward()
    assert model.extensions["ocr"].axes_head.predict[-1].weight.grad.abs().sum() > 0
    plain, _ = build(extensions={"ocr": {}})
    assert not hasattr(plain.extensions["ocr"], "axes_head")
    assert loss > plain.train()(pixel_values=images(16), extension_targets=targets).extension_losses["ocr"]
