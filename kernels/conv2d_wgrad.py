"""wgrad of the fused NHWC convolution: (dW, db) as a deterministic split-K over pixels.

The gradients' algebra (gy, gz, the shuffle and ReLU terms) is in conv2d_backward.py's docstring;
this kernel computes dW and db.

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

Cost per pixel (e = bytes per element, F = C = 64, 3x3, fp16, e = 2; DRAM traffic, L2 re-reads
not counted):
  wgrad   FLOPs 2*KS^2*Cin*Cout = 73,728; reads Cin*e of x and Cout*e of g once from DRAM (256 B);
          each of the KS^2*Cin/BLOCK_KW row blocks re-reads its pixel tiles from L2. The split-K
          workspace is SPLITS*(KS^2*Cin + 1)*Cout*4 bytes (~4 MiB for F = 64 on 132 SMs), written
          once and read once by the reduction: per-step, not per-pixel, cost.
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
from ._jit import _mma, _round_to

__all__ = ["conv2d_wgrad_nhwc"]


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
        want = triton.cdiv(_PROGRAMS_PER_SM * _common._multiprocessor_count(device), tiles)
    splits = max(1, min(want, m // _MIN_PIXELS_PER_SPLIT))
    per = triton.cdiv(triton.cdiv(m, splits), _P_ALIGN) * _P_ALIGN
    return triton.cdiv(m, per), per



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
    _launch(_wgrad_kernel, _wgrad_tuned, (tiles * splits,), args, meta,
            interpret=dict(BLOCK_P=_P_ALIGN), pinned=_WGRAD_PINNED, like=x)
    # Nothing to tune: the reduction always runs its one config.
    _launch(_wgrad_reduce_kernel, _wgrad_reduce_kernel, red_grid, red_args, red_meta, interpret={}, like=x)
    return dw, db

