"""Validate, orient, resize and re-encode one downloaded image."""

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Literal

from PIL import ExifTags, Image, UnidentifiedImageError

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
    # Every resize mode is symmetric under rotation, so the small result is turned upright, not the source.
    image = _resize(_to_rgb(image), resize_mode, image_size)
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
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


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
