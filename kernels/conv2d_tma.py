"""Stride-1 "same" NHWC convolution on Hopper's tensor memory accelerator (TMA), with the body
convs' epilogues (bias, ReLU, res_scale, skip).

What one launch computes (the `conv2d_nhwc` contract without in_shift and pixel shuffle):

    out = res_scale * act(conv(x, W) + bias) + skip        # act: ReLU or identity

x: (N, H, W, Cin) contiguous bf16/fp16; W packed (KS*KS*Cin, Cout) by `conv2d.pack_weight`;
skip, out: (N, H, W, Cout) in x's dtype; bias fp32. KS in {1, 3, 5}, zero padding KS // 2.
Cout a multiple of 8, or narrow (OUT_BY_POINTER: not a multiple of 8 but within one N tile, the
tail's 3): then the weight is zero-padded to its tile (`_common.pad_weight_columns`) and the
output written by masked pointer stores, since neither has 16-byte rows for a descriptor.

How it is tiled. One tile is BLOCK_M consecutive pixels of ONE image row (n, h, w0 ..
w0+BLOCK_M-1) x BLOCK_N output channels. The A operand of tap (dy, dx) and channel chunk k0
is the TMA box [1, 1, BLOCK_M, BLOCK_K] of the 4-D NHWC tensor at (n, h+dy-P, w0+dx-P, k0).
The copy engine zero-fills every element of a box outside the tensor, negative coordinates
included: that is exactly the conv's zero padding, so the main loop has no masks and no
per-pixel address arithmetic. A 1 x 1 x BLOCK_M box reshapes to the MMA's BLOCK_M x BLOCK_K
tile by dropping unit dims, so wgmma reads it straight from shared memory; a 1 x TH x TW box
(TH > 1) does not (Triton 3.9 copies it to registers with LDSM first: 149 registers and 287
instructions per 8 HGMMA against 97 and 101, see bench/results/2026-12-02_issue13_tma_body.md).
The output is a TMA box of the same shape: out-of-range pixels and channels of a partial tile are
clipped by the copy engine on the store. The skip is read with 16-byte loads, and with resident
weights and a skip the output is written with 16-byte stores too (shared memory, see the epilogue).

Grid: persistent. min(tiles, SMs * PROGRAMS_PER_SM) programs, each looping over tiles with the
grid stride. Two main-loop forms, chosen per autotune config (constexpr RESIDENT_W):

- RESIDENT_W = False: a flat loop over KS*KS taps x ceil(Cin/BLOCK_K) chunks, each step one A
  box and one BLOCK_K x BLOCK_N weight box (both TMA, from L2), software-pipelined NUM_STAGES
  deep. Any KS and channel count the host check admits.
- RESIDENT_W = True (Cin == BLOCK_K and KS in {1, 3}): the KS*KS weight tiles are loaded once
  per program, before the tile loop, and stay in shared memory (F = 64 bf16 3x3: 72 KiB); the
  taps are unrolled (the weight tiles are a tuple indexed by a static tap), so the software
  pipeliner pipelines the tile loop: the next tile's KS*KS A boxes are double-buffered (issued,
  in the sm_90 SASS, after this tile's MMAs and epilogue: a short prefetch distance). Shared
  memory is 2 stages x KS*KS boxes + the weights, so at F = 64 only BLOCK_M = 64 with 2 stages
  fits the 227 KiB of an sm_90 block (225.1 KiB).
- ROLL_ROWS = True (resident weights, KS 3): rolling rows. A work item is a strip of BLOCK_M
  columns x a chunk of rows (`row_chunking`: about one item per program), walked top to bottom.
  Each input row's 3 boxes (dx = -1, 0, +1) are loaded once and feed all 3 kernel rows: the
  output row above (its last kernel row: then complete, stored), the row itself and the row
  below (its first), with two fp32 accumulators carried from row to row. So A is read 3 times
  per pixel instead of 9, the halo rows of a chunk once more, and a pipeline stage is one input
  row (3 boxes), not a tile's 9. MMA rows issued per output pixel: (rows + 1) / rows per chunk.

Bytes through L2 per output pixel (F = 64 bf16 3x3): A 9 x 128 = 1152 B in the one-row forms
(the taps re-read the input rows: a wgmma shared-memory operand cannot start one pixel into a
swizzled box, so the horizontal taps are separate boxes), 3 x 128 = 384 B (+ the chunks' halo
rows) with rolling rows; weights 73,728 / BLOCK_M B streamed, or ~0 resident; out 128 B and
skip 128 B. DRAM: x, skip and out once (384 B/pixel with skip).

The interpreter (TRITON_INTERPRET=1) runs the same kernel on CPU tensors: host-side
TensorDescriptor boxes with negative coordinates are zero-filled there too. Operands are
widened to fp32 under INTERP only (its bf16 tl.dot is wrong), as `_jit._conv_mainloop` does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _common
from ._common import _block_n, _launch, _launch_config_args, pad_weight_columns
from ._jit import _conv_channel, _load_weight_taps, _round_for_desc, _shuffle_col, _widen

__all__ = ["tma_conv_supported", "conv2d_nhwc_tma"]

TMA_DTYPES = (torch.float16, torch.bfloat16)
# Under the interpreter: whether 3x3 resident-weight convs run the rolling-rows form (tests set
# False to run the one-row form), and the program count their row chunks are sized for.
_INTERPRET_ROLL = True
_INTERPRET_CHUNK_PROGRAMS = 8
TMA_KERNEL_SIZES = (1, 3, 5)
# Resident weights stay in shared memory beside 2 stages of KS*KS A boxes: KS 1 and 3 only.
_RESIDENT_KERNEL_SIZES = (1, 3)


def _tma_configs():
    # (BLOCK_M, RESIDENT_W, ROLL_ROWS, programs per SM, warps, stages). Streamed weights: 16 KiB
    # (BM 128) or 32 KiB (BM 256) of A + 8 KiB of W per stage, so 3-4 stages and 2 programs per
    # SM fit. Resident weights: 2 x 9 x 8 KiB of A + 72 KiB of W + 8 KiB (the TMA store's staging
    # tile, or with a skip its layout conversion) = 224 KiB at BM 64: one program per SM (a
    # 1 x 1 x 128 box would need 288 KiB of A stages). Rolling rows (3x3; its loop takes two
    # input rows per iteration): a stage is 6 boxes, 48 KiB at BM 64 (2 stages: 192 KiB with the
    # 72 KiB of weights and the epilogue's staging) or 96 KiB at BM 128 (1 stage, two warpgroups
    # that overlap each other's waits: 136 KiB). sm_90 needs at BM 64 w4 243 registers, 255 and
    # spills with a skip (`_prune` drops it there); BM 64 w8 spills either way (not listed).
    cfgs = []
    for bm, resident, roll, per_sm, warps, stages in [
        (128, False, False, 2, 4, 3), (128, False, False, 2, 4, 4), (128, False, False, 2, 8, 3),
        (256, False, False, 1, 8, 3),
        (64, True, False, 1, 4, 2),
        (64, True, True, 1, 4, 2), (128, True, True, 1, 8, 1),
        # Narrow N (BLOCK_N <= 32: the tail's 16): rolling BM 256 on two warpgroups (1 stage,
        # 123 KiB, 255 registers at sm_90). BM 128 on one warpgroup with 2 stages took 231 KiB
        # and spilled 220 B: not listed.
        (256, True, True, 1, 8, 1),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "RESIDENT_W": resident, "ROLL_ROWS": roll,
                                   "PROGRAMS_PER_SM": per_sm},
                                  num_warps=warps, num_stages=stages, pre_hook=_set_boxes))
    return cfgs


def _set_boxes(nargs: dict) -> None:
    """Config pre-hook: the A and out boxes are [1, 1, BLOCK_M, last] for the config's
    BLOCK_M (the descriptors' block shape is part of the kernel's type, so each config compiles
    against its own). Runs before every launch the autotuner makes, its benchmarks included."""
    bm = nargs["BLOCK_M"]
    for name in ("x_desc", "out_desc"):
        d = nargs[name]
        d.block_shape = [1, 1, bm, d.block_shape[-1]]


@triton.jit
def _tile_origin(tile, H, TILES_W, BLOCK_M: tl.constexpr):
    """Tile index -> (image, row, first column): tiles walk each image row left to right."""
    row = tile // TILES_W
    w0 = (tile - row * TILES_W) * BLOCK_M
    n = row // H
    h = row - n * H
    return n, h, w0


@triton.jit
def _row_chunking(ROWS, H, W, NUM_PROGRAMS, BLOCK_M: tl.constexpr):
    """The rolling-rows form's work items: (column strips per image row, row chunks per image,
    rows per chunk). As many chunks as give every program one item (at least 1, at most H):
    at 540x960 with BLOCK_M 64 and 132 programs, 15 strips x 8 chunks of 68 rows = 120 items.
    `row_chunking` is the host's copy of this rule (it sizes the grid)."""
    strips = tl.cdiv(W, BLOCK_M)
    chunks = tl.minimum(tl.maximum(NUM_PROGRAMS // ((ROWS // H) * strips), 1), H)
    chunk_rows = tl.cdiv(H, chunks)
    return strips, tl.cdiv(H, chunk_rows), chunk_rows


@triton.jit
def _row_boxes(x_desc, n, i, w0, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Input row i's three A boxes, one per horizontal tap (columns w0 - 1, w0, w0 + 1), each
    [BLOCK_M, BLOCK_K]; rows and columns outside the image are zero-filled by the copy engine."""
    b0 = x_desc.load([n, i, w0 - 1, 0]).reshape(BLOCK_M, BLOCK_K)
    b1 = x_desc.load([n, i, w0, 0]).reshape(BLOCK_M, BLOCK_K)
    b2 = x_desc.load([n, i, w0 + 1, 0]).reshape(BLOCK_M, BLOCK_K)
    return b0, b1, b2


@triton.jit
def _row_dots(acc, b0, b1, b2, ws, DY: tl.constexpr, INTERP: tl.constexpr):
    """acc + kernel row DY's three taps applied to one input row's boxes (`_row_boxes`)."""
    acc = tl.dot(_widen(b0, INTERP), ws[3 * DY], acc)
    acc = tl.dot(_widen(b1, INTERP), ws[3 * DY + 1], acc)
    acc = tl.dot(_widen(b2, INTERP), ws[3 * DY + 2], acc)
    return acc


@triton.jit
def _epilogue(acc, n, h, w0, n0, offs_n, bias, res_scale, skip_ptr, out_ptr, out_desc, H, W, INTERP: tl.constexpr,
              C_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_SKIP: tl.constexpr,
              STORE_BY_POINTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
    """Bias, ReLU, res_scale and skip on one tile's fp32 accumulator (pixels (n, h, w0 ..
    w0 + BLOCK_M - 1), channels offs_n), one rounding, and its store: a TMA box (clipped at the
    tensor's edge by the copy engine) or, STORE_BY_POINTER, masked pointer stores; R > 1: the
    columns are in shuffle order (`pack_weight(w, R)`) and land in the upscaled output, column
    q = (i*R + j)*C_SH + c at sub-pixel (i, j), channel c (no skip with a shuffle)."""
    if HAS_BIAS:
        acc += bias[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    acc = acc * res_scale
    offs_w = w0 + tl.arange(0, BLOCK_M)
    pix = (n * H + h).to(tl.int64) * W + offs_w
    s_mask = (offs_w < W)[:, None] & (offs_n < C_OUT)[None, :]
    if HAS_SKIP:
        # 16-byte loads through a pointer, not a TMA box: the pipeliner would double-buffer
        # a skip box too, and at BLOCK_M 64 with resident weights those 16 KiB do not fit.
        acc += tl.load(skip_ptr + pix[:, None] * C_OUT + offs_n[None, :], mask=s_mask, other=0.0).to(tl.float32)
    if R > 1:
        C_SH: tl.constexpr = C_OUT // (R * R)
        hr = (((n * H + h) * R).to(tl.int64) * (W * R) + offs_w * R) * C_SH  # sub-pixel (0, 0), channel 0
        tl.store(out_ptr + hr[:, None] + _shuffle_col(offs_n, R, C_SH, W * R)[None, :],
                 _round_for_desc(acc, out_desc, INTERP), mask=s_mask)
    elif STORE_BY_POINTER:
        tl.store(out_ptr + pix[:, None] * C_OUT + offs_n[None, :], _round_for_desc(acc, out_desc, INTERP),
                 mask=s_mask)
    else:
        out_desc.store([n, h, w0, n0], _round_for_desc(acc, out_desc, INTERP).reshape(1, 1, BLOCK_M, BLOCK_N))


@triton.jit
def _roll_step(x_desc, n, i, w0, acc_a, acc_b, ws, n0, offs_n, bias, res_scale, skip_ptr, out_ptr, out_desc, H, W,
               INTERP: tl.constexpr, C_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
               HAS_SKIP: tl.constexpr, STORE_BY_POINTER: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr):
    """One input row i of the rolling-rows form: acc_a (output row i - 1, kernel rows 0 and 1
    summed) gets kernel row 2 and is stored; acc_b (row i, kernel row 0) gets kernel row 1;
    row i + 1 starts with kernel row 0. Returns the new (acc_a, acc_b): rows i and i + 1."""
    b0, b1, b2 = _row_boxes(x_desc, n, i, w0, BLOCK_M, BLOCK_K)
    done = _row_dots(acc_a, b0, b1, b2, ws, 2, INTERP)
    _epilogue(done, n, i - 1, w0, n0, offs_n, bias, res_scale, skip_ptr, out_ptr, out_desc, H, W, INTERP,
              C_OUT, HAS_BIAS, RELU, HAS_SKIP, STORE_BY_POINTER, BLOCK_M, BLOCK_N, R)
    mid = _row_dots(acc_b, b0, b1, b2, ws, 1, INTERP)
    new = _row_dots(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), b0, b1, b2, ws, 0, INTERP)
    return mid, new


@triton.jit
def _conv2d_tma_kernel(
    x_desc, w_desc, out_desc, bias_ptr, skip_ptr, out_ptr,
    ROWS, H, W, res_scale, NUM_SMS,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, KS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_SKIP: tl.constexpr,
    INTERP: tl.constexpr, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_BY_POINTER: tl.constexpr,
    SHUFFLE: tl.constexpr,
    RESIDENT_W: tl.constexpr, ROLL_ROWS: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):
    # PREC / USE_INPUT_PRECISION are unused: operands are bf16/fp16 (tensor cores) or, under
    # the interpreter, exact fp32 widenings.
    PAD: tl.constexpr = KS // 2
    K_CHUNKS: tl.constexpr = (C_IN + BLOCK_K - 1) // BLOCK_K
    NUM_N_BLOCKS: tl.constexpr = (C_OUT + BLOCK_N - 1) // BLOCK_N
    TILES_W = tl.cdiv(W, BLOCK_M)
    NUM_TILES = ROWS * TILES_W
    pid = tl.program_id(0)
    # Channel blocks: a program keeps one block for all its tiles (the grid covers them in
    # NUM_N_BLOCKS groups; F <= 128 is one block), so resident weights are one N block's.
    n_blk = pid % NUM_N_BLOCKS
    n0 = n_blk * BLOCK_N
    first = pid // NUM_N_BLOCKS
    stride = tl.num_programs(0) // NUM_N_BLOCKS
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        # Shuffle-order column q is the conv's channel _conv_channel(q) (PyTorch's order).
        b_idx = _conv_channel(offs_n, SHUFFLE, C_OUT // (SHUFFLE * SHUFFLE)) if SHUFFLE > 1 else offs_n
        bias = tl.load(bias_ptr + b_idx, mask=offs_n < C_OUT, other=0.0)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)  # never added: HAS_BIAS is False
    if RESIDENT_W:
        ws = _load_weight_taps(w_desc, n0, KS, BLOCK_K, INTERP)
    # With a skip, resident weights leave no room for the TMA store's staging tile beside the
    # skip's layout conversion (238,736 B against 232,448 B): 16-byte stores there. A narrow
    # output (OUT_BY_POINTER: Cout not a multiple of 8, the tail's 3) has no TMA descriptor.
    BY_POINTER: tl.constexpr = OUT_BY_POINTER or (RESIDENT_W and HAS_SKIP and not ROLL_ROWS)
    if ROLL_ROWS:
        # Rolling rows (KS 3): an item is a strip of BLOCK_M columns x chunk_rows rows, walked
        # top to bottom. Each input row's 3 boxes are loaded once and feed all 3 kernel rows:
        # output row i - 1 (its last taps: it is complete and stored), row i, row i + 1 (its
        # first), two accumulators carried between rows. Rows h0 - 1 and h0 are the prologue.
        # The programs of one channel block are the ones that split its items.
        strips, chunks, chunk_rows = _row_chunking(ROWS, H, W, tl.maximum(NUM_SMS * PROGRAMS_PER_SM // NUM_N_BLOCKS, 1),
                                                   BLOCK_M)
        for item in tl.range(first, (ROWS // H) * chunks * strips, stride):
            strip = item % strips
            rest = item // strips
            n = rest // chunks
            h0 = (rest - n * chunks) * chunk_rows
            h_end = tl.minimum(h0 + chunk_rows, H)
            w0 = strip * BLOCK_M
            b0, b1, b2 = _row_boxes(x_desc, n, h0 - 1, w0, BLOCK_M, BLOCK_K)
            acc_a = _row_dots(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), b0, b1, b2, ws, 0, INTERP)
            b0, b1, b2 = _row_boxes(x_desc, n, h0, w0, BLOCK_M, BLOCK_K)
            acc_a = _row_dots(acc_a, b0, b1, b2, ws, 1, INTERP)
            acc_b = _row_dots(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), b0, b1, b2, ws, 0, INTERP)
            # Two rows per iteration, so the accumulators swap roles twice and are back in their
            # registers at the back edge: a loop-carried swap would be register moves between
            # wgmmas, which ptxas answers by serializing every wgmma (its warning C7514).
            for i in tl.range(h0 + 1, h_end, 2):
                acc_a, acc_b = _roll_step(x_desc, n, i, w0, acc_a, acc_b, ws, n0, offs_n, bias, res_scale, skip_ptr,
                                          out_ptr, out_desc, H, W, INTERP, C_OUT, HAS_BIAS, RELU, HAS_SKIP,
                                          BY_POINTER, BLOCK_M, BLOCK_N, BLOCK_K, SHUFFLE)
                acc_a, acc_b = _roll_step(x_desc, n, i + 1, w0, acc_a, acc_b, ws, n0, offs_n, bias, res_scale,
                                          skip_ptr, out_ptr, out_desc, H, W, INTERP, C_OUT, HAS_BIAS, RELU, HAS_SKIP,
                                          BY_POINTER, BLOCK_M, BLOCK_N, BLOCK_K, SHUFFLE)
            if (h_end - h0) % 2 == 1:  # an odd number of steps: the last one
                _roll_step(x_desc, n, h_end, w0, acc_a, acc_b, ws, n0, offs_n, bias, res_scale, skip_ptr, out_ptr,
                           out_desc, H, W, INTERP, C_OUT, HAS_BIAS, RELU, HAS_SKIP, BY_POINTER, BLOCK_M, BLOCK_N,
                           BLOCK_K, SHUFFLE)
    else:
        for tile in tl.range(first, NUM_TILES, stride):
            n, h, w0 = _tile_origin(tile, H, TILES_W, BLOCK_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if RESIDENT_W:
                for tap in tl.static_range(KS * KS):
                    a = x_desc.load([n, h + (tap // KS - PAD), w0 + (tap % KS - PAD), 0]).reshape(BLOCK_M, BLOCK_K)
                    acc = tl.dot(_widen(a, INTERP), ws[tap], acc)
            else:
                for step in range(KS * KS * K_CHUNKS):
                    tap = step // K_CHUNKS
                    k0 = (step - tap * K_CHUNKS) * BLOCK_K
                    a = x_desc.load([n, h + (tap // KS - PAD), w0 + (tap % KS - PAD), k0]).reshape(BLOCK_M, BLOCK_K)
                    b = w_desc.load([tap * C_IN + k0, n0])
                    acc = tl.dot(_widen(a, INTERP), _widen(b, INTERP), acc)
            _epilogue(acc, n, h, w0, n0, offs_n, bias, res_scale, skip_ptr, out_ptr, out_desc, H, W, INTERP,
                      C_OUT, HAS_BIAS, RELU, HAS_SKIP, BY_POINTER, BLOCK_M, BLOCK_N, SHUFFLE)


def row_chunking(rows: int, h: int, w: int, programs: int, block_m: int) -> tuple[int, int, int]:
    """The host's copy of `_row_chunking`: (strips, chunks, rows per chunk); it sizes the grid."""
    strips = triton.cdiv(w, block_m)
    chunks = min(max(programs // ((rows // h) * strips), 1), h)
    chunk_rows = triton.cdiv(h, chunks)
    return strips, triton.cdiv(h, chunk_rows), chunk_rows


def _resident_ok(ks: int, c_in: int, block_k: int) -> bool:
    """Resident weights need one K chunk per tap and at most 9 taps (shared memory, and the
    unrolled tap tuple of `_load_weight_taps`)."""
    return ks in _RESIDENT_KERNEL_SIZES and c_in == block_k


def _roll_ok(ks: int, c_in: int, block_k: int) -> bool:
    """Rolling rows: resident weights and a 3x3 kernel (three taps per kernel row)."""
    return ks == 3 and _resident_ok(ks, c_in, block_k)


def _prune(configs, named_args, **kwargs):
    """The autotuner's early prune: drop the resident-weight and rolling-row configs where they
    do not apply."""
    resident = _resident_ok(kwargs["KS"], kwargs["C_IN"], kwargs["BLOCK_K"])
    roll = _roll_ok(kwargs["KS"], kwargs["C_IN"], kwargs["BLOCK_K"])

    narrow_n = kwargs["BLOCK_N"] <= 32

    def fits(c) -> bool:
        bm, warps = c.kwargs["BLOCK_M"], c.num_warps
        if c.kwargs["ROLL_ROWS"] and bm == 256:
            return narrow_n  # the narrow-N config: its A stage leaves room for small weights only
        # Rolling rows at BLOCK_M 64 on one warpgroup: three accumulators and the skip's tile,
        # or the shuffle's store addresses, need more than 255 registers (sm_90 at N = 64: 32 B
        # of spills with a skip, 44 B with the x2 shuffle), so there only BLOCK_M 128 on two
        # warpgroups.
        heavy_epilogue = kwargs.get("HAS_SKIP") or kwargs.get("SHUFFLE", 1) > 1
        return not (c.kwargs["ROLL_ROWS"] and heavy_epilogue and warps == 4 and not narrow_n)

    return [c for c in configs if (resident or not c.kwargs["RESIDENT_W"]) and (roll or not c.kwargs["ROLL_ROWS"])
            and fits(c)]


_conv2d_tma_tuned = triton.autotune(
    configs=_tma_configs(),
    # The autotuner adds the tensor dtypes itself. HAS_SKIP: the prune differs with a skip (and
    # the skip's dummy pointer has x's dtype, so the dtypes alone would not tell the two apart).
    key=["C_IN", "C_OUT", "KS", "HAS_SKIP", "SHUFFLE"],
    prune_configs_by={"early_config_prune": _prune},
)(_conv2d_tma_kernel)


def _tma_block_k(c_in: int) -> int:
    """Channels per K step: the whole Cin up to 64 (128 B rows: the 128-byte swizzle); above, 64."""
    return min(64, _common._next_pow2(c_in))


def tma_conv_supported(x: torch.Tensor, w_packed: torch.Tensor, out: torch.Tensor, kernel_size: int, *,
                       in_shift=None, shuffle: int = 1, skip=None) -> bool:
    """Whether `conv2d_nhwc_tma` takes this (already checked) `conv2d_nhwc` call: a TMA-capable
    GPU (`_common._has_tma`; the tests patch it to run this path under the interpreter),
    bf16/fp16, no input shift, a pixel shuffle only without a skip, with Cout a multiple of 64
    and rows of at least _SHUFFLE_MIN_W pixels (the upsampler at inference sizes: 64-column
    blocks, pointer stores into the upscaled output), and what the
    copy engine's descriptors need:
    Cin a multiple of its K step (16, 32 or 64k: no weight box reads past a tap's rows), and x
    starting 16-byte aligned. Cout a multiple of 8 (16-byte row strides) with w_packed and out
    16-byte aligned too (a view at an odd offset goes to the pointer kernel instead of failing);
    or a narrow Cout (`_narrow_out`: the tail's 3), whose weight is padded to its one N tile and
    whose output is written by pointer stores, so neither needs a descriptor.

    x: (N, H, W, Cin); w_packed: (KS*KS*Cin, Cout); out: the output about to be written."""
    if in_shift is not None or kernel_size not in TMA_KERNEL_SIZES:
        return False
    if shuffle != 1 and (skip is not None or w_packed.shape[1] % _SHUFFLE_BLOCK_N or x.shape[2] < _SHUFFLE_MIN_W):
        return False
    if x.dtype not in TMA_DTYPES or x.dim() != 4:
        return False
    if not _common._has_tma(x.device):
        return False
    c_in, c_out = x.shape[3], w_packed.shape[1]
    if c_in < 16 or c_in % _tma_block_k(c_in) or x.data_ptr() % 16:
        return False
    if shuffle != 1:  # 64k columns: 16-byte weight rows; the output by pointer stores
        return w_packed.data_ptr() % 16 == 0
    if _narrow_out(c_out):  # a padded copy of the weight; the output by pointer stores
        return True
    return c_out >= 8 and c_out % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in (w_packed, out))


# A pixel-shuffle conv's channel block: resident weights of one block fit shared memory (64 x 64
# x 9 bf16 = 72 KiB; the pointer kernel's one 256-column tile would be 288 KiB).
_SHUFFLE_BLOCK_N = 64
# A tile is one image row, and a shuffle conv's epilogue leaves it only the BLOCK_M 128 rolling
# config (`_prune`): a narrower row wastes MMA rows (48-pixel training patches: 2.7x; static
# model 44.8 us against the pointer kernel's 33.2, whose tiles span rows). Interpreter tests
# lower it (tests/test_conv2d_tma.py).
_SHUFFLE_MIN_W = 128


def _narrow_out(c_out: int) -> bool:
    """A Cout whose rows are not 16-byte multiples but fit one N tile: padded weight, pointer
    stores (the tail's 3 channels)."""
    return c_out % 8 != 0 and c_out < _block_n(c_out)


def conv2d_nhwc_tma(x: torch.Tensor, w_packed: torch.Tensor, bias, kernel_size: int, *, relu: bool = False,
                    res_scale: float = 1.0, skip=None, shuffle: int = 1, out: torch.Tensor) -> torch.Tensor:
    """Launch the TMA conv. The caller (`conv2d.conv2d_nhwc`) has checked every argument and
    `tma_conv_supported`; `out` is allocated.

    x: (N, H, W, Cin) bf16/fp16 contiguous; w_packed: (KS*KS*Cin, Cout); bias: (Cout,) fp32 or
    None; skip: (N, H, W, Cout) or None; out: (N, H, W, Cout), or for shuffle r (w_packed from
    pack_weight(w, r), no skip) (N, rH, rW, Cout / r^2). Returns out."""
    n, h, w, c_in = x.shape
    c_out = w_packed.shape[1]
    ks = kernel_size
    block_n = _SHUFFLE_BLOCK_N if shuffle > 1 else _block_n(c_out)
    block_k = _tma_block_k(c_in)
    num_n_blocks = triton.cdiv(c_out, block_n)
    interp_bm = _common._INTERPRET_BLOCK_M
    narrow = shuffle == 1 and _narrow_out(c_out)
    wk = pad_weight_columns(w_packed, block_n) if narrow else w_packed  # 16-byte rows for its box

    def descs(block_m: int):
        # Boxes: A [1, 1, BM, BK]; weights [BK, BN]; out [1, 1, BM, BN]. Boxes past the tensor
        # are zero-filled on load and clipped on store (padding="zero"). A narrow output has no
        # descriptor (6-byte rows): x's stands in, unused (OUT_BY_POINTER; it has out's dtype).
        xd = TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, block_m, block_k])
        wd = TensorDescriptor(wk, list(wk.shape), list(wk.stride()), [block_k, block_n])
        od = (TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, block_m, block_k]) if narrow or shuffle > 1 else
              TensorDescriptor(out, list(out.shape), list(out.stride()), [1, 1, block_m, block_n]))
        return xd, wd, od

    meta = dict(
        C_IN=c_in, C_OUT=c_out, KS=ks,
        HAS_BIAS=bias is not None, RELU=bool(relu), HAS_SKIP=skip is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, OUT_BY_POINTER=narrow or shuffle > 1, SHUFFLE=shuffle,
        **_launch_config_args(x.dtype),
    )
    sms = _common._multiprocessor_count(x.device)

    def tiles(block_m: int) -> int:
        return n * h * triton.cdiv(w, block_m)

    def items(block_m: int, roll: bool, programs: int) -> int:
        if not roll:
            return tiles(block_m)
        strips, chunks, _ = row_chunking(n * h, h, w, max(programs // num_n_blocks, 1), block_m)
        return n * chunks * strips

    def grid(meta_):
        programs = sms * meta_["PROGRAMS_PER_SM"]
        if meta_["ROLL_ROWS"]:  # the programs are shared by the channel blocks (`_row_chunking`)
            per_block = max(programs // num_n_blocks, 1)
            return (min(items(meta_["BLOCK_M"], True, programs), per_block) * num_n_blocks,)
        progs = min(items(meta_["BLOCK_M"], False, programs), programs)
        return (max(1, progs) * num_n_blocks,)

    xd, wd, od = descs(interp_bm)  # GPU configs re-box A and out: _set_boxes
    dummy = x  # never read: the matching HAS_* flag is False
    # The interpreter's programs: 3 run the items, but the rolling rows are chunked as for 8
    # (_INTERPRET_CHUNK_PROGRAMS), so small test images still have several chunks per image.
    num_sms = _INTERPRET_CHUNK_PROGRAMS if _common._INTERPRET else sms
    args = (xd, wd, od, bias if bias is not None else dummy, skip if skip is not None else dummy, out,
            n * h, h, w, float(res_scale), num_sms)
    if _common._INTERPRET:
        # One fixed small config: rolling rows where they apply (the form of the best predicted
        # GPU config for 3x3 at F = 64; _INTERPRET_ROLL = False tests the one-row form), else
        # resident weights where they apply, 3 programs so that each runs several items.
        roll = _INTERPRET_ROLL and _roll_ok(ks, c_in, block_k)
        progs = min(3, items(interp_bm, roll, _INTERPRET_CHUNK_PROGRAMS))
        _conv2d_tma_kernel[(progs * num_n_blocks,)](
            *args, BLOCK_M=interp_bm, RESIDENT_W=_resident_ok(ks, c_in, block_k), ROLL_ROWS=roll,
            PROGRAMS_PER_SM=1, **meta)
        return out
    _launch(_conv2d_tma_kernel, _conv2d_tma_tuned, grid, args, meta, interpret={}, like=x)
    return out
