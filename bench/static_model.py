"""A static model of the GPU time of fastsr's fused kernels, from what compile_check emitted.

    python bench/compile_check.py --model edsr_baseline --scale 2 --lr-size 540x960 --dtype bfloat16 --emit DIR
    python bench/static_model.py DIR                    # inference (batch 1 at the LR size)
    python bench/static_model.py DIR --phase train      # one training step (forward + backward)
    python bench/static_model.py DIR --json OUT.json    # the numbers, for other tools
    python bench/static_model.py DIR --measure          # on a GPU: each launch timed beside its prediction

It reads DIR/manifest.json (every launch: kernel, arguments, grid, the configs its autotuner may
pick) and DIR/sass_report.json (per compiled kernel: MMA kind and shape, registers, shared
memory, hot-loop instruction counts) and gives per layer: useful FLOPs, FLOPs issued (padding
of channel blocks and pixel tiles, halo recompute), minimum DRAM bytes (each of the kernel's
tensors once), L2 <-> SM bytes implied by the tiling, and time bounds from the tensor-core rate,
instruction issue, shared memory, L2 and DRAM; the predicted time of a launch is its largest
bound, for the config the model predicts fastest (the autotuner times them all and keeps the
fastest). Then the whole model against its floor.

This is a tool for deciding what to change next, not a result: never quote it as a speed. It
knows nothing of latency, pipeline bubbles, occupancy effects beyond wave counts, or cache
hit rates; the ceilings below say which of its numbers were measured and which are assumed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The ceilings. "measured": on H200s like the ones this project tests on; "assumed": not
# measured here, a datasheet-derived or rule-of-thumb figure that the first GPU run should check.
CEILINGS = {
    "tc_bf16": (788e12, "FLOP/s", "measured", "dense bf16 matmul (torch), H200"),
    "tc_tf32": (394e12, "FLOP/s", "assumed", "dense tf32 MMA (HGMMA k8): half the bf16 rate, the datasheet ratio"),
    "dram": (4.3e12, "B/s", "measured", "device-to-device copy, bytes read + written, H200"),
    "sms": (132, "SMs", "measured", "H200 multiprocessor count"),
    "l2_size": (60e6, "B", "measured", "H200 L2 (the resblock workspace and a layer's re-reads live in it)"),
    "clock": (1.755e9, "Hz", "assumed", "sustained SM clock under load (boost is 1.98 GHz)"),
    "issue": (4, "warp-instr/clk/SM", "assumed", "one instruction per scheduler per clock, 4 schedulers"),
    "fp32": (128, "FMA/clk/SM", "assumed", "FFMA lanes per SM (the fp32 head has no tensor-core path)"),
    "smem": (128, "B/clk/SM", "assumed", "shared-memory bandwidth; wgmma operands and cp.async fills share it"),
    "l2": (5.5e12, "B/s", "assumed", "L2 <-> SM bandwidth, reads + writes"),
    "reach_issue": (0.8, "fraction", "assumed", "reachable fraction of the issue rate"),
    "reach_smem": (0.8, "fraction", "assumed", "reachable fraction of shared-memory bandwidth"),
    "reach_l2": (0.8, "fraction", "assumed", "reachable fraction of L2 bandwidth"),
    "reach_fp32": (0.8, "fraction", "assumed", "reachable fraction of the FFMA rate"),
    "launch_gap": (3e-6, "s", "assumed", "per-launch gap between kernels without CUDA graphs"),
}


def ceiling(name: str) -> float:
    return CEILINGS[name][0]


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}


def _nbytes(t: dict | None) -> int:
    """Bytes of a tensor argument recorded as {"shape", "dtype"}."""
    if not isinstance(t, dict):
        return 0
    return math.prod(t["shape"]) * _BYTES[t["dtype"]]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Work:
    """What one launch with one config does, in the units the bounds need."""

    useful_flops: float
    issued_flops: float
    dram_bytes: float        # each tensor the kernel must read or write, once
    l2_bytes: float          # L2 <-> SM traffic the tiling implies (operand re-reads, stores)
    smem_fill_bytes: float   # bytes written into shared memory by cp.async / TMA (the operand tiles)
    units: int               # independent work units (tiles) the grid spreads over the SMs
    notes: list[str] = field(default_factory=list)
    straight_line_warps: int = 0  # > 0: a loop-free kernel of this many warps per unit (the head)


def _conv_like(m: int, k_taps: int, c_k: int, c_n: int, e: int, a: dict, a_extra: float = 0.0) -> tuple:
    """Implicit GEMM M = m pixels, N = c_n, K = k_taps * c_k, walked in (BLOCK_M, BLOCK_N,
    BLOCK_K) tiles: (issued FLOPs, operand bytes through L2, tiles)."""
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    tiles_m, tiles_n, chunks = _cdiv(m, bm), _cdiv(c_n, bn), _cdiv(c_k, bk)
    steps = k_taps * chunks
    issued = 2.0 * tiles_m * bm * tiles_n * bn * steps * bk
    operands = tiles_m * tiles_n * steps * (bm * bk * (1 + a_extra) + bk * bn) * e
    return issued, operands, tiles_m * tiles_n


def _store_fill(run_bytes: int, sass: dict | None) -> int:
    """Bytes of each 32-byte L2 sector a store fills, for stores whose contiguous runs in memory
    are `run_bytes` long, at the SASS's narrowest per-thread store width w: in the MMA
    accumulator layout 4 lanes hold 8 adjacent columns of a row, so w-byte stores (w = 2: one
    element each) write 8w contiguous bytes per row; 16-byte stores fill a sector per 2 lanes."""
    w = (sass or {}).get("narrowest_store") or 16
    return max(1, min(32, run_bytes, 8 * w))


def work_conv(a: dict, cfg: dict, sass: dict | None = None) -> Work:
    """_conv2d_nhwc_kernel: forward conv (+ bias, ReLU, scale, skip, pixel shuffle). The pixel
    shuffle's stores are runs of Cout/r^2 contiguous channels (the packed weight's shuffle-order
    columns); the L2 takes them in whole sectors (`_store_fill`)."""
    x, out = a["x_ptr"], a["out_ptr"]
    e = _BYTES[x["dtype"]]
    m, cin, cout, ks = a["M"], a["C_IN"], a["C_OUT"], a["KS"]
    issued, operands, tiles = _conv_like(m, ks * ks, cin, cout, e, a)
    io = _nbytes(x) + _nbytes(out) + _nbytes(a["w_ptr"]) + (_nbytes(a["skip_ptr"]) if a["HAS_SKIP"] else 0)
    r = a.get("SHUFFLE", 1)
    fill = _store_fill(cout // (r * r) * e, sass) if r > 1 else 32
    stores = _nbytes(out) * 32 / fill + (_nbytes(a["skip_ptr"]) if a["HAS_SKIP"] else 0)
    notes = [f"stores fill {fill} of 32 B per sector"] if fill < 32 else []
    return Work(2.0 * m * ks * ks * cin * cout, issued, io, operands + stores, operands, tiles, notes)


def work_conv_tma(a: dict, cfg: dict, grid: list[int]) -> Work:
    """_conv2d_tma_kernel (kernels/conv2d_tma.py): each tile is BLOCK_M pixels of one image row;
    every (tap, K chunk) step copies a [1, 1, BLOCK_M, BLOCK_K] box of x by TMA (the copy engine
    fetches only the in-image part of a box: the zero padding costs no traffic), so A moves
    KS*KS*Cin*e bytes per pixel and N block through L2. Weights: streamed, one BLOCK_K x BLOCK_N
    box per step per tile; resident (RESIDENT_W), once per program of the persistent grid. The
    skip is read once, the output written once (staged through shared memory for the TMA store)."""
    x, out = a["x_desc"], a["out_ptr"]  # out_ptr: a narrow output's out_desc is only x's stand-in
    e = _BYTES[x["dtype"]]
    n, h, w, cin = x["shape"]
    cout, ks = a["C_OUT"], a["KS"]
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    nb, chunks = _cdiv(cout, bn), _cdiv(cin, bk)
    tiles = n * h * _cdiv(w, bm) * nb
    steps = ks * ks * chunks
    issued = 2.0 * tiles * bm * bn * steps * bk
    a_bytes = n * h * w * ks * ks * cin * e * nb
    notes = []
    if a.get("ROLL_ROWS"):
        # Rolling rows (3x3): an item is a column strip x row_chunks rows; every input row of it,
        # the halo rows at chunk boundaries included (those at the image's edge are zero-fill,
        # no traffic), is 3 boxes feeding 9 MMAs; the prologue's 2 rows feed 9 MMAs together.
        from fastsr.kernels.conv2d_tma import row_chunking

        strips, row_chunks, chunk_rows = row_chunking(n * h, h, w, max(a["NUM_SMS"] * a["PROGRAMS_PER_SM"] // nb, 1),
                                                      bm)
        tiles = n * row_chunks * strips * nb
        issued = 2.0 * bm * bn * bk * ks * ks * n * strips * (h + row_chunks) * nb
        a_bytes = n * w * (h + 2 * (row_chunks - 1)) * ks * cin * e * nb
        notes.append(f"rolling rows: {tiles} items of {chunk_rows} rows")
    w_box = steps * bk * min(bn, cout) * e
    programs = grid[0] if grid else tiles
    w_bytes = (programs if a["RESIDENT_W"] else tiles) * w_box
    skip = _nbytes(a["skip_ptr"]) if a["HAS_SKIP"] else 0
    io = _nbytes(x) + _nbytes(out) + _nbytes(a["w_desc"]) + skip
    notes.insert(0, f"{programs} programs, weights " + ("resident" if a["RESIDENT_W"] else "streamed"))
    return Work(2.0 * n * h * w * ks * ks * cin * cout, issued, io, a_bytes + w_bytes + _nbytes(out) + skip,
                a_bytes + w_bytes + _nbytes(out), tiles, notes)


def work_head(a: dict, cfg: dict) -> Work:
    """_conv2d_head_kernel (kernels/conv2d_head.py): reads the padded image copy (N, H+2P, W+2P,
    C_X) that `pad_image_nhwc` writes (one C_X*e = 16-byte vector per pixel and tap); unrolled
    K steps of BLOCK_K (BLOCK_K / C_X whole taps) and one K_REM step for the remaining taps; a
    tile is BLOCK_M pixels of one image row (a partial last tile per row), its BLOCK_M x KS^2
    vectors gathered (the taps re-read neighbours: counted through L2 here, L1 may keep them),
    the weight rows once per tile, 3 MMAs per step for an fp32 image (3xTF32), the output (in its
    own dtype) written once. Straight-line code: its issue count is the instructions per warp."""
    x, out = a["x_ptr"], a["out_ptr"]
    ex = _BYTES[x["dtype"]]
    n, hp, wp, c_x = x["shape"]
    ks, cin, cout = a["KS"], a["C_IN"], a["C_OUT"]
    h, w_ = hp - 2 * (ks // 2), wp - 2 * (ks // 2)
    m = n * h * w_
    bm, bn, bk, k_rem = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"], a["K_REM"]
    k_issued = (ks * ks // (bk // c_x)) * bk + k_rem
    tiles = n * h * _cdiv(w_, bm) * _cdiv(cout, bn)
    passes = 3 if a["SPLIT"] else 1
    issued = 2.0 * tiles * bm * bn * k_issued * passes
    w_rows = ks * ks * c_x
    operands = tiles * (bm * ks * ks * c_x + w_rows * bn) * ex
    io = _nbytes(x) + _nbytes(out) + _nbytes(a["w_ptr"])
    return Work(2.0 * m * ks * ks * cin * cout, issued, io, operands + _nbytes(out), tiles * k_issued * bn * ex * 2,
                tiles, [f"K {k_issued} per pass, " + ("3 MMA passes (3xTF32)" if passes > 1 else "1 MMA pass")],
                straight_line_warps=cfg.get("num_warps", 4))


def work_dgrad(a: dict, cfg: dict) -> Work:
    """_dgrad_kernel: dx = conv of the (unshuffled) output gradient with flipped weights. With
    G_PAD (a narrow gradient read from its padded copy, kernels/pad.py): BLOCK_K-wide K steps
    of BLOCK_K / G_PAD taps, unrolled; A is one G_PAD*e-byte vector per (pixel, real tap) (the
    dummy slots are masked and fetch nothing), B the whole packed weight (KS^2 * G_PAD rows) per tile."""
    g, out = a["g_ptr"], a["out_ptr"]
    e = _BYTES[g["dtype"]]
    m, c_g, c_in, ks = a["M"], a["C_G"], a["C_IN"], a["KS"]
    if a.get("G_PAD"):
        bm, bn, bk, gp = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"], a["G_PAD"]
        steps = _cdiv(ks * ks, bk // gp)
        tiles_m, tiles_n = _cdiv(m, bm), _cdiv(c_in, bn)
        issued = 2.0 * tiles_m * bm * tiles_n * bn * steps * bk
        operands = tiles_m * tiles_n * (bm + bn) * ks * ks * gp * e
        io = _nbytes(g) + _nbytes(out) + _nbytes(a["w_ptr"]) + (_nbytes(a["omask_ptr"]) if a["OUT_MASK"] else 0)
        stores = _nbytes(out) + (_nbytes(a["omask_ptr"]) if a["OUT_MASK"] else 0)
        return Work(2.0 * m * ks * ks * c_g * c_in, issued, io, operands + stores, operands, tiles_m * tiles_n,
                    [f"padded gradient, {bk // gp} taps per K step, {steps} steps"],
                    straight_line_warps=cfg.get("num_warps", 4))
    # The prologue mask (IN_MASK) is a second gradient-shaped read per A element.
    issued, operands, tiles = _conv_like(m, ks * ks, c_g, c_in, e, a, a_extra=1.0 if a["IN_MASK"] else 0.0)
    io = _nbytes(g) + _nbytes(out) + _nbytes(a["w_ptr"]) + (_nbytes(a["gmask_ptr"]) if a["IN_MASK"] else 0) \
        + (_nbytes(a["omask_ptr"]) if a["OUT_MASK"] else 0)
    stores = _nbytes(out) + (_nbytes(a["omask_ptr"]) if a["OUT_MASK"] else 0)
    return Work(2.0 * m * ks * ks * c_g * c_in, issued, io, operands + stores, operands, tiles)


def work_block(a: dict, cfg: dict) -> Work:
    """_resblock_nhwc_kernel: conv1 + ReLU over the halo tile into the program's L2-resident
    workspace slot, then conv2 + bias + scale + skip on the interior."""
    x = a["x_ptr"]
    e = _BYTES[x["dtype"]]
    n, h, w, c, ks = a["N"], a["H"], a["W"], a["C"], a["KS"]
    pad = ks // 2
    th, tw, bm, bn, bk = a["TILE_H"], a["TILE_W"], a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    tiles = n * _cdiv(h, th) * _cdiv(w, tw)
    halo, interior = (th + 2 * pad) * (tw + 2 * pad), th * tw
    steps = ks * ks * _cdiv(c, bk)
    nb = _cdiv(c, bn)
    rows1, rows2 = _cdiv(halo, bm) * bm, _cdiv(interior, bm) * bm  # MMA rows issued per tile
    issued = 2.0 * tiles * (rows1 + rows2) * nb * bn * steps * bk
    operands = tiles * (rows1 + rows2) // bm * nb * steps * (bm * bk + bk * bn) * e
    # Phase 1 writes the halo tile to the workspace; phase 2 re-reads x for the skip, writes out.
    other = tiles * (halo * c + 2 * interior * c) * e
    useful = 2 * 2.0 * n * h * w * ks * ks * c * c
    io = _nbytes(x) + _nbytes(a["out_ptr"]) + _nbytes(a["w1_ptr"]) + _nbytes(a["w2_ptr"])
    notes = [f"halo recompute {rows1 / rows2:.2f}x conv1 rows"] if rows2 else []
    ws = _nbytes(a["ws_ptr"])
    if ws > ceiling("l2_size") / 2:
        notes.append(f"workspace {ws / 1e6:.0f} MB: more than half of L2")
    return Work(useful, issued, io, operands + other, operands, tiles, notes)


def work_block_tma(a: dict, cfg: dict, grid: list[int]) -> Work:
    """_resblock_tma_kernel (kernels/resblock_tma.py): a tile is TILE_H rows x (BLOCK_M - 2P)
    columns; phase 1 runs HALO_H = TILE_H + 2P halo rows of BLOCK_M pixels (one [1, 1, BLOCK_M, C]
    box per tap) and writes them to the program's L2-resident slot; phase 2 runs TILE_H rows whose
    taps are slot boxes. Weights per tap (streamed) or once per program for both convs (resident).
    ROWS = 4 (3x3): four rows per step; per dx step 6 A boxes and 3 weight tiles serve 4 rows."""
    x = a["x_desc"]
    e = _BYTES[x["dtype"]]
    n, h, w, c, ks = a["N"], a["H"], a["W"], a["C"], a["KS"]
    pad = ks // 2
    th, bm = a["TILE_H"], a["BLOCK_M"]
    tw, halo_h = bm - 2 * pad, th + 2 * pad
    tiles = n * _cdiv(h, th) * _cdiv(w, tw)
    taps = ks * ks
    g = a.get("ROWS", 1)
    rows = tiles * (_cdiv(halo_h, g) + _cdiv(th, g)) * g  # MMA row segments of BLOCK_M pixels, both phases
    issued = 2.0 * rows * bm * taps * c * c
    a_bytes = rows // g * (g + ks - 1) * ks * bm * c * e  # per step: g + KS - 1 row boxes per dx
    w_bytes = (grid[0] * 2 if a["RESIDENT_W"] else rows // g) * taps * c * c * e
    ws_write = tiles * halo_h * bm * c * e
    skip_out = 2 * n * h * w * c * e
    io = _nbytes(a["x_ptr"]) + _nbytes(a["out_ptr"]) + 2 * taps * c * c * e
    notes = [f"{rows / tiles * bm / (th * tw):.2f} MMA rows per output pixel (ideal 2)"]
    ws = _nbytes(a["ws_ptr"])
    if ws > ceiling("l2_size") / 2:
        notes.append(f"workspace {ws / 1e6:.0f} MB: more than half of L2")
    return Work(2 * 2.0 * n * h * w * taps * c * c, issued, io, a_bytes + w_bytes + ws_write + skip_out,
                a_bytes + w_bytes, tiles, notes)


def work_wgrad(a: dict, cfg: dict, grid: list[int]) -> Work:
    """_wgrad_kernel: dW partials = im2col(x)^T @ g over each split's image rows (split-K), in row
    segments of BLOCK_P pixels (cdiv(W, BLOCK_P) per row, the last one padded); a PER_TAP k-block
    is TAPS taps of one kernel row sharing each G tile; fp32 partial tiles to the workspace."""
    x, g = a["x_ptr"], a["g_ptr"]
    e = _BYTES[x["dtype"]]
    m, w, cin, c_g, ks = a["M"], a["W"], a["C_IN"], a["C_G"], a["KS"]
    k_rows = ks * ks * a.get("C_X", cin)  # the head block's rows are the padded copy's (C_X channels)
    bkw, bq, bp = a["BLOCK_KW"], a["BLOCK_Q"], a["BLOCK_P"]
    taps = a.get("TAPS", 1)
    kb = (ks * ks // taps) * _cdiv(cin, bkw) if a.get("PER_TAP") else _cdiv(k_rows, bkw)
    qb = _cdiv(c_g, bq)
    programs = grid[0]
    splits = max(1, programs // (kb * qb))
    padded = kb * qb * (m // w) * _cdiv(w, bp) * bp  # pixel slots all programs step over
    issued = 2.0 * padded * taps * bkw * bq * (3 if a.get("SPLIT") else 1)  # 3xTF32: 3 MMAs
    mask = 1 if a["IN_MASK"] else 0
    per_pixel = (taps * bkw + (1 + mask) * bq) * e
    # Shared memory is filled for every slot (masked ones with zeros); L2 is read only for the
    # real pixels (a masked-off cp.async lane fetches nothing).
    operands, l2 = padded * per_pixel, kb * qb * m * per_pixel
    ws = splits * (k_rows + 1) * c_g * 4
    io = _nbytes(x) + _nbytes(g) * (1 + mask) + ws
    return Work(2.0 * m * ks * ks * cin * c_g, issued, io, l2 + ws, operands, programs,
                [f"{splits} splits x {kb * qb} tiles, {taps} taps/tile"])


def work_reduce(a: dict, cfg: dict) -> Work:
    """_wgrad_reduce_kernel: sum the split partials in a fixed order, write dW and db."""
    total = (a["KS"] ** 2 * a.get("C_X", a["C_IN"]) + 1) * a["C_G"]
    ws = a["SPLITS"] * total * 4
    outs = (_nbytes(a["dw_ptr"]) if a["HAS_DW"] else 0) + (_nbytes(a["db_ptr"]) if a["HAS_DB"] else 0)
    return Work(0.0, 0.0, ws + outs, ws + outs, 0.0, _cdiv(total, a["BLOCK"]))


def work_pad(a: dict, cfg: dict) -> Work:
    """_pad_bordered_kernel (kernels/pad.py): a narrow tensor copied into its bordered,
    channel-padded layout (one read of x and of the mask if any, one write of the copy)."""
    moved = _nbytes(a["x_ptr"]) + (_nbytes(a["mask_ptr"]) if a["IN_MASK"] else 0) + _nbytes(a["out_ptr"])
    return Work(0.0, 0.0, moved, moved, 0.0, _cdiv(a["TOTAL"], a["BLOCK_P"]))


def launch_work(kernel: str, args: dict, cfg: dict, grid: list[int], sass: dict | None = None) -> Work:
    """The work of one launch: its recorded arguments with one of its configs (a launch with a
    pinned config, e.g. wgrad under FASTSR_DETERMINISTIC=1, has its block sizes in the arguments);
    `sass`: that config's SASS facts (store widths), where a work function reads them."""
    a = {**args, **cfg}
    if kernel == "_conv2d_nhwc_kernel":
        return work_conv(a, cfg, sass)
    if kernel == "_conv2d_tma_kernel":
        return work_conv_tma(a, cfg, grid)
    if kernel == "_conv2d_head_kernel":
        return work_head(a, cfg)
    if kernel == "_dgrad_kernel":
        return work_dgrad(a, cfg)
    if kernel == "_pad_bordered_kernel":
        return work_pad(a, cfg)
    if kernel == "_resblock_nhwc_kernel":
        return work_block(a, cfg)
    if kernel == "_resblock_tma_kernel":
        return work_block_tma(a, cfg, grid)
    if kernel == "_wgrad_kernel":
        return work_wgrad(a, cfg, grid)
    if kernel == "_wgrad_reduce_kernel":
        return work_reduce(a, cfg)
    raise ValueError(f"static_model has no geometry for kernel {kernel}")


def _hgmma_flops(shape: str) -> float:
    m, n, k = (int(v) for v in shape.split("x"))
    return 2.0 * m * n * k


def bounds(work: Work, sass: dict, e: int) -> dict:
    """Each ceiling's time for this work (seconds) and the SASS-derived counts behind them."""
    sms, clk = ceiling("sms"), ceiling("clock")
    # Work units spread over the SMs: the busiest SM takes ceil(units / SMs) of them.
    waves = _cdiv(work.units, sms) * sms / work.units if work.units else 1.0
    t = {}
    smem_bytes = work.smem_fill_bytes
    loop = sass.get("hot_loop") or {}
    if sass["mma"] == "HGMMA" and sass.get("hgmma_shape"):
        m_, n_, k_ = (int(v) for v in sass["hgmma_shape"].split("x"))
        tf32 = k_ == 8  # HGMMA k8 is the tf32 MMA: 4-byte operands, half the bf16 rate
        e = 4 if tf32 else e
        t["tensor"] = work.issued_flops / ceiling("tc_tf32" if tf32 else "tc_bf16") * waves
        n_hgmma = work.issued_flops / _hgmma_flops(sass["hgmma_shape"])  # warpgroup instructions
        per = (m_ * k_ * e if sass.get("hgmma_a_from_smem") else 0) + k_ * n_ * e
        smem_bytes += n_hgmma * per
        # Every warp of the warpgroup issues the loop's instructions: 4 warp-instructions
        # per warpgroup HGMMA times (loop instructions / loop HGMMAs).
        if work.straight_line_warps:  # no loop: every warp runs the whole kernel once per unit
            warp_instr = work.units * work.straight_line_warps * sass["instructions"]
            t["issue"] = warp_instr / (sms * ceiling("issue") * clk * ceiling("reach_issue")) * waves
        elif loop.get("mma"):
            warp_instr = n_hgmma * 4 * loop["instructions"] / loop["mma"]
            t["issue"] = warp_instr / (sms * ceiling("issue") * clk * ceiling("reach_issue")) * waves
    elif work.issued_flops:
        # No tensor cores: FFMA lanes (the hot loop's other instructions ride on the issue bound).
        fma_rate = sms * ceiling("fp32") * 2 * clk * ceiling("reach_fp32")
        t["tensor"] = work.issued_flops / fma_rate * waves
        if loop.get("mma"):
            warp_instr = work.issued_flops / 64 * loop["instructions"] / loop["mma"]  # 32 lanes x 2 FLOP
            t["issue"] = warp_instr / (sms * ceiling("issue") * clk * ceiling("reach_issue")) * waves
    if smem_bytes:
        t["smem"] = smem_bytes / (sms * ceiling("smem") * clk * ceiling("reach_smem")) * waves
    t["l2"] = work.l2_bytes / (ceiling("l2") * ceiling("reach_l2"))
    t["dram"] = work.dram_bytes / ceiling("dram")
    return dict(times=t, smem_bytes=smem_bytes, waves=waves)


def _label(rec: dict) -> str:
    a = rec["args"]
    if rec["kernel"] in ("_resblock_nhwc_kernel", "_resblock_tma_kernel"):
        return f"{a['C']}->{a['C']} k{a['KS']}"
    if rec["kernel"] == "_pad_bordered_kernel":
        return f"pad {a['C_IN']}->{a['C_PAD']} ch k{a['KS']}" + (" shift" if a["HAS_SHIFT"] else "")
    cin = a.get("C_IN")
    cout = a.get("C_OUT", a.get("C_G"))
    r = a.get("SHUFFLE", a.get("R", 1))
    return f"{cin}->{cout} k{a['KS']}" + (f" r{r}" if r > 1 else "") + (" skip" if a.get("HAS_SKIP") else "") \
        + (" relu" if a.get("RELU") else "")


def _dtype_bytes(rec: dict) -> int:
    for v in rec["args"].values():
        if isinstance(v, dict) and v["dtype"] != "float32":
            return _BYTES[v["dtype"]]
    return 4


def model(manifest: dict, report: dict, phases: tuple[str, ...]) -> list[dict]:
    """One entry per launch of the given phases: each config's work and bounds, and the best.
    A residual block whose two-conv alternative compile_check recorded (launches with
    `alternative_of` = the block's index: the dispatch's "triton_convs") carries those launches'
    entries as "alternative" (role "block", label "convs: ..."); they are not entries themselves."""
    sass = {r["kernel_key"]: r["sass"] for r in report["rows"]}
    out, alts = [], {}
    for rec in manifest["launches"]:
        if rec["phase"] not in phases:
            continue
        per_cfg = []
        for c in rec["configs"]:
            if c["kernel_key"] not in sass:
                continue  # failed to compile: compile_check reported it
            w = launch_work(rec["kernel"], rec["args"], c["config"], c["grid"], sass[c["kernel_key"]])
            b = bounds(w, sass[c["kernel_key"]], _dtype_bytes(rec))
            pred = max(b["times"].values())
            per_cfg.append(dict(config=c["config"], kernel_key=c["kernel_key"], work=w, **b, predicted=pred,
                                binds=max(b["times"], key=b["times"].get)))
        best = min(per_cfg, key=lambda d: d["predicted"])
        entry = dict(index=rec["index"], phase=rec["phase"], role=rec["role"], kernel=rec["kernel"],
                     label=_label(rec), best=best, configs=per_cfg)
        if rec.get("alternative_of") is not None:
            alts.setdefault(rec["alternative_of"], []).append({**entry, "role": "block",
                                                               "label": "convs: " + entry["label"]})
        else:
            out.append(entry)
    for e in out:
        if e["index"] in alts:
            e["alternative"] = alts[e["index"]]
    return out


def chosen(e: dict) -> list[dict]:
    """What the measured dispatch would run for launch entry `e` by this model: the launch itself,
    or, for a residual block whose two-conv alternative was recorded and is predicted faster in
    sum, those two launches. On a GPU the dispatch (fastsr/ops/dispatch.py) times both and keeps
    the faster; this is the model's guess at that choice, not a measurement of it."""
    alt = e.get("alternative")
    if alt and sum(a["best"]["predicted"] for a in alt) < e["best"]["predicted"]:
        return alt
    return [e]


def render_block_candidates(entries: list[dict]) -> str:
    """Per residual-block layer: the one-launch block and the two conv launches, each predicted
    (the best config of each launch), and which one the totals count (the lower)."""
    rows = group([e for e in entries if e.get("alternative")])
    if not rows:
        return ""
    us = 1e6
    lines = ["residual blocks: both candidates the measured dispatch times on a GPU (fastsr/ops/dispatch.py: "
             "triton_block = one launch, triton_convs = conv+ReLU then conv+res_scale+skip); the totals count "
             "the lower prediction (picked), which is what the dispatch would measure and keep",
             f"  {'layer':<24} {'n':>3} {'block us':>9} {'binds':<6} {'convs us':>9} {'(conv1 + conv2)':<17} "
             f"{'binds':<10} {'picked':<13} {'total us':>9}  configs (block | conv1 | conv2)"]
    for r in rows:
        alt = r["alternative"]
        block, convs = r["best"]["predicted"], sum(a["best"]["predicted"] for a in alt)
        picked = chosen(r)
        total = sum(p["best"]["predicted"] for p in picked) * r["count"]
        lines.append(
            f"  {(_phase_tag(r['phase']) + 'block ' + r['label'])[:24]:<24} {r['count']:>3} {block * us:>9.1f} "
            f"{r['best']['binds']:<6} {convs * us:>9.1f} "
            f"{' + '.join(format(a['best']['predicted'] * us, '.1f') for a in alt):<17} "
            f"{'/'.join(a['best']['binds'] for a in alt):<10} "
            f"{'triton_convs' if picked is alt else 'triton_block':<13} {total * us:>9.1f}  "
            + " | ".join([_cfg_text(r["best"]["config"])] + [f"{a['kernel'].strip('_')} {_cfg_text(a['best']['config'])}"
                                                            for a in alt]))
    return "\n".join(lines)


def group(entries: list[dict]) -> list[dict]:
    """Launches of the same phase, kernel, role, shape and best config (16 blocks, say) become
    one layer row with a count, in the order each first ran."""
    rows: dict[tuple, dict] = {}
    for e in entries:
        key = (e["phase"], e["role"], e["kernel"], e["label"], e["best"]["kernel_key"])
        if key in rows:
            rows[key]["count"] += 1
        else:
            rows[key] = dict(key=key, count=1, **e)
    return list(rows.values())


_TERMS = ("tensor", "issue", "smem", "l2", "dram")


def _cfg_text(cfg: dict) -> str:
    short = {"num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k.replace('BLOCK_', 'B').replace('TILE_', 'T'))}{'' if k in short else '='}{v}"
                    for k, v in cfg.items() if k != "num_ctas")


def _phase_tag(phase: str) -> str:
    return {"train.forward": "f ", "train.backward": "b "}.get(phase, "")


def render(rows: list[dict], title: str) -> str:
    us = 1e6
    head = (f"{'layer':<26} {'n':>3} {'useful':>7} {'issued':>7} {'x':>5} {'DRAM':>7} {'L2':>7} "
            + " ".join(f"{t:>7}" for t in _TERMS) + f" {'pred':>8} {'total':>8}  binds   config")
    units = (f"{'':<26} {'':>3} {'GFLOP':>7} {'GFLOP':>7} {'':>5} {'MB':>7} {'MB':>7} "
             + " ".join(f"{'us':>7}" for _ in _TERMS) + f" {'us':>8} {'us':>8}")
    lines = [title, head, units, "-" * len(head)]
    for r in rows:
        b, w = r["best"], r["best"]["work"]
        t = b["times"]
        lines.append(
            f"{(_phase_tag(r['phase']) + r['role'] + ' ' + r['label'])[:26]:<26} {r['count']:>3} {w.useful_flops / 1e9:>7.2f} "
            f"{w.issued_flops / 1e9:>7.2f} {w.issued_flops / w.useful_flops if w.useful_flops else 0:>5.2f} "
            f"{w.dram_bytes / 1e6:>7.1f} {w.l2_bytes / 1e6:>7.1f} "
            + " ".join(f"{t[k] * us:>7.1f}" if k in t else f"{'-':>7}" for k in _TERMS)
            + f" {b['predicted'] * us:>8.1f} {b['predicted'] * us * r['count']:>8.1f}  {b['binds']:<7} "
              f"{_cfg_text(b['config'])}" + (f"  ({'; '.join(w.notes)})" if w.notes else ""))
    return "\n".join(lines)


def torch_op_rows(manifest: dict, phases: tuple[str, ...]) -> list[dict]:
    """The PyTorch ops between the Triton launches (casts, copies, the loss, weight folding),
    grouped by op: each is a memory pass, timed at the DRAM rate (a lower bound: no kernel of
    theirs does better than one read and one write at copy bandwidth)."""
    rows: dict[tuple, dict] = {}
    for op in manifest.get("torch_ops", []):
        if op["phase"] not in phases:
            continue
        key = (op["phase"], op["op"])
        r = rows.setdefault(key, dict(phase=op["phase"], op=op["op"], count=0, bytes=0))
        r["count"] += 1
        r["bytes"] += op["bytes_read"] + op["bytes_written"]
    for r in rows.values():
        r["seconds"] = r["bytes"] / ceiling("dram")
    return sorted(rows.values(), key=lambda r: -r["bytes"])


def render_torch_ops(rows: list[dict]) -> str:
    lines = [f"PyTorch ops between the launches (each at the DRAM rate, a lower bound; {len(rows)} kinds):",
             f"  {'op':<28} {'n':>4} {'MB':>9} {'us':>8}"]
    for r in rows:
        if r["bytes"] >= 1e5:
            lines.append(f"  {_phase_tag(r['phase']) + r['op']:<28} {r['count']:>4} {r['bytes'] / 1e6:>9.1f} "
                         f"{r['seconds'] * 1e6:>8.1f}")
    small = [r for r in rows if r["bytes"] < 1e5]
    if small:
        lines.append(f"  ({len(small)} more kinds under 0.1 MB each, {sum(r['count'] for r in small)} ops: "
                     + ", ".join(sorted({r['op'].split('.')[-1] for r in small})) + ")")
    return "\n".join(lines)


def summary(entries: list[dict], manifest: dict, phase_name: str, ops: list[dict] = ()) -> tuple[str, dict]:
    """The whole phase against its floors, counting for each residual block the candidate the
    model predicts faster (`chosen`); the pinned total (the block kernel everywhere, what
    backend="triton" alone runs and what this model reported before both were recorded) beside it."""
    pinned = sum(e["best"]["predicted"] for e in entries)
    has_alt = any(e.get("alternative") for e in entries)
    entries = [p for e in entries for p in chosen(e)]
    total = sum(e["best"]["predicted"] for e in entries)
    ops_s = sum(r["seconds"] for r in ops)
    n_ops = sum(r["count"] for r in ops)
    gaps = len(entries) * ceiling("launch_gap")
    useful = sum(e["best"]["work"].useful_flops for e in entries)
    issued = sum(e["best"]["work"].issued_flops for e in entries)
    dram = sum(e["best"]["work"].dram_bytes for e in entries)
    per_layer_floor = sum(max(e["best"]["work"].useful_flops / ceiling("tc_bf16"),
                              e["best"]["work"].dram_bytes / ceiling("dram")) for e in entries)
    flop_floor = useful / ceiling("tc_bf16")
    by_term = {k: sum(e["best"]["predicted"] for e in entries if e["best"]["binds"] == k) for k in _TERMS}
    by_role: dict[str, float] = {}
    for e in entries:
        by_role[e["role"]] = by_role.get(e["role"], 0.0) + e["best"]["predicted"]
    ms = 1e3
    text = "\n".join([
        f"{phase_name}: {len(entries)} launches; predicted {total * ms:.3f} ms of kernel time "
        f"(+ {gaps * ms:.3f} ms of launch gaps at {ceiling('launch_gap') * 1e6:.0f} us each without CUDA graphs)",
        f"  + {n_ops} PyTorch ops between them: {ops_s * ms:.3f} ms at the DRAM rate (+ their launch gaps)",
        f"  useful {useful / 1e9:.1f} GFLOP, issued {issued / 1e9:.1f} GFLOP ({issued / useful:.2f}x), "
        f"minimum DRAM {dram / 1e6:.0f} MB over the launches",
        f"  floor: useful FLOPs at the tensor-core rate {flop_floor * ms:.3f} ms; sum of per-layer floors "
        f"(max(FLOPs/tensor rate, bytes/DRAM rate) per launch) {per_layer_floor * ms:.3f} ms; "
        f"prediction / per-layer floor = {total / per_layer_floor:.2f}x",
        "  predicted time by binding term: " + ", ".join(f"{k} {v * ms:.3f} ms" for k, v in by_term.items() if v),
        "  predicted time by role: " + ", ".join(f"{k} {v * ms:.3f} ms" for k, v in by_role.items()),
    ] + ([f"  pinned (the one-launch block for every residual block, as backend='triton' runs it): "
          f"{pinned * ms:.3f} ms of kernel time; above, each block counts its lower-predicted candidate"]
         if has_alt else []))
    return text, dict(launches=len(entries), predicted_s=total, launch_gaps_s=gaps, torch_ops=n_ops,
                      torch_ops_s=ops_s, useful_flops=useful,
                      issued_flops=issued, dram_bytes=dram, flop_floor_s=flop_floor,
                      per_layer_floor_s=per_layer_floor, by_term_s=by_term, by_role_s=by_role,
                      pinned_predicted_s=pinned)


def ceilings_text() -> str:
    lines = ["ceilings (measured: on H200s like the ones we test on; assumed: not measured, check on first contact):"]
    for k, (v, unit, src, note) in CEILINGS.items():
        val = f"{v / 1e12:g} T{unit}" if unit in ("FLOP/s", "B/s") else f"{v / 1e6:g} M{unit}" if unit == "B" \
            else f"{v / 1e9:g} GHz" if unit == "Hz" else f"{v * 1e6:g} us" if unit == "s" else f"{v:g} {unit}"
        lines.append(f"  {k:<12} {val:<22} {src:<8} {note}")
    return "\n".join(lines)


_PHASES = {"inference": ("inference",), "train": ("train.forward", "train.backward")}


# --------------------------------------------------------------------------- on a GPU: measure


def measure_ceilings() -> dict:
    """The ceilings this model leans on, measured on this GPU (seconds-scale, event-timed):
    a bf16 matmul, a DRAM-sized copy and an L2-sized copy (bytes read + written)."""
    import torch
    from triton.testing import do_bench

    out = {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    out["tc_bf16"] = 2 * 8192 ** 3 / (ms * 1e-3)
    for name, nbytes in (("dram", 1 << 30), ("l2", 16 << 20)):
        src = torch.randn(nbytes // 4, device="cuda")
        dst = torch.empty_like(src)
        ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
        out[name] = 2 * nbytes / (ms * 1e-3)
    out["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    return out


class _LaunchTimer:
    """Brackets every top-level Triton launch with CUDA events (the autotuner's own benchmark
    runs, nested inside, are not timed separately) and notes the config the autotuner chose."""

    def __init__(self) -> None:
        self.records: list[tuple] = []
        self.depth = 0

    def __enter__(self):
        import torch
        import triton.runtime.autotuner as autotuner
        import triton.runtime.jit as jit

        self._saved = autotuner.Autotuner.run, jit.JITFunction.run
        timer = self

        def wrap(orig, tuned: bool):
            def run(this, *args, **kwargs):
                if timer.depth:
                    return orig(this, *args, **kwargs)
                timer.depth += 1
                try:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    result = orig(this, *args, **kwargs)
                    end.record()
                finally:
                    timer.depth -= 1
                best = getattr(this, "best_config", None) if tuned else None
                cfg = None if best is None else {**best.kwargs, **{k: getattr(best, k) for k in (
                    "num_warps", "num_stages", "num_ctas") if getattr(best, k, None) is not None}}
                name = (this.fn if tuned else this).__name__
                timer.records.append((name, start, end, cfg))
                return result
            return run

        autotuner.Autotuner.run = wrap(self._saved[0], True)
        jit.JITFunction.run = wrap(self._saved[1], False)
        return self

    def __exit__(self, *exc) -> None:
        import triton.runtime.autotuner as autotuner
        import triton.runtime.jit as jit

        autotuner.Autotuner.run, jit.JITFunction.run = self._saved


def measure_launches(manifest: dict, phase: str, reps: int) -> list[dict]:
    """Run the manifest's model on the GPU as compile_check drove it (random weights; inference
    at batch 1 and the LR size, or one training step), time every launch with CUDA events, and
    return per launch (in the manifest's order): kernel, median seconds over `reps`, chosen config.

    The first call autotunes (not timed). Between warm-up and the timed calls the CUDA profiler
    is started, so `ncu --profile-from-start off` sees only the timed launches."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compile_check import _DTYPES, build_model

    name, scale = manifest["model"], manifest["scale"]
    model = build_model(name, scale, _DTYPES[manifest["dtype"]]).cuda()
    fwd = (lambda x: model(x, scale=scale)) if name.startswith("mdsr") else model
    if phase == "inference":
        model.eval()
        x = torch.rand(1, 3, *manifest["lr_size"], device="cuda") * 255

        def step():
            with torch.no_grad():
                fwd(x)
    else:
        model.train()
        x = torch.rand(manifest["train_batch"], 3, *manifest["train_patch"], device="cuda") * 255

        def step():
            model.zero_grad(set_to_none=True)
            out = fwd(x)
            torch.nn.functional.l1_loss(out.float(), torch.zeros_like(out, dtype=torch.float32)).backward()
    step()  # autotune, compile
    torch.cuda.synchronize()
    runs = []
    torch.cuda.cudart().cudaProfilerStart()
    try:
        for _ in range(reps):
            with _LaunchTimer() as t:
                step()
            torch.cuda.synchronize()
            runs.append(t.records)
    finally:
        torch.cuda.cudart().cudaProfilerStop()
    out = []
    for i, first in enumerate(runs[0]):
        times = sorted(r[i][1].elapsed_time(r[i][2]) * 1e-3 for r in runs)
        out.append(dict(kernel=first[0], seconds=times[len(times) // 2], config=first[3]))
    return out


def _same_config(a: dict, b: dict) -> bool:
    return all(b.get(k) == v for k, v in a.items() if k != "num_ctas")


def measured_table(entries: list[dict], measured: list[dict]) -> tuple[str, list[dict]]:
    """The prediction beside each measurement, per launch, for the config the autotuner chose."""
    if [e["kernel"] for e in entries] != [m["kernel"] for m in measured]:
        return ("the GPU's launches differ from the manifest's: " + f"{len(measured)} measured, {len(entries)} "
                "recorded; no side-by-side table"), []
    rows, lines = [], [f"{'#':>4} {'layer':<28} {'measured':>9} {'pred':>9} {'meas/pred':>9}  binds    config chosen"]
    for e, m in zip(entries, measured):
        cfg = m["config"] or e["configs"][0]["config"]
        chosen = next((c for c in e["configs"] if _same_config(cfg, c["config"])), e["best"])
        rows.append(dict(index=e["index"], role=e["role"], label=e["label"], kernel=e["kernel"],
                         measured_s=m["seconds"], predicted_s=chosen["predicted"], binds=chosen["binds"],
                         config=cfg, times_s=chosen["times"]))
        lines.append(f"{e['index']:>4} {(e['role'] + ' ' + e['label'])[:28]:<28} {m['seconds'] * 1e6:>8.1f}u "
                     f"{chosen['predicted'] * 1e6:>8.1f}u {m['seconds'] / chosen['predicted']:>9.2f}  "
                     f"{chosen['binds']:<8} {_cfg_text(cfg)}")
    tm, tp = sum(r["measured_s"] for r in rows), sum(r["predicted_s"] for r in rows)
    lines.append(f"     {'total':<28} {tm * 1e6:>8.1f}u {tp * 1e6:>8.1f}u {tm / tp:>9.2f}")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("emit_dir", type=Path, help="a compile_check.py --emit DIR")
    p.add_argument("--phase", choices=["inference", "train", "all"], default="all")
    p.add_argument("--json", type=Path, help="write the per-launch numbers here")
    p.add_argument("--out", type=Path, help="also write the printed text here")
    p.add_argument("--measure", action="store_true",
                   help="on a CUDA GPU: also run the model, time every launch, print it beside the prediction")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per launch (--measure)")
    args = p.parse_args(argv)
    if args.measure:
        import torch

        if not torch.cuda.is_available():
            p.error("--measure needs a CUDA GPU (the prediction alone runs anywhere)")
    manifest = json.loads((args.emit_dir / "manifest.json").read_text())
    report = json.loads((args.emit_dir / "sass_report.json").read_text())
    phases = ["inference", "train"] if args.phase == "all" else [args.phase]
    m = manifest
    if args.out:
        args.out.write_text("")

    def say(*lines: str) -> None:
        """Print now and append to --out: on a GPU a later part may hit its time box."""
        text = "\n".join(lines)
        print(text, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(text + "\n")

    dump = {"manifest": {k: v for k, v in m.items() if k not in ("kernels", "launches", "torch_ops")},
            "ceilings": {k: dict(value=v[0], unit=v[1], source=v[2], note=v[3]) for k, v in CEILINGS.items()}}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(dump, indent=1))

    say(f"static model (a tool for choosing the next change, not a speed): {m.get('model')} x{m.get('scale')} "
        f"{m.get('dtype')}, sm_{m['arch']}, triton {m.get('triton')}", ceilings_text(), "",
        "columns: layer (f/b: a training step's forward/backward) and n launches of it; useful/issued FLOPs "
        "(x = issued/useful); DRAM = the kernel's tensors once; L2 = L2<->SM traffic of the tiling; "
        "tensor/issue/smem/l2/dram = time at each ceiling (tensor: the FFMA rate for a kernel without tensor "
        "cores); pred = the largest; total = pred x n", "")
    for ph in phases:
        wanted = _PHASES[ph]
        entries = model(manifest, report, wanted)
        if not entries:
            continue
        what = (f"inference, batch 1 at {m.get('lr_size')} LR" if ph == "inference"
                else f"one training step, batch {m.get('train_batch')} of {m.get('train_patch')} LR patches")
        ops = torch_op_rows(manifest, wanted)
        text, totals = summary(entries, manifest, what, ops)
        say(render(group(entries), f"== {what}: per layer, the best predicted config of each launch =="), "",
            render_block_candidates(entries), "", render_torch_ops(ops), "", text, "")
        dump[ph] = dict(totals=totals, torch_ops=ops, launches=[
            dict(index=e["index"], phase=e["phase"], role=e["role"], kernel=e["kernel"], label=e["label"],
                 best=_entry_json(e["best"]), configs=[_entry_json(c) for c in e["configs"]],
                 **({"picked": "triton_convs" if chosen(e) is e["alternative"] else "triton_block",
                     "alternative": [dict(kernel=a["kernel"], label=a["label"], best=_entry_json(a["best"]))
                                     for a in e["alternative"]]} if e.get("alternative") else {}))
            for e in entries])
        save()
        if args.measure:
            measured = measure_launches(manifest, ph, args.reps)
            table, rows = measured_table(entries, measured)
            say(f"== {what}: measured on {_device_name()} (median of {args.reps}, CUDA events per launch) "
                "beside the prediction for the config the autotuner chose ==", table, "")
            dump.setdefault("measured", {})[ph] = rows
            save()
    if args.measure:
        got = measure_ceilings()
        dump["ceilings_measured_here"] = got
        save()
        say("ceilings measured on this GPU: " + ", ".join(
            f"{k} {v / 1e12:.2f} T (model: {ceiling(k) / 1e12:.2f} T)" if k != "sms" else f"sms {v}"
            for k, v in got.items()) + " [l2: a 16 MiB copy, L2-resident; the model's l2 is the SM<->L2 rate]")
    return 0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _entry_json(c: dict) -> dict:
    w = c["work"]
    return dict(config=c["config"], kernel_key=c["kernel_key"], predicted_s=c["predicted"], binds=c["binds"],
                times_s=c["times"], waves=c["waves"], smem_bytes=c["smem_bytes"],
                work=dict(useful_flops=w.useful_flops, issued_flops=w.issued_flops, dram_bytes=w.dram_bytes,
                          l2_bytes=w.l2_bytes, smem_fill_bytes=w.smem_fill_bytes, units=w.units, notes=w.notes))


if __name__ == "__main__":
    sys.exit(main())
