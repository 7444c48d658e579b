"""Training batches from the length-sorted WebDataset shards written by `training_shards`.

Each rank reads its own shards (the shard order is shuffled per epoch from the seed, then dealt out
round-robin); batches are cut from consecutive samples (a shard's last ones completed by the next shard's
first), so lengths inside a batch are close and padding stays small, and an epoch's last batch is topped up
with its first samples, so every batch is full; the batch order is shuffled inside windows of `window` batches.
Every rank reads the modality of micro-step n (image+text or text-only) from the same seeded schedule, so no
rank runs the connector while another skips it.
Images are decoded and resized by the model's processor (BeniProcessor: the encoder's resize and crop) in
DataLoader workers and left uint8; DevicePixels rescales and normalizes them (and augments them, where asked) on the
model's device. Worker w builds micro-steps n with n % workers == w, and the DataLoader hands them back in order.

A stream is a pure function of (seed, rank, world size, position): `DataPosition` is all a checkpoint needs
to resume the exact batch sequence. Streams never end (epochs roll over), so ranks never run out at
different steps.
"""

import io
import json
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from beni_model.chat import IMAGE_MARKER, SampleTooLong, build_example, pack_batch, pad_batch
from beni_model.extensions import extension_class

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_PROMPT = "Describe the image."


@dataclass
class DataPosition:
    step: int = 0  # micro-batches this rank has consumed since training began
    epoch: int = 0
    epoch_start: int = 0  # the micro-step at which `epoch` began on this rank


@dataclass(frozen=True)
class DataSettings:
    shards: str  # folder with index.json and the tars
    batch_size: int  # samples per micro-batch per rank
    image_size: int  # the model's (an image batch without images is [0, 3, image_size, image_size])
    max_length: int | None = 2048  # None: conversations are never cut (the encoder stage, which does not run the LLM)
    text_fraction: float = 0.0  # share of micro-steps that are text-only (needs text-only samples in the shards)
    window: int = 16  # batches shuffled together inside a shard
    pack: bool = False  # concatenate a batch's samples into rows of up to max_length tokens (chat.pack_batch)
    pad_to_multiple_of: int = 1  # rows this many tokens wide: few batch shapes, so few CUDA graph captures
    extensions: dict[str, dict] = field(default_factory=dict)  # the model's (BeniConfig.extensions): their reply_ids hooks
    targets: tuple[str, ...] = ()  # extensions whose targets image batches carry (Extension.collate)
    grid: int = 0  # the image's patch grid side, for the extensions' targets
    seed: int = 0


def shard_paths(shards: str | Path) -> list[Path]:
    root = Path(shards)
    index = root / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} does not exist: materialize training_shards first or point `shards` at its folder.")
    return [root / entry["url"] for entry in json.loads(index.read_text())["shardlist"]]


def step_modality(seed: int, step: int, text_fraction: float) -> str:
    """The same answer on every rank: a function of the seed and the micro-step alone."""
    if text_fraction <= 0:
        return "image"
    return "text" if random.Random(f"{seed}:{step}").random() < text_fraction else "image"


def rank_shards(paths: list[Path], seed: int, epoch: int, rank: int, world_size: int) -> list[Path]:
    if len(paths) < world_size:
        raise ValueError(f"{len(paths)} shards cannot feed {world_size} ranks: write at least one shard per rank (smaller max_samples).")
    order = np.random.default_rng([seed, epoch]).permutation(len(paths))
    return [paths[i] for i in order[rank::world_size]]


def read_samples(path: Path):
    """Raw samples of one tar in stored (length-sorted) order: {"__key__", "json": bytes, "jpg": bytes, ...}."""
    with open(path, "rb") as f:
        yield from group_by_keys({**member, "__url__": str(path)} for member in tar_file_iterator(f))


def sample_modality(sample: dict) -> str:
    return "image" if any(ext in sample for ext in IMAGE_EXTS) else "text"


def epoch_batches(paths: list[Path], settings: DataSettings, epoch: int, rank: int, keep: set[str]):
    """(modality, samples) batches of one epoch over this rank's `paths`, in order: consecutive same-modality samples,
    so lengths inside a batch stay close. A shard's last samples join the next shard's first, and the epoch's last
    batch of each modality is topped up with the epoch's first samples, so every batch is full unless the epoch
    holds fewer samples of that modality than a batch (under cuda_graphs each batch shape costs a capture: seconds).
    The batch order is shuffled within windows of `window` batches."""
    pending, first = {"image": [], "text": []}, {"image": [], "text": []}
    for k, path in enumerate(paths):
        rng, window = np.random.default_rng([settings.seed, epoch, rank, k]), []
        for sample in read_samples(path):
            modality = sample_modality(sample)
            if modality not in keep:
                continue
            pending[modality].append(sample)
            if len(first[modality]) < settings.batch_size:
                first[modality].append(sample)
            if len(pending[modality]) == settings.batch_size:
                window.append((modality, pending[modality]))
                pending[modality] = []
                if len(window) == settings.window:
                    yield from (window[i] for i in rng.permutation(len(window)))
                    window = []
        yield from (window[i] for i in rng.permutation(len(window)))
    yield from ((m, samples + first[m][: settings.batch_size - len(samples)]) for m, samples in pending.items() if samples)


def raw_stream(settings: DataSettings, rank: int, world_size: int, position: DataPosition):
    """(position after the batch, modality, raw samples) forever, from `position` on; images stay encoded."""
    paths = shard_paths(settings.shards)
    keep = {m for m, share in (("image", 1 - settings.text_fraction), ("text", settings.text_fraction)) if share > 0}
    epoch, epoch_start = position.epoch, position.epoch_start
    while True:
        step, fifo, produced = epoch_start, {"image": deque(), "text": deque()}, set()
        for modality, samples in epoch_batches(rank_shards(paths, settings.seed, epoch, rank, world_size), settings, epoch, rank, keep):
            fifo[modality].append(samples)
            produced.add(modality)
            # Serve every micro-step whose modality is now available; the rest wait for more batches.
            while fifo[wanted := step_modality(settings.seed, step, settings.text_fraction)]:
                step += 1
                if step > position.step:
                    yield DataPosition(step, epoch, epoch_start), wanted, fifo[wanted].popleft()
                else:
                    fifo[wanted].popleft()
        if keep - produced:
            raise ValueError(
                f"Rank {rank}'s shards hold no {'/'.join(keep - produced)} samples for text_fraction={settings.text_fraction}: add text-only samples or set text_fraction=0."
            )
        epoch, epoch_start = epoch + 1, step  # leftovers of the other modality are dropped with the epoch


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


# What `augment` can draw anew for each image read: "camera" (colour, light, noise, blur, resolution: `augment`),
# "glyphs" (slant, width, wobble, stroke weight: `reshape_glyphs`).
AUGMENTATIONS = ("camera", "glyphs")


class DevicePixels:
    """Finishes the loader's pixels where the model runs: the loader hands over the image processor's resized images as
    uint8 (a quarter of float32's bytes through the workers' shared memory, the pinned copy and the bus), and the
    device rescales and normalizes them as the processor would, after `augment` where asked."""

    def __init__(self, image_processor, device: torch.device, augment: tuple[str, ...] | list[str] = (), seed: int = 0):
        rescale = image_processor.rescale_factor if getattr(image_processor, "do_rescale", True) else 1.0
        normalize = getattr(image_processor, "do_normalize", True)
        mean = torch.tensor(image_processor.image_mean if normalize else [0.0] * 3, device=device).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std if normalize else [1.0] * 3, device=device).view(1, 3, 1, 1)
        if unknown := set(augment) - set(AUGMENTATIONS):
            raise ValueError(f"Unknown augmentation {sorted(unknown)}: use any of {list(AUGMENTATIONS)}.")
        self.device, self.augment, self.seed = device, tuple(augment), seed
        self.scale, self.shift = rescale / std, -mean / std

    def __call__(self, pixels: torch.Tensor, rank: int = 0, step: int = 0) -> torch.Tensor:
        """`pixels` uint8 [images, 3, H, W] (on the host or the device) as the model's float32 pixel values; augmented
        images are drawn from (seed, rank, step): every epoch sees new ones, and a resumed run the same ones."""
        pixels = pixels.to(self.device, non_blocking=True).float()
        if self.augment and len(pixels):
            draw = random.Random(f"{self.seed}:{rank}:{step}")
            generator = torch.Generator(self.device).manual_seed(draw.getrandbits(63))
            pixels = pixels / 255
            if "glyphs" in self.augment:
                pixels = reshape_glyphs(pixels, generator)
            if "camera" in self.augment:
                pixels = augment(pixels, generator, shrink=draw.uniform(0.4, 0.8))
            pixels = pixels * 255
        return pixels * self.scale + self.shift


def _uniform_draws(n: int, device: torch.device, generator: torch.Generator):
    """uniform(low, high, *shape): one draw of that shape per image, [n, *shape], from `generator`."""

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(n, *shape, device=device).uniform_(low, high, generator=generator)

    return uniform


def reshape_glyphs(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """New glyph shapes for images [n, 3, H, W] in [0, 1], drawn per image, for a reader that must know letters in
    fonts it never saw: a slant, a narrower set, a wobble of a pixel or so on the scale of a letter, heavier or
    lighter strokes. Lines stay on their rows (the reading extensions' targets say which row a line is on) and no
    text leaves the frame: the slant comes with at least as much narrowing, the edges repeat the background."""
    n, device = len(images), images.device
    height, width = images.shape[-2:]

    uniform = _uniform_draws(n, device, generator)

    # Where each output pixel reads the input, in grid_sample's [-1, 1] coordinates: x = narrow * u + slant * v.
    v, u = torch.meshgrid(torch.linspace(-1, 1, height, device=device), torch.linspace(-1, 1, width, device=device), indexing="ij")
    slant = uniform(-0.25, 0.25, 1, 1) * (torch.rand(n, 1, 1, device=device, generator=generator) < 0.5)
    narrow = 1 + slant.abs() + uniform(0, 0.25, 1, 1)
    x = narrow * u + slant * v
    # The wobble: a displacement field of about a pixel (2 at most), smooth over about a letter (a control point every ~24 px).
    points = (max(2, height // 24), max(2, width // 24))
    wobble = torch.randn(n, 2, *points, device=device, generator=generator).clamp(-2, 2) * uniform(0.5, 1.0, 1, 1, 1)
    wobble = torch.nn.functional.interpolate(wobble, size=(height, width), mode="bicubic", align_corners=True)
    x = x + wobble[:, 0] * 2 / width
    y = v + wobble[:, 1] * 2 / height
    images = torch.nn.functional.grid_sample(images, torch.stack([x, y], -1), mode="bilinear", padding_mode="border", align_corners=True)
    # Stroke weight: a 3 x 3 minimum darkens and a maximum lightens every stroke by up to a pixel each side, dark ink on
    # light or light on dark alike; blended in part for sub-pixel weights.
    darker = -torch.nn.functional.max_pool2d(-images, 3, stride=1, padding=1)
    lighter = torch.nn.functional.max_pool2d(images, 3, stride=1, padding=1)
    side = (torch.rand(n, 1, 1, 1, device=device, generator=generator) < 0.5).float()
    amount = uniform(0, 0.8, 1, 1, 1) * (torch.rand(n, 1, 1, 1, device=device, generator=generator) < 0.5)
    return (images + amount * (side * darker + (1 - side) * lighter - images)).clamp(0, 1)


def augment(images: torch.Tensor, generator: torch.Generator, shrink: float = 0.6) -> torch.Tensor:
    """A camera's and a printer's ways of changing images [n, 3, H, W] in [0, 1] without moving their text, each drawn
    per image: colour and contrast, inverted ink, light falling off across the frame, sensor noise, blur, lost
    resolution (to `shrink` of the size and back). Nothing geometric: the reading extensions' targets say where each
    line sits. Batched tensor arithmetic, so it runs on the device beside the model (in the loader's workers, Pillow's
    took longer than the GPU's step)."""
    n, device = len(images), images.device

    uniform = _uniform_draws(n, device, generator)

    def chosen(p: float) -> torch.Tensor:
        return (torch.rand(n, 1, 1, 1, device=device, generator=generator) < p).float()

    def blend(p: float, changed: torch.Tensor) -> torch.Tensor:
        mask = chosen(p)
        return images * (1 - mask) + changed * mask

    images = blend(0.5, images * uniform(0.6, 1.4, 3, 1, 1) + uniform(-0.16, 0.16, 3, 1, 1))
    images = blend(0.15, 1 - images)
    height, width = images.shape[-2:]
    angle = uniform(0, 2 * torch.pi, 1, 1, 1)
    across = torch.linspace(-0.5, 0.5, width, device=device).view(1, 1, 1, -1) * angle.cos()
    across = across + torch.linspace(-0.5, 0.5, height, device=device).view(1, 1, -1, 1) * angle.sin()
    images = blend(0.3, images * (1 - uniform(0.2, 0.5, 1, 1, 1) * (across + 0.5)))
    images = blend(0.3, images + uniform(2 / 255, 10 / 255, 1, 1, 1) * (2 * uniform(0, 1, 1, height, width) - 1))
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    images = blend(0.3, images + uniform(0.3, 1.0, 1, 1, 1) * (blurred - images))
    small = torch.nn.functional.interpolate(images, scale_factor=shrink, mode="area")
    images = blend(0.3, torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False))
    return images.clamp(0, 1)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device`, pinned first on a GPU: a copy from pageable memory waits for the GPU."""
    return (tensor.pin_memory() if device.type == "cuda" else tensor).to(device, non_blocking=True)


def conversation_of(meta: dict, has_image: bool) -> list[dict]:
    if meta.get("conversations"):
        return meta["conversations"]
    prompt = f"{IMAGE_MARKER}\n{CAPTION_PROMPT}" if has_image else CAPTION_PROMPT
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": meta["caption"]}]


def reply_hook(settings: DataSettings, meta: dict, tokenizer):
    """The extensions' reply_ids for one image sample's replies: the first that gives ids."""
    hooks = [(extension_class(name), options) for name, options in settings.extensions.items()]
    if not hooks:
        return None

    def reply_ids(reply: str) -> list[int] | None:
        return next((ids for cls, options in hooks if (ids := cls.reply_ids(options, meta, reply, tokenizer)) is not None), None)

    return reply_ids


def image_text(extensions: dict[str, dict], meta: dict) -> str:
    """The `extensions`' prompt text after an image sample's image tokens (Extension.image_text), in their order."""
    return "".join(extension_class(name).image_text(options, meta) for name, options in extensions.items())


def collate(samples: list[dict], modality: str, processor, settings: DataSettings) -> dict:
    """One micro-batch; its `pixel_values` uint8, to be finished by DevicePixels."""
    input_ids, labels, pixels, metas = [], [], [], []
    tokenizer = processor.tokenizer
    for sample in samples:
        image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
        meta = json.loads(sample["json"])
        hook, text = (reply_hook(settings, meta, tokenizer), image_text(settings.extensions, meta)) if image is not None else (None, "")
        try:
            example = build_example(
                conversation_of(meta, image is not None), processor, settings.max_length, reply_ids=hook, image_text=text
            )
        except SampleTooLong as error:
            raise SampleTooLong(
                f"Sample {sample.get('__key__')} of {sample.get('__url__')}: {error} Raise the stage's max_length (each image's"
                " tokens, and the text its extensions put after it, count too)."
            ) from None
        input_ids.append(example.input_ids)
        labels.append(example.labels)
        if example.num_images:
            pixels.append(decode_image(image))
            metas.append(meta)
    if settings.pack:
        batch = pack_batch(input_ids, labels, settings.max_length, tokenizer.pad_token_id, settings.pad_to_multiple_of)
    else:
        batch = pad_batch(input_ids, tokenizer.pad_token_id, labels=labels, multiple_of=settings.pad_to_multiple_of)
    if modality == "image":
        size = settings.image_size
        # Resized as the encoder's processor resizes, left uint8: DevicePixels finishes them where the model runs. A
        # processor that resizes in floats gives fractions: rounded, not truncated.
        batch["pixel_values"] = (
            processor.image_processor(pixels, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
            if pixels
            else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        )
        for name in settings.targets:
            batch.update(extension_class(name).collate(settings.extensions[name], settings.grid, metas))
    return batch


class ShardStream(IterableDataset):
    """Decoded, tokenized, padded micro-batches for one rank; each carries its `position` and `modality`."""

    def __init__(self, settings: DataSettings, processor, rank: int, world_size: int, position: DataPosition):
        self.settings, self.processor = settings, processor
        self.rank, self.world_size, self.position = rank, world_size, position

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for position, modality, samples in raw_stream(self.settings, self.rank, self.world_size, self.position):
            if (position.step - 1) % workers == worker:
                batch = collate(samples, modality, self.processor, self.settings)
                yield {**batch, "modality": modality, "position": asdict(position)}


def make_loader(
    settings: DataSettings, processor, rank: int, world_size: int, position: DataPosition, workers: int, pin_memory: bool
) -> DataLoader:
    """The loader keeps at most 2 batches per worker in flight, so decoding never runs far ahead of training."""
    return DataLoader(
        ShardStream(settings, processor, rank, world_size, position),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        pin_memory=pin_memory,
    )
