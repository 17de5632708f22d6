"""Reading and writing images for the command line: Pillow in, PNG out, one-line errors.

`read_image` turns any PNG / JPEG / BMP / TIFF / WebP / GIF that Pillow decodes into an
`Image` holding a (3, H, W) float32 RGB tensor in 0..255 and an optional (H, W) float32
alpha in 0..255:

    L, 1, I;16, I          gray, replicated to RGB (I: only if every value fits 0..65535)
    LA, RGBA, P + tRNS     RGB + alpha (16-bit gray / RGB + tRNS too: the key color is transparent)
    CMYK, YCbCr, ...       converted to RGB by Pillow
    EXIF orientation       applied;  animations: the first frame (all: `read_animation`)

16-bit files keep their precision (value / 65535 * 255). Pillow decodes 16-bit gray
natively but truncates 16-bit RGB / RGBA / gray+alpha to their high bytes; for PNG and
TIFF the low bytes are recovered by decoding a second time with the byte order swapped
(see `_low_byte_rawmode`), so no other decoder is needed.

Only those formats are decoded, whatever the file name says: Pillow's other plugins (EPS
runs Ghostscript; XBM and PPM are plain text) are not reachable from outside data. Pillow's
warnings about damaged files are not printed (the file either decodes or raises).

The pixel count is read from the header (Image.open is lazy) and checked against
`max_pixels` before anything is decoded: a 100-byte PNG can claim 10^10 pixels.

`write_png` writes atomically (temp file in the target folder, fsync, rename), 8- or
16-bit. Pillow cannot write 16-bit RGB(A), so 16-bit PNGs are encoded by
`fastsr.pngstream` (zlib plus the Paeth filter, vectorised with numpy, in row chunks to
bound memory), which also streams PNGs too large to hold (`write_png_rows`).
"""
from __future__ import annotations

import io
import os
import re
import struct
import sys
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps

from fastsr.atomic import atomic_write
from fastsr.errors import ImageReadError
from fastsr.pngstream import PngStream, quantize_png_samples

# An 8192 x 8192 input is already a 32768 x 32768 output at x4 (1 G pixels, 12 GB as
# float32 RGB): anything larger must be asked for explicitly.
DEFAULT_MAX_PIXELS = 8192 * 8192

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Pillow format ids tried when opening, by content (JPEG includes multi-picture MPO files
# from cameras; DIB: headerless BMP). Nothing else is ever identified, whatever the extension.
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "TIFF", "WEBP", "GIF")

# What Pillow's decoders raise for malformed files (its own exception types are not a
# closed set: PNG chunk errors are SyntaxError, broken headers struct.error, etc.).
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
    MemoryError, struct.error, zlib.error, PILImage.DecompressionBombError,
)

_PIL_LIMIT_LOCK = threading.Lock()


@dataclass
class Image:
    """A decoded image.

    rgb: (3, H, W) float32 in 0..255 (16-bit sources: value / 65535 * 255, not rounded).
    alpha: (H, W) float32 in 0..255, or None when the file has no transparency.
    bit_depth: 8 or 16, the precision of the source samples.
    gray: the file holds one color channel (gray or gray + alpha); rgb repeats it 3 times.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    bit_depth: int
    path: Path
    gray: bool = False

    @property
    def height(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[2])


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _open_lazily(path: Path) -> PILImage.Image:
    """PILImage.open (header only) with Pillow's own bomb guard off; the caller checks the size.

    Pillow refuses images above 2 * MAX_IMAGE_PIXELS inside open() with a message that
    has no dimensions, and that global would override a user's larger max_pixels. It is
    lifted only for the header parse (under a lock, restored at once): no pixel data is
    decoded before `_decode` has compared width * height with max_pixels.
    """
    PILImage.init()  # registers every plugin, so open() knows all of PILLOW_FORMATS (WEBP, ...)
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # header damage ("Corrupt EXIF data") raises or is harmless
        saved = PILImage.MAX_IMAGE_PIXELS
        PILImage.MAX_IMAGE_PIXELS = None
        try:
            return PILImage.open(path, formats=PILLOW_FORMATS)
        finally:
            PILImage.MAX_IMAGE_PIXELS = saved


def read_header(path: str | os.PathLike) -> tuple[tuple[int, int, int], int] | None:
    """((H, W, channels), bit depth) from the file's header without decoding pixels, at worst
    a guess (channels 4 when the file has transparency, else 3; bit depth 16 or 8); None when
    the header is unreadable (`read_pixels` on the file then says why)."""
    try:
        with _open_lazily(Path(path)) as im:
            deep = im.mode.startswith("I") or any(";16" in str(t[3]) for t in im.tile if len(t) > 3)
            alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
            return (im.size[1], im.size[0], 4 if alpha else 3), 16 if deep else 8
    except _DECODE_ERRORS:
        return None


def frame_count(path: str | os.PathLike) -> int:
    """Frames in an animated GIF / WebP from its header, else 1 (also for unreadable files:
    the decode that follows says why)."""
    try:
        with _open_lazily(Path(path)) as im:
            return int(getattr(im, "n_frames", 1)) if im.format in ("GIF", "WEBP") else 1
    except _DECODE_ERRORS:
        return 1


@dataclass
class Animation:
    """The frames of an animated GIF / WebP: (H, W, 3 or 4) uint8 arrays (4: some frame has
    transparency), each shown `durations[i]` milliseconds; loop: 0 forever, N times, None once."""

    frames: list[np.ndarray]
    durations: list[int]
    loop: int | None


def read_animation(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Animation:
    """Decode every frame of an animated GIF / WebP (Pillow composes each onto the ones before).

    max_pixels bounds width * height * frames, checked from the header before decoding.
    Raises ImageReadError as `read_pixels` does.
    """
    path = Path(path)
    read_pixels(path, max_pixels)  # the file's own checks and one-line errors, on its first frame
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_lazily(path) as im:
                n = int(getattr(im, "n_frames", 1))
                width, height = im.size
                if width * height * n > max_pixels:
                    raise ImageReadError(
                        f"{path}: {n} frames of {width}x{height} ({width * height * n:,} pixels) exceed the limit "
                        f"of {max_pixels:,} pixels; raise max_pixels / --max-pixels to read it")
                frames, durations = [], []
                for i in range(n):
                    im.seek(i)
                    im.load()
                    frames.append(im.convert("RGBA"))
                    durations.append(int(im.info.get("duration") or 100))
                loop = im.info.get("loop")
    except ImageReadError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"{path}: corrupt, truncated or unsupported animation ({_one_line(e)})") from None
    arrays = [np.asarray(f) for f in frames]
    if all(a[..., 3].min() == 255 for a in arrays):
        arrays = [np.ascontiguousarray(a[..., :3]) for a in arrays]
    return Animation(arrays, durations, None if loop is None else int(loop))


def write_animation(path: str | os.PathLike, animation: Animation) -> Path:
    """Write an Animation as a GIF (palette per frame, Pillow's quantizer) or a lossless WebP,
    by path's suffix, atomically; OSError on failure."""
    path = Path(path)
    fmt = {".gif": "GIF", ".webp": "WEBP"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"an animation is written as .gif or .webp, not {path.name}")
    images = [PILImage.fromarray(np.ascontiguousarray(f)) for f in animation.frames]
    extra = {"lossless": True} if fmt == "WEBP" else {"disposal": 2 if images[0].mode == "RGBA" else 0}
    if animation.loop is not None:
        extra["loop"] = animation.loop

    def write(tmp: str) -> None:
        images[0].save(tmp, format=fmt, save_all=True, append_images=images[1:],
                       duration=animation.durations, **extra)

    return atomic_write(path, write)


def _low_byte_rawmode(im: PILImage.Image) -> str | None:
    """Raw mode that makes Pillow's decoder keep the LOW byte of each 16-bit sample.

    Pillow decodes 48/64-bit RGB(A) into 8-bit RGB(A) by keeping the high byte; its
    unpackers for the opposite byte order keep the other byte. Decoding twice, once each
    way, gives both bytes, with Pillow's own unfiltering / decompression (bits per pixel
    are the same for both raw modes, so PNG filtering is undone correctly). 16-bit
    gray + alpha ("LA;16B") is decoded with the 32-bit raw mode "RGBA", which keeps all
    four bytes. Returns None when the image is not one of these cases.
    """
    if not im.tile or im.mode not in ("RGB", "RGBA"):
        return None
    rawmodes = {_tile_rawmode(t) for t in im.tile}
    if len(rawmodes) != 1:
        return None
    raw = rawmodes.pop()
    if not isinstance(raw, str):
        return None
    if raw == "LA;16B":
        return "RGBA"
    native = "L" if sys.byteorder == "little" else "B"
    for base in ("RGB", "RGBA"):
        for order, other in (("B", "L"), ("L", "B"), ("N", "B" if native == "L" else "L")):
            if raw == f"{base};16{order}":
                return f"{base};16{other}"
    return None


def _tile_rawmode(tile) -> object:
    args = tile[3] if len(tile) > 3 else None
    return args[0] if isinstance(args, tuple) and args else args


def _with_rawmode(tile, rawmode: str):
    args = tile[3]
    new_args = (rawmode,) + tuple(args[1:]) if isinstance(args, tuple) else rawmode
    return tile._replace(args=new_args) if hasattr(tile, "_replace") else (*tile[:3], new_args, *tile[4:])


def _decode(path: Path, max_pixels: int) -> tuple[np.ndarray, int]:
    """Decode the first frame to an (H, W, C) array, C in 1..4 (gray, gray+alpha, RGB, RGBA).

    Returns (array: uint8, or uint16 for 16-bit sources; bit_depth).
    Raises ImageReadError for anything Pillow cannot decode, or too many pixels.
    """
    try:
        with warnings.catch_warnings():
            # The size is checked here, and damage ("Corrupt EXIF data", "Truncated File
            # Read") either decodes or raises: Pillow's warnings would only be noise on stderr.
            warnings.simplefilter("ignore")
            return _decode_quietly(path, max_pixels)
    except ImageReadError:
        raise
    except PILImage.UnidentifiedImageError:
        raise ImageReadError(
            f"{path}: not an image file fastsr reads (PNG, JPEG, BMP, TIFF, WebP, GIF): unknown format or corrupt header"
        ) from None
    except PermissionError as e:
        raise ImageReadError(f"{path}: cannot open ({e.strerror})") from None
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"{path}: corrupt, truncated or unsupported image ({_one_line(e)})") from None


def _decode_quietly(path: Path, max_pixels: int) -> tuple[np.ndarray, int]:
    """`_decode` without the error translation (Pillow's exceptions escape)."""
    with _open_lazily(path) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageReadError(
                f"{path}: {width}x{height} pixels ({width * height:,}) exceeds the limit of "
                f"{max_pixels:,} pixels (possible decompression bomb); raise max_pixels / --max-pixels to read it"
            )
        low_mode = _low_byte_rawmode(im)
        low = _decode_low_bytes(path, low_mode) if low_mode else None
        im.load()
        if im.format == "PNG" and im.mode == "P" and isinstance(im.info.get("transparency"), int):
            _fix_palette_alpha(im, path)
        im = ImageOps.exif_transpose(im)
        if low is not None:
            return _with_key_alpha(_merge_16bit(np.asarray(im), low, low_mode), im.info), 16
        return _pillow_to_array(im, path)


def _fix_palette_alpha(im: PILImage.Image, path: Path) -> None:
    r"""Pillow reads a palette PNG's tRNS as "one transparent index" when it matches
    `^\xff*\x00\xff*$`, where `$` also matches before a final b"\n": alpha values (0, 10)
    become (0, 255). Put the real per-entry alphas back in that case."""
    with open(path, "rb") as f:
        f.seek(8)
        while (head := f.read(8)) and len(head) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IDAT":
                return
            if kind == b"tRNS":
                body = f.read(length)
                if not re.fullmatch(rb"\xff*\x00\xff*", body):
                    im.info["transparency"] = body
                return
            f.seek(length + 4, os.SEEK_CUR)


def _decode_low_bytes(path: Path, rawmode: str) -> np.ndarray:
    with _open_lazily(path) as im:
        im.tile = [_with_rawmode(t, rawmode) for t in im.tile]
        im.load()
        return np.asarray(ImageOps.exif_transpose(im))


def _merge_16bit(high: np.ndarray, low: np.ndarray, low_mode: str) -> np.ndarray:
    if low_mode == "RGBA":
        # 16-bit gray + alpha decoded as raw RGBA bytes: (L hi, L lo, A hi, A lo).
        b = low.astype(np.uint16)
        return np.stack([b[..., 0] * 256 + b[..., 1], b[..., 2] * 256 + b[..., 3]], axis=-1)
    return high.astype(np.uint16) * 256 + low.astype(np.uint16)


def _with_key_alpha(arr: np.ndarray, info: dict) -> np.ndarray:
    """16-bit gray / RGB with a PNG tRNS key color (full 16-bit sample values): add the alpha
    channel it means, 0 where a pixel equals the key and 65535 elsewhere. Other arrays as given."""
    key = info.get("transparency")
    channels = arr.shape[-1]
    if key is None or channels not in (1, 3) or np.ndim(key) != (0 if channels == 1 else 1):
        return arr
    opaque = np.any(arr != np.asarray(key, dtype=np.int64).reshape(channels), axis=-1)
    return np.concatenate([arr, (opaque * 65535).astype(np.uint16)[..., None]], axis=-1)


def _has_transparency(im: PILImage.Image) -> bool:
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return True
    if "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"


def _pillow_to_array(im: PILImage.Image, path: Path) -> tuple[np.ndarray, int]:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit gray ("I" is how some Pillow versions / TIFFs hand 16-bit gray over).
        arr = np.asarray(im).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageReadError(
                f"{path}: integer samples {arr.min()}..{arr.max()} do not fit 16 bits (0..65535); "
                "save it as 8- or 16-bit unsigned"
            )
        return _with_key_alpha(arr.astype(np.uint16)[..., None], im.info), 16
    if mode == "F":
        raise ImageReadError(f"{path}: 32-bit float images are not supported; save it as 8- or 16-bit")
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if _has_transparency(im):
        target = "LA" if mode in ("LA", "La") else "RGBA"
    else:
        target = "L" if mode == "L" else "RGB"
    if mode != target:
        im = im.convert(target)
    arr = np.asarray(im)
    return (arr[..., None] if arr.ndim == 2 else arr), 8


def read_pixels(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int]:
    """The decoded samples: (H, W, C) uint8 / uint16 (C: gray, gray + alpha, RGB, RGBA) and
    the bit depth, 8 or 16. `read_image` without the float copy; same checks and errors."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    return _decode(path, max_pixels)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image:
    """Read an image file into RGB (3, H, W) float32 0..255 plus optional alpha (H, W).

    Raises ImageReadError (one-line message starting with the path) for missing, empty,
    truncated, corrupt, unsupported or too-large (> max_pixels, checked from the header
    before decoding) files.
    """
    path = Path(path)
    arr, bit_depth = read_pixels(path, max_pixels)
    scale = 255.0 / 65535.0 if bit_depth == 16 else 1.0
    data = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)
    if scale != 1.0:
        data = data * scale
    channels = data.shape[0]
    color = data[:1].expand(3, -1, -1) if channels in (1, 2) else data[:3]
    alpha = data[-1].clone() if channels in (2, 4) else None
    return Image(rgb=color.contiguous(), alpha=alpha, bit_depth=bit_depth, path=path, gray=channels in (1, 2))


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers never see half a PNG (see fastsr.atomic)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def encode_png16(pixels: np.ndarray, rows_per_chunk: int = 256) -> bytes:
    """Encode an (H, W, C) uint16 array, C in 1..4, as a 16-bit PNG (Paeth filter on every row;
    `fastsr.pngstream.PngStream`, filtering rows_per_chunk rows at a time)."""
    if pixels.dtype != np.uint16 or pixels.ndim != 3 or not 1 <= pixels.shape[2] <= 4:
        raise ValueError(f"expected an (H, W, 1..4) uint16 array, got {pixels.dtype} {pixels.shape}")
    height, width, channels = pixels.shape
    buf = io.BytesIO()
    png = PngStream(buf, width, height, channels, 16, chunk_bytes=rows_per_chunk * width * channels * 2)
    png.add(pixels)
    png.close()
    return buf.getvalue()


def write_png(
    path: str | os.PathLike,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None = None,
    bit_depth: int = 8,
) -> Path:
    """Write rgb (3, H, W) float 0..255 and optional alpha (H, W) float 0..255 as a PNG.

    Values are clamped to 0..255 (NaN -> 0) and rounded; bit_depth 16 maps 0..255 to
    0..65535 (RGB or RGBA, 16 bits per sample). Written atomically; OSError on failure.
    """
    path = Path(path)
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    if not isinstance(rgb, torch.Tensor) or rgb.dim() != 3 or rgb.shape[0] != 3:
        raise ValueError(f"rgb must be a (3, H, W) tensor, got {getattr(rgb, 'shape', type(rgb))}")
    planes = [rgb]
    if alpha is not None:
        if alpha.shape != rgb.shape[1:]:
            raise ValueError(f"alpha must be (H, W) = {tuple(rgb.shape[1:])}, got {tuple(alpha.shape)}")
        planes.append(alpha[None])
    data = torch.cat([p.detach().to("cpu", torch.float32) for p in planes]).permute(1, 2, 0).numpy()
    samples = quantize_png_samples(data, bit_depth)  # data is our copy: cat made it
    if bit_depth == 16:
        encoded = encode_png16(samples)
    else:
        buf = io.BytesIO()
        PILImage.fromarray(np.ascontiguousarray(samples)).save(buf, format="PNG")
        encoded = buf.getvalue()
    _atomic_write_bytes(path, encoded)
    return path


# ---------------------------------------------------------------------------------------
# Listing inputs
# ---------------------------------------------------------------------------------------


def is_image_name(path: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """True for a visible file name with one of `extensions` (case-insensitive)."""
    # Dot files are skipped: macOS "._x.png" AppleDouble files and our own temp files.
    return path.suffix.lower() in extensions and not path.name.startswith(".")


def list_images(inputs: Iterable[str | os.PathLike], recursive: bool = False,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Expand files and folders into a list of image paths, without duplicates.

    Folders are scanned for `extensions` (sorted by name); recursive: their subfolders
    too (depth first, sorted; hidden ones skipped), else only the folder itself. Other
    paths are kept as given, even when missing or oddly named: the caller reads them and
    reports whatever is wrong with each.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        found = _folder_images(path, recursive, extensions) if path.is_dir() else [path]
        for p in found:
            key = p.resolve() if p.exists() else p
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def _folder_images(folder: Path, recursive: bool, extensions: tuple[str, ...],
                   visited: set[Path] | None = None) -> list[Path]:
    visited = set() if visited is None else visited
    visited.add(folder.resolve())
    entries = sorted(folder.iterdir())
    found = [c for c in entries if c.is_file() and is_image_name(c, extensions)]
    if recursive:
        for sub in entries:  # a folder reached twice (a symlink loop) is read once
            if sub.is_dir() and not sub.name.startswith(".") and sub.resolve() not in visited:
                found += _folder_images(sub, True, extensions, visited)
    return found
