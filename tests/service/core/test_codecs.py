"""service.core.codecs: every fixture is generated in memory with Pillow / numpy."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from service.core.codecs import (
    ImageSpec,
    ImageTooLarge,
    InvalidArray,
    InvalidImage,
    InvalidInput,
    decode_base64_images,
    decode_image,
    decode_images,
    decode_npy,
    decode_npy_array,
    encode_npy,
    encode_png,
    encode_png_base64,
    source_pixels,
    to_uint8,
)

GRAY = ImageSpec(channels=1, height=4, width=4)
RGB = ImageSpec(channels=3, height=4, width=4)


def save(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def solid(mode: str, color, size=(4, 4)) -> Image.Image:
    return Image.new(mode, size, color)


def assert_layout(out: np.ndarray, shape: tuple[int, ...]) -> None:
    assert out.shape == shape
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable


# --- image decoding: modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [GRAY, RGB], ids=["L", "RGB"])
def test_png_round_trip_is_lossless(spec):
    image = np.random.default_rng(0).integers(0, 256, (spec.channels, 4, 4), dtype=np.uint8)
    out = decode_image(encode_png(image), spec)
    assert_layout(out, image.shape)
    np.testing.assert_array_equal(out, image)


def test_rgb_to_gray_uses_luma_and_gray_to_rgb_replicates():
    red = decode_image(save(solid("RGB", (255, 0, 0))), GRAY)
    assert_layout(red, (1, 4, 4))
    assert (red == 76).all()  # 0.299 * 255
    gray = decode_image(save(solid("L", 200)), RGB)
    assert_layout(gray, (3, 4, 4))
    assert (gray == 200).all()


def test_rgba_is_composited_onto_black():
    img = solid("RGBA", (255, 255, 255, 0))  # transparent white
    img.putpixel((1, 0), (10, 20, 30, 255))  # opaque
    img.putpixel((2, 0), (200, 100, 50, 128))  # half transparent
    out = decode_image(save(img), RGB)
    assert (out[:, 1:, :] == 0).all() and (out[:, 0, 0] == 0).all()
    np.testing.assert_array_equal(out[:, 0, 1], [10, 20, 30])
    np.testing.assert_allclose(out[:, 0, 2], [100, 50, 25], atol=1)  # rgb * 128 / 255


def test_la_is_composited_onto_black():
    img = solid("LA", (255, 0))
    img.putpixel((0, 0), (255, 255))
    img.putpixel((1, 0), (200, 128))
    out = decode_image(save(img), GRAY)[0]
    assert out[0, 0] == 255
    assert abs(int(out[0, 1]) - 100) <= 1
    assert (out[1:] == 0).all()


def test_palette_transparency_becomes_black():
    img = solid("P", 1)
    img.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)  # index 0 white, index 1 green
    img.putpixel((0, 0), 0)
    out = decode_image(save(img, transparency=0), RGB)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 0, 0])  # transparent white -> black, not white
    np.testing.assert_array_equal(out[:, 3, 3], [0, 255, 0])


def test_16bit_gray_is_scaled_not_clipped_or_truncated():
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = save(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # really a 16-bit PNG
    out = decode_image(data, GRAY)[0]
    # round(v / 257): 1000 -> 4 (clipping would give 255, the high byte 3)
    np.testing.assert_array_equal(out[0], [0, 4, 128, 255])


def test_16bit_colour_key_transparency_becomes_black():
    values = np.array([[1000, 2000], [65535, 1000]], dtype=np.uint16)
    out = decode_image(save(Image.fromarray(values), transparency=1000), ImageSpec(channels=1, height=2, width=2))
    np.testing.assert_array_equal(out[0], [[0, 8], [255, 0]])


def test_jpeg_rgb_and_cmyk():
    rgb = decode_image(save(solid("RGB", (30, 120, 220), (16, 16)), "JPEG", quality=95), RGB)
    np.testing.assert_allclose(rgb.reshape(3, -1).mean(axis=1), [30, 120, 220], atol=3)
    cmyk = decode_image(save(solid("CMYK", (0, 255, 255, 0), (16, 16)), "JPEG", quality=95), RGB)
    np.testing.assert_allclose(cmyk.reshape(3, -1).mean(axis=1), [255, 0, 0], atol=3)


def test_animated_gif_uses_first_frame():
    frames = [solid("L", 50), solid("L", 200), solid("L", 120)]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert (decode_image(data, GRAY) == 50).all()


@pytest.mark.parametrize("fmt, params", [("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {}),
                                         ("TIFF", {"compression": "tiff_deflate"})],
                         ids=["bmp", "webp-lossless", "tiff", "tiff-deflate"])
def test_lossless_formats_decode_to_their_pixels(fmt, params):
    image = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = decode_image(save(Image.fromarray(image), fmt, **params), RGB)
    np.testing.assert_array_equal(out, image.transpose(2, 0, 1))


def test_lossy_webp_and_a_multi_page_tiff():
    """A lossy WebP decodes near its pixels; a TIFF's first page is the image, as an animation's first frame."""
    photo = solid("RGB", (30, 120, 220), (16, 16))
    out = decode_image(save(photo, "WEBP", quality=90), ImageSpec(channels=3, height=16, width=16))
    assert np.abs(out.astype(int) - np.array([30, 120, 220])[:, None, None]).max() <= 4
    pages = save(solid("L", 70), "TIFF", save_all=True, append_images=[solid("L", 200)])
    assert Image.open(io.BytesIO(pages)).n_frames == 2
    assert (decode_image(pages, GRAY) == 70).all()


# --- resizing --------------------------------------------------------------------------------------------


def test_resize_to_model_size_keeps_height_width_order():
    img = solid("L", 0, (32, 16))  # width 32, height 16
    img.paste(255, (0, 0, 16, 16))  # left half white
    out = decode_image(save(img), ImageSpec(channels=1, height=8, width=16))
    assert_layout(out, (1, 8, 16))
    assert (out[0, :, :7] == 255).all() and (out[0, :, 9:] == 0).all()


def test_uniform_image_stays_uniform_after_resize():
    out = decode_image(save(solid("RGB", (9, 99, 199), (57, 31))), ImageSpec(channels=3, height=28, width=28))
    assert_layout(out, (3, 28, 28))
    for channel, value in zip(out, (9, 99, 199)):
        assert (channel == value).all()


def test_downscaling_averages_instead_of_dropping_pixels():
    checkerboard = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = decode_image(save(Image.fromarray(checkerboard)), GRAY)
    # Bilinear (anti-aliased when shrinking) gives mid-gray; nearest-neighbour would keep only 0s or 255s.
    assert (np.abs(out.astype(int) - 128) <= 3).all()


# --- bad images ------------------------------------------------------------------------------------------


def test_truncated_png_is_invalid():
    data = save(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)))
    with pytest.raises(InvalidImage) as info:
        decode_image(data[: len(data) // 2], GRAY)
    assert info.value.code == "invalid_image"


def test_random_and_empty_bytes_are_invalid():
    with pytest.raises(InvalidImage, match="cannot identify image file"):
        decode_image(np.random.default_rng(3).bytes(500), GRAY)
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", GRAY)


def test_batch_error_names_the_failing_index():
    good = save(solid("L", 1))
    with pytest.raises(InvalidImage, match=r"^image 2: cannot identify image file"):
        decode_images([good, good, b"not an image", good], GRAY)
    with pytest.raises(InvalidInput):
        decode_images([], GRAY)


def test_eps_is_refused_without_running_ghostscript():
    with pytest.raises(InvalidImage, match="EPS images are not accepted"):
        decode_image(save(solid("L", 1), "EPS"), GRAY)


# --- size guard ------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def one_bit_png(width: int, height: int, rows: int) -> bytes:
    """A black 1-bit PNG whose IDAT holds `rows` rows (all of them makes a valid, tiny-on-disk bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    pixels = zlib.compress(bytes((1 + (width + 7) // 8) * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def test_bomb_is_rejected_before_decoding(monkeypatch):
    data = one_bit_png(8000, 8000, rows=8000)  # 64 Mpixel, about 8 KB on disk, below Pillow's own limit
    assert len(data) < 20_000

    def decompress(self):
        raise AssertionError("the image was decompressed")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decompress)
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, GRAY)
    assert info.value.code == "image_too_large" and "8000x8000" in str(info.value)


def test_pillow_decompression_bomb_error_maps_to_too_large():
    # Beyond 2 * Image.MAX_IMAGE_PIXELS Pillow itself raises, even though our limit would allow it.
    spec = ImageSpec(channels=1, height=4, width=4, max_pixels=10**9)
    with pytest.raises(ImageTooLarge):
        decode_image(one_bit_png(15000, 15000, rows=1), spec)


def test_pillow_bomb_warning_raised_as_error_maps_to_too_large():
    # Under `-W error` Pillow raises its warning (between 1x and 2x MAX_IMAGE_PIXELS) as an exception.
    spec = ImageSpec(channels=1, height=4, width=4, max_pixels=10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLarge):
            decode_image(one_bit_png(10000, 10000, rows=1), spec)


@pytest.mark.parametrize("mode, size", [("L", (28, 28)), ("RGB", (300, 5)), ("RGBA", (9, 17)), ("P", (7, 3)),
                                        ("I;16", (30, 20)), ("1", (13, 11))])
def test_a_pngs_size_is_read_from_its_header_as_pillow_reads_it(mode, size):
    data = save(Image.new(mode, size))
    with Image.open(io.BytesIO(data)) as opened:
        assert source_pixels(data, GRAY) == opened.width * opened.height == size[0] * size[1]
    # The header alone is enough to count (and refuse) pixels: the rest is only read when decoding, which
    # still refuses a PNG whose pixel data is missing.
    assert source_pixels(data[:33], GRAY) == size[0] * size[1]
    with pytest.raises(InvalidImage):
        decode_image(data[:33], GRAY)
    with pytest.raises(ImageTooLarge, match=f"{size[0]}x{size[1]}"):
        source_pixels(data[:33], ImageSpec(channels=1, height=4, width=4, max_pixels=size[0] * size[1] - 1))


def test_a_header_that_is_not_a_well_formed_png_ihdr_goes_to_pillow():
    good = one_bit_png(8, 8, rows=8)
    zero_width = good[:16] + struct.pack(">I", 0) + good[20:]
    not_ihdr_first = good[:12] + b"IDAT" + good[16:]
    for data in (zero_width, not_ihdr_first, good[:20]):
        with pytest.raises(InvalidImage):
            source_pixels(data, GRAY)


def test_max_pixels_applies_to_the_source_size():
    data = save(solid("L", 7, (20, 20)))
    assert decode_image(data, ImageSpec(channels=1, height=4, width=4, max_pixels=400)).shape == (1, 4, 4)
    with pytest.raises(ImageTooLarge):
        decode_image(data, ImageSpec(channels=1, height=4, width=4, max_pixels=399))


# --- base64 ----------------------------------------------------------------------------------------------


def test_base64_plain_data_url_and_wrapped_lines():
    data = save(solid("L", 77))
    plain = base64.b64encode(data).decode()
    wrapped = "\n".join(plain[i : i + 16] for i in range(0, len(plain), 16))
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    items = [plain, "data:image/png;base64," + plain, wrapped, urlsafe]
    out = decode_base64_images(items, GRAY)
    assert_layout(out, (4, 1, 4, 4))
    assert (out == 77).all()


def test_bad_base64_names_the_index():
    plain = base64.b64encode(save(solid("L", 1))).decode()
    with pytest.raises(InvalidImage, match=r"^image 1: invalid base64"):
        decode_base64_images([plain, "not*base64!"], GRAY)
    with pytest.raises(InvalidImage, match=r"^image 0: data URL"):
        decode_base64_images(["data:image/png," + plain], GRAY)
    with pytest.raises(InvalidImage, match=r"^image 0: empty"):
        decode_base64_images([""], GRAY)


# --- npy -------------------------------------------------------------------------------------------------


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


BATCH3 = np.random.default_rng(4).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
BATCH1 = BATCH3[:, :1]


@pytest.mark.parametrize(
    ("spec", "array", "expected"),
    [
        (RGB, BATCH3, BATCH3),
        (RGB, BATCH3.transpose(0, 2, 3, 1), BATCH3),  # NHWC
        (RGB, np.asfortranarray(BATCH3), BATCH3),  # Fortran-ordered file
        (GRAY, BATCH1, BATCH1),
        (GRAY, BATCH1[:, 0], BATCH1),  # NHW
        (GRAY, BATCH1.transpose(0, 2, 3, 1), BATCH1),  # NHW1
        (GRAY, BATCH1[0, 0], BATCH1[:1]),  # one HW image
    ],
    ids=["nchw", "nhwc", "fortran", "n1hw", "nhw", "nhw1", "hw"],
)
def test_npy_layouts(spec, array, expected):
    out = decode_npy(npy(array), spec)
    assert_layout(out, expected.shape)
    np.testing.assert_array_equal(out, expected)


def test_npy_float_input_is_scaled_with_round_half_even():
    values = np.array([0.0, 2.5 / 255, 3.5 / 255, 0.5, 1.0], dtype=np.float32)
    array = np.zeros((1, 1, 4, 4), dtype=">f4")  # big-endian on purpose
    array.flat[:5] = values
    out = decode_npy(npy(array), GRAY)
    np.testing.assert_array_equal(out.flat[:5], [0, 2, 4, 128, 255])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((1, 1, 4, 4), np.nan, dtype=np.float32), "finite"),
        (np.full((1, 1, 4, 4), np.inf, dtype=np.float64), "finite"),
        (np.full((1, 1, 4, 4), 255.0, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((1, 1, 4, 4), dtype=np.int64), "dtype int64"),
        (np.zeros((1, 1, 5, 4), dtype=np.uint8), "shape"),
        (np.zeros((1, 3, 4, 4), dtype=np.uint8), "shape"),  # RGB batch for a 1-channel model
        (np.zeros((0, 1, 4, 4), dtype=np.uint8), "empty"),
    ],
    ids=["nan", "inf", "float-0-255", "int64", "wrong-hw", "wrong-c", "empty"],
)
def test_npy_rejects_bad_arrays(array, message):
    with pytest.raises(InvalidArray, match=message) as info:
        decode_npy(npy(array), GRAY)
    assert info.value.code == "invalid_array"


UNPICKLED: list[str] = []


def _record_unpickle() -> str:
    UNPICKLED.append("ran")
    return "payload"


class Payload:
    def __reduce__(self):
        return (_record_unpickle, ())


def test_npy_never_unpickles():
    array = np.empty((1,), dtype=object)
    array[0] = Payload()
    data = npy(array)
    with pytest.raises(InvalidArray, match="object"):
        decode_npy(data, GRAY)
    with pytest.raises(InvalidArray, match="object"):
        decode_npy_array(data)
    assert UNPICKLED == []


def test_npy_header_claiming_huge_shape_is_rejected_without_allocating():
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(16)
    with pytest.raises(InvalidArray, match="promises"):
        decode_npy_array(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage bytes", npy(BATCH1)[:-3], npy(BATCH1) + b"x"],
    ids=["empty", "garbage", "truncated", "trailing"],
)
def test_npy_rejects_malformed_files(data):
    with pytest.raises(InvalidArray):
        decode_npy(data, GRAY)


def test_npz_is_not_an_npy():
    buffer = io.BytesIO()
    np.savez(buffer, x=BATCH1)
    with pytest.raises(InvalidArray):
        decode_npy_array(buffer.getvalue())


def test_encode_npy_round_trip():
    array = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    out = decode_npy_array(encode_npy(array))
    assert out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out, array)
    with pytest.raises(ValueError):
        encode_npy(np.array([object()], dtype=object))


# --- encoding --------------------------------------------------------------------------------------------


def test_to_uint8_rounds_half_even_and_clips():
    pixels = np.array([[-0.5, 0.0, 2.5 / 255, 3.5 / 255, 1.0, 7.0, np.nan]], dtype=np.float32)
    out = to_uint8(pixels)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, [[0, 0, 2, 4, 255, 255, 0]])
    with pytest.raises(TypeError):
        to_uint8(np.zeros(3, dtype=np.uint8))


def test_encode_png_modes_and_base64():
    gray = np.full((1, 3, 5), 9, dtype=np.uint8)
    assert Image.open(io.BytesIO(encode_png(gray))).mode == "L"
    color = np.zeros((3, 3, 5), dtype=np.uint8)
    color[0] = 255
    img = Image.open(io.BytesIO(base64.b64decode(encode_png_base64(color))))
    assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (5, 3), (255, 0, 0))


@pytest.mark.parametrize(
    "image",
    [np.zeros((2, 4, 4), np.uint8), np.zeros((4, 4), np.uint8), np.zeros((1, 4, 4), np.float32)],
    ids=["two-channels", "2d", "float"],
)
def test_encode_png_rejects_bad_arrays(image):
    with pytest.raises((TypeError, ValueError)):
        encode_png(image)


def test_image_spec_validates():
    with pytest.raises(ValueError, match="channels"):
        ImageSpec(channels=4, height=4, width=4)
    with pytest.raises(ValueError, match="height"):
        ImageSpec(channels=1, height=0, width=4)


def test_codecs_import_neither_torch_nor_training():
    root = Path(__file__).resolve().parents[3]
    code = "import sys, service.core.codecs; print(sorted({'torch', 'training'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
