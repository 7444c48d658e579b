"""Validate, orient, resize and re-encode one downloaded image."""

import hashlib
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from PIL import ExifTags, Image, UnidentifiedImageError

if TYPE_CHECKING:
    import numpy as np

ResizeMode = Literal["keep", "center_crop", "pad", "longest_edge"]
ImageFormat = Literal["jpg", "webp"]

_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the image upright, as in ImageOps.exif_transpose
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PIL_FORMAT = {"jpg": "JPEG", "webp": "WEBP"}


class ImageRejected(Exception):
    """The bytes are not a usable image; `reason` is the status the index records."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    width: int
    height: int
    content_sha256: str
    phash: str


def dhash(image: Image.Image) -> str:
    """64-bit difference hash: is each pixel of a 9x8 grey thumbnail brighter than its right neighbour."""
    pixels = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR).tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return f"{bits:016x}"


def process_image(
    data: bytes,
    *,
    resize_mode: ResizeMode,
    image_size: int,
    image_format: ImageFormat,
    quality: int,
    min_side: int,
    max_pixels: int,
) -> ProcessedImage:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image") from None
    except Image.DecompressionBombError:
        raise ImageRejected("too_many_pixels") from None
    except (OSError, SyntaxError, ValueError):
        raise ImageRejected("decode_error") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels")
    if min(width, height) < min_side:
        raise ImageRejected("too_small")
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if image.format == "JPEG" and resize_mode != "keep":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller.
            scale = _scale(width, height, resize_mode, image_size)
            if scale < 1:
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ImageRejected("decode_error") from None
    try:
        rgb = _to_rgb(image)
    except (OSError, ValueError):  # a mode or palette Pillow cannot convert
        raise ImageRejected("decode_error") from None
    # Every resize mode is symmetric under rotation, so the small result is turned upright, not the source.
    image = _resize(rgb, resize_mode, image_size)
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
    out = io.BytesIO()
    image.save(out, _PIL_FORMAT[image_format], quality=quality)
    return ProcessedImage(
        data=out.getvalue(),
        width=image.width,
        height=image.height,
        content_sha256=hashlib.sha256(data).hexdigest(),
        phash=dhash(image),
    )


def _scale(width: int, height: int, mode: ResizeMode, size: int) -> float:
    if mode == "center_crop":
        return size / min(width, height)
    return size / max(width, height)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with every pixel's value kept: deep samples scaled by `_unit_grey`, transparency composited over white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # numpy here only: a download worker that meets no deep image never imports it (0.1 s of CPU per worker)
        import numpy as np

        grey, opaque = _unit_grey(image)
        grey = np.where(opaque, grey, 1.0)  # transparent pixels show the white background
        return Image.fromarray(np.round(grey * 255).astype(np.uint8)).convert("RGB")
    if image.mode == "La":  # grey with premultiplied alpha (a TIFF's associated alpha): Pillow converts only the RGB form
        grey, alpha = image.split()
        image = Image.merge("RGBa", (grey, grey, grey, alpha))
    if image.mode.endswith(("A", "a")) or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _unit_grey(image: Image.Image) -> "tuple[np.ndarray, np.ndarray]":
    """A grey image of more than 8 bits (I;16*, I, F) as floats in [0, 1], and where it is opaque.

    Pillow's own convert clips these samples at 255, which turns a 16-bit image white and a float one black.
    Integer samples are scaled by the full scale of their bit depth, because that is where the format puts
    white: 65535 for 16 bits (PNG; Pillow already rescales a PGM's maxval to 16 bits), the declared
    BitsPerSample of a TIFF (a 12-bit scan is white at 4095), offset by half the range when the TIFF
    says the samples are signed. Integers wider than 16 bits and floats have no white a format agrees
    on (they hold counts, depths, radiance): floats already in [0, 1] are taken as they are, which is
    the convention of float images; anything else is stretched from its smallest to its largest
    finite value, the only scale that keeps its content visible. NaN shows as black.
    """
    import numpy as np

    values = np.asarray(image).astype(np.float32)  # exact for 16-bit samples, half the memory of float64
    opaque = values != image.info["transparency"] if isinstance(image.info.get("transparency"), int) else np.ones(values.shape, bool)
    bits, signed = _bit_depth(image)
    if image.mode != "F" and 0 < bits <= 16:
        low = -(2 ** (bits - 1)) if signed else 0
        return np.clip((values - low) / (2**bits - 1), 0, 1), opaque
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scaled = (values.astype(np.float64) - low) / (high - low) if high > low else values  # float64: a float32 range can overflow
    return np.nan_to_num(np.clip(scaled, 0, 1), nan=0.0), opaque


def _bit_depth(image: Image.Image) -> tuple[int, bool]:
    """Bits per sample and whether they are signed, as a TIFF declares them (tags 258 and 339); otherwise 16-bit
    unsigned, since Pillow's PNG and PPM readers hold every deeper integer sample in 16 bits."""
    tags = getattr(image, "tag_v2", None) or {}
    return int((tags.get(258) or (16,))[0]), (tags.get(339) or (1,))[0] == 2


def _resize(image: Image.Image, mode: ResizeMode, size: int) -> Image.Image:
    width, height = image.size
    if mode == "keep" or (mode == "longest_edge" and max(width, height) <= size):
        return image
    scale = _scale(width, height, mode, size)
    # BOX averages the source pixels each output pixel covers (area downscaling); BICUBIC when enlarging.
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    if mode == "center_crop":
        side = min(width, height)  # the centred square of the source that becomes the output
        left, top = (width - side) / 2, (height - side) / 2
        return image.resize((size, size), resample, box=(left, top, left + side, top + side))
    resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), resample)
    if mode == "longest_edge":
        return resized
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return canvas
