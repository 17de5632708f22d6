"""fastsr.imageio: every Pillow mode we promise, 16-bit precision, and one-line errors."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from fastsr.errors import ImageReadError
from fastsr.imageio import encode_png16, list_images, read_image, write_png

RNG = np.random.default_rng(1234)


def _rgb(h=13, w=17):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _as_hwc(img):
    return img.rgb.permute(1, 2, 0).numpy()


def _save(tmp_path, name, pil, **kw):
    path = tmp_path / name
    pil.save(path, **kw)
    return path


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("ext,kw", [("png", {}), ("bmp", {}), ("tif", {}), ("webp", {"lossless": True})])
def test_rgb_lossless_formats_read_exactly(tmp_path, ext, kw):
    arr = _rgb()
    img = read_image(_save(tmp_path, f"a.{ext}", PILImage.fromarray(arr), **kw))
    assert img.rgb.dtype == torch.float32 and img.rgb.shape == (3, 13, 17)
    assert img.alpha is None and img.bit_depth == 8
    np.testing.assert_array_equal(_as_hwc(img), arr.astype(np.float32))


def test_gray_is_replicated(tmp_path):
    arr = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    img = read_image(_save(tmp_path, "g.png", PILImage.fromarray(arr)))
    for c in range(3):
        np.testing.assert_array_equal(img.rgb[c].numpy(), arr)
    assert img.alpha is None


def test_bilevel_is_gray(tmp_path):
    arr = RNG.integers(0, 2, (9, 11), dtype=np.uint8).astype(bool)
    img = read_image(_save(tmp_path, "b.png", PILImage.fromarray(arr)))
    np.testing.assert_array_equal(img.rgb[1].numpy(), arr * 255.0)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_modes(tmp_path, mode):
    arr = RNG.integers(0, 256, (8, 10, len(mode)), dtype=np.uint8)
    img = read_image(_save(tmp_path, "a.png", PILImage.fromarray(arr, mode)))
    np.testing.assert_array_equal(img.alpha.numpy(), arr[..., -1])
    expected = arr[..., :1].repeat(3, -1) if mode == "LA" else arr[..., :3]
    np.testing.assert_array_equal(_as_hwc(img), expected)


def test_palette_with_and_without_transparency(tmp_path):
    p = PILImage.fromarray(_rgb()).convert("P")
    plain = read_image(_save(tmp_path, "p.png", p))
    assert plain.alpha is None
    np.testing.assert_array_equal(_as_hwc(plain), np.asarray(p.convert("RGB")))
    transparent = read_image(_save(tmp_path, "pt.png", p, transparency=int(np.asarray(p)[0, 0])))
    assert transparent.alpha is not None
    assert transparent.alpha[0, 0] == 0 and transparent.alpha.max() == 255


def test_gray16_keeps_precision(tmp_path):
    arr = RNG.integers(0, 65536, (7, 9), dtype=np.uint16)
    path = _save(tmp_path, "g16.png", PILImage.fromarray(arr))
    img = read_image(path)
    assert img.bit_depth == 16
    np.testing.assert_allclose(img.rgb[0].numpy(), arr * (255 / 65535), rtol=0, atol=1e-4)


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_color16_png_keeps_precision(tmp_path, channels):
    # Pillow alone truncates these to their high bytes; read_image recovers the low bytes.
    arr = RNG.integers(0, 65536, (11, 14, channels), dtype=np.uint16)
    arr[0, 0] = 0x01FF  # high byte 1, low byte 255: any byte mix-up shows here
    path = tmp_path / "c16.png"
    path.write_bytes(encode_png16(arr, rows_per_chunk=4))
    img = read_image(path)
    assert img.bit_depth == 16
    expected = arr.astype(np.float64) * (255 / 65535)
    color = expected[..., :1].repeat(3, -1) if channels == 2 else expected[..., :3]
    np.testing.assert_allclose(_as_hwc(img), color, atol=1e-4)
    if channels in (2, 4):
        np.testing.assert_allclose(img.alpha.numpy(), expected[..., -1], atol=1e-4)
    else:
        assert img.alpha is None


def test_rgb16_tiff_keeps_precision(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    arr = RNG.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    for compression in (None, "zlib"):
        path = tmp_path / f"c16_{compression}.tif"
        tifffile.imwrite(path, arr, compression=compression)
        img = read_image(path)
        assert img.bit_depth == 16
        np.testing.assert_allclose(_as_hwc(img), arr * (255 / 65535), atol=1e-4)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    arr = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    path = _save(tmp_path, "c.jpg", PILImage.fromarray(arr).convert("CMYK"), quality=95)
    img = read_image(path)
    assert img.rgb.shape == (3, 16, 16) and img.alpha is None
    assert np.abs(_as_hwc(img) - arr).max() < 12


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # white stripe on the left
    pil = PILImage.fromarray(arr)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = read_image(_save(tmp_path, "r.jpg", pil, exif=exif, quality=95))
    assert img.rgb.shape == (3, 40, 20)
    # The left stripe ends up at the top after a clockwise quarter turn.
    assert img.rgb[:, :8].mean() > 240 and img.rgb[:, 12:].mean() < 15


def test_animated_gif_reads_first_frame(tmp_path):
    frames = [PILImage.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = read_image(path)
    assert img.rgb.shape == (3, 6, 8)
    assert img.rgb[0].min() > 200 and img.rgb[2].max() < 50


def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width, height):
    """A PNG whose header claims width x height, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))  # 10^10 pixels in 70 bytes
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    msg = str(e.value)
    assert "bomb.png" in msg and "100000x100000" in msg and "\n" not in msg


def test_max_pixels_is_a_user_limit(tmp_path):
    path = _save(tmp_path, "ok.png", PILImage.fromarray(_rgb(10, 10)))
    assert read_image(path, max_pixels=100).rgb.shape == (3, 10, 10)
    with pytest.raises(ImageReadError, match="10x10"):
        read_image(path, max_pixels=99)


def test_max_pixels_above_pillows_own_limit(tmp_path, monkeypatch):
    # A user's larger limit wins over Pillow's global bomb guard (and restores it after).
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 20)
    path = _save(tmp_path, "ok.png", PILImage.fromarray(_rgb(10, 10)))
    assert read_image(path, max_pixels=1000).rgb.shape == (3, 10, 10)
    assert PILImage.MAX_IMAGE_PIXELS == 20


def _truncated_png(tmp_path):
    buf = io.BytesIO()
    PILImage.fromarray(_rgb(64, 64)).save(buf, format="PNG")
    path = tmp_path / "trunc.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _zero_byte(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return path


def _text_as_png(tmp_path):
    path = tmp_path / "text.png"
    path.write_text("hello, not a png\n")
    return path


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda d: d / "missing.png", "no such file"),
        (_zero_byte, "empty file"),
        (_truncated_png, "truncated"),
        (_text_as_png, "not an image"),
        (lambda d: d, "directory"),
    ],
    ids=["missing", "zero-byte", "truncated", "text-as-png", "directory"],
)
def test_bad_files_give_one_line_errors(tmp_path, make, needle):
    path = make(tmp_path)
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and needle in msg and "\n" not in msg


def test_float_tiff_is_refused_clearly(tmp_path):
    path = _save(tmp_path, "f.tif", PILImage.fromarray(np.ones((4, 4), np.float32)))
    with pytest.raises(ImageReadError, match="float"):
        read_image(path)


# ----------------------------------------------------------------------------- writing


def test_write_png_rounds_clamps_and_round_trips(tmp_path):
    rgb = torch.tensor([[-5.0, 0.4, 0.6], [254.6, 300.0, float("nan")], [1.5, 2.5, 128.0]]).reshape(3, 1, 3)
    path = write_png(tmp_path / "sub" / "o.png", rgb)
    back = np.asarray(PILImage.open(path))
    assert back.shape == (1, 3, 3) and back.dtype == np.uint8
    np.testing.assert_array_equal(back[0].T, [[0, 0, 1], [255, 255, 0], [2, 2, 128]])
    assert [p.name for p in path.parent.iterdir()] == ["o.png"]  # no temp file left


def test_write_png_alpha(tmp_path):
    rgb = torch.rand(3, 5, 6) * 255
    alpha = torch.rand(5, 6) * 255
    back = read_image(write_png(tmp_path / "a.png", rgb, alpha))
    np.testing.assert_array_equal(back.alpha.numpy(), alpha.round().numpy())
    np.testing.assert_array_equal(back.rgb.numpy(), rgb.round().numpy())


@pytest.mark.parametrize("with_alpha", [False, True])
def test_write_png16_round_trips(tmp_path, with_alpha):
    rgb = torch.rand(3, 9, 7, dtype=torch.float32) * 255
    alpha = torch.rand(9, 7) * 255 if with_alpha else None
    back = read_image(write_png(tmp_path / "o16.png", rgb, alpha, bit_depth=16))
    assert back.bit_depth == 16
    # 16-bit quantization step is 255/65535 ~ 0.0039 in 0..255 units.
    assert (back.rgb - rgb).abs().max() <= 0.5 * 255 / 65535 + 1e-4
    if with_alpha:
        assert (back.alpha - alpha).abs().max() <= 0.5 * 255 / 65535 + 1e-4


def test_write_png_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="3, H, W"):
        write_png(tmp_path / "x.png", torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="alpha"):
        write_png(tmp_path / "x.png", torch.zeros(3, 2, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="bit_depth"):
        write_png(tmp_path / "x.png", torch.zeros(3, 2, 2), bit_depth=12)


# ----------------------------------------------------------------------------- listing


def test_list_images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.PNG", "a.jpg", "c.txt", ".hidden.png", "d.webp"):
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "e.png").write_bytes(b"x")
    extra = tmp_path / "missing.png"
    got = list_images([str(folder), str(extra), str(folder / "a.jpg")])
    assert [p.name for p in got] == ["a.jpg", "b.PNG", "d.webp", "missing.png"]
