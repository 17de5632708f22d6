"""Backward of the fused NHWC convolution and of the fused residual block.

The forward (kernels/conv2d.py) computes, per conv, stride 1, "same" zero padding P = KS // 2:

    y   = conv(x - in_shift) + bias             z = res_scale * act(y) + skip
    out = pixel_shuffle(z, r)                   act = relu or identity

Given g = dL/d out (the upscaled NHWC gradient when r > 1), with gz = pixel_unshuffle(g)
and gy = res_scale * gz * (y > 0 if relu else 1), the gradients are

    dx[p, ci]       = sum_{tap, co} gy[p - tap, co] * W[co, ci, tap]   dgrad: a conv of gy
    dW[co, ci, tap] = sum_p (x - in_shift)[p + tap, ci] * gy[p, co]     wgrad: a reduction over pixels
    db[co]          = sum_p gy[p, co]
    d skip = g,  d in_shift = -sum_p dx[p, :]                           (the op layer does these two)

Three kernels, each one launch, no atomics anywhere (so gradients are bitwise reproducible):

dgrad (`_dgrad_kernel`): the forward's implicit GEMM with M = N*H*W pixels, N = Cin, K = KS*KS*Cout,
  run over gy with flipped, transposed weights (`pack_weight_dgrad`: row (kh'*KS + kw')*Cout + q holds
  W[co(q), :, KS-1-kh', KS-1-kw']; for stride 1 and odd KS, conv_transpose == conv with those weights
  and the same padding). What the forward's mainloop does not do, the A-operand load here does:
  - inverse pixel shuffle on load: the A tile of pixel (n, h, w) is gathered straight from the
    upscaled gradient, g[n, h*r + i, w*r + j, c]. The K index inside a tap is ordered
    q = (i*r + j)*C/r^2 + c (the packed weight rows are permuted to match), so a K chunk reads
    runs of C/r^2 contiguous channels, not a stride-r^2 gather, and no unshuffled copy exists;
  - the ReLU mask in the prologue (a conv whose own output went through ReLU): gz is zeroed where
    the saved/recomputed activation is 0, on load;
  - the mask of the *input's* ReLU in the epilogue (the block's conv2, whose input was
    relu(h)): dh = res_scale * acc, zeroed where h == 0, rounded once at the store;
  - res_scale is applied once, to the fp32 accumulator (linear, so it commutes with the sums):
    no extra rounding step, and no rescaled copy of g or of the weights.
  Tiling, block sizes and autotune configs are the forward's (`_conv_configs`, `_block_n`,
  `_block_k`); the MMA and rounding helpers are shared.

wgrad (`_wgrad_kernel`): a GEMM dW_packed = A^T @ G with M = KS*KS*Cin rows (row k = tap*Cin + ci,
  the packed-weight order), N = Cout, K = the N*H*W pixels. A^T[k, p] = (x - in_shift)[p + tap_k, ci_k]
  is an implicit im2col gather (padding reads 0, in_shift only on in-bounds taps, as in the
  forward); G = gy, loaded with the same shuffle gather and ReLU mask as dgrad. The pixel axis is
  split-K: program (k-block, n-block, split) sums BLOCK_P-pixel steps over its own fixed range of
  P_PER_SPLIT pixels and writes the fp32 partial tile to workspace slot `split`; the bias partial
  (a column sum of the same G tiles) goes to an extra row of the slot. `_wgrad_reduce_kernel` then
  adds the slots in the fixed order 0, 1, ..., SPLITS-1, applies res_scale, and writes dW directly
  in PyTorch's (Cout, Cin, KS, KS) layout (and db), in the parameters' dtypes. The split
  boundaries are fixed by the launcher (multiples of the largest BLOCK_P), not by the tuned config.

resblock backward (`resblock_backward_nhwc`): the block's forward saves only x. Backward
  recomputes h = relu(conv1(x) + b1) with the forward conv kernel, then
      dW2, db2 = wgrad(h, dy) * res_scale
      dh       = dgrad(dy, W2) * res_scale, masked by h > 0 in the epilogue
      dW1, db1 = wgrad(x, dh)
      dx       = conv(dh, flip(W1)^T) + dy   (the forward kernel, its skip epilogue adds dy)
  h and dh are transient (they live only during this backward): the activation memory held between
  forward and backward is x alone, half of what eager autograd keeps (x and relu(h)).

Cost per pixel (e = bytes per element, F = C = 64, 3x3, fp16, e = 2; DRAM traffic, L2 re-reads
not counted):
  dgrad   FLOPs 2*KS^2*Cin*Cout = 73,728; reads Cout*e of g (+ Cout*e of the prologue mask, or
          Cin*e of the epilogue mask), writes Cin*e of dx: 256 B (+128 B mask): same as a forward conv.
  wgrad   FLOPs 2*KS^2*Cin*Cout = 73,728; reads Cin*e of x and Cout*e of g once from DRAM (256 B);
          each of the KS^2*Cin/BLOCK_KW row blocks re-reads its pixel tiles from L2. The split-K
          workspace is SPLITS*(KS^2*Cin + 1)*Cout*4 bytes (~4 MiB for F = 64 on 132 SMs), written
          once and read once by the reduction: per-step, not per-pixel, cost.
  block   recompute conv1 (73,728 FLOP, 256 B), wgrad2 + dgrad2 + wgrad1 + dgrad1 (4 x 73,728 FLOP):
          ~369 kFLOP and ~1.5 KiB of DRAM traffic per pixel, against eager's 4 convs (no recompute,
          +25% FLOPs here) plus separate ReLU-backward, scale and add passes.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import conv2d as conv2d_mod
from .conv2d import (
    _INTERPRET,
    _INTERPRET_BLOCK_M,
    _INT32_MAX,
    SUPPORTED_DTYPES,
    SUPPORTED_KERNEL_SIZES,
    SUPPORTED_SHUFFLES,
    _block_k,
    _block_n,
    _check_activation,
    _check_kernel_size,
    _check_same_device,
    _check_tensor,
    _check_vector,
    _conv_configs,
    _launch_config_args,
    _tile_coords,
    _mma,
    _next_pow2,
    _overlaps,
    _round_to,
    conv2d_nhwc,
    pack_weight,
)

__all__ = [
    "pack_weight_dgrad",
    "conv2d_dgrad_nhwc",
    "conv2d_wgrad_nhwc",
    "conv2d_backward_nhwc",
    "resblock_backward_nhwc",
]


# --------------------------------------------------------------------------------------
# dgrad
# --------------------------------------------------------------------------------------


@triton.jit
def _dgrad_mainloop(
    acc,
    g_ptr, gmask_ptr, img, oh, ow, m_mask, H, W,
    w_ptr, offs_n, n_mask,
    C_G: tl.constexpr, C_OUT: tl.constexpr, KS: tl.constexpr, R: tl.constexpr,
    IN_MASK: tl.constexpr, INTERP: tl.constexpr,
    PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc[m, n] += sum over taps and q of gz[img, oh + kh - P, ow + kw - P, q] * w[(kh*KS + kw)*C_G + q, n]

    gz is the pixel-unshuffled view of g, (N, H*R, W*R, C_G/R^2) NHWC, read in place: for a
    low-resolution pixel (n, h, w) and q = (i*R + j)*C_SH + c, gz[n, h, w, q] = g[n, h*R + i,
    w*R + j, c] at address row(n, h, w) + col(q) (R = 1: the plain NHWC address). With IN_MASK,
    elements where gmask (same layout as g) is 0 read as 0: the ReLU-backward prologue.
    Otherwise the same flat tap x chunk loop as the forward's `_conv_mainloop`."""
    PAD = KS // 2
    K_CHUNKS = (C_G + BLOCK_K - 1) // BLOCK_K
    C_SH = C_G // (R * R)
    W_G = W * R
    offs_k = tl.arange(0, BLOCK_K)
    # Address of gz[img, oh, ow, 0] (per pixel); a tap adds a scalar, a chunk a column vector.
    row0 = ((img * H + oh).to(tl.int64) * R * W_G + ow * R) * C_SH
    b_base = w_ptr + offs_k[:, None] * C_OUT + offs_n[None, :]
    for step in range(KS * KS * K_CHUNKS):
        if K_CHUNKS == 1:
            tap = step
            k0 = 0
        else:
            tap = step // K_CHUNKS
            k0 = (step - tap * K_CHUNKS) * BLOCK_K
        dh = tap // KS - PAD
        dw = tap % KS - PAD
        ih = oh + dh
        iw = ow + dw
        row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        q = k0 + offs_k
        k_ok = q < C_G
        if R == 1:
            col = q
        else:
            ij = q // C_SH
            col = ((ij // R) * W_G + ij % R) * C_SH + q % C_SH
        a_mask = row_ok[:, None] & k_ok[None, :]
        a_off = row0[:, None] + ((dh * W_G + dw) * R * C_SH + col)[None, :]
        a = tl.load(g_ptr + a_off, mask=a_mask, other=0.0)
        b = tl.load(b_base + (tap * C_G + k0) * C_OUT, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        if INTERP:
            # See _conv_mainloop: the interpreter cannot multiply bf16; widening is exact.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IN_MASK:
            keep = tl.load(gmask_ptr + a_off, mask=a_mask, other=0.0).to(tl.float32) != 0.0
            a = tl.where(keep, a, tl.zeros_like(a))
        acc = _mma(a, b, acc, PREC, USE_INPUT_PRECISION)
    return acc


@triton.jit
def _dgrad_kernel(
    g_ptr, gmask_ptr, w_ptr, omask_ptr, out_ptr,
    M, H, W, scale,
    C_G: tl.constexpr, C_IN: tl.constexpr, KS: tl.constexpr, R: tl.constexpr,
    IN_MASK: tl.constexpr, OUT_MASK: tl.constexpr,
    INTERP: tl.constexpr, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Same grid as the forward: 1-D, channel blocks fastest.
    offs_m, offs_n, m_mask, n_mask, img, oh, ow = _tile_coords(M, H, W, C_IN, BLOCK_M, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _dgrad_mainloop(
        acc, g_ptr, gmask_ptr, img, oh, ow, m_mask, H, W, w_ptr, offs_n, n_mask,
        C_G, C_IN, KS, R, IN_MASK, INTERP, PREC, USE_INPUT_PRECISION, BLOCK_K,
    )

    # ---- epilogue in fp32: res_scale, the input ReLU's mask, one rounding at the store ----
    acc = acc * scale
    mask = m_mask[:, None] & n_mask[None, :]
    off = offs_m.to(tl.int64)[:, None] * C_IN + offs_n[None, :]
    if OUT_MASK:
        keep = tl.load(omask_ptr + off, mask=mask, other=0.0).to(tl.float32) != 0.0
        acc = tl.where(keep, acc, 0.0)
    tl.store(out_ptr + off, _round_to(acc, out_ptr, INTERP), mask=mask)


_dgrad_tuned = triton.autotune(
    configs=_conv_configs(), key=["C_G", "C_IN", "KS", "R", "IN_MASK", "OUT_MASK"]  # + dtypes
)(_dgrad_kernel)


# --------------------------------------------------------------------------------------
# wgrad: split-K over pixels, deterministic reduction
# --------------------------------------------------------------------------------------


@triton.jit
def _wgrad_kernel(
    x_ptr, g_ptr, gmask_ptr, shift_ptr, ws_ptr,
    M, H, W, P_PER_SPLIT,
    C_IN: tl.constexpr, C_G: tl.constexpr, KS: tl.constexpr, R: tl.constexpr,
    HAS_SHIFT: tl.constexpr, IN_MASK: tl.constexpr,
    INTERP: tl.constexpr, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Partial dW_packed[k, q] (and db[q] in row K_ROWS) over this program's pixel range."""
    PAD = KS // 2
    K_ROWS = KS * KS * C_IN
    NUM_KB = (K_ROWS + BLOCK_KW - 1) // BLOCK_KW
    NUM_QB = (C_G + BLOCK_Q - 1) // BLOCK_Q
    C_SH = C_G // (R * R)
    W_G = W * R
    # Tiles fastest, splits slowest: the programs running together share one pixel range, so
    # its x and g rows come from DRAM once and from L2 for the other row/column blocks.
    pid = tl.program_id(0)
    pid_kq = pid % (NUM_KB * NUM_QB)
    split = pid // (NUM_KB * NUM_QB)
    pid_q = pid_kq % NUM_QB
    pid_k = pid_kq // NUM_QB

    # Rows: packed-weight index k = tap*C_IN + ci -> the (dh, dw) shift and channel it reads.
    offs_k = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    k_ok = offs_k < K_ROWS
    tap = offs_k // C_IN
    ci = offs_k % C_IN
    dh = tap // KS - PAD
    dw = tap % KS - PAD
    x_col = (dh * W + dw) * C_IN + ci  # x[p + tap, ci] = x_ptr + p*C_IN + x_col (NHW index p)
    if HAS_SHIFT:
        s = tl.load(shift_ptr + ci, mask=k_ok, other=0.0)
    # Columns: gradient channel q in gather order (see _dgrad_mainloop).
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < C_G
    ij = offs_q // C_SH
    g_col = ((ij // R) * W_G + ij % R) * C_SH + offs_q % C_SH

    acc = tl.zeros((BLOCK_KW, BLOCK_Q), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    p_start = split * P_PER_SPLIT
    p_end = tl.minimum(p_start + P_PER_SPLIT, M)
    offs_p = tl.arange(0, BLOCK_P)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + offs_p
        p_ok = p < p_end
        ow = p % W
        t = p // W
        oh = t % H
        img = t // H
        # A^T tile: BLOCK_KW rows x BLOCK_P pixels of the shifted input (implicit im2col).
        ih = oh[None, :] + dh[:, None]
        iw = ow[None, :] + dw[:, None]
        a_mask = k_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + (p.to(tl.int64) * C_IN)[None, :] + x_col[:, None], mask=a_mask, other=0.0)
        # G tile: BLOCK_P pixels x BLOCK_Q gradient channels, unshuffled on load.
        g_row = ((img * H + oh).to(tl.int64) * R * W_G + ow * R) * C_SH
        g_off = g_row[:, None] + g_col[None, :]
        g_mask = p_ok[:, None] & q_ok[None, :]
        g = tl.load(g_ptr + g_off, mask=g_mask, other=0.0)
        if INTERP:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        if IN_MASK:
            keep = tl.load(gmask_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32) != 0.0
            g = tl.where(keep, g, tl.zeros_like(g))
        if HAS_SHIFT:
            # (x - shift) rounded to x's dtype, exactly as the forward computed it.
            a = _round_to(tl.where(a_mask, a.to(tl.float32) - s[:, None], 0.0), x_ptr, INTERP)
        acc = _mma(a, g, acc, PREC, USE_INPUT_PRECISION)
        acc_b += tl.sum(g.to(tl.float32), axis=0)

    slot = ws_ptr + split.to(tl.int64) * ((K_ROWS + 1) * C_G)
    tl.store(slot + offs_k[:, None] * C_G + offs_q[None, :], acc, mask=k_ok[:, None] & q_ok[None, :])
    # Every row block computed the same column sums; block 0 writes them.
    if pid_k == 0:
        tl.store(slot + K_ROWS * C_G + offs_q, acc_b, mask=q_ok)


@triton.jit
def _wgrad_reduce_kernel(
    ws_ptr, dw_ptr, db_ptr, SPLITS, scale,
    C_IN: tl.constexpr, C_G: tl.constexpr, KS: tl.constexpr, R: tl.constexpr,
    HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr,
):
    """dW, db = scale * sum over slots 0..SPLITS-1 (in that order) of the workspace, written as
    dW[co, ci, kh, kw] / db[co] (co = the conv channel of gather column q)."""
    K_ROWS = KS * KS * C_IN
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
    co = (q % C_SH) * (R * R) + q // C_SH
    if HAS_DW:
        tap = k // C_IN
        ci = k % C_IN
        dst = (co * C_IN + ci) * (KS * KS) + tap
        tl.store(dw_ptr + dst, _round_to(acc, dw_ptr, INTERP), mask=ok & (k < K_ROWS))
    if HAS_DB:
        tl.store(db_ptr + co, _round_to(acc, db_ptr, INTERP), mask=ok & (k == K_ROWS))


def _wgrad_configs():
    # BLOCK_P pixels per K step x (warps, stages). Operands per stage at BLOCK_KW = 64,
    # BLOCK_Q = 64, fp16: (64 + 64) * BLOCK_P * 2 B = 16 KiB at BLOCK_P = 64.
    return [
        triton.Config({"BLOCK_P": bp}, num_warps=wp, num_stages=st)
        for bp, wp, st in [(32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3)]
    ]


# The autotuner picks a config by timing, so two processes may pick different ones, and
# BLOCK_P sets the summation order inside a split: with torch.use_deterministic_algorithms
# (or FASTSR_DETERMINISTIC=1) this config is used instead, so gradients are bitwise equal
# across processes and machines with the same GPU, not only between runs of one process.
_WGRAD_PINNED = dict(BLOCK_P=64, num_warps=4, num_stages=3)  # one of _wgrad_configs()


def pinned_configs() -> bool:
    """Whether the wgrad kernel runs its pinned config instead of the autotuned one."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FASTSR_DETERMINISTIC") == "1"


_wgrad_tuned = triton.autotune(configs=_wgrad_configs(), key=["C_IN", "C_G", "KS", "R", "HAS_SHIFT", "IN_MASK"])(
    _wgrad_kernel
)
# Split boundaries are multiples of the largest tuned BLOCK_P, so every config sums the same
# pixels into the same slot (the order inside a slot depends only on the config, which the
# autotuner caches: two runs give bitwise-equal gradients).
_P_ALIGN = 32 if _INTERPRET else max(c.kwargs["BLOCK_P"] for c in _wgrad_configs())
_MIN_PIXELS_PER_SPLIT = 32 if _INTERPRET else 512
_INTERPRET_MAX_SPLITS = 3
_PROGRAMS_PER_SM = 2
_REDUCE_BLOCK = 256 if _INTERPRET else 1024


def _wgrad_block_kw(k_rows: int) -> int:
    """Packed-weight rows per program: one tap of Cin = 64, all 27 rows of the head conv."""
    if _INTERPRET:
        return 16 if k_rows <= 48 else 32 if k_rows < 256 else 64
    return min(64, max(16, _next_pow2(k_rows)))


def _wgrad_block_q(c_g: int, dtype: torch.dtype) -> int:
    """Gradient channels per program. fp32 operands take twice the shared memory per stage, so
    they stop at 64 (the (BLOCK_P = 128) x 128 fp32 tile alone would be 64 KiB a stage)."""
    cap = 64 if (_INTERPRET or dtype == torch.float32) else 128
    return min(max(16, _next_pow2(c_g)), cap)


def _num_splits(m: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, pixels per split) for the split-K over m pixels."""
    if _INTERPRET:
        want = _INTERPRET_MAX_SPLITS
    else:
        want = triton.cdiv(_PROGRAMS_PER_SM * conv2d_mod._multiprocessor_count(device), tiles)
    splits = max(1, min(want, m // _MIN_PIXELS_PER_SPLIT))
    per = triton.cdiv(triton.cdiv(m, splits), _P_ALIGN) * _P_ALIGN
    return triton.cdiv(m, per), per


# --------------------------------------------------------------------------------------
# Checks and helpers
# --------------------------------------------------------------------------------------


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_weight(name: str, w, x, kernel_size: int, c_out: int | None = None, c_in: int | None = None):
    _check_tensor(name, w, rank=4)
    if w.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {w.dtype}")
    co, ci, kh, kw = w.shape
    if kh != kernel_size or kw != kernel_size:
        raise ValueError(f"{name} must be (Cout, Cin, {kernel_size}, {kernel_size}), got {tuple(w.shape)}")
    if c_in is not None and ci != c_in:
        raise ValueError(f"{name} expects Cin={ci} but x has {c_in} channels")
    if c_out is not None and co != c_out:
        raise ValueError(f"{name} must have {c_out} output channels, got {co}")
    if co < 1 or ci < 1:
        raise ValueError(f"{name} has no channels: {tuple(w.shape)}")


def _check_shuffle(shuffle, c_out: int) -> int:
    if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle not in SUPPORTED_SHUFFLES:
        raise ValueError(f"shuffle must be one of {SUPPORTED_SHUFFLES}, got {shuffle!r}")
    if c_out % (shuffle * shuffle):
        raise ValueError(f"shuffle={shuffle} needs Cout divisible by {shuffle * shuffle}, got Cout={c_out}")
    return shuffle


def _check_grad_dtype(name: str, dtype) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _result(name: str, given, shape, dtype, device, inputs: dict) -> torch.Tensor:
    """Allocate a gradient, or check the one given (shape, dtype, device, contiguous, no overlap)."""
    if given is None:
        return torch.empty(shape, device=device, dtype=dtype)
    _check_tensor(name, given)
    if tuple(given.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(given.shape)}")
    if given.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {given.dtype}")
    if given.device != device:
        raise ValueError(f"{name} is on {given.device}, expected {device}")
    if not given.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    for other, t in inputs.items():
        if t is not None and _overlaps(given, t):
            raise ValueError(f"{name} must not share memory with {other}")
    return given


def _gather_perm(c_out: int, shuffle: int, device) -> torch.Tensor:
    """perm[q] = the conv output channel read at gather position q = (i*r + j)*C/r^2 + c."""
    r2 = shuffle * shuffle
    c_sh = c_out // r2
    return (torch.arange(c_sh, device=device)[None, :] * r2 + torch.arange(r2, device=device)[:, None]).reshape(-1)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def pack_weight_dgrad(weight: torch.Tensor, shuffle: int = 1) -> torch.Tensor:
    """(Cout, Cin, KS, KS) -> (KS*KS*Cout, Cin): the packed weight of the dgrad conv.

    Row (kh*KS + kw)*Cout + q holds W[co(q), :, KS-1-kh, KS-1-kw] (flipped taps, in and out
    channels swapped). For shuffle r > 1 the rows of a tap are in gather order:
    q = (i*r + j)*Cout/r^2 + c holds conv channel co = c*r^2 + i*r + j, the channel the
    pixel-shuffled gradient stores at sub-pixel (i, j), channel c."""
    _check_tensor("weight", weight, rank=4)
    w = weight.flip(2, 3).transpose(0, 1)  # (Cin, Cout, KS, KS)
    if shuffle > 1:
        w = w[:, _gather_perm(weight.shape[0], shuffle, weight.device)]
    return pack_weight(w)


def conv2d_dgrad_nhwc(grad_out, weight, kernel_size: int, *, shuffle: int = 1, res_scale: float = 1.0,
                      grad_mask=None, input_mask=None, out=None) -> torch.Tensor:
    """dx of a stride-1 "same" conv: res_scale * conv_transpose(gz, weight), optionally masked.

    grad_out:   (N, H*r, W*r, Cout/r^2) contiguous NHWC gradient of the (pixel-shuffled) output,
                float32 / float16 / bfloat16; read in place (no unshuffled copy).
    weight:     (Cout, Cin, KS, KS) in grad_out's dtype (packed here with `pack_weight_dgrad`).
    grad_mask:  None, or grad_out's shape and dtype: gz is zeroed where it is 0 (ReLU on the output).
    input_mask: None, or (N, H, W, Cin) in grad_out's dtype: dx is zeroed where it is 0 (the
                conv's input was relu(h); pass h or relu(h)).
    Returns dx (N, H, W, Cin) in grad_out's dtype (or writes `out`). fp32 accumulation.
    Per pixel: 2*KS^2*Cin*Cout FLOPs; reads Cout*e of grad (+Cout*e of grad_mask or Cin*e of
    input_mask), writes Cin*e.
    """
    _check_activation("grad_out", grad_out)
    ks = _check_kernel_size(kernel_size, SUPPORTED_KERNEL_SIZES)
    _check_tensor("weight", weight, rank=4)
    c_out, c_in = weight.shape[0], weight.shape[1]
    r = _check_shuffle(shuffle, c_out)
    _check_weight("weight", weight, grad_out, ks)
    n, hr, wr, c_sh = grad_out.shape
    if hr % r or wr % r or c_sh * r * r != c_out:
        raise ValueError(
            f"grad_out must be (N, H*{r}, W*{r}, Cout/{r * r} = {c_out // (r * r)}) for weight "
            f"{tuple(weight.shape)}, got {tuple(grad_out.shape)}"
        )
    h, w = hr // r, wr // r
    masks = (("grad_mask", grad_mask, tuple(grad_out.shape)), ("input_mask", input_mask, (n, h, w, c_in)))
    for name, t, shape in masks:
        if t is not None:
            _check_activation(name, t)
            if tuple(t.shape) != shape or t.dtype != grad_out.dtype:
                raise ValueError(f"{name} must be {shape} {grad_out.dtype}, got {tuple(t.shape)} {t.dtype}")
    _check_same_device(grad_out, weight=weight, grad_mask=grad_mask, input_mask=input_mask, out=out)
    out = _result("out", out, (n, h, w, c_in), grad_out.dtype, grad_out.device,
                  dict(grad_out=grad_out, grad_mask=grad_mask, input_mask=input_mask))
    m = n * h * w
    if m == 0:
        return out
    if m * r * r > _INT32_MAX:
        raise ValueError(f"{m * r * r} output pixels; at most {_INT32_MAX} are supported")
    w_packed = pack_weight_dgrad(weight, r)
    block_n = _block_n(c_in)
    num_n_blocks = triton.cdiv(c_in, block_n)
    dummy = grad_out
    args = (grad_out, grad_mask if grad_mask is not None else dummy, w_packed,
            input_mask if input_mask is not None else dummy, out, m, h, w, float(res_scale))
    meta = dict(C_G=c_out, C_IN=c_in, KS=ks, R=r, IN_MASK=grad_mask is not None, OUT_MASK=input_mask is not None,
                BLOCK_N=block_n, BLOCK_K=_block_k(c_out, grad_out.dtype), **_launch_config_args(grad_out.dtype))

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * num_n_blocks,)

    if _INTERPRET:
        _dgrad_kernel[grid](*args, BLOCK_M=_INTERPRET_BLOCK_M, **meta)
    else:
        with _device_ctx(grad_out):
            _dgrad_tuned[grid](*args, **meta)
    return out


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
    ks = _check_kernel_size(kernel_size, SUPPORTED_KERNEL_SIZES)
    n, h, w, c_in = x.shape
    if c_in < 1:
        raise ValueError("x has 0 channels")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
    if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle not in SUPPORTED_SHUFFLES:
        raise ValueError(f"shuffle must be one of {SUPPORTED_SHUFFLES}, got {shuffle!r}")
    r = shuffle
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

    k_rows = ks * ks * c_in
    block_kw = _wgrad_block_kw(k_rows)
    block_q = _wgrad_block_q(c_out, x.dtype)
    tiles = triton.cdiv(k_rows, block_kw) * triton.cdiv(c_out, block_q)
    splits, per_split = _num_splits(m, tiles, x.device)
    ws = torch.empty((splits, k_rows + 1, c_out), device=x.device, dtype=torch.float32)
    cfg = _launch_config_args(x.dtype)
    args = (x, grad_out, grad_mask if grad_mask is not None else grad_out,
            in_shift if in_shift is not None else ws, ws, m, h, w, per_split)
    meta = dict(C_IN=c_in, C_G=c_out, KS=ks, R=r, HAS_SHIFT=in_shift is not None, IN_MASK=grad_mask is not None,
                BLOCK_KW=block_kw, BLOCK_Q=block_q, **cfg)
    total = (k_rows + 1) * c_out
    red_args = (ws, dw if dw is not None else ws, db if db is not None else ws, splits, float(res_scale))
    red_meta = dict(C_IN=c_in, C_G=c_out, KS=ks, R=r, HAS_DW=dw is not None, HAS_DB=db is not None,
                    INTERP=cfg["INTERP"], BLOCK=_REDUCE_BLOCK)
    red_grid = (triton.cdiv(total, _REDUCE_BLOCK),)
    if _INTERPRET:
        _wgrad_kernel[(tiles * splits,)](*args, BLOCK_P=_P_ALIGN, **meta)
        _wgrad_reduce_kernel[red_grid](*red_args, **red_meta)
    elif pinned_configs():
        with _device_ctx(x):
            _wgrad_kernel[(tiles * splits,)](*args, **_WGRAD_PINNED, **meta)
            _wgrad_reduce_kernel[red_grid](*red_args, **red_meta)
    else:
        with _device_ctx(x):
            _wgrad_tuned[(tiles * splits,)](*args, **meta)
            _wgrad_reduce_kernel[red_grid](*red_args, **red_meta)
    return dw, db


def conv2d_backward_nhwc(grad_out, x, weight, bias, kernel_size: int, *, in_shift=None, relu: bool = False,
                         res_scale: float = 1.0, shuffle: int = 1, needs=(True, True, True),
                         dw_dtype=None, db_dtype=torch.float32, dx_out=None, dw_out=None, db_out=None):
    """Gradients of `conv2d_nhwc(x, pack_weight(weight), bias, kernel_size, in_shift=, relu=,
    res_scale=, skip=, shuffle=)` with respect to x, weight and bias.

    grad_out: (N, H*r, W*r, Cout/r^2) contiguous NHWC, x's dtype (the forward output's gradient).
    x:        (N, H, W, Cin) contiguous NHWC, float32 / float16 / bfloat16 (the forward input).
    weight:   (Cout, Cin, KS, KS) in x's dtype; bias: (Cout,) float32 or None (only read to
              recompute the ReLU mask when relu=True).
    needs:    which of (dx, dW, db) to compute; the others come back as None.
    Returns (dx (N, H, W, Cin) x's dtype, dW (Cout, Cin, KS, KS) dw_dtype (default x's dtype),
             db (Cout,) db_dtype). The skip's gradient is grad_out itself and in_shift's is
             -dx summed over pixels: the caller forms those.
    relu=True recomputes relu(conv(x) + bias) with the forward kernel for the mask (the forward
    saves nothing but its inputs): +1 forward conv. Then one dgrad and one wgrad launch (+ the
    split-K reduction); see the module docstring for FLOPs and bytes.
    """
    _check_activation("x", x)
    ks = _check_kernel_size(kernel_size, SUPPORTED_KERNEL_SIZES)
    _check_weight("weight", weight, x, ks, c_in=x.shape[3])
    _check_activation("grad_out", grad_out)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
    r = _check_shuffle(shuffle, weight.shape[0])
    n, h, w, _ = x.shape
    want = (n, h * r, w * r, weight.shape[0] // (r * r))
    if tuple(grad_out.shape) != want:
        raise ValueError(f"grad_out must have shape {want}, got {tuple(grad_out.shape)}")
    if bias is not None:
        _check_vector("bias", bias, weight.shape[0])
    need_dx, need_dw, need_db = (bool(v) for v in needs)
    mask = None
    if relu and x.numel() > 0 and (need_dx or need_dw or need_db):
        mask = conv2d_nhwc(x, pack_weight(weight), bias, ks, in_shift=in_shift, relu=True, shuffle=r)
    dx = None
    if need_dx:
        dx = conv2d_dgrad_nhwc(grad_out, weight, ks, shuffle=r, res_scale=res_scale, grad_mask=mask, out=dx_out)
    dw, db = conv2d_wgrad_nhwc(x, grad_out, ks, shuffle=r, res_scale=res_scale, in_shift=in_shift, grad_mask=mask,
                               need_dw=need_dw, need_db=need_db, dw_dtype=dw_dtype, db_dtype=db_dtype,
                               dw_out=dw_out, db_out=db_out)
    return dx, dw, db


def resblock_backward_nhwc(grad_out, x, w1, b1, w2, kernel_size: int, res_scale: float = 1.0, *,
                           needs=(True, True, True, True, True), dw_dtype=None, db_dtype=torch.float32,
                           dx_out=None, dw1_out=None, db1_out=None, dw2_out=None, db2_out=None):
    """Gradients of the residual block  y = x + res_scale * (conv2(relu(conv1(x) + b1)) + b2).

    grad_out: (N, H, W, C) contiguous NHWC, x's dtype; x: the block input, (N, H, W, C),
    float32 / float16 / bfloat16; w1, w2: (C, C, KS, KS) in x's dtype; b1: (C,) float32 or None
    (read for the recompute; b2 is never read). kernel_size 3 or 5.
    needs: which of (dx, dW1, db1, dW2, db2) to compute; the others come back as None.
    Returns the 5-tuple; dx in x's dtype, dW* in dw_dtype (default x's dtype), db* in db_dtype.

    Only x is needed from the forward: h = relu(conv1(x) + b1) is recomputed here (one forward
    conv), then wgrad(h, dy), dgrad of conv2 with the h > 0 mask in its epilogue, wgrad(x, dh), and
    dx = dgrad of conv1 + dy (the forward kernel's skip epilogue). Per pixel (C = 64, 3x3):
    5 x 73,728 FLOPs; transient buffers h and dh, (N, H, W, C) each, freed on return.
    """
    _check_activation("x", x)
    ks = _check_kernel_size(kernel_size, (3, 5))
    n, h, w, c = x.shape
    _check_weight("w1", w1, x, ks, c_out=c, c_in=c)
    _check_weight("w2", w2, x, ks, c_out=c, c_in=c)
    _check_activation("grad_out", grad_out)
    if tuple(grad_out.shape) != tuple(x.shape) or grad_out.dtype != x.dtype:
        raise ValueError(
            f"grad_out must be {tuple(x.shape)} {x.dtype}, got {tuple(grad_out.shape)} {grad_out.dtype}"
        )
    if b1 is not None:
        _check_vector("b1", b1, c)
    _check_same_device(x, grad_out=grad_out, w1=w1, b1=b1, w2=w2)
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = (bool(v) for v in needs)
    dx = dw1 = db1 = dw2 = db2 = None
    if need_dx:
        dx = _result("dx_out", dx_out, tuple(x.shape), x.dtype, x.device, dict(x=x, grad_out=grad_out))
    if not any((need_dx, need_dw1, need_db1, need_dw2, need_db2)):
        return dx, dw1, db1, dw2, db2
    hid = conv2d_nhwc(x, pack_weight(w1), b1, ks, relu=True)  # recomputed, never saved
    wkw = dict(dw_dtype=dw_dtype, db_dtype=db_dtype)
    if need_dw2 or need_db2:
        dw2, db2 = conv2d_wgrad_nhwc(hid, grad_out, ks, res_scale=res_scale, need_dw=need_dw2, need_db=need_db2,
                                     dw_out=dw2_out, db_out=db2_out, **wkw)
    if need_dx or need_dw1 or need_db1:
        dh = conv2d_dgrad_nhwc(grad_out, w2, ks, res_scale=res_scale, input_mask=hid)
        del hid
        if need_dw1 or need_db1:
            dw1, db1 = conv2d_wgrad_nhwc(x, dh, ks, need_dw=need_dw1, need_db=need_db1,
                                         dw_out=dw1_out, db_out=db1_out, **wkw)
        if need_dx:
            conv2d_nhwc(dh, pack_weight_dgrad(w1), None, ks, skip=grad_out, out=dx)
    return dx, dw1, db1, dw2, db2
