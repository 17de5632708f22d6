"""The fused EDSR residual block: one launch for  x + res_scale * (conv2(relu(conv1(x) + b1)) + b2).

Both convs are C -> C channels, KS x KS (3, or 5 for MDSR's pre-processing blocks), stride
1, zero padding P = KS // 2, on NHWC activations. Each program owns a TILE_H x TILE_W
spatial tile of one image and does, per tile:

  phase 1  conv1 + b1 + ReLU over the halo-extended tile, (TILE_H + 2P) x (TILE_W + 2P)
           pixels (the P-pixel border is recomputed by the neighbouring tiles too), and
           writes it to the program's own workspace slot. Halo positions outside the image
           are written as 0: that is exactly what conv2's zero padding reads there.
  barrier  tl.debug_barrier(): every thread of the program sees the whole slot.
  phase 2  conv2 over the tile's interior, reading its A operand from the workspace, then
           + b2, * res_scale, + x (the skip, the same tile just read in phase 1) -> out.

Where the intermediate lives: a per-PROGRAM scratch in global memory, (programs, halo
pixels, C) elements -- never a full (N, H, W, C) tensor. The grid is persistent (on a GPU at
most 2 programs per SM, each looping over tiles), so the scratch is a fixed ~10 MiB for
F = 64 fp16 (264 programs x 18*18 x 64 x 2 B = 41 KiB each): it is rewritten in place tile
after tile and stays resident in the 50 MiB L2; its lines are never evicted to DRAM.

The intermediate is stored in x's dtype: the tile is rounded exactly where eager
low-precision PyTorch rounds the output of conv1 + ReLU (so fused and eager agree on what
conv2 sees), and conv2's MMA then runs on fp16/bf16 tensor-core operands. fp32 stays fp32.

Per output pixel, F = 64, fp16, 3x3, 16 x 16 tile (halo 18 x 18 = 324 pixels):
                       FLOPs                                 DRAM bytes
  two conv launches    2 x 73,728 = 147,456                  640 (read x, write t, read t,
                                                                  read x again, write y)
  this kernel          73,728 x 324/256 + 73,728 = 167,035   256 (read x once, write y; the
                       (+13%: halo recompute)                     halo re-reads and the skip
                                                                  re-read hit L2)
So ~290 FLOP/B becomes ~650 FLOP/B, and the 2.5x cut in DRAM traffic is the point where a
64->64 conv is memory-bound. That depends on the GPU: on an H100 (~295 FLOP/B ridge: dense
bf16 over DRAM bandwidth) one such conv sits at the ridge, but on an H200 (measured ~183
FLOP/B: 788 TFLOP/s over 4.3 TB/s) it is already above it, so there the block pays the +13%
MMA work (+26% with BLOCK_M = 128's 324 -> 384 row padding), a workspace re-read 9 times
through L2 and 2 CTAs per SM for traffic that did not bind; the static model
(bench/static_model.py) predicts it slower than two convs there. So it is one candidate of
the measured dispatch (fastsr/ops/dispatch.py times it against two conv launches per GPU
and shape), not a fixed choice. For training its value is memory (only x is saved), which
holds everywhere. For F = 256 one conv is at ~1,150 FLOP/B and the 13-27% halo recompute
would cost more than any saved traffic buys: `resblock_supported` says no.

On a GPU with TMA (compute capability >= 9.0), bf16/fp16 and C in 16/32/64, `resblock_nhwc` runs
kernels/resblock_tma.py instead: the same two phases with every MMA operand a copy-engine box
(x's taps, zero-filled out of range, and the workspace's), one 64-pixel halo row per MMA tile (no
324 -> 384 padding), four rows per step at 3x3 so the vertical taps reuse row boxes, 16-byte
stores; its docstring says why the intermediate cannot live in shared memory in Triton's tl. The
static model (bench/static_model.py) predicts its four-row form below two TMA convs for
EDSR-baseline x2 1080p inference on an H200 (294.5 against 321.1 us, both L2-bound) and above them
on 48x48 training patches; the measured dispatch decides on the GPU. This module's pointer kernel
serves everything else (and sm_80/86/89).

The conv inner loop (`_jit._conv_mainloop`) is shared with `conv2d.py`: a flat loop over
KS*KS taps x ceil(C / BLOCK_K) channel chunks, one BLOCK_M x BLOCK_K activation tile and
one BLOCK_K x BLOCK_N weight tile per step, fp32 accumulation with tl.dot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    _INTERPRET,
    _block_k,
    _block_n,
    _check_activation,
    _check_kernel_size,
    _check_out,
    _check_packed_weight,
    _check_same_device,
    _check_vector,
    _launch,
    _launch_config_args,
)
from ._jit import _block_tile, _conv_mainloop, _round_to
from .resblock_tma import resblock_nhwc_tma, tma_block_supported

__all__ = ["resblock_nhwc", "resblock_supported"]

SUPPORTED_KERNEL_SIZES = (3, 5)
# Above this the block is compute-bound already and the halo recompute is a net loss.
MAX_FUSED_CHANNELS = 128


@triton.jit
def _resblock_nhwc_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, ws_ptr,
    N, H, W, res_scale, WS_STRIDE,
    C: tl.constexpr, KS: tl.constexpr,
    INTERP: tl.constexpr, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PAD = KS // 2
    HALO_H = TILE_H + 2 * PAD
    HALO_W = TILE_W + 2 * PAD
    HALO_PIX = HALO_H * HALO_W
    TILE_PIX = TILE_H * TILE_W

    tiles_w = tl.cdiv(W, TILE_W)
    tiles_h = tl.cdiv(H, TILE_H)
    num_tiles = N * tiles_h * tiles_w
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * WS_STRIDE  # this program's slot: HALO_PIX x C
    offs_mb = tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)

    # Persistent loop: consecutive tiles of a program are a grid-size apart; tiles that run
    # at the same time are neighbours along W, so their halos overlap in L2.
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        img, th0, tw0 = _block_tile(tile, tiles_h, tiles_w, TILE_H, TILE_W)

        # The previous tile's phase 2 must be done reading the slot before it is rewritten.
        tl.debug_barrier()

        # ---- phase 1: t = relu(conv1(x) + b1) on the halo tile -> workspace ----
        for q0 in range(0, HALO_PIX, BLOCK_M):
            q = q0 + offs_mb
            q_ok = q < HALO_PIX
            hh = th0 - PAD + q // HALO_W  # image coordinates of halo pixel q
            ww = tw0 - PAD + q % HALO_W
            in_img = q_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            for n0 in range(0, C, BLOCK_N):
                offs_n = n0 + offs_nb
                n_ok = offs_n < C
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc = _conv_mainloop(
                    acc, x_ptr, img, hh, ww, in_img, H, W, w1_ptr, offs_n, n_ok, b1_ptr,
                    C, C, KS, False, INTERP, PREC, USE_INPUT_PRECISION, BLOCK_K, C,
                )
                acc += tl.load(b1_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
                # ReLU, and conv2's zero padding: halo pixels outside the image hold 0.
                acc = tl.where(in_img[:, None], tl.maximum(acc, 0.0), 0.0)
                tl.store(
                    ws + q[:, None] * C + offs_n[None, :],
                    _round_to(acc, ws_ptr, INTERP),
                    mask=q_ok[:, None] & n_ok[None, :],
                )

        # Phase 2 reads what other threads of this program wrote in phase 1.
        tl.debug_barrier()

        # ---- phase 2: out = x + res_scale * (conv2(t) + b2) on the tile interior ----
        for p0 in range(0, TILE_PIX, BLOCK_M):
            p = p0 + offs_mb
            th = p // TILE_W
            tw = p % TILE_W
            oh = th0 + th
            ow = tw0 + tw
            out_ok = (p < TILE_PIX) & (oh < H) & (ow < W)
            pix = ((img * H + oh) * W + ow).to(tl.int64) * C
            for n0 in range(0, C, BLOCK_N):
                offs_n = n0 + offs_nb
                n_ok = offs_n < C
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                # The workspace is a 1-image NHWC tensor of HALO_H x HALO_W pixels; the
                # interior pixel (th, tw) sits at (th + PAD, tw + PAD), so every tap of
                # a valid pixel is inside the slot.
                acc = _conv_mainloop(
                    acc, ws, 0, th + PAD, tw + PAD, out_ok, HALO_H, HALO_W, w2_ptr, offs_n, n_ok, b2_ptr,
                    C, C, KS, False, INTERP, PREC, USE_INPUT_PRECISION, BLOCK_K, C,
                )
                acc += tl.load(b2_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
                acc = acc * res_scale
                mask = out_ok[:, None] & n_ok[None, :]
                io_off = pix[:, None] + offs_n[None, :]
                acc += tl.load(x_ptr + io_off, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + io_off, _round_to(acc, out_ptr, INTERP), mask=mask)


def _cfg(tile_h, tile_w, block_m, warps, stages):
    return triton.Config(
        {"TILE_H": tile_h, "TILE_W": tile_w, "BLOCK_M": block_m}, num_warps=warps, num_stages=stages
    )


# Bounded tuning lists. What a tile costs, 3x3 (MMA rows issued per output pixel, conv1 +
# conv2, against the ideal 2.0): 16x16 / BLOCK_M 128: 384/256 + 1 = 2.50; 14x14 (halo
# 16x16 = 256, no phase-1 padding): 256/196 + 256/196 = 2.61; 16x32 (halo 612): 640/512 + 1
# = 2.25, at twice the workspace. 16x16 also tiles 48x48 training patches exactly.
_CONFIGS = {
    3: [
        _cfg(16, 16, 128, 4, 3),
        _cfg(16, 16, 64, 4, 3),
        _cfg(14, 14, 128, 4, 3),
        _cfg(16, 32, 128, 8, 3),
        _cfg(8, 16, 64, 4, 4),
    ],
    5: [
        _cfg(16, 16, 128, 4, 3),  # halo 20x20 = 400
        _cfg(16, 16, 64, 4, 3),
        _cfg(12, 12, 64, 4, 3),   # halo 16x16 = 256
        _cfg(12, 28, 128, 8, 3),  # halo 16x32 = 512
    ],
}
_resblock_tuned = {
    ks: triton.autotune(configs=cfgs, key=["C", "KS"])(_resblock_nhwc_kernel)  # + dtypes
    for ks, cfgs in _CONFIGS.items()
}

# Interpreter: one small fixed tile that does not divide the test images, so partial tiles,
# a partial last halo chunk (3x3: 6x10 = 60 halo pixels in 32-row chunks) and the persistent
# loop (a 2-program grid) are all exercised.
_INTERPRET_CONFIG = {"TILE_H": 4, "TILE_W": 8, "BLOCK_M": 32}
_INTERPRET_PROGRAMS = 2
_PROGRAMS_PER_SM = 2


def _halo_pixels(cfg: dict, ks: int) -> int:
    pad = ks // 2
    return (cfg["TILE_H"] + 2 * pad) * (cfg["TILE_W"] + 2 * pad)


def _num_tiles(n: int, h: int, w: int, cfg: dict) -> int:
    return n * triton.cdiv(h, cfg["TILE_H"]) * triton.cdiv(w, cfg["TILE_W"])


def resblock_supported(channels: int, kernel_size: int) -> bool:
    """Whether the one-kernel residual block is worth using for this shape.

    True for kernel_size 3 or 5 and 1 <= channels <= 128 (EDSR-baseline / MDSR F = 64).
    Wider blocks (EDSR F = 256) are compute-bound already, so recomputing conv1 on the halo
    costs more than the saved DRAM traffic: run two `conv2d_nhwc` calls instead."""
    return (
        not isinstance(kernel_size, bool)
        and kernel_size in SUPPORTED_KERNEL_SIZES
        and isinstance(channels, int)
        and 1 <= channels <= MAX_FUSED_CHANNELS
    )


def resblock_nhwc(x, w1_packed, b1, w2_packed, b2, kernel_size: int, res_scale: float = 1.0,
                  out=None) -> torch.Tensor:
    """x + res_scale * (conv2(relu(conv1(x) + b1)) + b2) in one launch.

    x:          (N, H, W, C) contiguous NHWC, float32 / float16 / bfloat16.
    w1_packed, w2_packed: (KS*KS*C, C) from `pack_weight`, x's dtype.
    b1, b2:     (C,) float32.
    kernel_size: 3 or 5. Accumulation in fp32; the intermediate relu(conv1(x) + b1) is rounded
    to x's dtype (as eager PyTorch in that dtype does). Works for any C >= 1, but see
    `resblock_supported` for when it pays off. Returns out ((N, H, W, C), x's dtype); an
    `out` given is written and returned (it must not share memory with x).
    """
    _check_activation("x", x)
    ks = _check_kernel_size(kernel_size, SUPPORTED_KERNEL_SIZES)
    n, h, w, c = x.shape
    if c < 1:
        raise ValueError("x has 0 channels")
    _check_packed_weight("w1_packed", w1_packed, x, ks, c, c)
    _check_packed_weight("w2_packed", w2_packed, x, ks, c, c)
    _check_vector("b1", b1, c)
    _check_vector("b2", b2, c)
    _check_same_device(x, w1_packed=w1_packed, b1=b1, w2_packed=w2_packed, b2=b2, out=out)
    out = _check_out(out, (n, h, w, c), x, dict(x=x, w1_packed=w1_packed, w2_packed=w2_packed))
    if out.numel() == 0:
        return out
    if n * h * w > 2**31 - 1:
        raise ValueError(f"x has {n * h * w} pixels; at most {2**31 - 1} are supported")
    if tma_block_supported(x, w1_packed, w2_packed, out, ks):
        # Hopper (TMA) and bf16/fp16 with C in 16/32/64: operands as copy-engine boxes
        # (kernels/resblock_tma.py); everything else runs the pointer kernel below.
        return resblock_nhwc_tma(x, w1_packed, b1, w2_packed, b2, ks, res_scale, out)

    block_n = _block_n(c)
    block_k = _block_k(c, x.dtype)
    meta = dict(C=c, KS=ks, BLOCK_N=block_n, BLOCK_K=block_k, **_launch_config_args(x.dtype))

    if _INTERPRET:
        configs = [_INTERPRET_CONFIG]
        max_programs = _INTERPRET_PROGRAMS
    else:
        configs = [cfg.kwargs for cfg in _CONFIGS[ks]]
        max_programs = _PROGRAMS_PER_SM * _common._multiprocessor_count(x.device)
    # One slot per program, sized for the largest halo among the configs the autotuner may
    # pick; never more programs than tiles.
    halo = max(_halo_pixels(cfg, ks) for cfg in configs)
    programs = min(max_programs, max(_num_tiles(n, h, w, cfg) for cfg in configs))
    ws = torch.empty((programs, halo, c), device=x.device, dtype=x.dtype)
    if _INTERPRET:
        # An unwritten slot element read by phase 2 would then poison the tests' output.
        ws.fill_(float("nan"))

    args = (x, w1_packed, b1, w2_packed, b2, out, ws, n, h, w, float(res_scale), halo * c)

    def grid(meta_):
        return (min(programs, _num_tiles(n, h, w, meta_)),)

    _launch(_resblock_nhwc_kernel, _resblock_tuned[ks], grid, args, meta, interpret=_INTERPRET_CONFIG, like=x)
    return out
