"""Streaming PNG output: an image whose rows arrive in bands is never whole in memory.

`write_png_rows(path, bands, width, height, channels, bit_depth)` writes a PNG from an
iterable (typically a generator that computes them) of (R, W, C) uint8 / uint16 row
bands, atomically (`fastsr.atomic.atomic_write`: a temp file in the target folder,
renamed when complete). `PngStream` is the encoder underneath: every row Paeth-filtered
(vectorised with numpy given the row above, in chunks of about 1 MiB of raw rows to
bound the int16 temporaries), one zlib stream, IDAT chunks of about 1 MiB written as
they fill. `quantize_png_samples` turns float samples in 0..255 into PNG samples.

Memory for a 16000 x 16000 RGB output: the band being added plus ~25 MB, against
768 MB for the uint8 image and 3 GB for it as float32.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from fastsr.atomic import atomic_write

_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # gray, gray + alpha, RGB, RGBA
_IDAT_BYTES = 1 << 20


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _paeth_scanlines(raw: np.ndarray, prev: np.ndarray | None, bpp: int) -> bytes:
    """Rows raw (R, row bytes) uint8 as PNG scanlines: filter byte 4 (Paeth) + filtered bytes.

    prev: the unfiltered row above raw[0] (None at the top of the image).
    """
    cur = raw.astype(np.int16)
    up = np.empty_like(cur)
    up[0] = prev if prev is not None else 0
    up[1:] = cur[:-1]
    left = np.zeros_like(cur)
    left[:, bpp:] = cur[:, :-bpp]
    upleft = np.zeros_like(cur)
    upleft[:, bpp:] = up[:, :-bpp]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    filtered = ((cur - pred) & 0xFF).astype(np.uint8)
    return np.concatenate([np.full((raw.shape[0], 1), 4, np.uint8), filtered], axis=1).tobytes()


class PngStream:
    """Encode a PNG incrementally: `add` rows top to bottom, then `close`; bytes go to `out`.

    width x height, channels 1..4 (gray, gray + alpha, RGB, RGBA), bit_depth 8 (uint8
    rows) or 16 (uint16 rows). chunk_bytes: raw bytes filtered at once (the temporaries
    are about 20x that).
    """

    def __init__(self, out: BinaryIO, width: int, height: int, channels: int, bit_depth: int = 8,
                 level: int = 6, chunk_bytes: int = 1 << 20):
        if bit_depth not in (8, 16) or channels not in _COLOR_TYPE or width <= 0 or height <= 0:
            raise ValueError(f"cannot encode a {width}x{height} PNG with {channels} channel(s) at {bit_depth} bits")
        self.width, self.height, self.channels = width, height, channels
        self.dtype = np.dtype(np.uint8 if bit_depth == 8 else np.uint16)
        self.rows = 0
        self._out = out
        self._bpp = channels * self.dtype.itemsize
        self._rows_per_chunk = max(1, chunk_bytes // (width * self._bpp))
        self._comp = zlib.compressobj(level)
        self._pending = bytearray()
        self._prev: np.ndarray | None = None
        header = struct.pack(">IIBBBBB", width, height, bit_depth, _COLOR_TYPE[channels], 0, 0, 0)
        out.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header))

    def add(self, rows: np.ndarray) -> None:
        """Append rows: (R, width, channels) of the stream's dtype."""
        if rows.dtype != self.dtype or rows.shape[1:] != (self.width, self.channels):
            raise ValueError(f"expected (R, {self.width}, {self.channels}) {self.dtype} rows, got {rows.dtype} {rows.shape}")
        if self.rows + rows.shape[0] > self.height:
            raise ValueError(f"more rows than the {self.height} the header declares")
        raw = np.ascontiguousarray(rows, dtype=self.dtype.newbyteorder(">")).view(np.uint8)
        raw = raw.reshape(rows.shape[0], self.width * self._bpp)
        for r0 in range(0, raw.shape[0], self._rows_per_chunk):
            chunk = raw[r0 : r0 + self._rows_per_chunk]
            self._pending += self._comp.compress(_paeth_scanlines(chunk, self._prev, self._bpp))
            self._prev = chunk[-1].copy()
            if len(self._pending) >= _IDAT_BYTES:
                self._flush_idat()
        self.rows += rows.shape[0]

    def close(self) -> None:
        """Finish the file; ValueError when fewer rows came than the header declares."""
        if self.rows != self.height:
            raise ValueError(f"got {self.rows} rows, the header declares {self.height}")
        self._pending += self._comp.flush()
        self._flush_idat()
        self._out.write(png_chunk(b"IEND", b""))

    def _flush_idat(self) -> None:
        if self._pending:
            self._out.write(png_chunk(b"IDAT", bytes(self._pending)))
            self._pending.clear()


def write_png_rows(path: str | os.PathLike, bands: Iterable[np.ndarray], width: int, height: int,
                   channels: int, bit_depth: int = 8) -> Path:
    """Write a PNG from (R, width, channels) uint8 / uint16 row bands, top to bottom.

    Atomic: if `bands` raises, or yields too few or too many rows, nothing appears at `path`
    (and a file already there is untouched). OSError for write failures.
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            png = PngStream(f, width, height, channels, bit_depth)
            for band in bands:
                png.add(band)
            png.close()

    return atomic_write(path, write)


def quantize_png_samples(data: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Float32 samples in 0..255 -> PNG samples, overwriting `data` on the way: NaN -> 0,
    clamped, rounded half to even; uint8 (bit_depth 8) or uint16 scaled to 0..65535 (16)."""
    np.nan_to_num(data, copy=False, nan=0.0)
    np.clip(data, 0.0, 255.0, out=data)
    if bit_depth == 16:
        np.multiply(data, np.float32(65535.0 / 255.0), out=data)
    return np.rint(data, out=data).astype(np.uint16 if bit_depth == 16 else np.uint8)
