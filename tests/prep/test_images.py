"""Every pixel mode Pillow opens becomes 8-bit RGB with its values kept, checked against numpy conversions of the
very arrays the test files were written from."""

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, TiffImagePlugin

from beni_pipeline.prep.download import download_chunk, read_index
from beni_pipeline.prep.images import ImageRejected, process_image
from tests.conftest import jpeg_bytes
from tests.prep.test_download import FAST

H, W = 40, 48
PROPERTY = settings(max_examples=60, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def unit() -> np.ndarray:
    """A smooth field in [0, 1] with a bright disc: every output pixel is predictable, so correlation means something."""
    y, x = np.mgrid[0:H, 0:W]
    field = 0.1 + 0.6 * x / (W - 1) * (0.3 + 0.7 * y / (H - 1))
    return np.where((x - 30) ** 2 + (y - 14) ** 2 < 64, 0.95, field)


def alpha() -> np.ndarray:
    return np.round(255 * np.linspace(0, 1, H)[:, None] * np.ones(W)).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def over_white(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    a = a.astype(float)[..., None] / 255
    return rgb * a + 255 * (1 - a)


def grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count) written by hand: Pillow cannot write them."""
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", samples.shape[1], samples.shape[0], 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (Pillow's LAB: L 0..255 for 0..100, a and b signed bytes; D50 white, as ICC) to 8-bit sRGB."""
    lightness = lab[..., 0].astype(float) / 255 * 100
    a, b = lab[..., 1].astype(np.int8).astype(float), lab[..., 2].astype(np.int8).astype(float)
    fy = (lightness + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * np.array([0.96422, 1.0, 0.82521])
    bradford_d50_to_srgb = np.array(
        [[3.1338561, -1.6168667, -0.4906146], [-0.9787684, 1.9161415, 0.0334540], [0.0719453, -0.2289914, 1.4052427]]
    )
    linear = np.clip(xyz @ bradford_d50_to_srgb.T, 0, 1)
    return 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def case_1():
    bits = unit() > 0.5
    return encode(Image.fromarray(bits), "PNG"), grey(255.0 * bits)


def case_l():
    v = np.round(unit() * 255).astype(np.uint8)
    return encode(Image.fromarray(v), "PNG"), grey(v.astype(float))


def case_la():
    v = np.round(unit() * 255).astype(np.uint8)
    image = Image.merge("LA", (Image.fromarray(v), Image.fromarray(alpha())))
    return encode(image, "PNG"), over_white(grey(v.astype(float)), alpha())


def case_la_premultiplied():
    """A grey TIFF with associated (premultiplied) alpha: Pillow opens it as La."""
    a = alpha()
    premultiplied = np.round(unit() * a).astype(np.uint8)
    data = bytearray(encode(Image.merge("LA", (Image.fromarray(premultiplied), Image.fromarray(a))), "TIFF"))
    extra_samples = data.find(bytes.fromhex("520103000100000002000000"))  # ExtraSamples = 2 (unassociated), little-endian
    data[extra_samples + 8] = 1  # associated alpha
    assert Image.open(io.BytesIO(bytes(data))).mode == "La"
    return bytes(data), grey(premultiplied.astype(float) + 255 - a)


def palette_image():
    colours = np.array([[16 * i, 255 - 15 * i, (90 * i) % 256] for i in range(16)], dtype=np.uint8)
    index = np.round(unit() * 15).astype(np.uint8)
    image = Image.fromarray(index, "L").convert("P")
    image.putpalette(colours.ravel().tolist())
    return image, colours[index].astype(float), index


def case_p():
    image, rgb, _ = palette_image()
    return encode(image, "PNG"), rgb


def case_p_transparency():
    image, rgb, index = palette_image()
    return encode(image, "PNG", transparency=5), np.where((index == 5)[..., None], 255.0, rgb)


def case_pa():
    image, rgb, index = palette_image()
    pa_image = Image.merge("PA", (Image.fromarray(index, "L"), Image.fromarray(alpha())))
    pa_image.putpalette(image.getpalette())
    return encode(pa_image, "TIFF"), over_white(rgb, alpha())


def case_rgb():
    rgb = np.round(np.stack([unit(), unit()[::-1], 1 - unit()], axis=-1) * 255).astype(np.uint8)
    return encode(Image.fromarray(rgb), "PNG"), rgb.astype(float)


def case_rgba():
    rgb = np.round(np.stack([unit(), unit()[::-1], 1 - unit()], axis=-1) * 255).astype(np.uint8)
    return encode(Image.fromarray(np.dstack([rgb, alpha()])), "PNG"), over_white(rgb.astype(float), alpha())


def case_cmyk(fmt="TIFF"):
    cmyk = np.round(np.stack([unit(), 0.5 * unit()[::-1], 1 - unit(), 0.3 * unit()], axis=-1) * 255).astype(np.uint8)
    data = encode(Image.fromarray(cmyk, "CMYK"), fmt)
    c = np.asarray(Image.open(io.BytesIO(data))).astype(float) / 255  # a JPEG's samples are what it decodes to
    return data, 255 * (1 - c[..., :3]) * (1 - c[..., 3:])


def case_ycbcr():
    ycc = np.round(np.stack([unit(), 0.3 + 0.4 * unit()[::-1], 0.35 + 0.3 * unit()], axis=-1) * 255).astype(np.uint8)
    y, cb, cr = (ycc[..., i].astype(float) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], axis=-1)
    return encode(Image.fromarray(ycc, "YCbCr"), "TIFF"), np.clip(rgb, 0, 255)


def case_lab():
    signed_ab = np.stack([np.round(30 * unit() - 15), np.round(20 - 40 * unit()[::-1])], axis=-1).astype(np.int8)
    lab = np.dstack([np.round(unit() * 255).astype(np.uint8), signed_ab.view(np.uint8)])
    return encode(Image.fromarray(lab, "LAB"), "TIFF"), lab_to_srgb(lab)


def case_grey16_png():
    v = np.round(unit() * 65535).astype(np.uint16)
    return png16(v), grey(v / 257)


def case_grey16_png_transparent():
    v = np.round(unit() * 65535).astype(np.uint16)
    key = int(v[0, 0])  # tRNS: this one grey value is transparent
    return encode(Image.fromarray(v), "PNG", transparency=key), grey(np.where(v == key, 255.0, v / 257))


def case_rgb16_png():
    v = np.round(np.stack([unit(), unit()[::-1], 1 - unit()], axis=-1) * 65535).astype(np.uint16)
    return png16(v), v / 257


def case_rgba16_png():
    opacity = np.linspace(0, 1, H)[:, None] * np.ones(W)
    v = np.round(np.stack([unit(), unit()[::-1], 1 - unit(), opacity], axis=-1) * 65535).astype(np.uint16)
    return png16(v), over_white(v[..., :3] / 257, v[..., 3] / 257)


def case_la16_png():
    v = np.round(np.stack([unit(), np.linspace(0, 1, H)[:, None] * np.ones(W)], axis=-1) * 65535).astype(np.uint16)
    return png16(v), over_white(grey(v[..., 0] / 257), v[..., 1] / 257)


def case_i16_tiff(mode="I;16"):
    v = np.round(unit() * 65535).astype(np.uint16)
    image = Image.frombytes(mode, (W, H), v.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    data = encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == ("I;16B" if mode == "I;16B" else "I;16")
    return data, grey(v / 257)


def case_i16_signed_tiff():
    v = np.round(unit() * 65535 - 32768).astype(np.int16)
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[339], info.tagtype[339] = 2, 3  # SampleFormat: signed integers
    data = encode(Image.fromarray(v.view(np.uint16)), "TIFF", tiffinfo=info)
    assert Image.open(io.BytesIO(data)).mode == "I"
    return data, grey((v.astype(float) + 32768) / 257)


def case_i32_tiff():
    v = np.round(unit() * 5_000_000 - 1_000_000).astype(np.int32)  # 32-bit counts: stretched over their range
    return encode(Image.fromarray(v), "TIFF"), grey(255 * (v - v.min()) / (v.max() - v.min()))


def case_pgm16(maxval=65535):
    v = np.round(unit() * maxval).astype(np.uint16)
    return f"P5\n{W} {H}\n{maxval}\n".encode() + v.astype(">u2").tobytes(), grey(255 * v.astype(float) / maxval)


def case_float_tiff():
    v = unit().astype(np.float32)
    return encode(Image.fromarray(v), "TIFF"), grey(255.0 * v)


def case_float_tiff_out_of_range():
    v = (unit() * 3000 - 500).astype(np.float32)  # e.g. heights in metres: no white of their own
    return encode(Image.fromarray(v), "TIFF"), grey(255 * (v - v.min()) / (v.max() - v.min()))


CASES = {
    "1": case_1,
    "L": case_l,
    "LA": case_la,
    "La premultiplied TIFF": case_la_premultiplied,
    "P": case_p,
    "P with transparency": case_p_transparency,
    "PA TIFF": case_pa,
    "RGB": case_rgb,
    "RGBA": case_rgba,
    "CMYK TIFF": case_cmyk,
    "CMYK JPEG": lambda: case_cmyk("JPEG"),
    "YCbCr TIFF": case_ycbcr,
    "LAB TIFF": case_lab,
    "16-bit grey PNG (I;16)": case_grey16_png,
    "16-bit grey PNG with tRNS": case_grey16_png_transparent,
    "16-bit RGB PNG": case_rgb16_png,
    "16-bit RGBA PNG": case_rgba16_png,
    "16-bit grey+alpha PNG": case_la16_png,
    "I;16 TIFF": case_i16_tiff,
    "I;16B TIFF": lambda: case_i16_tiff("I;16B"),
    "I;16L TIFF": lambda: case_i16_tiff("I;16L"),
    "signed 16-bit TIFF (I)": case_i16_signed_tiff,
    "32-bit int TIFF (I)": case_i32_tiff,
    "16-bit PGM (I)": case_pgm16,
    "PGM maxval 999 (I)": lambda: case_pgm16(999),
    "float TIFF in [0, 1] (F)": case_float_tiff,
    "float TIFF out of [0, 1] (F)": case_float_tiff_out_of_range,
}


def stored_pixels(data: bytes) -> np.ndarray:
    result = process_image(data, resize_mode="keep", image_size=64, image_format="jpg", quality=95, min_side=1, max_pixels=10**6)
    image = Image.open(io.BytesIO(result.data))
    assert image.mode == "RGB" and image.size == (W, H)
    return np.asarray(image).astype(float)


def as_stored(reference: np.ndarray) -> np.ndarray:
    """The reference through the same JPEG encoder, so what differs is the conversion alone, not JPEG's chroma subsampling."""
    image = Image.fromarray(np.round(np.clip(reference, 0, 255)).astype(np.uint8))
    return np.asarray(Image.open(io.BytesIO(encode(image, "JPEG", quality=95)))).astype(float)


@pytest.mark.parametrize("name", CASES)
def test_every_mode_keeps_its_pixels(name):
    data, reference = CASES[name]()
    got = stored_pixels(data)
    assert abs(got.mean() - reference.mean()) <= 2, (got.mean(), reference.mean())
    expected = as_stored(reference)
    for channel in range(3):
        if expected[..., channel].std() > 1:  # a flat channel has no pattern to correlate
            assert np.corrcoef(got[..., channel].ravel(), expected[..., channel].ravel())[0, 1] > 0.99, channel
    assert np.abs(got - expected).mean() <= 1.5


def test_a_16_bit_png_downloads_with_its_pixels(fault_server, tmp_path):
    data, reference = case_grey16_png()
    fault_server.images["/grey16.png"] = data
    download_chunk(pa.table({"sample_id": ["g"], "url": [f"{fault_server.url}/grey16.png"]}), tmp_path, FAST)
    (row,) = read_index(tmp_path).to_pylist()
    assert row["status"] == "ok", row
    with open(tmp_path / row["tar"], "rb") as f:
        f.seek(row["offset"])
        stored = np.asarray(Image.open(io.BytesIO(f.read(row["size"]))).convert("RGB")).astype(float)
    assert abs(stored.mean() - reference.mean()) <= 2  # resized on the way, and a mean survives resizing


SEEDS = [
    jpeg_bytes(40, 30),
    case_rgba()[0],
    case_p_transparency()[0],
    case_grey16_png()[0],
    case_float_tiff()[0],
    case_cmyk()[0],
    encode(Image.new("RGB", (20, 20), (1, 2, 3)), "GIF"),
    encode(Image.new("RGB", (20, 20), (1, 2, 3)), "BMP"),
    encode(Image.new("RGB", (20, 20), (1, 2, 3)), "WEBP"),
]


@st.composite
def damaged_images(draw) -> bytes:
    """A real image file with some bytes overwritten, some cut, or both: what a broken server or disk hands over."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


@PROPERTY
@given(st.one_of(st.binary(max_size=512), damaged_images()))
def test_any_bytes_are_an_image_or_rejected(data):
    try:
        result = process_image(data, resize_mode="center_crop", image_size=16, image_format="jpg", quality=80, min_side=1, max_pixels=10**6)
    except ImageRejected:
        return
    assert Image.open(io.BytesIO(result.data)).mode == "RGB"


ARRAYS = {  # mode -> (dtype, channels, a format that stores the mode)
    "1": (np.bool_, 0, "PNG"),
    "L": (np.uint8, 0, "PNG"),
    "LA": (np.uint8, 2, "PNG"),
    "RGB": (np.uint8, 3, "PNG"),
    "RGBA": (np.uint8, 4, "PNG"),
    "CMYK": (np.uint8, 4, "TIFF"),
    "YCbCr": (np.uint8, 3, "TIFF"),
    "LAB": (np.uint8, 3, "TIFF"),
    "I;16": (np.uint16, 0, "PNG"),
    "I": (np.int32, 0, "TIFF"),
    "F": (np.float32, 0, "TIFF"),
}


@st.composite
def small_images(draw) -> tuple[str, np.ndarray]:
    mode = draw(st.sampled_from(sorted(ARRAYS)))
    dtype, channels, _ = ARRAYS[mode]
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 6))) + ((channels,) if channels else ())
    elements = st.floats(width=32) if dtype is np.float32 else None  # NaN and infinities included
    return mode, draw(hnp.arrays(dtype, shape, elements=elements))


@PROPERTY
@given(small_images())
def test_any_small_array_in_any_mode_becomes_rgb(mode_and_array):
    mode, array = mode_and_array
    image = Image.fromarray(array, mode if mode in ("CMYK", "YCbCr", "LAB", "LA", "RGBA") else None)
    data = encode(image, ARRAYS[mode][2])
    result = process_image(data, resize_mode="keep", image_size=8, image_format="jpg", quality=95, min_side=1, max_pixels=10**6)
    stored = Image.open(io.BytesIO(result.data))
    assert stored.mode == "RGB" and stored.size == (array.shape[1], array.shape[0])
    if mode in ("I;16", "L"):  # deep or not, a grey image keeps its mean brightness
        full_scale = 65535 if mode == "I;16" else 255
        assert abs(np.asarray(stored).astype(float).mean() - 255 * array.mean() / full_scale) <= 4
