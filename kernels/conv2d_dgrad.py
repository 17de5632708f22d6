"""dgrad of the fused NHWC convolution: dx = res_scale * conv_transpose(gz, W), masked.

The gradients' algebra (gy, gz, the shuffle and ReLU terms) is in conv2d_backward.py's docstring;
this kernel computes dx.

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

A narrow gradient (Cout < 16 without a shuffle: the tail's 3 RGB channels) is not read in place:
  its pixels are 3*e bytes apart, so a tap's A tile would be a 2-byte gather filling 3 of a
  16-wide K chunk (16/3 of the MMA work wasted), and no TMA box or 16-byte vector fits it. The
  launcher first copies it (`pad.pad_bordered_nhwc`, one pass) into gp = (N, H + 2P, W + 2P, G_PAD),
  G_PAD = max(16 B / e, next_pow2(Cout)) (bf16/fp16 RGB: 8, fp32: 4): zero in the extra
  channels and in a P = KS // 2 pixel border, the prologue mask applied. Then one (pixel, tap)
  is one aligned 16-byte vector, a K step holds BLOCK_K / G_PAD whole taps (BLOCK_K 32 for
  bf16/fp16, 16 for fp32: a 4 KiB weight tile, one 16-byte vector per thread even at 8 warps;
  bf16 3x3: 3 steps, K 96 issued for 27 useful, against 9 x 16 = 144 in place), and the border
  is the conv's zero padding, so the unrolled steps load without bounds masks
  (`_dgrad_padded_mainloop`; `pack_weight_dgrad(..., g_pad=)` lays out the matching rows). The copy costs, per output pixel,
  a read of Cout*e and a write of ~G_PAD*e = 16 B (EDSR's training step, 16 x 96x96 bf16:
  0.9 MB read, 2.5 MB written), against dx's Cin*e = 128 B.

Cost per pixel (e = bytes per element, F = C = 64, 3x3, fp16, e = 2; DRAM traffic, L2 re-reads
not counted):
  dgrad   FLOPs 2*KS^2*Cin*Cout = 73,728; reads Cout*e of g (+ Cout*e of the prologue mask, or
          Cin*e of the epilogue mask), writes Cin*e of dx: 256 B (+128 B mask): same as a forward conv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsr.ops.shuffle_order import shuffle_perm

from . import _common
from ._common import (
    _INT32_MAX,
    _INTERPRET_BLOCK_M,
    _block_k,
    _block_n,
    _check_activation,
    _check_kernel_size,
    _check_same_device,
    _check_shuffle,
    _check_tensor,
    _check_weight,
    _conv_configs,
    _launch,
    _launch_config_args,
    _result,
)
from ._jit import _mma, _round_to, _shuffle_col, _tap_of_step, _tile_coords
from .conv2d import pack_weight
from .pad import pad_bordered_nhwc, vector_channels

__all__ = ["pack_weight_dgrad", "conv2d_dgrad_nhwc"]


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
    K_CHUNKS = (C_G + BLOCK_K - 1) // BLOCK_K
    C_SH = C_G // (R * R)
    W_G = W * R
    offs_k = tl.arange(0, BLOCK_K)
    # Address of gz[img, oh, ow, 0] (per pixel); a tap adds a scalar, a chunk a column vector.
    row0 = ((img * H + oh).to(tl.int64) * R * W_G + ow * R) * C_SH
    b_base = w_ptr + offs_k[:, None] * C_OUT + offs_n[None, :]
    for step in range(KS * KS * K_CHUNKS):
        tap, k0, dh, dw = _tap_of_step(step, KS, K_CHUNKS, BLOCK_K)
        ih = oh + dh
        iw = ow + dw
        row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        q = k0 + offs_k
        k_ok = q < C_G
        if R == 1:
            col = q
        else:
            col = _shuffle_col(q, R, C_SH, W_G)
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
def _dgrad_padded_mainloop(
    acc,
    g_ptr, img, oh, ow, M, H, W,
    w_ptr, offs_n, n_mask,
    C_IN: tl.constexpr, KS: tl.constexpr, G_PAD: tl.constexpr, INTERP: tl.constexpr,
    PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[m, n] += sum over taps t and q < G_PAD of gp[img, oh + kh(t), ow + kw(t), q] * w[t*G_PAD + q, n]

    gp is the bordered, channel-padded gradient `pad.pad_bordered_nhwc` writes: (N, H + 2P, W + 2P,
    G_PAD), P = KS // 2, zero in the border (the conv's padding) and in channels >= C_G. A step
    is a BLOCK_K-wide K chunk of TPS = BLOCK_K / G_PAD whole taps: column k is tap
    step*TPS + k // G_PAD, channel k % G_PAD, so each (pixel, tap) is one aligned G_PAD*e = 16-byte
    vector (fp32 at G_PAD = 4, bf16/fp16 at 8) and no load needs a bounds mask: rows past M read
    the last pixel's taps (their results are never stored), and only the last step's slots past
    the KS*KS taps (and their weight rows, past the packed weight's end) are masked. The steps
    are unrolled: their tap offsets are known per column group at compile time."""
    TPS: tl.constexpr = BLOCK_K // G_PAD
    STEPS: tl.constexpr = (KS * KS + TPS - 1) // TPS
    P: tl.constexpr = KS // 2
    W_P = W + 2 * P
    offs_k = tl.arange(0, BLOCK_K)
    # Centre element of each pixel in gp (monotonic in the pixel index, so clamping it to pixel
    # M - 1's keeps the tail rows' taps inside gp).
    centre = (img * (H + 2 * P) + oh + P) * W_P + ow + P
    last = M - 1
    last_centre = ((last // W // H) * (H + 2 * P) + (last // W) % H + P) * W_P + last % W + P
    a_base = g_ptr + tl.minimum(centre, last_centre).to(tl.int64)[:, None] * G_PAD
    b_base = w_ptr + offs_k[:, None] * C_IN + offs_n[None, :]
    for step in tl.static_range(STEPS):
        tap = step * TPS + offs_k // G_PAD
        a_off = ((tap // KS - P) * W_P + tap % KS - P) * G_PAD + offs_k % G_PAD
        b_ptrs = b_base + step * BLOCK_K * C_IN
        if (step + 1) * TPS > KS * KS:  # the last step has empty tap slots
            tap_ok = tap < KS * KS
            a = tl.load(a_base + a_off[None, :], mask=tap_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=tap_ok[:, None] & n_mask[None, :], other=0.0)
        else:
            a = tl.load(a_base + a_off[None, :])
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        if INTERP:
            # See _conv_mainloop: the interpreter cannot multiply bf16; widening is exact.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = _mma(a, b, acc, PREC, USE_INPUT_PRECISION)
    return acc


@triton.jit
def _dgrad_kernel(
    g_ptr, gmask_ptr, w_ptr, omask_ptr, out_ptr,
    M, H, W, scale,
    C_G: tl.constexpr, C_IN: tl.constexpr, KS: tl.constexpr, R: tl.constexpr,
    IN_MASK: tl.constexpr, OUT_MASK: tl.constexpr,
    INTERP: tl.constexpr, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G_PAD: tl.constexpr = 0,
):
    # Same grid as the forward: 1-D, channel blocks fastest.
    offs_m, offs_n, m_mask, n_mask, img, oh, ow = _tile_coords(M, H, W, C_IN, BLOCK_M, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if G_PAD > 0:
        # g is the bordered, channel-padded copy (`pad.pad_bordered_nhwc`; the prologue mask applied)
        acc = _dgrad_padded_mainloop(
            acc, g_ptr, img, oh, ow, M, H, W, w_ptr, offs_n, n_mask,
            C_IN, KS, G_PAD, INTERP, PREC, USE_INPUT_PRECISION, BLOCK_K,
        )
    else:
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


def _prune_padded(configs, named_args, **kwargs):
    """The padded path's steps are unrolled (no loop to pipeline): configs differing only in
    num_stages compile to the same code, so keep one of each (BLOCK_M, num_warps)."""
    if not kwargs.get("G_PAD"):
        return configs
    seen, kept = set(), []
    for c in configs:
        key = (c.kwargs["BLOCK_M"], c.num_warps)
        if key not in seen:
            seen.add(key)
            kept.append(c)
    return kept


_dgrad_tuned = triton.autotune(
    configs=_conv_configs(), key=["C_G", "C_IN", "KS", "R", "IN_MASK", "OUT_MASK", "G_PAD"],  # + dtypes
    prune_configs_by={"early_config_prune": _prune_padded},
)(_dgrad_kernel)

def _g_pad(c_g: int, r: int, dtype: torch.dtype) -> int:
    """Channels per pixel of the padded gradient copy the dgrad reads, 0 for none (read in place).
    A gradient of fewer than 16 channels without a shuffle (the tail's 3) would fill a 16-wide K
    chunk per tap with zeros and be gathered with narrow loads; padded to a power of two of at
    least 16 bytes (bf16/fp16: 8 channels, fp32: 4 for RGB) one (pixel, tap) is one 16-byte load
    and a K chunk holds 16 / G_PAD taps."""
    if r != 1 or c_g >= 16:
        return 0
    return vector_channels(c_g, dtype)


def _padded_block_k(dtype: torch.dtype) -> int:
    """K per step of the padded path: a BLOCK_K x 64 weight tile of 4 KiB (bf16/fp16: 32 = 4
    taps; fp32: 16 = 4 taps), so even an 8-warp program loads it as one 16-byte vector per thread
    (a 16 x 64 bf16 tile would be 8 bytes per thread there)."""
    return 16 if dtype == torch.float32 else 32


def pack_weight_dgrad(weight: torch.Tensor, shuffle: int = 1, g_pad: int = 0) -> torch.Tensor:
    """(Cout, Cin, KS, KS) -> (KS*KS*Cout, Cin): the packed weight of the dgrad conv.

    Row (kh*KS + kw)*Cout + q holds W[co(q), :, KS-1-kh, KS-1-kw] (flipped taps, in and out
    channels swapped). For shuffle r > 1 the rows of a tap are in gather order:
    q = (i*r + j)*Cout/r^2 + c holds conv channel co = c*r^2 + i*r + j, the channel the
    pixel-shuffled gradient stores at sub-pixel (i, j), channel c.

    g_pad > 0 (the padded gradient's channels; shuffle 1, Cout <= g_pad): (KS*KS*g_pad, Cin),
    row tap*g_pad + q holds the same W[q, :, flipped tap] for q < Cout and zeros for the other q
    (the padded gradient's zero channels)."""
    _check_tensor("weight", weight, rank=4)
    if g_pad:
        c_out, c_in, ks = weight.shape[0], weight.shape[1], weight.shape[2]
        if shuffle != 1 or g_pad < c_out:
            raise ValueError(f"g_pad={g_pad} needs shuffle 1 and Cout <= g_pad, got shuffle={shuffle}, Cout={c_out}")
        packed = weight.new_zeros((ks * ks, g_pad, c_in))
        packed[:, :c_out] = weight.flip(2, 3).permute(2, 3, 0, 1).reshape(ks * ks, c_out, c_in)
        return packed.reshape(ks * ks * g_pad, c_in)
    w = weight.flip(2, 3).transpose(0, 1)  # (Cin, Cout, KS, KS)
    if shuffle > 1:
        w = w[:, shuffle_perm(weight.shape[0], shuffle, weight.device)]
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
    input_mask), writes Cin*e. A narrow grad_out (Cout < 16, shuffle 1) is first copied into a
    bordered, 16-byte-per-pixel layout (one extra launch, the mask applied there; see the module
    docstring) and dgrad reads the copy.
    """
    _check_activation("grad_out", grad_out)
    ks = _check_kernel_size(kernel_size, _common.SUPPORTED_KERNEL_SIZES)
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
    g_pad = _g_pad(c_out, r, grad_out.dtype)
    if g_pad:
        # Narrow gradient (the tail's 3 channels): read from a bordered, channel-padded copy,
        # the prologue mask applied there (see _dgrad_padded_mainloop).
        g, gmask = pad_bordered_nhwc(grad_out, ks, g_pad, mask=grad_mask), None
        block_k = _padded_block_k(grad_out.dtype)
    else:
        g, gmask, block_k = grad_out, grad_mask, _block_k(c_out, grad_out.dtype)
    w_packed = pack_weight_dgrad(weight, r, g_pad)
    block_n = _block_n(c_in)
    num_n_blocks = triton.cdiv(c_in, block_n)
    dummy = g
    args = (g, gmask if gmask is not None else dummy, w_packed,
            input_mask if input_mask is not None else dummy, out, m, h, w, float(res_scale))
    meta = dict(C_G=c_out, C_IN=c_in, KS=ks, R=r, IN_MASK=gmask is not None, OUT_MASK=input_mask is not None,
                BLOCK_N=block_n, BLOCK_K=block_k, G_PAD=g_pad, **_launch_config_args(grad_out.dtype))

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * num_n_blocks,)

    _launch(_dgrad_kernel, _dgrad_tuned, grid, args, meta, interpret=dict(BLOCK_M=_INTERPRET_BLOCK_M), like=grad_out)
    return out

