"""Fuzz and property tests for the image door: `read_image`, `list_images` and the CLI.

Contract for every input: a correct Image, or ImageReadError with one line that starts
with the file name (the CLI: exit 1, one `fastsr: error: FILE: ...` line per bad file, no
traceback), within a few seconds. "Correct" is checked against an independent writer:
16-bit PNGs are encoded here (all five filters, Adam7), palettes and EXIF orientations are
applied with numpy, never with the code under test.

Formats without a checksum (BMP, TIFF, GIF, JPEG, WebP) can turn a flipped bit into a
different, valid image; for those only the contract is checked. PNG has CRCs and zlib
checksums, so a damaged PNG must decode to the original pixels or raise.
"""
from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from PIL import Image as PILImage

from fuzzing import flip_bits, flips, quick, write
from fastsr.cli import main
from fastsr.errors import ImageReadError
from fastsr.imageio import Image, frame_count, list_images, read_animation, read_image

SECONDS = 20  # one decode of a tiny file; far above the real cost, far below a CI hang


def check_image(img: Image) -> None:
    """What every successful read must look like."""
    assert img.rgb.dtype == torch.float32 and img.rgb.dim() == 3 and img.rgb.shape[0] == 3
    assert img.height > 0 and img.width > 0 and img.bit_depth in (8, 16)
    assert torch.isfinite(img.rgb).all() and img.rgb.min() >= 0 and img.rgb.max() <= 255
    if img.alpha is not None:
        assert img.alpha.shape == img.rgb.shape[1:] and img.alpha.dtype == torch.float32
        assert img.alpha.min() >= 0 and img.alpha.max() <= 255


def read_or_error(path: Path, **kw) -> Image | ImageReadError:
    """read_image under the contract: an Image or a one-line ImageReadError naming the file."""
    with quick(SECONDS):
        try:
            img = read_image(path, **kw)
        except ImageReadError as e:
            message = str(e)
            assert message.startswith(str(path)) and "\n" not in message, message
            return e
    check_image(img)
    return img


def hwc(img: Image) -> np.ndarray:
    return img.rgb.permute(1, 2, 0).numpy()


def as_255(a: np.ndarray, bits: int) -> np.ndarray:
    return a.astype(np.float64) * (255.0 / 65535.0) if bits == 16 else a.astype(np.float64)


# ----------------------------------------------------------------------------- writers
# An independent PNG encoder: 8/16-bit samples, filter type per row, optional Adam7.

ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG color type


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def filter_rows(a: np.ndarray, filters: list[int]) -> bytes:
    """Encode (h, w, c) samples as PNG scanlines, row i with filter filters[i % len]."""
    h, w, _ = a.shape
    raw = np.ascontiguousarray(a.astype(">u2" if a.dtype == np.uint16 else np.uint8)).view(np.uint8)
    r = raw.reshape(h, -1).astype(np.int32)
    bpp = r.shape[1] // w  # bytes per pixel
    up = np.vstack([np.zeros_like(r[:1]), r[:-1]])
    left = np.zeros_like(r)
    left[:, bpp:] = r[:, :-bpp]
    upleft = np.zeros_like(r)
    upleft[:, bpp:] = up[:, :-bpp]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    predictors = [np.zeros_like(r), left, up, (left + up) // 2, paeth]
    kinds = np.array([filters[i % len(filters)] for i in range(h)])
    pred = np.stack(predictors)[kinds, np.arange(h)]
    rows = np.concatenate([kinds[:, None], (r - pred) & 0xFF], axis=1).astype(np.uint8)
    return rows.tobytes()


def png_bytes(a: np.ndarray, *, interlace: bool = False, filters=(0,), extra: bytes = b"") -> bytes:
    """A PNG of (h, w, c) uint8 / uint16 samples; `extra` chunks go before IDAT."""
    h, w, c = a.shape
    depth = 16 if a.dtype == np.uint16 else 8
    if interlace:
        data = b"".join(
            filter_rows(a[y0::dy, x0::dx], list(filters)) for x0, y0, dx, dy in ADAM7 if a[y0::dy, x0::dx].size
        )
    else:
        data = filter_rows(a, list(filters))
    header = struct.pack(">IIBBBBB", w, h, depth, COLOR_TYPE[c], 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra
            + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b""))


def exif_orientation(value: int) -> bytes:
    exif = PILImage.Exif()
    exif[0x0112] = value
    return exif.tobytes().removeprefix(b"Exif\x00\x00")  # eXIf holds the bare TIFF structure


# EXIF orientation -> what a viewer shows, from the EXIF spec (row 0 / column 0 positions).
ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a[:, ::-1], -1),
    8: lambda a: np.rot90(a, 1),
}


def pil_bytes(pil: PILImage.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


# ----------------------------------------------------------------------------- corpus
# One small valid file per kind the reader handles; the fuzz tests damage these.


def _animated(fmt: str) -> bytes:
    frames = [PILImage.fromarray(noise(9, 11, 3, seed)) for seed in (1, 2, 3)]
    if fmt == "GIF":
        frames = [f.quantize(32) for f in frames]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, loop=0, **kw)


def _tiff16(**kw) -> bytes:
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(4).integers(0, 65536, (9, 11, 3), dtype=np.uint16), **kw)
    return buf.getvalue()


def _palette(transparency: bool) -> bytes:
    pil = PILImage.fromarray(noise(9, 11, 3)).quantize(16)
    return pil_bytes(pil, "PNG", **({"transparency": bytes(range(0, 256, 16))} if transparency else {}))


def _exif_jpeg() -> bytes:
    pil = PILImage.fromarray(noise(9, 11, 3))
    exif = pil.getexif()
    exif[0x0112] = 6
    return pil_bytes(pil, "JPEG", exif=exif, quality=90)


CORPUS = {
    "rgb8.png": lambda: pil_bytes(PILImage.fromarray(noise(9, 11, 3)), "PNG"),
    "rgba16-adam7.png": lambda: png_bytes(
        np.random.default_rng(5).integers(0, 65536, (9, 11, 4), dtype=np.uint16), interlace=True, filters=(0, 1, 2, 3, 4)),
    "gray16.png": lambda: png_bytes(np.random.default_rng(6).integers(0, 65536, (9, 11, 1), dtype=np.uint16), filters=(4,)),
    "palette.png": lambda: _palette(False),
    "palette-trns.png": lambda: _palette(True),
    "animated.png": lambda: _animated("PNG"),
    "animated.gif": lambda: _animated("GIF"),
    "animated.webp": lambda: _animated("WEBP"),
    "rgb.jpg": lambda: pil_bytes(PILImage.fromarray(noise(9, 11, 3)), "JPEG", quality=90),
    "exif.jpg": _exif_jpeg,
    "cmyk.jpg": lambda: pil_bytes(PILImage.fromarray(noise(9, 11, 3)).convert("CMYK"), "JPEG"),
    "rgb.bmp": lambda: pil_bytes(PILImage.fromarray(noise(9, 11, 3)), "BMP"),
    "rgb16.tif": lambda: _tiff16(),
    "rgb16-zlib-be.tif": lambda: _tiff16(compression="zlib", byteorder=">"),
    "la.tif": lambda: pil_bytes(PILImage.fromarray(noise(9, 11, 2), "LA"), "TIFF"),
}


@functools.lru_cache(maxsize=None)
def corpus(name: str) -> bytes:
    return CORPUS[name]()


@functools.lru_cache(maxsize=None)
def clean_pixels(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        img = read_image(write(Path(d), name, corpus(name)))
        return hwc(img).copy(), None if img.alpha is None else img.alpha.numpy().copy()


def same_as_clean(name: str, img: Image) -> bool:
    rgb, alpha = clean_pixels(name)
    if hwc(img).shape != rgb.shape or not np.array_equal(hwc(img), rgb):
        return False
    return (img.alpha is None) == (alpha is None) and (alpha is None or np.array_equal(img.alpha.numpy(), alpha))


def test_the_corpus_reads_cleanly(tmp_path):
    for name in CORPUS:
        assert isinstance(read_or_error(write(tmp_path, name, corpus(name))), Image), name


# ----------------------------------------------------------------------------- damaged files


@given(name=st.sampled_from(sorted(CORPUS)), where=flips)
def test_flipped_bits(tmp_path, name, where):
    result = read_or_error(write(tmp_path, name, flip_bits(corpus(name), where)))
    if name.endswith(".png") and isinstance(result, Image):
        assert same_as_clean(name, result), "a damaged PNG decoded to different pixels"


@given(name=st.sampled_from(sorted(CORPUS)), keep=st.floats(0, 1, exclude_max=True))
def test_truncated(tmp_path, name, keep):
    data = corpus(name)
    cut = max(1, int(keep * len(data)))
    result = read_or_error(write(tmp_path, name, data[:cut]))
    if isinstance(result, Image) and not name.startswith("animated"):
        # Only the end of the file may be missing (IEND, trailing tags): all pixels are there.
        assert same_as_clean(name, result), f"cut at {cut} of {len(data)} gave different pixels"


@given(name=st.sampled_from(sorted(CORPUS)), junk=st.binary(min_size=1, max_size=64),
       where=st.floats(0, 1))
def test_inserted_junk(tmp_path, name, junk, where):
    data = corpus(name)
    at = int(where * len(data))
    result = read_or_error(write(tmp_path, name, data[:at] + junk + data[at:]))
    if name.endswith(".png") and isinstance(result, Image):
        assert same_as_clean(name, result)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".gif", ".bmp", ".tif", ".webp"])
def test_zero_byte_file(tmp_path, ext):
    err = read_or_error(write(tmp_path, "empty" + ext, b""))
    assert isinstance(err, ImageReadError) and "empty" in str(err)


def test_missing_file_and_folder(tmp_path):
    assert "no such file" in str(read_or_error(tmp_path / "nope.png"))
    (tmp_path / "dir.png").mkdir()
    assert "directory" in str(read_or_error(tmp_path / "dir.png"))


# ----------------------------------------------------------------------------- wrong format

TEXT_IMAGES = {  # text that some Pillow plugin (not one fastsr reads) would decode
    "xbm": b"#define x_width 4\n#define x_height 2\nstatic char x_bits[] = {0x0f, 0x05};\n",
    "ppm": b"P3\n2 1\n255\n255 0 0 0 255 0\n",
    "pbm": b"P1\n2 2\n0 1\n1 0\n",
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
}


@pytest.mark.parametrize("kind", sorted(TEXT_IMAGES))
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_text_formats_are_not_decoded(tmp_path, kind, ext):
    err = read_or_error(write(tmp_path, kind + ext, TEXT_IMAGES[kind]))
    assert isinstance(err, ImageReadError) and "not an image" in str(err)


@given(text=st.text(min_size=1, max_size=200), ext=st.sampled_from([".png", ".jpg", ".gif", ".tif"]))
def test_text_named_as_image(tmp_path, text, ext):
    assert isinstance(read_or_error(write(tmp_path, "notes" + ext, text.encode())), ImageReadError)


@given(name=st.sampled_from(sorted(CORPUS)), ext=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".tif", ".webp"]))
def test_content_decides_not_the_extension(tmp_path, name, ext):
    img = read_or_error(write(tmp_path, "renamed" + ext, corpus(name)))
    assert isinstance(img, Image) and same_as_clean(name, img)


# ----------------------------------------------------------------------------- huge claims


def png_claiming(width: int, height: int) -> bytes:
    return png_bytes(np.zeros((1, 1, 3), np.uint8)).replace(
        chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)),
        chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))


def gif_first_descriptor(data: bytes) -> int:
    """Offset of the first image descriptor (0x2C) of a GIF: skip the color table and extensions."""
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[at] == 0x21:  # extension: introducer, label, then sub-blocks up to a 0 length
        at += 2
        while data[at]:
            at += data[at] + 1
        at += 1
    assert data[at] == 0x2C
    return at


def patch_size(name: str, width: int, height: int) -> bytes:
    """A corpus file whose header claims width x height (pixel data unchanged)."""
    data = bytearray(corpus(name))
    if name.endswith(".png"):
        return png_claiming(width, height)
    if name.endswith(".gif"):  # logical screen and first image descriptor, 16-bit little endian
        data[6:10] = struct.pack("<HH", width, height)
        at = gif_first_descriptor(data)
        data[at + 5:at + 9] = struct.pack("<HH", width, height)
    elif name.endswith(".bmp"):
        data[18:26] = struct.pack("<ii", width, height)
    elif name.endswith(".jpg"):  # baseline SOF0: FF C0, length, precision, height, width
        at = data.index(b"\xff\xc0")
        data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@given(name=st.sampled_from(["rgb8.png", "animated.gif", "rgb.bmp", "rgb.jpg"]),
       width=st.integers(1, 65535), height=st.integers(1, 65535), max_pixels=st.integers(1, 10_000))
def test_claimed_size_is_checked_before_decoding(tmp_path, name, width, height, max_pixels):
    result = read_or_error(write(tmp_path, name, patch_size(name, width, height)), max_pixels=max_pixels)
    if isinstance(result, Image):
        assert result.height * result.width <= max_pixels
    elif "exceeds the limit" in str(result):
        assert f"{width}x{height}" in str(result)


@pytest.mark.parametrize("side", [10**5, 2**31 - 1])
def test_decompression_bomb_header(tmp_path, side):
    path = write(tmp_path, "bomb.png", png_claiming(side, side))
    err = read_or_error(path)
    assert isinstance(err, ImageReadError) and "exceeds the limit" in str(err) and f"{side}x{side}" in str(err)


# ----------------------------------------------------------------------------- correct decoding

shapes = st.tuples(st.integers(1, 19), st.integers(1, 19))


@given(shape=shapes, channels=st.sampled_from([1, 2, 3, 4]), interlace=st.booleans(),
       filters=st.lists(st.integers(0, 4), min_size=1, max_size=5), orientation=st.integers(0, 8),
       key=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_16bit_png_keeps_precision(tmp_path, shape, channels, interlace, filters, orientation, key, seed):
    a = np.random.default_rng(seed).integers(0, 65536, (*shape, channels), dtype=np.uint16)
    extra = exif_orientation(orientation) if orientation else b""
    extra = chunk(b"eXIf", extra) if extra else b""
    has_key = key and channels in (1, 3)  # tRNS: a 16-bit key color for gray / RGB
    if has_key:
        extra += chunk(b"tRNS", struct.pack(f">{channels}H", *a[0, 0]))
    img = read_or_error(write(tmp_path, "a16.png", png_bytes(a, interlace=interlace, filters=filters, extra=extra)))
    assert isinstance(img, Image) and img.bit_depth == 16
    shown = ORIENT[orientation or 1](a)
    color = shown if channels >= 3 else shown[..., :1]
    np.testing.assert_allclose(hwc(img), np.broadcast_to(as_255(color[..., :3], 16), hwc(img).shape), atol=1e-4)
    if channels in (2, 4):
        np.testing.assert_allclose(img.alpha.numpy(), as_255(shown[..., -1], 16), atol=1e-4)
    elif has_key:
        transparent = np.all(shown == a[0, 0], axis=-1)
        np.testing.assert_array_equal(img.alpha.numpy(), np.where(transparent, 0.0, 255.0))
    else:
        assert img.alpha is None


@given(shape=shapes, mode=st.sampled_from(["1", "L", "LA", "RGB", "RGBA"]), interlace=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_8bit_png_modes(tmp_path, shape, mode, interlace, seed):
    rng = np.random.default_rng(seed)
    channels = {"1": 1, "L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    a = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
    if mode == "1":
        a = np.where(a >= 128, 255, 0).astype(np.uint8)
        data = pil_bytes(PILImage.fromarray(a[..., 0] > 0), "PNG")  # a real 1-bit PNG
    else:
        data = png_bytes(a, interlace=interlace, filters=(0, 1, 2, 3, 4))
    img = read_or_error(write(tmp_path, "a8.png", data))
    assert isinstance(img, Image) and img.bit_depth == 8
    color = a[..., :3] if channels >= 3 else a[..., :1]
    np.testing.assert_array_equal(hwc(img), np.broadcast_to(color, hwc(img).shape).astype(np.float32))
    if channels in (2, 4):
        np.testing.assert_array_equal(img.alpha.numpy(), a[..., -1].astype(np.float32))
    else:
        assert img.alpha is None


@given(shape=shapes, colors=st.integers(1, 256), bits=st.sampled_from([1, 2, 4, 8]),
       trns=st.none() | st.lists(st.integers(0, 255), min_size=1, max_size=256), seed=st.integers(0, 2**32 - 1))
@example(shape=(1, 2), colors=2, bits=1, trns=[0, 10], seed=0)  # tRNS b"\x00\n": Pillow reads alpha 255
def test_palette_png(tmp_path, shape, colors, bits, trns, seed):
    colors = min(colors, 2**bits)
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (colors, 3), dtype=np.uint8)
    index = rng.integers(0, colors, shape, dtype=np.uint8)
    pil = PILImage.fromarray(index, "P")
    pil.putpalette(palette.tobytes())
    kw = {"bits": bits} if bits < 8 else {}
    if trns is not None:
        trns = trns[:colors]
        kw["transparency"] = bytes(trns)
    img = read_or_error(write(tmp_path, "p.png", pil_bytes(pil, "PNG", **kw)))
    assert isinstance(img, Image) and img.bit_depth == 8
    np.testing.assert_array_equal(hwc(img), palette[index].astype(np.float32))
    if trns is None:
        assert img.alpha is None
    else:
        table = np.full(256, 255, np.uint8)
        table[:len(trns)] = trns
        np.testing.assert_array_equal(img.alpha.numpy(), table[index].astype(np.float32))


@given(shape=shapes, colors=st.integers(2, 256), transparent=st.none() | st.integers(0, 255),
       seed=st.integers(0, 2**32 - 1))
def test_gif_palette_and_transparency(tmp_path, shape, colors, transparent, seed):
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (colors, 3), dtype=np.uint8)
    assume(len(np.unique(palette, axis=0)) == colors)  # distinct: a GIF writer may reorder them
    index = rng.integers(0, colors, shape, dtype=np.uint8)
    pil = PILImage.fromarray(index, "P")
    pil.putpalette(palette.tobytes())
    kw = {} if transparent is None else {"transparency": transparent % colors}
    img = read_or_error(write(tmp_path, "p.gif", pil_bytes(pil, "GIF", optimize=False, **kw)))
    assert isinstance(img, Image) and img.bit_depth == 8
    opaque = np.ones(shape, bool) if transparent is None else index != transparent % colors
    np.testing.assert_array_equal(hwc(img)[opaque], palette[index][opaque].astype(np.float32))
    if transparent is None or opaque.all():
        assert img.alpha is None or (img.alpha == 255).all()
    else:
        np.testing.assert_array_equal(img.alpha.numpy(), np.where(opaque, 255.0, 0.0))


@given(shape=shapes, orientation=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_exif_orientation_of_jpeg(tmp_path, shape, orientation, seed):
    pil = PILImage.fromarray(noise(*shape, 3, seed))
    plain = read_or_error(write(tmp_path, "plain.jpg", pil_bytes(pil, "JPEG", quality=90)))
    exif = pil.getexif()
    exif[0x0112] = orientation
    turned = read_or_error(write(tmp_path, "turned.jpg", pil_bytes(pil, "JPEG", quality=90, exif=exif)))
    assert isinstance(turned, Image) and isinstance(plain, Image)
    np.testing.assert_array_equal(hwc(turned), ORIENT[orientation](hwc(plain)))


@given(color=st.tuples(*[st.integers(0, 255)] * 3))
def test_cmyk_jpeg(tmp_path, color):
    pil = PILImage.new("RGB", (16, 16), color).convert("CMYK")
    img = read_or_error(write(tmp_path, "cmyk.jpg", pil_bytes(pil, "JPEG", quality=95)))
    assert isinstance(img, Image) and img.alpha is None
    assert np.abs(hwc(img) - np.array(color)).max() <= 12


@given(fmt=st.sampled_from(["GIF", "PNG", "WEBP"]), frames=st.integers(2, 4), shape=shapes,
       seed=st.integers(0, 2**32 - 1))
def test_animations_give_the_first_frame(tmp_path, fmt, frames, shape, seed):
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, (frames, 3), dtype=np.uint8)
    assume(len({tuple(c) for c in colors}) == frames)
    pics = [PILImage.new("RGB", shape[::-1], tuple(int(v) for v in c)) for c in colors]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = pil_bytes(pics[0], fmt, save_all=True, append_images=pics[1:], duration=30, loop=0, **kw)
    img = read_or_error(write(tmp_path, "anim." + fmt.lower(), data))
    assert isinstance(img, Image) and img.rgb.shape == (3, *shape)
    assert (hwc(img) == colors[0]).all()


@given(shape=shapes, channels=st.sampled_from([1, 3, 4]), compression=st.sampled_from([None, "zlib"]),
       byteorder=st.sampled_from(["<", ">"]), seed=st.integers(0, 2**32 - 1))
def test_16bit_tiff(tmp_path, shape, channels, compression, byteorder, seed):
    tifffile = pytest.importorskip("tifffile")
    a = np.random.default_rng(seed).integers(0, 65536, (*shape, channels), dtype=np.uint16)
    path = tmp_path / "a16.tif"
    extra = {"extrasamples": [2]} if channels == 4 else {}  # 2 = unassociated alpha
    tifffile.imwrite(path, a if channels > 1 else a[..., 0], compression=compression, byteorder=byteorder,
                     photometric="rgb" if channels > 1 else "minisblack", **extra)
    img = read_or_error(path)
    if isinstance(img, ImageReadError):  # a layout Pillow cannot decode: fine, if said clearly
        return
    assert img.bit_depth == 16
    np.testing.assert_allclose(hwc(img), np.broadcast_to(as_255(a[..., :3], 16), hwc(img).shape), atol=1e-4)
    if channels == 4:
        np.testing.assert_allclose(img.alpha.numpy(), as_255(a[..., 3], 16), atol=1e-4)


@pytest.mark.parametrize("dtype,values,ok", [
    (np.int32, [0, 70000, 5], False), (np.int16, [-5, 3, 300], False), (np.int32, [0, 65535, 7], True)])
def test_integer_tiff_outside_16_bits_is_refused(tmp_path, dtype, values, ok):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "int.tif"
    tifffile.imwrite(path, np.array([values], dtype))
    result = read_or_error(path)
    if ok:
        assert isinstance(result, Image) and np.allclose(hwc(result)[0, :, 0], as_255(np.array(values), 16))
    else:
        assert isinstance(result, ImageReadError) and "do not fit 16 bits" in str(result)


# ----------------------------------------------------------------------------- list_images


@given(names=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="/\\\x00"), min_size=1, max_size=12)
                      .filter(lambda s: s not in (".", "..")), max_size=8, unique=True))
def test_list_images_picks_visible_image_files(tmp_path, names):
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for n in names:
        try:
            (folder / n).write_bytes(b"x")
        except OSError:  # a name this file system refuses (too long in bytes, ...)
            pass
    found = list_images([folder, folder])
    expected = sorted(p for p in folder.iterdir()
                      if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
                      and not p.name.startswith("."))
    assert found == expected


# ----------------------------------------------------------------------------- the command line


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    with quick(60):
        rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [line for line in err.splitlines() if line.strip()]


@given(damage=st.lists(st.tuples(st.sampled_from(sorted(CORPUS)), st.sampled_from(["flip", "cut", "empty", "text"]),
                                 st.floats(0, 1, exclude_max=True)), min_size=1, max_size=3))
def test_cli_upscale_reports_each_bad_file_on_one_line(tmp_path, capsys, damage):
    folder = tmp_path / "in"
    out = tmp_path / "out"
    folder.mkdir(exist_ok=True)
    for old in [*folder.iterdir(), *(out.iterdir() if out.exists() else [])]:
        old.unlink()
    write(folder, "good.png", corpus("rgb8.png"))
    expected_bad = set()
    for i, (name, how, where) in enumerate(damage):
        data = bytearray(corpus(name))
        if how == "flip":
            data[int(where * len(data))] ^= 0xFF
        elif how == "cut":
            data = data[:int(where * len(data))]
        elif how == "empty":
            data = b""
        else:
            data = b"not an image\n"
        path = write(folder, f"d{i}_{name}", bytes(data))
        if isinstance(read_or_error(path), ImageReadError):
            expected_bad.add(str(path))
        elif frame_count(path) > 1:  # upscale reads every frame of an animated GIF / WebP
            try:
                read_animation(path)
            except ImageReadError as e:
                assert str(e).startswith(str(path)) and "\n" not in str(e), e
                expected_bad.add(str(path))
    rc, lines = run_cli(capsys, ["upscale", str(folder), "-o", str(out), "--scale", "2", "--bicubic"])
    errors = [line for line in lines if line.startswith("fastsr: error: ")]
    assert all(line.startswith("fastsr: ") for line in lines), lines
    assert {e[len("fastsr: error: "):].split(": ")[0] for e in errors} == expected_bad
    assert rc == (1 if expected_bad else 0)
    assert len(list(out.iterdir())) == len(damage) + 1 - len(expected_bad)  # animations: .gif / .webp
    assert PILImage.open(out / "good_x2.png").size == (22, 18)


def test_cli_upscale_refuses_a_bomb_and_keeps_going(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder, "bomb.png", png_claiming(10**5, 10**5))
    write(folder, "ok.jpg", corpus("rgb8.png"))  # a PNG named .jpg: read by content
    rc, lines = run_cli(capsys, ["upscale", str(folder), "-o", str(tmp_path / "out"), "-s", "3", "--bicubic"])
    assert rc == 1
    assert [line for line in lines if "error" in line] == [
        f"fastsr: error: {folder / 'bomb.png'}: 100000x100000 pixels (10,000,000,000) exceeds the limit of "
        "67,108,864 pixels (possible decompression bomb); raise max_pixels / --max-pixels to read it"]
    assert PILImage.open(tmp_path / "out" / "ok_x3.png").size == (33, 27)


def test_cli_eval_names_the_bad_file(tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    write(folder, "a.png", pil_bytes(PILImage.fromarray(noise(40, 40, 3)), "PNG"))
    write(folder, "b.png", corpus("rgb8.png")[:100])
    write(folder, "c.jpg", b"")
    rc, lines = run_cli(capsys, ["eval", str(folder), "--scale", "2", "--bicubic"])
    errors = [line for line in lines if line.startswith("fastsr: error: ")]
    assert rc == 1 and len(errors) == 2
    assert errors[0].startswith(f"fastsr: error: {folder / 'b.png'}: ")
    assert errors[1] == f"fastsr: error: {folder / 'c.jpg'}: empty file (0 bytes)"
