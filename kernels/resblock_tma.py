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
the ideal 2.0 (the pointer kernel: 2.25-2.50).

Weights: streamed per tap (a [C, C] box each step, software-pipelined with the A box), or
resident (RESIDENT_W: both convs' 9 tiles loaded once per program, 2 x 72 KiB at F = 64 bf16; taps
unrolled, KS = 3 and C == 64 or less only).

Where the intermediate lives, and why not shared memory. Phase 2 reads the intermediate at
KS*KS shifted windows (one row down, one pixel right). In Triton's tl language a tensor in
shared memory exists only as the operand the compiler stages for a tl.dot or a descriptor load:
tl has no shared-memory allocation and no sub-view (slice at an offset) of a tile, so the shifted
windows of an intermediate that lives in shared memory cannot be expressed (Gluon, Triton's
lower-level dialect, has both: `gl.allocate_shared_memory` and `shared_memory_descriptor.slice`;
and a 1-pixel offset is not a legal start of a 128-byte-swizzled wgmma operand anyway, so even
there the horizontal taps would need an unswizzled or re-staged tile). The reachable form here is
the per-program global slot, rewritten tile after tile so it stays in L2 (132 programs x 18 x 64
x 64 x 2 B = 19 MiB at F = 64), read back by TMA.

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
        for r in range(HALO_H):
            acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
            acc = _row_taps(acc, x_desc, img, th0 - 2 * PAD + r, tw0 - 2 * PAD, w1_desc, w1s,
                            BLOCK_M, C, KS, RESIDENT_W, INTERP)
            hh = th0 - PAD + r
            ok = col_ok & (hh >= 0) & (hh < H)
            acc = tl.where(ok[:, None], tl.maximum(acc + b1[None, :], 0.0), 0.0)
            tl.store(slot + r * (BLOCK_M * C), _round_for_desc(acc, ws_desc, INTERP))
        _fence_proxy_async_global(INTERP)
        tl.debug_barrier()
        # ---- phase 2: x + res_scale * (conv2(t) + b2) on the interior rows ----
        ow = tw0 + offs_m
        out_col = (offs_m < TILE_W) & (ow < W)
        for r in range(TILE_H):
            acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
            acc = _row_taps(acc, ws_desc, pid, r, 0, w2_desc, w2s, BLOCK_M, C, KS, RESIDENT_W, INTERP)
            oh = th0 + r
            # The row test as a (BLOCK_M,) tensor: `&` of a tensor and the interpreter's i1 scalar
            # gives int32 there, which it refuses as a load mask.
            mask = (out_col & (oh + offs_m * 0 < H))[:, None] & (offs_c < C)[None, :]
            pix = ((img * H + oh).to(tl.int64) * W + ow) * C
            io = pix[:, None] + offs_c[None, :]
            acc = (acc + b2[None, :]) * res_scale
            acc += tl.load(x_ptr + io, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + io, _round_for_desc(acc, x_desc, INTERP), mask=mask)


def _cfg(tile_h: int, resident: bool, per_sm: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"TILE_H": tile_h, "RESIDENT_W": resident, "PROGRAMS_PER_SM": per_sm},
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
]


def _resident_ok(ks: int, c: int) -> bool:
    return ks == 3 and c in TMA_CHANNELS


def _prune(configs, named_args, **kwargs):
    """The autotuner's early prune: resident weights only where `_resident_ok`."""
    keep = _resident_ok(kwargs["KS"], kwargs["C"])
    return [c for c in configs if keep or not c.kwargs["RESIDENT_W"]]


_resblock_tma_tuned = triton.autotune(configs=_CONFIGS, key=["C", "KS"],
                                      prune_configs_by={"early_config_prune": _prune})(_resblock_tma_kernel)

# Interpreter: BLOCK_M 16 (TILE_W 14 at 3x3, 12 at 5x5) and TILE_H 4, so the tests' small odd
# images have partial tiles in both directions; 2 programs, so each loops over several tiles.
_INTERPRET_BLOCK_M = 16
_INTERPRET_CONFIG = {"TILE_H": 4, "BLOCK_M": _INTERPRET_BLOCK_M, "PROGRAMS_PER_SM": 1}
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
    configs = [_INTERPRET_CONFIG] if interp else [cfg.kwargs for cfg in _prune(_CONFIGS, None, KS=ks, C=c)]

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
        _resblock_tma_kernel[(programs(_INTERPRET_CONFIG),)](
            *args, RESIDENT_W=_resident_ok(ks, c), **_INTERPRET_CONFIG, **meta)
        return out

    def grid(meta_):
        return (max(1, programs(meta_)),)

    _launch(_resblock_tma_kernel, _resblock_tma_tuned, grid, args, dict(meta, BLOCK_M=bm), interpret={}, like=x)
    return out
