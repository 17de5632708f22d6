"""wgrad of the fused NHWC convolution: (dW, db) as a deterministic split-K over pixels.

The gradients' algebra (gy, gz, the shuffle and ReLU terms) is in conv2d_backward.py's docstring;
this kernel computes dW and db.

wgrad (`_wgrad_kernel`): a GEMM dW_packed = A^T @ G with M = KS*KS*Cin rows (row k = tap*Cin + ci,
  the packed-weight order), N = Cout, K = the N*H*W pixels. A^T[k, p] = (x - in_shift)[p + tap_k, ci_k]
  is an implicit im2col gather (padding reads 0, in_shift only on in-bounds taps, as in the
  forward); G = gy, loaded with the same shuffle gather and ReLU mask as dgrad.
  Split-K over pixels: program (k-block, n-block, split) walks its split's fixed range of
  ROWS_PER_SPLIT image rows (flat over the batch) in row segments of BLOCK_P pixels; a segment
  has one (image, row), so the loop has no division: the column is `ow0 + arange`, and the
  segment/row/image advance by compares. A k-block is, for Cin >= 16, BLOCK_KW channels of the
  TAPS = 3 taps of one kernel row (3x3; 1 tap at 1x1/5x5): one G tile feeds 3 MMAs, and the
  in-bounds mask of a tap is 1-D over pixels (a scalar row test folded into the column bound),
  so x loads are 16-byte vectors; for narrow inputs (the head, Cin = 3) all KS^2*Cin rows are one
  block with per-row taps. Each program writes its fp32 partial tiles to workspace slot `split`;
  only the k-block-0 programs sum G's columns (the bias partial, an extra row of the slot).
  `_wgrad_reduce_kernel` adds the slots in the fixed order 0, 1, ..., SPLITS-1, applies
  res_scale, and writes dW in PyTorch's (Cout, Cin, KS, KS) layout (and db), in the parameters'
  dtypes. The split boundaries are whole rows fixed by the launcher, not by the tuned config.

Cost per pixel (e = bytes per element, F = C = 64, 3x3, bf16, e = 2):
  wgrad   FLOPs 2*KS^2*Cin*Cout = 73,728; reads Cin*e of x and Cout*e of g once from DRAM (256 B);
          from L2, each of the 3 kernel-row blocks reads 3 shifted x tiles and one g tile (and
          the ReLU mask): (9*Cin + 3*Cout (+3*Cout)) * e = 1536 (1920) B, against 2304 (3456) B
          with one tap per block. Row segments pad a row to a multiple of BLOCK_P pixels: MMA and
          shared memory, not L2 (masked lanes fetch nothing). The split-K workspace is
          SPLITS*(KS^2*Cin + 1)*Cout*4 bytes (~10 MiB for F = 64 on 132 SMs), written once and
          read once by the reduction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    _INT32_MAX,
    _INTERPRET,
    _check_activation,
    _check_grad_dtype,
    _check_kernel_size,
    _check_same_device,
    _check_shuffle,
    _check_vector,
    _launch,
    _launch_config_args,
    _next_pow2,
    _result,
)
from .conv2d_head import pad_image_nhwc
from .pad import pad_bordered_nhwc, vector_channels
from ._jit import _conv_channel, _mma, _mma_3xtf32, _round_to

__all__ = ["conv2d_wgrad_nhwc"]


@triton.jit
def _wgrad_loop(
    x_ptr, g_ptr, gmask_ptr, s, acc0, acc1, acc2, acc_b,
    t, oh, xr, n_steps, H, W,
    dh, dw0, c0, offs_c, ch_ok, x_col, k_ok, g_col, q_ok,
    C_IN: tl.constexpr, C_X: tl.constexpr, C_G: tl.constexpr, G_COLS: tl.constexpr, KS: tl.constexpr,
    R: tl.constexpr, PER_TAP: tl.constexpr, TAPS: tl.constexpr,
    CH_MASK: tl.constexpr, Q_MASK: tl.constexpr,
    HAS_SHIFT: tl.constexpr, IN_MASK: tl.constexpr, WITH_B: tl.constexpr, SPLIT: tl.constexpr,
    INTERP: tl.constexpr, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """The split's main loop: n_steps row segments of BLOCK_P pixels, starting at flat row t
    (row oh of its image), column 0. A row segment has one (image, row), so every index is a
    scalar plus `ow = ow0 + arange`: no division in the loop, and the masks are 1-D over
    pixels (per-tap blocks); the all-rows head block reads the padded image copy (row xr of it
    is the segment's row) and needs no bounds mask at all.
    WITH_B (the k-block-0 programs only): also the column sums of G, the bias partial."""
    P: tl.constexpr = KS // 2
    offs_p = tl.arange(0, BLOCK_P)
    ow0 = t * 0
    for _ in range(n_steps):
        ow = ow0 + offs_p
        pix_ok = ow < W
        pix0 = t.to(tl.int64) * W + ow0  # flat NHW index of the segment's first pixel
        # G tile: BLOCK_P pixels x BLOCK_Q gradient channels, unshuffled on load: LR row t is HR
        # rows t*R .. t*R + R-1 (W*G_COLS elements), pixel ow starts at HR column ow*R. G_COLS:
        # C_G, or a narrow gradient's padded copy's row (BLOCK_Q channels, zeros past C_G).
        g_off = t.to(tl.int64) * W * G_COLS + (ow * (G_COLS // R))[:, None] + g_col[None, :]
        if Q_MASK:
            g_mask = pix_ok[:, None] & q_ok[None, :]
        else:
            g_mask = pix_ok[:, None]
        g = tl.load(g_ptr + g_off, mask=g_mask, other=0.0)
        if INTERP:
            g = g.to(tl.float32)
        if IN_MASK:
            keep = tl.load(gmask_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32) != 0.0
            g = tl.where(keep, g, tl.zeros_like(g))
        if WITH_B:
            acc_b += tl.sum(g.to(tl.float32), axis=0)
        if PER_TAP:
            # One kernel row (dh) of taps: x rows oh + dh, columns ow + dw. In-bounds: a scalar
            # for the row, one compare per pixel for the column; channels all valid unless the
            # last chunk is partial (CH_MASK).
            # In bounds: 0 <= ow, ow + dw < W and the row oh + dh inside the image: two compares
            # per pixel against scalar bounds (an outside row makes the range empty).
            w_lim = tl.where((oh + dh >= 0) & (oh + dh < H), W, 0)
            base = (pix0 + dh * W) * C_IN + c0
            for j in tl.static_range(TAPS):
                dw = dw0 + j
                okp = (ow >= tl.maximum(-dw, 0)) & (ow < tl.minimum(w_lim, w_lim - dw))
                if CH_MASK:
                    a_mask = ch_ok[:, None] & okp[None, :]
                else:
                    a_mask = okp[None, :]
                a = tl.load(x_ptr + base + ((offs_p + dw) * C_IN)[None, :] + offs_c[:, None], mask=a_mask, other=0.0)
                if INTERP:
                    a = a.to(tl.float32)
                if HAS_SHIFT:
                    # (x - shift) rounded to x's dtype, exactly as the forward computed it.
                    a = _round_to(tl.where(a_mask, a.to(tl.float32) - s[:, None], 0.0), x_ptr, INTERP)
                if j == 0:
                    acc0 = _mma(a, g, acc0, PREC, USE_INPUT_PRECISION)
                elif j == 1:
                    acc1 = _mma(a, g, acc1, PREC, USE_INPUT_PRECISION)
                else:
                    acc2 = _mma(a, g, acc2, PREC, USE_INPUT_PRECISION)
        else:
            # Rows of every tap of a narrow input (the head) in one block, from the padded copy
            # (`conv2d_head.pad_image_nhwc`: shifted, bordered, C_X channels): each (tap, pixel)
            # is one aligned 16-byte vector of C_X rows, the border is the zero padding, so only
            # the rows past the last tap are masked. Pixels past the row's end read pixel W - 1
            # (their G columns are zero).
            xrow = (xr.to(tl.int64) * (W + 2 * P) + P) * C_X
            a = tl.load(x_ptr + xrow + x_col[:, None] + (tl.minimum(ow, W - 1) * C_X)[None, :],
                        mask=k_ok[:, None], other=0.0)
            if SPLIT:
                # fp32 image and gradient: 3xTF32 (_jit._mma_3xtf32), fp32-level products.
                acc0 = _mma_3xtf32(a, g, acc0, INTERP, USE_INPUT_PRECISION)
            else:
                if INTERP:
                    a = a.to(tl.float32)
                acc0 = _mma(a, g, acc0, PREC, USE_INPUT_PRECISION)
        # Next segment; past the row's end, the next row (and past the image's last row, row 0
        # of the next image): scalar selects, no division.
        ow0 += BLOCK_P
        nxt = ow0 >= W
        ow0 = tl.where(nxt, 0, ow0)
        t = tl.where(nxt, t + 1, t)
        oh = tl.where(nxt, oh + 1, oh)
        xr = tl.where(nxt, xr + 1, xr)  # the padded copy's row: + 2P more at a new image
        xr = tl.where(oh == H, xr + 2 * P, xr)
        oh = tl.where(oh == H, 0, oh)
    return acc0, acc1, acc2, acc_b


@triton.jit
def _wgrad_kernel(
    x_ptr, g_ptr, gmask_ptr, shift_ptr, ws_ptr,
    M, H, W, ROWS_PER_SPLIT,
    C_IN: tl.constexpr, C_G: tl.constexpr, KS: tl.constexpr, R: tl.constexpr,
    HAS_SHIFT: tl.constexpr, IN_MASK: tl.constexpr,
    INTERP: tl.constexpr, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_Q: tl.constexpr,
    PER_TAP: tl.constexpr, TAPS: tl.constexpr, C_X: tl.constexpr, SPLIT: tl.constexpr,
    G_COLS: tl.constexpr,
):
    """Partial dW_packed[k, q] (and db[q] in row K_ROWS) over this program's rows of pixels.

    PER_TAP: a k-block is BLOCK_KW channels (chunk c0) of TAPS taps of one kernel row (TAPS = KS:
    the whole row, dw = -P..P, sharing each G tile; TAPS = 1: one tap). Otherwise (narrow Cin,
    the head) a k-block is BLOCK_KW consecutive rows tap*C_X + c spanning taps of x's padded copy
    (C_X channels, the last C_X - C_IN zero; C_X = C_IN for PER_TAP)."""
    PAD: tl.constexpr = KS // 2
    K_ROWS: tl.constexpr = KS * KS * C_X
    NUM_CH: tl.constexpr = (C_IN + BLOCK_KW - 1) // BLOCK_KW
    if PER_TAP:
        NUM_KB: tl.constexpr = (KS * KS // TAPS) * NUM_CH
    else:
        NUM_KB: tl.constexpr = (K_ROWS + BLOCK_KW - 1) // BLOCK_KW
    NUM_QB: tl.constexpr = (C_G + BLOCK_Q - 1) // BLOCK_Q
    C_SH: tl.constexpr = C_G // (R * R)
    W_G = W * R
    # Tiles fastest, splits slowest: the programs running together share one range of rows, so
    # its x and g rows come from DRAM once and from L2 for the other row/column blocks.
    pid = tl.program_id(0)
    pid_kq = pid % (NUM_KB * NUM_QB)
    split = pid // (NUM_KB * NUM_QB)
    pid_q = pid_kq % NUM_QB
    pid_k = pid_kq // NUM_QB

    offs_c = tl.arange(0, BLOCK_KW)
    if PER_TAP:
        grp = pid_k // NUM_CH
        c0 = (pid_k - grp * NUM_CH) * BLOCK_KW
        if TAPS == KS:
            dh = grp - PAD
            tap0 = grp * KS  # the row's first tap; its TAPS taps are tap0 .. tap0 + KS - 1
            dw0 = -PAD
        else:
            tap0 = grp
            dh = grp // KS - PAD
            dw0 = grp % KS - PAD
        ch_ok = offs_c < C_IN - c0
        offs_k = tap0 * C_IN + c0 + offs_c  # rows of tap j: offs_k + j*C_IN
        k_ok = ch_ok
        x_col = offs_c  # unused in this mode
        if HAS_SHIFT:
            s = tl.load(shift_ptr + c0 + offs_c, mask=ch_ok, other=0.0)
        else:
            s = 0.0
    else:
        # Rows: k = tap*C_X + c -> the (dh, dw) shift and channel it reads in the padded copy
        # (W + 2P pixels a row): x[p + tap, c] = the pixel's element + x_col.
        offs_k = pid_k * BLOCK_KW + offs_c
        k_ok = offs_k < K_ROWS
        tap = offs_k // C_X
        x_col = ((tap // KS - PAD) * (W + 2 * PAD) + tap % KS - PAD) * C_X + offs_k % C_X
        s = 0.0  # in the copy
        dh = 0
        c0 = 0
        ch_ok = k_ok
        dw0 = 0
    # Columns: gradient channel q in gather order (see _dgrad_mainloop).
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < C_G
    # The same address as _jit._shuffle_col, written out: through the helper the 64->3 tail's
    # BLOCK_P=64 w4 config compiled to 87 registers and 22.9 int+pred/HGMMA instead of 71 and 19.1.
    ij = offs_q // C_SH
    g_col = ((ij // R) * W_G + ij % R) * C_SH + offs_q % C_SH
    if G_COLS != C_G:
        g_col = offs_q  # the padded copy of a narrow gradient (R = 1): channel q of the pixel

    acc0 = tl.zeros((BLOCK_KW, BLOCK_Q), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_KW, BLOCK_Q), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_KW, BLOCK_Q), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    rows = M // W
    t0 = split * ROWS_PER_SPLIT
    n_steps = (tl.minimum(t0 + ROWS_PER_SPLIT, rows) - t0) * ((W + BLOCK_P - 1) // BLOCK_P)
    oh0 = t0 % H
    xr0 = t0 + (t0 // H) * (2 * PAD) + PAD  # row t0 in the padded copy (the head block reads it)
    CH_MASK: tl.constexpr = (C_IN % BLOCK_KW) != 0 or not PER_TAP
    Q_MASK: tl.constexpr = (G_COLS % BLOCK_Q) != 0  # a padded gradient (G_COLS = BLOCK_Q) has none
    # The bias is the column sum of G: only the programs of k-block 0 (which store it) sum it.
    if pid_k == 0:
        acc0, acc1, acc2, acc_b = _wgrad_loop(
            x_ptr, g_ptr, gmask_ptr, s, acc0, acc1, acc2, acc_b, t0, oh0, xr0, n_steps, H, W,
            dh, dw0, c0, offs_c, ch_ok, x_col, k_ok, g_col, q_ok,
            C_IN, C_X, C_G, G_COLS, KS, R, PER_TAP, TAPS, CH_MASK, Q_MASK, HAS_SHIFT, IN_MASK, True, SPLIT,
            INTERP, PREC, USE_INPUT_PRECISION, BLOCK_P)
    else:
        acc0, acc1, acc2, acc_b = _wgrad_loop(
            x_ptr, g_ptr, gmask_ptr, s, acc0, acc1, acc2, acc_b, t0, oh0, xr0, n_steps, H, W,
            dh, dw0, c0, offs_c, ch_ok, x_col, k_ok, g_col, q_ok,
            C_IN, C_X, C_G, G_COLS, KS, R, PER_TAP, TAPS, CH_MASK, Q_MASK, HAS_SHIFT, IN_MASK, False, SPLIT,
            INTERP, PREC, USE_INPUT_PRECISION, BLOCK_P)

    slot = ws_ptr + split.to(tl.int64) * ((K_ROWS + 1) * C_G)
    st_mask = ch_ok[:, None] & q_ok[None, :]
    tl.store(slot + offs_k[:, None] * C_G + offs_q[None, :], acc0, mask=st_mask)
    if PER_TAP and TAPS > 1:
        tl.store(slot + (offs_k + C_IN)[:, None] * C_G + offs_q[None, :], acc1, mask=st_mask)
        tl.store(slot + (offs_k + 2 * C_IN)[:, None] * C_G + offs_q[None, :], acc2, mask=st_mask)
    if pid_k == 0:
        tl.store(slot + K_ROWS * C_G + offs_q, acc_b, mask=q_ok)


@triton.jit
def _wgrad_reduce_kernel(
    ws_ptr, dw_ptr, db_ptr, SPLITS, scale,
    C_IN: tl.constexpr, C_G: tl.constexpr, KS: tl.constexpr, R: tl.constexpr,
    HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr,
    C_X: tl.constexpr,
):
    """dW, db = scale * sum over slots 0..SPLITS-1 (in that order) of the workspace, written as
    dW[co, ci, kh, kw] / db[co] (co = the conv channel of gather column q). Workspace row
    k = tap*C_X + ci; the rows of channels ci >= C_IN (the padded copy's zeros) are dropped."""
    K_ROWS = KS * KS * C_X
    TOTAL = (K_ROWS + 1) * C_G
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = ws_ptr + offs
    for _ in range(SPLITS):  # slot 0, 1, ...: a fixed order, so the sum is reproducible
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += TOTAL
    acc = acc * scale
    k = offs // C_G
    q = offs % C_G
    C_SH = C_G // (R * R)
    co = _conv_channel(q, R, C_SH)
    if HAS_DW:
        tap = k // C_X
        ci = k % C_X
        dst = (co * C_IN + ci) * (KS * KS) + tap
        tl.store(dw_ptr + dst, _round_to(acc, dw_ptr, INTERP), mask=ok & (k < K_ROWS) & (ci < C_IN))
    if HAS_DB:
        tl.store(db_ptr + co, _round_to(acc, db_ptr, INTERP), mask=ok & (k == K_ROWS))


def _wgrad_configs():
    # BLOCK_P pixels of one image row per K step x (warps, stages). Operands per stage at
    # BLOCK_KW = 64, BLOCK_Q = 64, 3 taps, bf16: (3*64 + 64) * BLOCK_P * 2 B = 16 KiB at
    # BLOCK_P = 32. A row of W pixels takes cdiv(W, BLOCK_P) steps, so BLOCK_P = 16 (and 32 at
    # 96) keep the training patches' rows (48 LR, 96 HR pixels) free of the padding 64 adds
    # (masked slots cost MMA and shared memory, not L2). No 128: at 3 taps x 64 x 128 a stage
    # is 64 KiB+ (the tail's 64 -> 3 config needed 289 KiB at 3 stages, over the 227 KiB limit).
    return [
        triton.Config({"BLOCK_P": bp}, num_warps=wp, num_stages=st)
        for bp, wp, st in [(16, 4, 4), (32, 4, 3), (32, 4, 4), (64, 4, 3), (32, 8, 3), (64, 8, 3)]
    ]


# fp32 accumulator registers per thread a config may hold: TAPS x BLOCK_KW x BLOCK_Q over its
# threads. 3 x 64 x 64 at 4 warps is 96 (144-163 registers in all, no spills); the x2
# upsampler's 3 x 64 x 128 would be 192 at 4 warps, so it runs only the 8-warp configs (96).
_ACC_REGS_MAX = 96


def _acc_regs(kw: dict, num_warps: int) -> int:
    return kw["TAPS"] * kw["BLOCK_KW"] * kw["BLOCK_Q"] // (32 * num_warps)


def _prune_wgrad_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: drop configs whose accumulators would not fit (_ACC_REGS_MAX)."""
    keep = [c for c in configs if _acc_regs(kwargs, c.num_warps) <= _ACC_REGS_MAX]
    return keep or configs


# The autotuner picks a config by timing, so two processes may pick different ones, and
# BLOCK_P sets the summation order inside a split: with torch.use_deterministic_algorithms
# (or FASTSR_DETERMINISTIC=1) this config is used instead, so gradients are bitwise equal
# across processes and machines with the same GPU, not only between runs of one process.
# Two, both in _wgrad_configs(): the 8-warp one where the 4-warp one's accumulators do not fit.
_WGRAD_PINNED = dict(BLOCK_P=32, num_warps=4, num_stages=3)
_WGRAD_PINNED_WIDE = dict(BLOCK_P=32, num_warps=8, num_stages=3)

_wgrad_tuned = triton.autotune(configs=_wgrad_configs(),
                               key=["C_IN", "C_G", "KS", "R", "HAS_SHIFT", "IN_MASK", "PER_TAP", "TAPS", "C_X", "SPLIT", "G_COLS"],
                               prune_configs_by={"early_config_prune": _prune_wgrad_configs})(
    _wgrad_kernel
)
# Splits are ranges of whole image rows (flat over the batch), fixed by the launcher, not by
# the tuned config: every config sums the same pixels into the same slot (the order inside a
# slot depends only on the config, which the autotuner caches: two runs give bitwise-equal
# gradients).
_INTERPRET_BLOCK_P = 16
_MIN_PIXELS_PER_SPLIT = 32 if _INTERPRET else 512
_INTERPRET_MAX_SPLITS = 3
_PROGRAMS_PER_SM = 2
_REDUCE_BLOCK = 256 if _INTERPRET else 1024


def _wgrad_tiling(c_in: int, ks: int, c_g: int, dtype: torch.dtype) -> dict:
    """The k-block geometry: PER_TAP (Cin >= 16) blocks are BLOCK_KW channels of TAPS taps of one
    kernel row (TAPS = 3 for 3x3 convs: 3 accumulators, one G tile per 3 MMAs), so their masks are 1-D over pixels; narrower inputs
    (the head, Cin = 3: 27 rows) take all packed rows in one BLOCK_KW block (27 of 32 used).
    At BLOCK_Q = 128 (the x2 upsampler) 3 taps leave only the 8-warp configs (_ACC_REGS_MAX)."""
    per_tap = c_in >= 16
    c_x = c_in if per_tap else vector_channels(c_in, dtype)
    if per_tap:
        block_kw = (16 if c_in <= 32 else 32) if _INTERPRET else min(64, _next_pow2(c_in))
    else:
        # Rows tap*C_X + c of the padded image copy: the RGB head's 9 x 4 = 36 (27 real) in one
        # 64-row block, the M of one HGMMA (wgmma's M is 64 per warpgroup).
        k_rows = ks * ks * c_x
        block_kw = (16 if k_rows <= 48 else 32 if k_rows < 256 else 64) if _INTERPRET \
            else min(64, max(16, _next_pow2(k_rows)))
    block_q = _wgrad_block_q(c_g, dtype)
    taps = 3 if per_tap and ks == 3 else 1
    num_kb = (ks * ks // taps) * triton.cdiv(c_in, block_kw) if per_tap else triton.cdiv(ks * ks * c_x, block_kw)
    return dict(BLOCK_KW=block_kw, BLOCK_Q=block_q, PER_TAP=per_tap, TAPS=taps, C_X=c_x,
                SPLIT=not per_tap and dtype == torch.float32, tiles=num_kb * triton.cdiv(c_g, block_q))


def _wgrad_block_q(c_g: int, dtype: torch.dtype) -> int:
    """Gradient channels per program. fp32 operands take twice the shared memory per stage, so
    they stop at 64 (the (BLOCK_P = 128) x 128 fp32 tile alone would be 64 KiB a stage)."""
    cap = 64 if (_INTERPRET or dtype == torch.float32) else 128
    return min(max(16, _next_pow2(c_g)), cap)


def _num_splits(rows: int, tiles: int, device: torch.device, row_pixels: int = 1) -> tuple[int, int]:
    """(splits, image rows per split) for the split-K over `rows` image rows of `row_pixels`
    pixels each (flat over the batch: N*H rows of W)."""
    if _INTERPRET:
        want = _INTERPRET_MAX_SPLITS
    else:
        want = triton.cdiv(_PROGRAMS_PER_SM * _common._multiprocessor_count(device), tiles)
    splits = max(1, min(want, rows * row_pixels // _MIN_PIXELS_PER_SPLIT, rows))
    per = triton.cdiv(rows, splits)
    return triton.cdiv(rows, per), per


def conv2d_wgrad_nhwc(x, grad_out, kernel_size: int, *, shuffle: int = 1, res_scale: float = 1.0, in_shift=None,
                      grad_mask=None, need_dw: bool = True, need_db: bool = True, dw_dtype=None,
                      db_dtype=torch.float32, dw_out=None, db_out=None):
    """(dW, db) of a stride-1 "same" conv: res_scale * sum over pixels; deterministic split-K.

    x:         (N, H, W, Cin) contiguous NHWC conv input, float32 / float16 / bfloat16.
    grad_out:  (N, H*r, W*r, Cout/r^2), x's dtype: the gradient of the pixel-shuffled output.
    in_shift:  None or (Cin,) float32: the forward subtracted it from in-bounds taps of x.
    grad_mask: None or grad_out's shape and dtype: gradient zeroed where it is 0 (output ReLU).
    Returns (dW (Cout, Cin, KS, KS) in dw_dtype (default x's dtype) or None,
             db (Cout,) in db_dtype or None); `dw_out` / `db_out` are written if given.
    Per pixel: 2*KS^2*Cin*Cout FLOPs (+Cout for db); reads Cin*e of x and Cout*e of grad from DRAM.
    Plus SPLITS*(KS^2*Cin + 1)*Cout*4 B of fp32 workspace, written once and reduced once.
    """
    _check_activation("x", x)
    _check_activation("grad_out", grad_out)
    ks = _check_kernel_size(kernel_size, _common.SUPPORTED_KERNEL_SIZES)
    n, h, w, c_in = x.shape
    if c_in < 1:
        raise ValueError("x has 0 channels")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
    r = _check_shuffle(shuffle, None)  # Cout comes from grad_out below
    if tuple(grad_out.shape[:3]) != (n, h * r, w * r) or grad_out.shape[3] < 1:
        raise ValueError(f"grad_out must be (N, H*{r}, W*{r}, Cout/{r * r}) = ({n}, {h * r}, {w * r}, ...) "
                         f"for x {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    c_out = grad_out.shape[3] * r * r
    if in_shift is not None:
        _check_vector("in_shift", in_shift, c_in)
    if grad_mask is not None:
        _check_activation("grad_mask", grad_mask)
        if tuple(grad_mask.shape) != tuple(grad_out.shape) or grad_mask.dtype != grad_out.dtype:
            raise ValueError(f"grad_mask must be {tuple(grad_out.shape)} {grad_out.dtype}, "
                             f"got {tuple(grad_mask.shape)} {grad_mask.dtype}")
    _check_same_device(x, grad_out=grad_out, in_shift=in_shift, grad_mask=grad_mask, dw_out=dw_out, db_out=db_out)
    dw_dtype = _check_grad_dtype("dw_dtype", dw_dtype or x.dtype)
    db_dtype = _check_grad_dtype("db_dtype", db_dtype)
    inputs = dict(x=x, grad_out=grad_out, grad_mask=grad_mask)
    dw = _result("dw_out", dw_out, (c_out, c_in, ks, ks), dw_dtype, x.device, inputs) if need_dw else None
    db = _result("db_out", db_out, (c_out,), db_dtype, x.device, inputs) if need_db else None
    if not (need_dw or need_db):
        return dw, db
    m = n * h * w
    if m == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dw, db
    if m * r * r > _INT32_MAX:
        raise ValueError(f"{m * r * r} output pixels; at most {_INT32_MAX} are supported")

    tiling = _wgrad_tiling(c_in, ks, c_out, x.dtype)
    tiles = tiling.pop("tiles")
    k_rows = ks * ks * tiling["C_X"]
    xk = x
    if not tiling["PER_TAP"]:
        # A narrow input (the head's image) is read from its padded copy, in_shift applied there.
        xk = pad_image_nhwc(x, ks, in_shift)
    gk, gmask, g_cols = grad_out, grad_mask, c_out
    if r == 1 and c_out < tiling["BLOCK_Q"]:
        # A narrow gradient (the tail's 3 channels) is read from a copy padded to its one
        # BLOCK_Q tile (`pad_bordered_nhwc`, no border, the mask applied there): 16-byte loads of whole
        # pixels, no column mask (3 channels would be 2-byte loads). 16 x 48x48 x 4 patches of
        # the x2 tail in bf16: 0.9 MB read, 4.7 MB written.
        g_cols = tiling["BLOCK_Q"]
        gk, gmask = pad_bordered_nhwc(grad_out, 1, g_cols, mask=grad_mask), None
    splits, rows_per_split = _num_splits(n * h, tiles, x.device, w)
    ws = torch.empty((splits, k_rows + 1, c_out), device=x.device, dtype=torch.float32)
    cfg = _launch_config_args(x.dtype)
    args = (xk, gk, gmask if gmask is not None else gk,
            in_shift if in_shift is not None else ws, ws, m, h, w, rows_per_split)
    meta = dict(C_IN=c_in, C_G=c_out, KS=ks, R=r, HAS_SHIFT=in_shift is not None and tiling["PER_TAP"],
                IN_MASK=gmask is not None, G_COLS=g_cols, **tiling, **cfg)
    total = (k_rows + 1) * c_out
    red_args = (ws, dw if dw is not None else ws, db if db is not None else ws, splits, float(res_scale))
    red_meta = dict(C_IN=c_in, C_G=c_out, KS=ks, R=r, HAS_DW=dw is not None, HAS_DB=db is not None,
                    INTERP=cfg["INTERP"], BLOCK=_REDUCE_BLOCK, C_X=tiling["C_X"])
    red_grid = (triton.cdiv(total, _REDUCE_BLOCK),)
    _launch(_wgrad_kernel, _wgrad_tuned, (tiles * splits,), args, meta,
            interpret=dict(BLOCK_P=_INTERPRET_BLOCK_P), like=x,
            pinned=_WGRAD_PINNED if _acc_regs(tiling, _WGRAD_PINNED["num_warps"]) <= _ACC_REGS_MAX
            else _WGRAD_PINNED_WIDE)
    # Nothing to tune: the reduction always runs its one config.
    _launch(_wgrad_reduce_kernel, _wgrad_reduce_kernel, red_grid, red_args, red_meta, interpret={}, like=x)
    return dw, db

