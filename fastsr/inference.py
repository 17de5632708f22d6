"""Whole-image inference: tiling for memory, the paper's self-ensemble (EDSR+), bicubic.

Tiling. The LR image is cut into tiles of `tile` x `tile` pixels; each is run with
`tile_overlap` extra LR pixels of context on every side (clipped at the image border)
and only the tile's own part of the output is kept. The output equals the untiled one
exactly (up to float reassociation) when the overlap is at least the network's
receptive-field radius (`receptive_field_radius`): every output pixel then sees the
same inputs, and the image-border zero padding stays where it was. That radius is the
default. Smaller overlaps are faster (less recomputed context) and differ from the
untiled output near tile seams; EDSR's large receptive field makes the difference
small but not zero.

Self-ensemble (Lim et al., section 4: "EDSR+"): run the 8 flips / 90-degree rotations
of the input, undo each on its output, average.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np

import torch
import torch.nn as nn

from fastsr.errors import FastSRError
from fastsr.imresize import imresize

Tile = Union[int, str, None]

# Activations alive at once per LR pixel, in units of n_feats channels: the block input,
# both conv outputs, the global skip, plus slack for conv workspaces (im2col on the CPU,
# cuDNN workspaces). The upsampler adds about 2 * scale^2 (conv output + shuffled copy).
_ACTIVATION_MAPS_LR = 8
# The tail's 3 output channels at full resolution, as the CPU's oneDNN convolution writes them
# before reordering: blocked in 16 channels (measured: eager fp32 EDSR with 4 features peaked at
# 612 B per LR pixel at x2, 256 of them this buffer; the n_feats terms alone said 256).
_TAIL_BLOCK_CHANNELS = 16
# Never plan to use more than this fraction of the free memory: allocator fragmentation
# and the estimate's error need headroom.
_MEMORY_FRACTION = 0.5
_MIN_TILE = 32


def _conv_radius(conv: nn.Conv2d) -> int:
    """Pixels of context one conv adds on each side (its 'same' padding reach)."""
    k = max(conv.kernel_size)
    d = max(conv.dilation)
    return d * (k - 1) // 2


def receptive_field_radius(model: nn.Module, scale: int | None = None) -> int:
    """Receptive-field radius of `model` in LR pixels (each 3x3 conv adds 1, each 5x5 adds 2).

    For EDSR/MDSR only the convs that run at `scale` count (MDSR's other scale branches
    do not; scale=None on MDSR: the largest over its scales). Convs after the upsampler run at HR resolution; each is rounded up to a
    whole LR pixel, which can only over-estimate (safe for exact tiling). Other modules:
    every Conv2d counts (an upper bound).
    """
    if all(hasattr(model, a) for a in ("head", "body", "pre_blocks", "upsampler", "tail_conv")):
        if hasattr(model, "scale_index"):  # MDSR
            if scale is None:
                return max(receptive_field_radius(model, s) for s in model.scales)
            idx = model.scale_index(scale)
        else:
            idx = 0
        parts: list[nn.Module] = [model.head, *model.pre_blocks(idx), model.body, model.upsampler(idx), model.tail_conv()]
        convs = [m for part in parts for m in part.modules() if isinstance(m, nn.Conv2d)]
    else:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(_conv_radius(c) for c in convs)


def _model_feats(model: nn.Module) -> int:
    feats = getattr(model, "n_feats", None)
    if feats:
        return int(feats)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    return max(widths, default=64)


def _proc_kib(path: str, key: str) -> int | None:
    """A "Key:   N kB" line of a /proc file, in bytes; None when there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_meminfo_available() -> int | None:
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_cgroup_available() -> int | None:
    # In a container the cgroup limit, not the host's free RAM, is what kills us.
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Bytes that a new allocation on `device` can use, or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory cached by PyTorch's allocator but unused is free for us too.
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        values = [v for v in (_read_meminfo_available(), _read_cgroup_available()) if v is not None]
        return min(values) if values else None
    return None


def activation_bytes_per_lr_pixel(model: nn.Module, scale: int, dtype: torch.dtype) -> int:
    """Rough peak activation memory per LR pixel and image:
    bytes * (n_feats * (8 + 2 s^2) + 16 s^2), the last term the tail's blocked output."""
    elem = torch.empty((), dtype=dtype).element_size()
    s2 = scale * scale
    return elem * (_model_feats(model) * (_ACTIVATION_MAPS_LR + 2 * s2) + _TAIL_BLOCK_CHANNELS * s2)


def auto_tile_size(
    model: nn.Module,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    lr_size: tuple[int, int] | None = None,
    scale: int | None = None,
    batch: int = 1,
    tile_overlap: int | None = None,
) -> int | None:
    """LR tile size that fits in free memory, or None when the whole image fits.

    lr_size: (H, W) of the LR input (None: always return a tile). The estimate is
    `activation_bytes_per_lr_pixel` x pixels (tile plus overlap) x batch, against half
    the free memory (CUDA: mem_get_info plus the allocator's cache; CPU: MemAvailable,
    capped by the cgroup limit). When free memory cannot be read, a 512 tile is used.
    """
    scale = int(scale if scale is not None else getattr(model, "scale", 2))
    per_px = activation_bytes_per_lr_pixel(model, scale, dtype) * max(1, batch)
    free = free_memory_bytes(device)
    if free is None:
        return 512 if lr_size is None or max(lr_size) > 512 else None
    budget = free * _MEMORY_FRACTION
    if lr_size is not None:
        h, w = lr_size
        # The output buffer (N, 3, sH, sW) lives beside the activations.
        budget -= batch * 3 * h * w * scale * scale * torch.empty((), dtype=dtype).element_size()
        if h * w * per_px <= budget:
            return None
    overlap = receptive_field_radius(model, scale) if tile_overlap is None else tile_overlap
    side = int(math.sqrt(max(budget, 0) / per_px)) - 2 * overlap
    return max(_MIN_TILE, side // 8 * 8)


# ---------------------------------------------------------------------------------------
# A bound on the process's resident memory (fastsr upscale --max-memory)
# ---------------------------------------------------------------------------------------

# Peak bytes per pixel of decoding a file (`fastsr.imageio`), measured with Pillow 13:
# Pillow's own image (4 bytes per RGB pixel), the EXIF-transposed copy, the numpy array
# and the bytes it is made from: 14.3 for RGB, 16.3 RGBA, 4.3 gray; 16-bit files are
# decoded twice (high and low bytes) and merged: 29.4 for RGB.
DECODE_BYTES_PER_PIXEL = {8: 16, 16: 32}
# Measured activation peaks of the fused CPU path are 0.65-1.0x `activation_bytes_per_lr_pixel`
# (EDSR-baseline x2/x3/x4, 256-512 px tiles); per-call overheads (oneDNN scratch, primitive
# caches, allocator rounding) are a constant, and the PNG stream's filter temporaries another.
_ACTIVATION_MARGIN = 1.25
_TILE_OVERHEAD_BYTES = 48 << 20
_PNG_STREAM_BYTES = 32 << 20


def resident_bytes() -> int | None:
    """Resident memory of this process now (VmRSS), or None where /proc is not there."""
    return _proc_kib("/proc/self/status", "VmRSS")


def upscale_peak_bytes(
    model: nn.Module | None,
    lr_size: tuple[int, int],
    channels: int,
    bit_depth: int,
    scale: int,
    tile: int | None,
    overlap: int,
    *,
    dtype: torch.dtype = torch.float32,
    on_cpu: bool = True,
    self_ensemble: bool = False,
    probe_px: int = 0,
) -> int:
    """Estimated peak memory above the process's baseline to upscale one file with `upscale_rows`.

    The larger of decoding the file (`DECODE_BYTES_PER_PIXEL`) and the upscaling that
    follows: the decoded (H, W, channels) integer image, one band of integer output rows
    (s * tile rows, s * W, 3 or 4 with alpha), the PNG stream, and one tile's work: its
    float input and output, the network's activations (`activation_bytes_per_lr_pixel`
    with a margin; counted only on_cpu, elsewhere they live on the device), alpha and
    bicubic resizing, the self-ensemble's copies. model None: bicubic. probe_px: the pixels
    of the crop at which the first tile still times the CPU engines against each other
    (`EDSR.whole_model_probe`): both run there and the heap keeps what each used, which
    together measured about one estimate's worth of activations per probe pixel (EDSR-baseline
    x2 fp32 at 256x256: fused 3.1 KB, OpenVINO 2.3 KB per pixel, estimate 5.4 KB).
    """
    h, w = lr_size
    s2 = scale * scale
    sample = 2 if bit_depth == 16 else 1
    out_c = 4 if channels in (2, 4) else 3
    th, tw = (h, w) if tile is None else (min(tile, h), min(tile, w))
    context_px = min(th + 2 * overlap, h) * min(tw + 2 * overlap, w)
    # Crop -> float (and its RGB copy), float output (network + alpha, concatenated), quantized.
    per_px = 8 * channels + 12 + 8 * out_c * s2 + out_c * sample * s2
    if out_c == 4 or model is None:  # MATLAB bicubic: a float pass per axis, per channel
        per_px += 8 * (scale + s2) * (3 if model is None else 1)
    activations = int(_ACTIVATION_MARGIN * activation_bytes_per_lr_pixel(model, scale, dtype)) if model is not None else 0
    if on_cpu:
        per_px += activations
    if self_ensemble:  # transformed input, transformed output, the float32 accumulator
        per_px += 24 + 36 * s2
    work = context_px * per_px + probe_px * activations + _TILE_OVERHEAD_BYTES
    band = scale * th * scale * w * out_c * sample + _PNG_STREAM_BYTES
    decoded = h * w * channels * sample
    return max(h * w * DECODE_BYTES_PER_PIXEL[bit_depth], decoded + band + work)


def process_memory_bytes() -> int:
    """What this process holds now: `resident_bytes`, or where /proc is not there the peak
    resident size so far (an over-estimate, which is the safe side for a bound)."""
    now = resident_bytes()
    if now is None:  # kB on Linux and BSD, bytes on macOS
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        now = peak if sys.platform == "darwin" else peak * 1024
    return now


def format_size(n: int) -> str:
    """Bytes as '1.50 GiB' (from 1 GiB up) or '800 MiB'."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def tile_for_memory(limit: int, peak: Callable[[int | None], int], lr_size: tuple[int, int]) -> int | None:
    """Largest LR tile (None: the whole image) with peak(tile) <= limit, else _MIN_TILE.

    peak: tile -> estimated bytes (e.g. baseline + `upscale_peak_bytes`), growing with the
    tile. The caller compares peak(result) with limit to see whether any tile fits.
    """
    if peak(None) <= limit:
        return None
    lo, hi = _MIN_TILE // 8, max(lr_size) // 8  # in units of 8 pixels
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if peak(mid * 8) <= limit else (lo, mid - 1)
    return lo * 8


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    """Split 0..length into ceil(length / tile) near-equal spans (no thin last sliver)."""
    n = max(1, math.ceil(length / tile))
    bounds = [round(i * length / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def _window_span(length: int, tile: int, overlap: int) -> int:
    """The context window's length along one axis: the longest of the tiles' spans with
    `overlap` on each side, clipped at the image's border. Every window of an image has it."""
    return max(min(length, b + overlap) - max(0, a - overlap) for a, b in _spans(length, tile))


def _window_start(start: int, overlap: int, span: int, length: int) -> int:
    """Where a window of `span` pixels starts for a tile starting at `start`: `overlap` before
    it, moved inward at the image's border so the window stays inside it."""
    return min(max(0, start - overlap), length - span)


def _tile_windows(h: int, w: int, tile: int, overlap: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Row-major tiles of an h x w image: ((y0, y1, x0, x1) the tile, (cy0, cy1, cx0, cx1)
    its context window).

    Every window has one shape (`_window_span` per axis): a window at the border is moved
    inward instead of clipped, so each tile still has `overlap` pixels of context on every
    side that is not the image's border. One shape per image matters on the CPU: each new
    input shape is timed (fused against OpenVINO), compiled by OpenVINO, and leaves its
    working set in caches and in the heap, so the up to 9 shapes of clipped windows cost
    time and memory that one shape pays once. The price, from 3 tiles per axis on, is up to
    `overlap` more pixels per border window and axis.
    """
    wh, ww = _window_span(h, tile, overlap), _window_span(w, tile, overlap)
    for y0, y1 in _spans(h, tile):
        cy0 = _window_start(y0, overlap, wh, h)
        for x0, x1 in _spans(w, tile):
            cx0 = _window_start(x0, overlap, ww, w)
            yield (y0, y1, x0, x1), (cy0, cy0 + wh, cx0, cx0 + ww)


def tile_count(lr_size: tuple[int, int], tile: int | None) -> int:
    """How many tiles `upscale_rows` cuts an (H, W) image into (tile None: 1)."""
    h, w = lr_size
    return len(_spans(h, tile)) * len(_spans(w, tile)) if tile else 1


def tile_cost(lr_size: tuple[int, int], tile: int | None, overlap: int) -> float:
    """Work of tiled over untiled: LR pixels the network runs on (every tile's context window,
    `_tile_windows`) over the image's pixels. 1.0 untiled; the recompute factor."""
    h, w = lr_size
    if not tile:
        return 1.0
    rows = len(_spans(h, tile)) * _window_span(h, tile, overlap)
    cols = len(_spans(w, tile)) * _window_span(w, tile, overlap)
    return rows * cols / (h * w)


# An image that fits in memory whole is still cut into tiles when that costs at most this much
# recomputed context, so that it gets a progress bar with an ETA: up to _PROGRESS_TILES tiles
# (fewer, larger ones when the image is too small for that many within the cost).
_PROGRESS_COST = 1.15
_PROGRESS_TILES = 8


def progress_tile(lr_size: tuple[int, int], overlap: int) -> int | None:
    """The largest tile (a multiple of 8) cutting the image into at least _PROGRESS_TILES tiles
    at a `tile_cost` of at most _PROGRESS_COST; failing that, the one giving the most tiles
    within that cost; None when no split into 2 or more is that cheap."""
    side = max(lr_size)
    fits = [(t, tile_count(lr_size, t)) for t in range(side - 1 - (side - 1) % 8, _MIN_TILE - 1, -8)
            if t > 0 and tile_cost(lr_size, t, overlap) <= _PROGRESS_COST]
    fits = [(t, n) for t, n in fits if n >= 2]
    if not fits:
        return None
    enough = [t for t, n in fits if n >= _PROGRESS_TILES]
    return max(enough) if enough else max(fits, key=lambda tn: (tn[1], tn[0]))[0]


def _tile_part(piece: torch.Tensor, window: tuple[tuple[int, ...], tuple[int, ...]], scale: int) -> torch.Tensor:
    """The tile's own output in `piece`, the output of its context window (..., s*ch, s*cw)."""
    (y0, y1, x0, x1), (cy0, _, cx0, _) = window
    oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
    return piece[..., oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale]


def _forward_tiled(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, tile: int, overlap: int
) -> torch.Tensor:
    n, _, h, w = x.shape
    if tile >= h and tile >= w:
        return run(x)
    out: torch.Tensor | None = None
    for window in _tile_windows(h, w, tile, overlap):
        (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) = window
        piece = run(x[:, :, cy0:cy1, cx0:cx1].contiguous())
        if out is None:
            out = piece.new_empty(n, piece.shape[1], h * scale, w * scale)
        out[:, :, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = _tile_part(piece, window, scale)
    assert out is not None
    return out


def upscale_rows(
    process: Callable[[np.ndarray], torch.Tensor],
    image: np.ndarray,
    scale: int,
    tile: int | None,
    overlap: int,
    bit_depth: int = 8,
) -> Iterator[np.ndarray]:
    """Upscale `image` tile by tile and yield the output as PNG-ready rows, top to bottom.

    image: (H, W, C) array of any dtype; process(crop) gets an (h, w, C) crop of it (a
    tile plus `overlap` context pixels per side) and returns its (C', s*h, s*w) float
    output in 0..255 on the CPU. Yields bands (s * tile_rows, s * W, C') of uint8
    (bit_depth 8) or uint16 (16), quantized as `write_png` does, for
    `fastsr.imageio.write_png_rows`. Only one band of output and one tile's work are
    alive at once: the full-size output never exists, as floats or at all.
    tile None: the whole image in one piece.
    """
    from fastsr.pngstream import quantize_png_samples

    h, w = image.shape[:2]
    band: np.ndarray | None = None
    for window in _tile_windows(h, w, tile or max(h, w), overlap):
        (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) = window
        part = _tile_part(process(image[cy0:cy1, cx0:cx1]), window, scale)
        samples = quantize_png_samples(part.float().permute(1, 2, 0).numpy(), bit_depth)
        if band is None:
            band = np.empty(((y1 - y0) * scale, w * scale, samples.shape[2]), samples.dtype)
        band[:, x0 * scale : x1 * scale] = samples
        del part, samples
        if x1 == w:
            yield band
            band = None


def _ensemble(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean over the dihedral group D4: rotate k quarter turns after an optional flip, undo."""
    acc: torch.Tensor | None = None
    for flip in (False, True):
        xf = x.flip(-1) if flip else x
        for k in range(4):
            # rot90 returns a transposed view; convs on such strides take a slow path (~2x).
            y = run(torch.rot90(xf, k, dims=(-2, -1)).contiguous())
            y = torch.rot90(y, -k, dims=(-2, -1))
            if flip:
                y = y.flip(-1)
            # Accumulate in float32 at least: eight bf16/fp16 additions would lose bits.
            y = y.to(torch.promote_types(y.dtype, torch.float32))
            acc = y if acc is None else acc.add_(y)
    assert acc is not None
    return (acc / 8).to(x.dtype)


def upscale(
    model: nn.Module,
    x: torch.Tensor,
    scale: int,
    *,
    tile: Tile = None,
    tile_overlap: int | None = None,
    self_ensemble: bool = False,
) -> torch.Tensor:
    """Super-resolve x (N, 3, H, W) float 0..255 -> (N, 3, scale*H, scale*W), x's dtype and device.

    model(x, scale=scale) must accept the scale keyword (EDSR checks it, MDSR selects
    its branches with it); model and x must already share device and dtype. A model taking
    another range (input_range, else rgb_range != 255) is fed x scaled to it and its output
    scaled back to 0..255.
    tile: None (whole image), an LR tile size, or "auto" (`auto_tile_size`).
    tile_overlap: LR context pixels per tile side; None = the receptive-field radius,
    which makes tiled == untiled. The output is not clamped or quantized.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float (N, C, H, W) tensor, got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if tile_overlap is not None and tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")
    if tile == "auto":
        tile = auto_tile_size(model, x.device, x.dtype, lr_size=tuple(x.shape[-2:]), scale=scale,
                              batch=x.shape[0], tile_overlap=tile_overlap)
    elif tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0):
        raise ValueError(f"tile must be a positive int, 'auto' or None, got {tile!r}")
    overlap = receptive_field_radius(model, scale) if tile_overlap is None else int(tile_overlap)

    # x is 0..255; a model taking another range (official --rgb_range 1, input_range=1) gets its own.
    to_model = float(getattr(model, "input_range", getattr(model, "rgb_range", 255.0))) / 255.0

    def call(p: torch.Tensor) -> torch.Tensor:
        if to_model == 1.0:
            return model(p, scale=scale)
        return model(p * to_model, scale=scale) / to_model

    def run(t: torch.Tensor) -> torch.Tensor:
        if tile is None:
            return call(t)
        return _forward_tiled(call, t, scale, tile, overlap)

    with torch.inference_mode():
        return _ensemble(run, x) if self_ensemble else run(x)


def bicubic_upscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """MATLAB-compatible bicubic upscaling (fastsr.imresize), the papers' baseline.

    x: (N, C, H, W), (C, H, W) or (H, W); uint8 in -> rounded uint8 out (MATLAB's uint8
    path, what the published baselines use), float in -> same float dtype, unclamped.
    """
    with torch.inference_mode():
        return imresize(x, scale=scale)


# ---------------------------------------------------------------------------------------
# Upscaler: a network (or bicubic) with its device, dtype, tiling and memory bound
# ---------------------------------------------------------------------------------------

_OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def _is_cpu_oom(err: RuntimeError) -> bool:
    return "can't allocate memory" in str(err) or "not enough memory" in str(err)


@dataclass
class Upscaler:
    """The chosen way to upscale: a loaded network, or bicubic (model None).

    tile: None (whole images), an LR tile size, or "auto" (`auto_tile_size`); tile_overlap:
    LR context pixels per tile side (None: exact tiling, see `context`).
    """

    model: nn.Module | None
    label: str
    device: torch.device
    dtype: torch.dtype
    scale: int
    tile: Tile = None
    tile_overlap: int | None = None
    self_ensemble: bool = False
    _last_size: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        """lr (N, 3, H, W) float 0..255 (uint8 for the bicubic protocol path) -> float32 CPU output."""
        return self.run(lr, self.tile)

    def run(self, lr: torch.Tensor, tile: Tile) -> torch.Tensor:
        """As __call__, with this tiling instead of self.tile (None: the whole input at once)."""
        if self.model is None:
            return bicubic_upscale(lr.to(self.device), self.scale).float().cpu()
        x = lr.to(self.device, self.dtype)
        y = upscale(self.model, x, self.scale, tile=tile, tile_overlap=self.tile_overlap,
                    self_ensemble=self.self_ensemble)
        return y.float().cpu()

    def run_guarded(self, lr: torch.Tensor, name: str, tile: Tile = None) -> torch.Tensor:
        """`run` with this tiling (default None: the caller tiles); out-of-memory becomes a
        one-line FastSRError naming `name` and suggesting --tile / --max-memory."""
        try:
            return self.run(lr, tile)
        except (*_OOM_ERRORS, RuntimeError) as e:
            if not isinstance(e, _OOM_ERRORS) and not _is_cpu_oom(e):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            h, w = lr.shape[-2:]
            hint = "try a smaller --tile" if isinstance(self.tile, int) else "try --max-memory SIZE or --tile 256"
            raise FastSRError(f"{name}: out of memory on {self.device} for a {w}x{h} input; {hint}") from None

    @property
    def context(self) -> int:
        """LR context pixels per tile side: tile_overlap, else what makes tiles exact (the
        network's receptive-field radius; bicubic reads 2 pixels beyond, alpha too)."""
        if self.tile_overlap is not None:
            return self.tile_overlap
        return max(3, receptive_field_radius(self.model, self.scale)) if self.model is not None else 3

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the network computes in (the fused path's own, else the module's)."""
        return getattr(self.model, "compute_dtype", None) or self.dtype

    def synchronize(self) -> None:
        """Wait for the device (timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_bytes(self, shape: tuple[int, int, int], bit_depth: int, tile: int | None) -> int:
        """`upscale_peak_bytes` of one (H, W, channels) image with this upscaler and `tile`."""
        h, w, channels = shape
        on_cpu = self.device.type == "cpu"
        probe_px = 0
        if on_cpu and hasattr(self.model, "whole_model_probe"):
            window = (1, 3, h, w) if tile is None else (1, 3, min(h, tile + 2 * self.context), min(w, tile + 2 * self.context))
            probe = self.model.whole_model_probe(window, self.scale)
            probe_px = 0 if probe is None else probe[-2] * probe[-1]
        return upscale_peak_bytes(self.model, (h, w), channels, bit_depth, self.scale, tile, self.context,
                                  dtype=self.compute_dtype, on_cpu=on_cpu, self_ensemble=self.self_ensemble,
                                  probe_px=probe_px)

    def choose_tile(self, name: str, shape: tuple[int, int, int], bit_depth: int,
                    limit: int | None, base: int) -> tuple[int | None, int | None]:
        """(LR tile, estimated peak) for one (H, W, channels) image named `name`.

        Without a limit: self.tile, "auto" resolved by `auto_tile_size` (peak None). With a
        limit on the process's memory (base: what it holds before this image): a fixed tile
        is checked against it, otherwise the largest tile within it (`tile_for_memory`);
        FastSRError when the bound cannot be kept. "auto" on a network on the CPU cuts an image
        that fits whole into `progress_tile` tiles when that is cheap, so that it shows progress.
        """
        h, w, _ = shape
        if limit is None:
            if self.tile != "auto":
                return self.tile, None
            if self.model is None:
                return None, None
            tile = auto_tile_size(self.model, self.device, self.dtype, lr_size=(h, w), scale=self.scale,
                                  tile_overlap=self.tile_overlap)
            return (self._progress_tile((h, w)) if tile is None else tile), None

        def peak(tile: int | None) -> int:
            return base + self.peak_bytes(shape, bit_depth, tile)

        fixed = isinstance(self.tile, int)
        tile = self.tile if fixed else tile_for_memory(limit, peak, (h, w))
        if tile is None and self.tile == "auto" and self.model is not None:
            tile = self._progress_tile((h, w))  # smaller than whole: within the bound too
        if peak(tile) > limit:
            how = f"with --tile {tile}" if fixed else "even in small tiles"
            raise FastSRError(
                f"{name}: {w}x{h} at x{self.scale} needs about {format_size(peak(tile))} {how} "
                f"(this process already holds {format_size(base)}), over --max-memory {format_size(limit)}; "
                f"raise --max-memory{' or lower --tile' if fixed else ''}"
            )
        return tile, peak(tile)

    def _progress_tile(self, lr_size: tuple[int, int]) -> int | None:
        """`progress_tile` on the CPU, where an image that fits can take minutes; None elsewhere
        (a GPU finishes such an image in about a second: no bar is worth the recompute)."""
        return progress_tile(lr_size, self.context) if self.device.type == "cpu" else None

    def release_shape_caches(self) -> None:
        """Drop what earlier input shapes left in this process: OpenVINO's compiled shapes (each
        with its buffers) and the free memory the native CPU path keeps on the heap
        (`glibc_heap.trim`). The next input then pays one compile and fresh pages."""
        from fastsr.ops.backends import glibc_heap
        from fastsr.ops.backends.openvino import clear_compiled_shapes

        if self.model is not None:
            clear_compiled_shapes(self.model)
        glibc_heap.trim()

    def memory_baseline(self, lr_size: tuple[int, int] | None) -> int:
        """What the process holds before an (H, W) image is upscaled under a memory bound
        (`process_memory_bytes`). An image of another size than the last one (None: not known
        yet) first drops the per-shape state the last one left (`release_shape_caches`): its
        tiles have another shape, so that state would only add to the bound's baseline."""
        if lr_size is None or (self._last_size is not None and lr_size != self._last_size):
            self.release_shape_caches()
        self._last_size = (-1, -1) if lr_size is None else lr_size  # unknown: the next image releases too
        return process_memory_bytes()

    def check_memory_floor(self, limit: int) -> None:
        """Run a tiny input once, so that what the first call loads (the fused path imports its
        kernels' modules: ~160 MB resident) is part of the baseline; refuse a bound below it."""
        self.run(torch.full((1, 3, 8, 8), 128.0), None)  # mid-gray: zeros would look like 0..1 input
        base = process_memory_bytes()
        if base >= limit:
            raise FastSRError(f"--max-memory {format_size(limit)} is below what this process holds with the model "
                              f"loaded ({format_size(base)}) before any image; raise it")
