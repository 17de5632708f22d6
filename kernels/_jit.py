"""Device code (@triton.jit helpers) shared by the kernels: rounding to the storage dtype, the
MMA with its precision, a conv tile's pixel coordinates, the forward conv's main loop
(run by conv2d.py, by the residual block for both its convs, and so by dgrad's dx conv), and
the TMA kernels' operand helpers (conv2d_tma.py and resblock_tma.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _round_bf16_rtne(v):
    """fp32 -> the nearest-even bf16 value, kept in fp32. Only used under the interpreter,
    whose own fp32->bf16 cast truncates (the GPU cast rounds to nearest even)."""
    u = v.to(tl.uint32, bitcast=True)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(v, ptr, INTERP: tl.constexpr):
    """Round an fp32 tensor to the element type of `ptr`.

    On the GPU this is the plain cast (the result has ptr's element type and can feed
    tl.dot or tl.store). Under the interpreter, which cannot do arithmetic or tl.dot on
    bf16, the value is rounded the same way but kept in fp32 (bf16/fp16 -> fp32 is exact,
    so storing it later through ptr's type is exact too)."""
    if INTERP:
        if ptr.dtype.element_ty == tl.bfloat16:
            r = _round_bf16_rtne(v)
        elif ptr.dtype.element_ty == tl.float16:
            r = v.to(tl.float16).to(tl.float32)
        else:
            r = v
    else:
        r = v.to(ptr.dtype.element_ty)
    return r


@triton.jit
def _tf32_rna(v):
    """fp32 -> the nearest tf32 value (10 stored mantissa bits; ties away from zero, as
    cvt.rna.tf32.f32), kept in fp32. Integer ops on the bits: the GPU and the interpreter
    compute the same value. Finite inputs only (images, weights, gradients)."""
    u = v.to(tl.uint32, bitcast=True)
    u = (u + 0x1000) & 0xFFFFE000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _mma_3xtf32(a, b, acc, INTERP: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr):
    """acc += a @ b for fp32 a, b at fp32-level accuracy on tf32 tensor cores (3xTF32): each
    operand v = hi + lo, hi = tf32(v), lo = tf32(v - hi), and acc += lo_a*hi_b + hi_a*lo_b +
    hi_a*hi_b (small terms first; lo*lo, ~2^-22 of a product, dropped). The parts are exact tf32
    values, so each MMA's products are exact in fp32 (11 x 11 significant bits); the roundings
    are the split's and fp32 accumulation's. Under the interpreter "ieee" (its fp32 dot)
    computes the same products of the same values. A b whose values are exact in tf32 (widened
    bf16 / fp16: 8 / 11 significant bits) has lo_b = 0: its middle MMA adds exact zeros."""
    a_hi = _tf32_rna(a)
    a_lo = _tf32_rna(a - a_hi)
    b_hi = _tf32_rna(b)
    b_lo = _tf32_rna(b - b_hi)
    acc = _mma(a_lo, b_hi, acc, "ieee" if INTERP else "tf32", USE_INPUT_PRECISION)
    acc = _mma(a_hi, b_lo, acc, "ieee" if INTERP else "tf32", USE_INPUT_PRECISION)
    acc = _mma(a_hi, b_hi, acc, "ieee" if INTERP else "tf32", USE_INPUT_PRECISION)
    return acc


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr):
    """acc += a @ b in fp32. PREC is "ieee" for fp32 operands (no TF32), "tf32" otherwise
    (Triton's default; it only matters for fp32 operands)."""
    if USE_INPUT_PRECISION:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc, allow_tf32=PREC == "tf32")
    return acc


@triton.jit
def _tap_of_step(step, KS: tl.constexpr, K_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr):
    """(tap, k0, dh, dw) of step `step` of the flat KS*KS taps x K_CHUNKS channel-chunk loop the
    conv main loops run: the tap index, the chunk's first channel, and the tap's (row, column)
    shift from the centre."""
    if K_CHUNKS == 1:
        tap = step
        k0 = 0
    else:
        tap = step // K_CHUNKS
        k0 = (step - tap * K_CHUNKS) * BLOCK_K
    return tap, k0, tap // KS - KS // 2, tap % KS - KS // 2


@triton.jit
def _shuffle_col(q, R: tl.constexpr, C_SH: tl.constexpr, W_HR):
    """Offset of shuffle-order column q = (i*R + j)*C_SH + c (pack_weight(w, r)) from the
    upscaled NHWC element of sub-pixel (0, 0), channel 0, of the same low-resolution pixel:
    sub-pixel (i, j), channel c of an upscaled image W_HR pixels wide."""
    ij = q // C_SH
    return ((ij // R) * W_HR + ij % R) * C_SH + q % C_SH


@triton.jit
def _conv_channel(q, R: tl.constexpr, C_SH: tl.constexpr):
    """The conv output channel c*R^2 + i*R + j (PyTorch's PixelShuffle order) of shuffle-order
    column q = (i*R + j)*C_SH + c."""
    return (q % C_SH) * (R * R) + q // C_SH


@triton.jit
def _conv_mainloop(
    acc,
    src_ptr, img, oh, ow, m_mask, H_src, W_src,
    w_ptr, offs_n, n_mask,
    shift_ptr,
    C_SRC: tl.constexpr, C_OUT: tl.constexpr, KS: tl.constexpr,
    HAS_SHIFT: tl.constexpr, INTERP: tl.constexpr,
    PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, W_COLS: tl.constexpr,
):
    """acc[m, n] += sum over taps (kh, kw) and channels ci of
         src[img[m], oh[m] + kh - P, ow[m] + kw - P, ci] * w[(kh*KS + kw)*C_SRC + ci, n]

    `src` is NHWC with C_SRC channels (an activation, or the resblock's workspace), rows
    outside [0, H_src) x [0, W_src) or with m_mask False read as zero. One flat loop over
    KS*KS*ceil(C_SRC/BLOCK_K) steps: each step loads one BLOCK_M x BLOCK_K activation tile
    (BLOCK_K contiguous channels per pixel: 16-byte vector loads) and one BLOCK_K x BLOCK_N
    weight tile (contiguous rows of the packed weight, from L2), and issues one MMA.

    W_COLS: the packed weight's row length. C_OUT, or (a narrow output: the tail's 3 channels)
    its columns zero-padded to the one BLOCK_N tile (`_common.pad_weight_columns`): then every weight
    row is one aligned 16-byte-multiple run and its load has no column mask (a 3-column row
    would be 2-byte loads)."""
    K_CHUNKS = (C_SRC + BLOCK_K - 1) // BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    # Pointers of the centre tap's first chunk, built once; each step only adds a scalar
    # offset (tap shift, channel chunk) to them.
    pix0 = (img * H_src + oh) * W_src + ow  # flattened NHW index of the centre tap
    a_base = src_ptr + (pix0.to(tl.int64) * C_SRC)[:, None] + offs_k[None, :]
    b_base = w_ptr + offs_k[:, None] * W_COLS + offs_n[None, :]
    for step in range(KS * KS * K_CHUNKS):
        tap, k0, dh, dw = _tap_of_step(step, KS, K_CHUNKS, BLOCK_K)
        ih = oh + dh
        iw = ow + dw
        row_ok = m_mask & (ih >= 0) & (ih < H_src) & (iw >= 0) & (iw < W_src)
        k_ok = offs_k < C_SRC - k0
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(a_base + ((dh * W_src + dw) * C_SRC + k0), mask=a_mask, other=0.0)
        if W_COLS > C_OUT:  # padded columns: all BLOCK_N exist (zeros past C_OUT)
            b = tl.load(b_base + (tap * C_SRC + k0) * W_COLS, mask=k_ok[:, None], other=0.0)
        else:
            b = tl.load(b_base + (tap * C_SRC + k0) * W_COLS, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        if INTERP:
            # The interpreter cannot multiply bf16 (it stores it as raw uint16 bits);
            # widening is exact, and products of bf16/fp16 values are exact in fp32, so
            # this matches a tensor-core MMA up to the order of the fp32 additions.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if HAS_SHIFT:
            # (x - shift) rounded to x's dtype, like eager `x - mean` in that dtype; taps
            # in the zero padding stay exactly zero.
            s = tl.load(shift_ptr + k0 + offs_k, mask=k_ok, other=0.0)
            a = _round_to(tl.where(a_mask, a.to(tl.float32) - s[None, :], 0.0), src_ptr, INTERP)
        acc = _mma(a, b, acc, PREC, USE_INPUT_PRECISION)
    return acc



@triton.jit
def _block_tile(tile, tiles_h, tiles_w, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """A residual-block tile index -> (image, first row, first column) of its TILE_H x TILE_W
    tile: tiles walk each image's rows of tiles left to right, so the tiles that run at the same
    time are neighbours along W and their halos overlap in L2."""
    tw0 = (tile % tiles_w) * TILE_W
    t = tile // tiles_w
    th0 = (t % tiles_h) * TILE_H
    return t // tiles_h, th0, tw0


@triton.jit
def _tile_coords(M, H, W, C_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's pixel block (over N*H*W) and channel block (over C_N), with masks and
    the pixels' (image, row, column)."""
    # 1-D grid, channel blocks fastest: when C_N > BLOCK_N the programs sharing one pixel
    # tile run side by side and its activation rows are read from DRAM once (then L2).
    # (A 2-D grid would also cap the pixel axis at 65,535 tiles.)
    NUM_N_BLOCKS = (C_N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    pid_n = pid % NUM_N_BLOCKS
    pid_m = pid // NUM_N_BLOCKS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < C_N
    ow = offs_m % W
    t = offs_m // W
    oh = t % H
    img = t // H
    return offs_m, offs_n, m_mask, n_mask, img, oh, ow


@triton.jit
def _widen(v, INTERP: tl.constexpr):
    # The interpreter cannot multiply bf16 (raw uint16 bits); widening is exact and products of
    # bf16/fp16 values are exact in fp32, so this matches the MMA up to the fp32 summation order.
    if INTERP:
        v = v.to(tl.float32)
    return v


@triton.jit
def _round_for_desc(acc, desc, INTERP: tl.constexpr):
    """fp32 -> the descriptor's element type, round to nearest even (the interpreter's own
    fp32 -> bf16 cast truncates, so it rounds first; the cast of a representable value is exact)."""
    if INTERP:
        if desc.dtype == tl.bfloat16:
            acc = _round_bf16_rtne(acc)
    return acc.to(desc.dtype)


@triton.jit
def _load_weight_taps(w_desc, n0, KS: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """The KS*KS weight tiles (BLOCK_K x BLOCK_N each) as a tuple, loaded once: used only as MMA
    operands, they stay in shared memory for the program's whole tile loop."""
    w0 = _widen(w_desc.load([0, n0]), INTERP)
    if KS == 1:
        ws = (w0,)
    else:
        ws = (w0,
              _widen(w_desc.load([1 * BLOCK_K, n0]), INTERP), _widen(w_desc.load([2 * BLOCK_K, n0]), INTERP),
              _widen(w_desc.load([3 * BLOCK_K, n0]), INTERP), _widen(w_desc.load([4 * BLOCK_K, n0]), INTERP),
              _widen(w_desc.load([5 * BLOCK_K, n0]), INTERP), _widen(w_desc.load([6 * BLOCK_K, n0]), INTERP),
              _widen(w_desc.load([7 * BLOCK_K, n0]), INTERP), _widen(w_desc.load([8 * BLOCK_K, n0]), INTERP))
    return ws
