"""The one-launch residual block on Hopper's tensor memory accelerator (TMA):
out = x + res_scale * (conv2(relu(conv1(x) + b1)) + b2), both convs C -> C, KS x KS, zero
padding P = KS // 2, NHWC bf16/fp16 (`resblock.resblock_nhwc` selects it; the pointer kernel
there runs everything else).

Tile: TILE_H image rows x TILE_W = BLOCK_M - 2P columns of one image, so that one halo row is
exactly BLOCK_M pixels: every MMA operand is a [1, 1, BLOCK_M, C] box (one row segment; the only
box shape Triton hands wgmma straight from shared memory, see conv2d_tma.py), and the halo costs
no padded MMA rows. Per tile:

  phase 1  for each of the HALO_H = TILE_H + 2P halo rows r: the KS*KS taps of x are the boxes at
           (n, th0 - 2P + r + dy, tw0 - 2P + dx, 0). Out of range (negative included) the copy
           engine zero-fills: conv1's padding, no masks. + b1, ReLU, and 0 where the halo pixel is
           outside the image (conv2's padding), rounded to x's dtype, written with 16-byte stores
           to row r of this program's workspace slot, a (programs, HALO_H, BLOCK_M, C) tensor.
  fence    a CTA barrier, and `fence.proxy.async.global` in every writing thread before it:
           the slot was written by ordinary stores and is read next by the copy engine.
  phase 2  for each interior row r: the taps are the workspace boxes at (pid, r + dy, dx, 0)
           (in the slot: the halo row below is r + dy, the column window starts at dx). A box
           running past the slot's BLOCK_M columns is zero-filled; those values only reach MMA
           rows m >= TILE_W, which are not stored. + b2, * res_scale, + x (16-byte loads),
           16-byte stores of the TILE_W valid columns (a TMA store would write the BLOCK_M - TILE_W
           columns that belong to the next tile).

MMA rows per output pixel (3x3, BLOCK_M 64, TILE_H 16): (18 + 16) * 64 / (16 * 62) = 2.19 against
the ideal 2.0 (the pointer kernel: 2.25-2.50); 2.32 with four-row steps (20 + 16 rows).

Three forms, chosen per autotune config:
- ROWS = 1, weights streamed: per tap one A box and one [C, C] weight box, software-pipelined.
- ROWS = 1, RESIDENT_W: both convs' 9 weight tiles loaded once per program (2 x 72 KiB at F = 64
  bf16), taps unrolled (3x3, C <= 64); compiles with 1 stage only (no overlap of box and MMA).
- ROWS = 4 (3x3), weights streamed: four consecutive rows per step, four accumulators. Per dx the
  six row boxes r .. r+5 serve all twelve (row, dy) products -- the vertical taps reuse row boxes,
  which a box sub-view cannot do in tl (see below) but separate accumulators can -- and each
  weight tile is read once per four rows: 18 A boxes + 9 weight tiles per 4 x 64 pixels against
  36 + 36 (L2 bytes per output row ~0.38x of the one-row streamed form, ~0.75x of the resident
  one's). Rows past the halo (phase 1) or the tile (phase 2) are computed and not stored.

Where the intermediate lives, and why not shared memory. Phase 2 reads the intermediate at
KS*KS shifted windows (one row down, one pixel right). In Triton's tl language a tensor in
shared memory exists only as the operand the compiler stages for a tl.dot or a descriptor load:
tl has no shared-memory allocation and no sub-view (slice at an offset) of a tile, so the shifted
windows of an intermediate that lives in shared memory cannot be expressed (Gluon, Triton's
lower-level dialect, has both: `gl.allocate_shared_memory` and `shared_memory_descriptor.slice`;
and a 1-pixel offset is not a legal start of a 128-byte-swizzled wgmma operand anyway, so even
there the horizontal taps would need an unswizzled or re-staged tile). The reachable form here is
the per-program global slot, rewritten tile after tile so it stays in L2 (132 programs x 18 x 64
x 64 x 2 B = 19 MiB at F = 64; sized for the largest grid among the configs), read back by TMA.

The interpreter (TRITON_INTERPRET=1) runs this kernel on CPU tensors (host TensorDescriptors
zero-fill there too); operands are widened to fp32 under INTERP only, and the fence (inline PTX)
is skipped there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _common
from ._common import _launch, _launch_config_args
from ._jit import _block_tile, _load_weight_taps, _round_for_desc, _widen

__all__ = ["tma_block_supported", "resblock_nhwc_tma"]

TMA_DTYPES = (torch.float16, torch.bfloat16)
TMA_KERNEL_SIZES = (3, 5)
# Channels: one K step per tap, a power of two (tl.arange), 16-byte rows: 16, 32 or 64.
TMA_CHANNELS = (16, 32, 64)
BLOCK_M = 64  # one halo row per MMA tile (wgmma's M per warpgroup); the slot's width


@triton.jit
def _row_taps(acc, src_desc, i0, r0, c0, w_desc, ws, BLOCK_M: tl.constexpr, C: tl.constexpr, KS: tl.constexpr,
              RESIDENT_W: tl.constexpr, INTERP: tl.constexpr):
    """acc[m, :] += sum over taps (dy, dx) of src[i0, r0 + dy, c0 + dx + m, :] @ W[dy*KS + dx]:
    one row segment of a stride-1 conv, every A operand a [1, 1, BLOCK_M, C] box (zero-filled
    out of range). ws: the resident weight tiles (a tuple, RESIDENT_W), else read per tap."""
    if RESIDENT_W:
        for tap in tl.static_range(KS * KS):
            a = src_desc.load([i0, r0 + tap // KS, c0 + tap % KS, 0]).reshape(BLOCK_M, C)
            acc = tl.dot(_widen(a, INTERP), ws[tap], acc)
    else:
        for tap in tl.range(KS * KS):
            a = src_desc.load([i0, r0 + tap // KS, c0 + tap % KS, 0]).reshape(BLOCK_M, C)
            b = w_desc.load([tap * C, 0])
            acc = tl.dot(_widen(a, INTERP), _widen(b, INTERP), acc)
    return acc


@triton.jit
def _box(desc, i0, r, c, BLOCK_M: tl.constexpr, C: tl.constexpr, INTERP: tl.constexpr):
    """The [1, 1, BLOCK_M, C] box at (i0, r, c, 0) as a BLOCK_M x C MMA operand."""
    return _widen(desc.load([i0, r, c, 0]).reshape(BLOCK_M, C), INTERP)


@triton.jit
def _four_rows_taps3(acc0, acc1, acc2, acc3, src_desc, i0, r0, c0, w_desc,
                     BLOCK_M: tl.constexpr, C: tl.constexpr, INTERP: tl.constexpr):
    """3x3 taps of four consecutive row segments at once: acc_j[m, :] += sum over (dy, dx) of
    src[i0, r0 + j + dy, c0 + dx + m, :] @ W[dy*3 + dx], j = 0..3. Per dx the six row boxes
    r0 .. r0+5 serve all twelve (j, dy) products (a box feeds up to 3 accumulators: the vertical
    taps' row reuse) and each of the 3 weight tiles is read once for the four rows, so L2 reads per
    output row are 6/4 A boxes and 3/4 weight tiles per dx instead of 3 + 3. The dx loop is a
    runtime loop, so the pipeliner double-buffers one dx step (6 A + 3 weight boxes)."""
    for dx in tl.range(3):
        a0 = _box(src_desc, i0, r0, c0 + dx, BLOCK_M, C, INTERP)
        a1 = _box(src_desc, i0, r0 + 1, c0 + dx, BLOCK_M, C, INTERP)
        a2 = _box(src_desc, i0, r0 + 2, c0 + dx, BLOCK_M, C, INTERP)
        a3 = _box(src_desc, i0, r0 + 3, c0 + dx, BLOCK_M, C, INTERP)
        a4 = _box(src_desc, i0, r0 + 4, c0 + dx, BLOCK_M, C, INTERP)
        a5 = _box(src_desc, i0, r0 + 5, c0 + dx, BLOCK_M, C, INTERP)
        w0 = _widen(w_desc.load([dx * C, 0]), INTERP)        # tap (0, dx)
        w1 = _widen(w_desc.load([(3 + dx) * C, 0]), INTERP)  # tap (1, dx)
        w2 = _widen(w_desc.load([(6 + dx) * C, 0]), INTERP)  # tap (2, dx)
        acc0 = tl.dot(a2, w2, tl.dot(a1, w1, tl.dot(a0, w0, acc0)))
        acc1 = tl.dot(a3, w2, tl.dot(a2, w1, tl.dot(a1, w0, acc1)))
        acc2 = tl.dot(a4, w2, tl.dot(a3, w1, tl.dot(a2, w0, acc2)))
        acc3 = tl.dot(a5, w2, tl.dot(a4, w1, tl.dot(a3, w0, acc3)))
    return acc0, acc1, acc2, acc3


@triton.jit
def _halo_row_store(acc, slot, r, th0, H, col_ok, b1, ws_desc, HALO_H: tl.constexpr, PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, C: tl.constexpr, INTERP: tl.constexpr):
    """Phase 1's epilogue for halo row r: + b1, ReLU, 0 outside the image, stored (16-byte
    stores) to slot row r if r < HALO_H (a row group may run past the halo)."""
    hh = th0 - PAD + r
    ok = col_ok & (hh >= 0) & (hh < H)
    acc = tl.where(ok[:, None], tl.maximum(acc + b1[None, :], 0.0), 0.0)
    # Row tests as (BLOCK_M,) tensors: `&` of a tensor and the interpreter's i1 scalar gives
    # int32 there, which it refuses as a mask.
    keep = ((r + col_ok.to(tl.int32) * 0) < HALO_H)[:, None] & (tl.arange(0, C) < C)[None, :]
    tl.store(slot + r * (BLOCK_M * C), _round_for_desc(acc, ws_desc, INTERP), mask=keep)


@triton.jit
def _out_row_store(acc, r, th0, H, W, img, ow, out_col, b2, res_scale, x_ptr, out_ptr, x_desc,
                   TILE_H: tl.constexpr, C: tl.constexpr, INTERP: tl.constexpr):
    """Phase 2's epilogue for interior row r: + b2, * res_scale, + x, 16-byte stores of the
    valid columns if r < TILE_H and the row is inside the image."""
    oh = th0 + r
    offs_c = tl.arange(0, C)
    zero = out_col.to(tl.int32) * 0
    mask = (out_col & (oh + zero < H) & (r + zero < TILE_H))[:, None] & (offs_c < C)[None, :]
    pix = ((img * H + oh).to(tl.int64) * W + ow) * C
    io = pix[:, None] + offs_c[None, :]
    acc = (acc + b2[None, :]) * res_scale
    acc += tl.load(x_ptr + io, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + io, _round_for_desc(acc, x_desc, INTERP), mask=mask)


@triton.jit
def _fence_proxy_async_global(INTERP: tl.constexpr):
    """Order this thread's ordinary global stores before later copy-engine (async proxy) reads
    of them (PTX fence.proxy.async.global; the CTA barrier after it orders the other threads)."""
    if not INTERP:
        tl.inline_asm_elementwise("fence.proxy.async.global;\n mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _resblock_tma_kernel(
    x_desc, w1_desc, w2_desc, ws_desc, b1_ptr, b2_ptr, x_ptr, out_ptr, ws_ptr,
    N, H, W, res_scale, WS_ROWS,
    C: tl.constexpr, KS: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr,
    USE_INPUT_PRECISION: tl.constexpr,
    TILE_H: tl.constexpr, BLOCK_M: tl.constexpr, RESIDENT_W: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
    ROWS: tl.constexpr = 1,
):
    # PROGRAMS_PER_SM only sizes the grid; PREC / USE_INPUT_PRECISION are unused (bf16/fp16
    # operands, or their exact fp32 widenings under the interpreter).
    PAD: tl.constexpr = KS // 2
    TILE_W: tl.constexpr = BLOCK_M - 2 * PAD
    HALO_H: tl.constexpr = TILE_H + 2 * PAD
    tiles_w = tl.cdiv(W, TILE_W)
    tiles_h = tl.cdiv(H, TILE_H)
    num_tiles = N * tiles_h * tiles_w
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, C)
    b1 = tl.load(b1_ptr + offs_c)
    b2 = tl.load(b2_ptr + offs_c)
    # This program's slot, row r at slot + r * BLOCK_M * C (a (WS_ROWS, BLOCK_M, C) block).
    slot = ws_ptr + pid.to(tl.int64) * (WS_ROWS * BLOCK_M * C) + (offs_m * C)[:, None] + offs_c[None, :]
    if RESIDENT_W:
        w1s = _load_weight_taps(w1_desc, 0, KS, C, INTERP)
        w2s = _load_weight_taps(w2_desc, 0, KS, C, INTERP)
    else:
        w1s = (0,)
        w2s = (0,)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        img, th0, tw0 = _block_tile(tile, tiles_h, tiles_w, TILE_H, TILE_W)
        # The previous tile's phase 2 has consumed its slot boxes (each load completed before its
        # MMA); all threads pass here before any rewrites the slot.
        tl.debug_barrier()
        # ---- phase 1: relu(conv1(x) + b1) on the halo rows -> the slot ----
        ww = tw0 - PAD + offs_m
        col_ok = (ww >= 0) & (ww < W)
        for r in range(0, HALO_H, ROWS):
            acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
            if ROWS == 4:  # four halo rows per step, vertical taps reusing row boxes (3x3)
                acc1 = tl.zeros((BLOCK_M, C), dtype=tl.float32)
                acc2 = tl.zeros((BLOCK_M, C), dtype=tl.float32)
                acc3 = tl.zeros((BLOCK_M, C), dtype=tl.float32)
                acc, acc1, acc2, acc3 = _four_rows_taps3(acc, acc1, acc2, acc3, x_desc, img, th0 - 2 * PAD + r,
                                                         tw0 - 2 * PAD, w1_desc, BLOCK_M, C, INTERP)
                _halo_row_store(acc1, slot, r + 1, th0, H, col_ok, b1, ws_desc, HALO_H, PAD, BLOCK_M, C, INTERP)
                _halo_row_store(acc2, slot, r + 2, th0, H, col_ok, b1, ws_desc, HALO_H, PAD, BLOCK_M, C, INTERP)
                _halo_row_store(acc3, slot, r + 3, th0, H, col_ok, b1, ws_desc, HALO_H, PAD, BLOCK_M, C, INTERP)
            else:
                acc = _row_taps(acc, x_desc, img, th0 - 2 * PAD + r, tw0 - 2 * PAD, w1_desc, w1s,
                                BLOCK_M, C, KS, RESIDENT_W, INTERP)
            _halo_row_store(acc, slot, r, th0, H, col_ok, b1, ws_desc, HALO_H, PAD, BLOCK_M, C, INTERP)
        _fence_proxy_async_global(INTERP)
        tl.debug_barrier()
        # ---- phase 2: x + res_scale * (conv2(t) + b2) on the interior rows ----
        ow = tw0 + offs_m
        out_col = (offs_m < TILE_W) & (ow < W)
        for r in range(0, TILE_H, ROWS):
            acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
            if ROWS == 4:  # rows past TILE_H read slot rows past the halo (unwritten or zero-filled)
                acc1 = tl.zeros((BLOCK_M, C), dtype=tl.float32)
                acc2 = tl.zeros((BLOCK_M, C), dtype=tl.float32)
                acc3 = tl.zeros((BLOCK_M, C), dtype=tl.float32)
                acc, acc1, acc2, acc3 = _four_rows_taps3(acc, acc1, acc2, acc3, ws_desc, pid, r, 0, w2_desc,
                                                         BLOCK_M, C, INTERP)
                _out_row_store(acc1, r + 1, th0, H, W, img, ow, out_col, b2, res_scale, x_ptr, out_ptr, x_desc,
                               TILE_H, C, INTERP)
                _out_row_store(acc2, r + 2, th0, H, W, img, ow, out_col, b2, res_scale, x_ptr, out_ptr, x_desc,
                               TILE_H, C, INTERP)
                _out_row_store(acc3, r + 3, th0, H, W, img, ow, out_col, b2, res_scale, x_ptr, out_ptr, x_desc,
                               TILE_H, C, INTERP)
            else:
                acc = _row_taps(acc, ws_desc, pid, r, 0, w2_desc, w2s, BLOCK_M, C, KS, RESIDENT_W, INTERP)
            _out_row_store(acc, r, th0, H, W, img, ow, out_col, b2, res_scale, x_ptr, out_ptr, x_desc,
                           TILE_H, C, INTERP)


def _cfg(tile_h: int, resident: bool, per_sm: int, warps: int, stages: int, rows: int = 1) -> triton.Config:
    return triton.Config({"TILE_H": tile_h, "RESIDENT_W": resident, "PROGRAMS_PER_SM": per_sm, "ROWS": rows},
                         num_warps=warps, num_stages=stages)


# (TILE_H, RESIDENT_W, programs per SM, warps, stages). Streamed: per stage one 8 KiB A box and one
# 8 KiB weight box (F = 64 bf16), 2 programs per SM. Resident: 144 KiB of weights (both convs)
# beside the A boxes of one row (the 9 unrolled taps; double-buffering them, 2 stages, would need
# 144 KiB more than the 227 KiB an sm_90 block may have), 1 program per SM.
_CONFIGS = [
    _cfg(16, False, 2, 4, 3),
    _cfg(16, False, 2, 4, 4),
    _cfg(8, False, 2, 4, 3),
    _cfg(16, True, 1, 4, 1),
    # Four rows per step (3x3, streamed weights): one pipeline stage is a dx step's 6 A boxes and
    # 3 weight tiles, 72 KiB at F = 64 bf16, so 2 stages (144 KiB) or 3 (216 KiB), 1 program/SM;
    # 4 fp32 accumulators (128 registers per thread at 4 warps).
    _cfg(16, False, 1, 4, 2, rows=4),
    _cfg(16, False, 1, 4, 3, rows=4),
]


def _resident_ok(ks: int, c: int) -> bool:
    return ks == 3 and c in TMA_CHANNELS


def _prune(configs, named_args, **kwargs):
    """The autotuner's early prune: resident weights only where `_resident_ok`, four-row steps
    only for 3x3 (`_four_rows_taps3`)."""
    resident, rows4 = _resident_ok(kwargs["KS"], kwargs["C"]), kwargs["KS"] == 3
    return [c for c in configs if (resident or not c.kwargs["RESIDENT_W"]) and (rows4 or c.kwargs["ROWS"] == 1)]


_resblock_tma_tuned = triton.autotune(configs=_CONFIGS, key=["C", "KS"],
                                      prune_configs_by={"early_config_prune": _prune})(_resblock_tma_kernel)

# Interpreter: BLOCK_M 16 (TILE_W 14 at 3x3, 12 at 5x5) and TILE_H 4, so the tests' small odd
# images have partial tiles in both directions (and four-row steps run past the 6-row halo);
# 2 programs, so each loops over several tiles. The form (RESIDENT_W, ROWS) is the four-row one
# where it applies (3x3), else one row with streamed weights; tests set the others here.
_INTERPRET_BLOCK_M = 16
_INTERPRET_CONFIG = {"TILE_H": 4, "BLOCK_M": _INTERPRET_BLOCK_M, "PROGRAMS_PER_SM": 1, "RESIDENT_W": False,
                     "ROWS": 4}
_INTERPRET_PROGRAMS = 2


def tma_block_supported(x: torch.Tensor, w1_packed: torch.Tensor, w2_packed: torch.Tensor, out: torch.Tensor,
                        kernel_size: int) -> bool:
    """Whether `resblock_nhwc_tma` takes this (already checked) `resblock_nhwc` call: a TMA-capable
    GPU (`_common._has_tma`; tests patch it under the interpreter), bf16/fp16, KS 3 or 5, C in
    TMA_CHANNELS (one K step per tap, 16-byte rows), x, both weights and out 16-byte aligned.

    x, out: (N, H, W, C); w*_packed: (KS*KS*C, C)."""
    if kernel_size not in TMA_KERNEL_SIZES or x.dtype not in TMA_DTYPES or x.dim() != 4:
        return False
    if x.shape[3] not in TMA_CHANNELS or not _common._has_tma(x.device):
        return False
    return all(t.data_ptr() % 16 == 0 for t in (x, w1_packed, w2_packed, out))


def resblock_nhwc_tma(x: torch.Tensor, w1_packed: torch.Tensor, b1: torch.Tensor, w2_packed: torch.Tensor,
                      b2: torch.Tensor, kernel_size: int, res_scale: float, out: torch.Tensor) -> torch.Tensor:
    """Launch the TMA block. The caller (`resblock.resblock_nhwc`) has checked every argument and
    `tma_block_supported`; `out` is allocated.

    x: (N, H, W, C) bf16/fp16; w1_packed, w2_packed: (KS*KS*C, C) x's dtype; b1, b2: (C,) fp32;
    out: (N, H, W, C). Returns out."""
    n, h, w, c = x.shape
    ks = kernel_size
    pad = ks // 2
    interp = _common._INTERPRET
    bm = _INTERPRET_BLOCK_M if interp else BLOCK_M
    tile_w = bm - 2 * pad
    if interp:
        form = dict(_INTERPRET_CONFIG)
        form["RESIDENT_W"] = form["RESIDENT_W"] and _resident_ok(ks, c)
        form["ROWS"] = form["ROWS"] if ks == 3 else 1
    configs = [form] if interp else [cfg.kwargs for cfg in _prune(_CONFIGS, None, KS=ks, C=c)]

    def tiles(tile_h: int) -> int:
        return n * triton.cdiv(h, tile_h) * triton.cdiv(w, tile_w)

    def programs(cfg: dict) -> int:
        if interp:
            return min(_INTERPRET_PROGRAMS, tiles(cfg["TILE_H"]))
        return min(tiles(cfg["TILE_H"]), cfg["PROGRAMS_PER_SM"] * _common._multiprocessor_count(x.device))

    # One slot per program, rows for the largest halo among the configs the autotuner may pick.
    halo_h = max(cfg["TILE_H"] for cfg in configs) + 2 * pad
    ws = torch.empty((max(programs(cfg) for cfg in configs), halo_h, bm, c), device=x.device, dtype=x.dtype)
    if interp:
        ws.fill_(float("nan"))  # a slot element read before phase 1 wrote it would poison the output
    xd = TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, bm, c])
    w1d = TensorDescriptor(w1_packed, list(w1_packed.shape), list(w1_packed.stride()), [c, c])
    w2d = TensorDescriptor(w2_packed, list(w2_packed.shape), list(w2_packed.stride()), [c, c])
    wsd = TensorDescriptor(ws, list(ws.shape), list(ws.stride()), [1, 1, bm, c])
    args = (xd, w1d, w2d, wsd, b1, b2, x, out, ws, n, h, w, float(res_scale), halo_h)
    meta = dict(C=c, KS=ks, **_launch_config_args(x.dtype))
    if interp:
        _resblock_tma_kernel[(programs(form),)](*args, **form, **meta)
        return out

    def grid(meta_):
        return (max(1, programs(meta_)),)

    _launch(_resblock_tma_kernel, _resblock_tma_tuned, grid, args, dict(meta, BLOCK_M=bm), interpret={}, like=x)
    return out
