"""Implicit-GEMM 2-D convolution on NHWC activations, with fused epilogues.

What one launch computes (stride 1, "same" zero padding, kernel size KS in {1, 3, 5}):

    y = conv(x - in_shift) + bias          # in_shift only on in-bounds taps: padding stays 0
    y = relu(y)                            # optional
    y = res_scale * y + skip               # skip optional (same shape as y)
    out = pixel_shuffle(y, r)              # optional, written straight into the upscaled layout

as one GEMM per output tile:

    M = N*H*W output pixels     (rows: BLOCK_M pixels, flattened over the batch)
    N = Cout output channels    (cols: BLOCK_N channels; BLOCK_N = Cout for F <= 128)
    K = KS*KS*Cin               (walked as KS*KS taps x ceil(Cin / BLOCK_K) chunks)

The A tile of one (tap, chunk) step is a BLOCK_M x BLOCK_K gather of shifted NHWC pixels
(one contiguous row of BLOCK_K channels per pixel, masked at image borders and at the
channel tail); the B tile is the matching BLOCK_K x BLOCK_N slice of the packed weight
(`pack_weight`: row k = (kh*KS + kw)*Cin + ci, so one tap's weights are Cin contiguous rows).
All taps and chunks run as ONE flat loop of KS*KS*ceil(Cin/BLOCK_K) steps, so the software
pipeliner has a loop long enough to overlap loads with MMAs even when Cin fits one chunk
(F = 64: 9 steps of 64-deep MMAs for a 3x3 conv). Accumulation is fp32 (`tl.dot`; fp32
inputs use input_precision="ieee", no TF32, so fp32 parity is tight).

Reads and writes, per output pixel (e = bytes per element: 2 for fp16/bf16, 4 for fp32):
- reads Cin*e of x from DRAM once; the other KS*KS-1 taps hit the same rows again from L1/L2
  (a BLOCK_M = 128 tile of a W-wide image re-reads only a (KS-1)-pixel border);
- reads KS*KS*Cin*Cout*e of weights per BLOCK_M pixels (F = 64, fp16: 73,728 B per 128
  pixels = 576 B/pixel, all from L2: the whole packed weight is 72 KiB);
- reads Cout*e of skip (if any), writes Cout*e of output (pixel shuffle moves the same bytes);
- does 2*KS*KS*Cin*Cout FLOPs.
For the EDSR body conv (3x3, F = 64, fp16) that is 73,728 FLOP against 256 B of DRAM
traffic (384 B with skip): ~288 FLOP/B, at an H100's balance point. Each epilogue fused here
(bias, ReLU, scale, skip, shuffle) is a full 2*Cout*e read+write pass that eager PyTorch
would add on top.

Block sizes come from `triton.autotune` over a small bounded list (BLOCK_M, num_warps,
num_stages), keyed on (Cin, Cout, KS, shuffle) and the tensor dtypes; BLOCK_N and BLOCK_K
follow from the channel counts. Under the Triton interpreter (TRITON_INTERPRET=1, CPU
tensors) one fixed small configuration is used and nothing is tuned; both paths launch the
same kernel body.
"""
from __future__ import annotations

import contextlib
import inspect
import os

import torch
import triton
import triton.language as tl

__all__ = ["pack_weight", "conv2d_nhwc"]

# Read once at import, like Triton itself reads it when a kernel is decorated.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# `input_precision=` exists on tl.dot from Triton 3.0 on (so in every Triton >= 3.2 that
# fastsr supports); older releases only had allow_tf32. Checked once here, branched on at
# compile time inside the kernel, so the branch not taken is never compiled.
_DOT_HAS_INPUT_PRECISION = "input_precision" in inspect.signature(tl.dot).parameters

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_KERNEL_SIZES = (1, 3, 5)
SUPPORTED_SHUFFLES = (1, 2, 3)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------
# Device helpers shared by conv2d and resblock kernels
# --------------------------------------------------------------------------------------


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
def _mma(a, b, acc, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr):
    """acc += a @ b in fp32. PREC is "ieee" for fp32 operands (no TF32), "tf32" otherwise
    (Triton's default; it only matters for fp32 operands)."""
    if USE_INPUT_PRECISION:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc, allow_tf32=PREC == "tf32")
    return acc


@triton.jit
def _conv_mainloop(
    acc,
    src_ptr, img, oh, ow, m_mask, H_src, W_src,
    w_ptr, offs_n, n_mask,
    shift_ptr,
    C_SRC: tl.constexpr, C_OUT: tl.constexpr, KS: tl.constexpr,
    HAS_SHIFT: tl.constexpr, INTERP: tl.constexpr,
    PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc[m, n] += sum over taps (kh, kw) and channels ci of
         src[img[m], oh[m] + kh - P, ow[m] + kw - P, ci] * w[(kh*KS + kw)*C_SRC + ci, n]

    `src` is NHWC with C_SRC channels (an activation, or the resblock's workspace), rows
    outside [0, H_src) x [0, W_src) or with m_mask False read as zero. One flat loop over
    KS*KS*ceil(C_SRC/BLOCK_K) steps: each step loads one BLOCK_M x BLOCK_K activation tile
    (BLOCK_K contiguous channels per pixel: 16-byte vector loads) and one BLOCK_K x BLOCK_N
    weight tile (contiguous rows of the packed weight, from L2), and issues one MMA."""
    PAD = KS // 2
    K_CHUNKS = (C_SRC + BLOCK_K - 1) // BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    # Pointers of the centre tap's first chunk, built once; each step only adds a scalar
    # offset (tap shift, channel chunk) to them.
    pix0 = (img * H_src + oh) * W_src + ow  # flattened NHW index of the centre tap
    a_base = src_ptr + (pix0.to(tl.int64) * C_SRC)[:, None] + offs_k[None, :]
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
        row_ok = m_mask & (ih >= 0) & (ih < H_src) & (iw >= 0) & (iw < W_src)
        k_ok = offs_k < C_SRC - k0
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(a_base + ((dh * W_src + dw) * C_SRC + k0), mask=a_mask, other=0.0)
        b = tl.load(b_base + (tap * C_SRC + k0) * C_OUT, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
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


# --------------------------------------------------------------------------------------
# The conv kernel
# --------------------------------------------------------------------------------------


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
def _conv2d_nhwc_kernel(
    x_ptr, w_ptr, bias_ptr, shift_ptr, skip_ptr, out_ptr,
    M, H, W, res_scale,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, KS: tl.constexpr, SHUFFLE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, HAS_SKIP: tl.constexpr,
    INTERP: tl.constexpr, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n, m_mask, n_mask, img, oh, ow = _tile_coords(M, H, W, C_OUT, BLOCK_M, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _conv_mainloop(
        acc, x_ptr, img, oh, ow, m_mask, H, W, w_ptr, offs_n, n_mask, shift_ptr,
        C_IN, C_OUT, KS, HAS_SHIFT, INTERP, PREC, USE_INPUT_PRECISION, BLOCK_K,
    )

    # ---- epilogue, all in fp32 registers: one rounding, at the store ----
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    acc = acc * res_scale
    mask = m_mask[:, None] & n_mask[None, :]
    if SHUFFLE == 1:
        out_off = offs_m.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
        if HAS_SKIP:
            acc += tl.load(skip_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
    else:
        # PixelShuffle: conv channel co = c*R*R + i*R + j goes to out[n, oh*R + i, ow*R + j, c].
        # The address splits into a per-pixel part and a per-channel part, so the shuffle
        # costs no extra pass: out_off = row[m] + col[co].
        R = SHUFFLE
        C_SH = C_OUT // (R * R)
        W_OUT = W * R
        c = offs_n // (R * R)
        i = (offs_n // R) % R
        j = offs_n % R
        row = ((img * H + oh).to(tl.int64) * R * W_OUT + ow * R) * C_SH
        col = (i * W_OUT + j) * C_SH + c
        out_off = row[:, None] + col[None, :]
    tl.store(out_ptr + out_off, _round_to(acc, out_ptr, INTERP), mask=mask)


def _conv_configs():
    # Bounded list: BLOCK_M pixels per tile x (warps, pipeline stages). With BLOCK_N = 64 and
    # BLOCK_K = 64 (F = 64, fp16) one stage holds (BLOCK_M + 64) * 64 * 2 B of operands:
    # 24 KiB at BLOCK_M = 128, so 3-4 stages fit shared memory with room for 2 CTAs per SM.
    cfgs = []
    for block_m, warps, stages in [
        (64, 4, 3), (64, 4, 4),
        (128, 4, 3), (128, 4, 4), (128, 8, 3),
        (256, 8, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages))
    return cfgs


_conv2d_nhwc_tuned = triton.autotune(
    configs=_conv_configs(),
    key=["C_IN", "C_OUT", "KS", "SHUFFLE"],  # the autotuner adds the tensor dtypes itself
)(_conv2d_nhwc_kernel)

# The interpreter runs one program at a time in Python: a small fixed configuration, never
# tuned. BLOCK_N / BLOCK_K caps are smaller there than on the GPU on purpose, so the tests'
# small channel counts still exercise several channel blocks and K chunks with tails.
_INTERPRET_BLOCK_M = 32


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _block_n(c_out: int) -> int:
    # tl.dot needs every block dim >= 16; F = 64 -> one 64-wide block holding all of Cout.
    return min(max(16, _next_pow2(c_out)), 64 if _INTERPRET else 128)


def _block_k(c_in: int, dtype: torch.dtype) -> int:
    """Channels per K step: 128 B of each pixel row on the GPU (64 fp16 / 32 fp32), so one
    step is one 16-byte vector load per thread per row segment. Under the interpreter,
    narrow inputs (<= 32 channels) use 16-wide chunks so that the tests' odd channel counts
    run multi-chunk loops with a tail; wide ones use up to 64 to keep interpretation fast."""
    if _INTERPRET:
        return 16 if c_in <= 32 else min(_next_pow2(c_in), 64)
    cap = 64 if dtype != torch.float32 else 32
    return min(max(16, _next_pow2(c_in)), cap)


def _multiprocessor_count(device: torch.device) -> int:
    """SMs of the GPU the launch runs on: the persistent resblock grid and wgrad's split-K
    are sized from it. 64 for a non-CUDA device (bench/compile_check.py replaces this
    function to size the launches it records for the GPU it compiles for)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 64  # pragma: no cover - a non-CUDA Triton backend


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------
# Input checks shared with resblock.py
# --------------------------------------------------------------------------------------


def _check_tensor(name: str, t, *, rank: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")


def _check_activation(name: str, x) -> None:
    _check_tensor(name, x, rank=4)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous (N, H, W, C) NHWC tensor, got strides {tuple(x.stride())} "
            f"for shape {tuple(x.shape)} (call .contiguous())"
        )


def _check_same_device(x, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")


def _check_kernel_size(kernel_size, allowed) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size not in allowed:
        raise ValueError(f"kernel_size must be one of {allowed}, got {kernel_size!r}")
    return kernel_size


def _check_packed_weight(name: str, w, x, kernel_size: int, c_in: int, c_out: int | None = None) -> int:
    _check_tensor(name, w, rank=2)
    if w.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {w.dtype}")
    if not w.is_contiguous():
        raise ValueError(f"{name} must be contiguous (use pack_weight), got strides {tuple(w.stride())}")
    k = kernel_size * kernel_size * c_in
    if w.shape[0] != k:
        raise ValueError(
            f"{name} has {w.shape[0]} rows but kernel_size={kernel_size} and {c_in} input channels need "
            f"kernel_size**2 * Cin = {k} (weight packed for another kernel size or channel count?)"
        )
    if c_out is not None and w.shape[1] != c_out:
        raise ValueError(f"{name} must have {c_out} output channels (columns), got {w.shape[1]}")
    if w.shape[1] < 1:
        raise ValueError(f"{name} has no output channels")
    return w.shape[1]


def _check_vector(name: str, v, length: int) -> None:
    _check_tensor(name, v, rank=1)
    if v.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (pass .float()), got {v.dtype}")
    if v.shape[0] != length:
        raise ValueError(f"{name} must have {length} elements, got {v.shape[0]}")
    if not v.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + a.numel() * a.element_size()
    b1 = b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def _check_out(out, shape, x, inputs: dict) -> torch.Tensor:
    """Allocate the output, or check the one given: shape, x's dtype and device, contiguous,
    and no memory shared with any of `inputs` (name -> tensor or None)."""
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype)
    _check_tensor("out", out)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"out must have x's dtype {x.dtype}, got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device} but x is on {x.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    for name, t in inputs.items():
        if t is not None and _overlaps(out, t):
            # Programs read neighbouring pixels of x (and the autotuner re-runs the kernel),
            # so an output written over an input would corrupt it.
            raise ValueError(f"out must not share memory with {name}")
    return out


def _launch_config_args(dtype: torch.dtype) -> dict:
    return dict(
        INTERP=_INTERPRET,
        PREC=_dot_precision(dtype),
        USE_INPUT_PRECISION=_DOT_HAS_INPUT_PRECISION,
    )


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, KH, KW) -> (KH*KW*Cin, Cout) contiguous, same dtype.

    Row k = (kh*KW + kw)*Cin + ci, so the K loop of the implicit GEMM walks one tap's Cin
    rows contiguously and each row holds all Cout weights of one input channel."""
    _check_tensor("weight", weight, rank=4)
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * c_in, c_out).contiguous()


def conv2d_nhwc(x, w_packed, bias, kernel_size: int, *, in_shift=None, relu: bool = False,
                res_scale: float = 1.0, skip=None, shuffle: int = 1, out=None) -> torch.Tensor:
    """Fused NHWC convolution (see the module docstring for what it reads and writes).

    x:        (N, H, W, Cin) contiguous, float32 / float16 / bfloat16.
    w_packed: (KS*KS*Cin, Cout) from `pack_weight`, x's dtype.
    bias:     (Cout,) float32 or None.
    in_shift: (Cin,) float32 or None, subtracted from every in-bounds input value on load.
    Computes with fp32 accumulation, stride 1, zero padding kernel_size // 2:
        y = conv(x - in_shift) + bias; y = relu(y) if relu; y = res_scale * y; y += skip;
        then PixelShuffle(shuffle) written straight into the (N, H*r, W*r, Cout/r^2) output.
    Returns out (x's dtype, contiguous NHWC); an `out` given is written and returned.
    skip together with shuffle > 1 is not supported.
    """
    _check_activation("x", x)
    ks = _check_kernel_size(kernel_size, SUPPORTED_KERNEL_SIZES)
    n, h, w, c_in = x.shape
    if c_in < 1:
        raise ValueError("x has 0 channels")
    c_out = _check_packed_weight("w_packed", w_packed, x, ks, c_in)
    if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle not in SUPPORTED_SHUFFLES:
        raise ValueError(f"shuffle must be one of {SUPPORTED_SHUFFLES}, got {shuffle!r}")
    if shuffle > 1 and c_out % (shuffle * shuffle) != 0:
        raise ValueError(
            f"shuffle={shuffle} needs Cout divisible by {shuffle * shuffle}, got Cout={c_out}"
        )
    if skip is not None and shuffle > 1:
        raise ValueError("skip with shuffle > 1 is not supported (add the skip after the pixel shuffle)")
    if bias is not None:
        _check_vector("bias", bias, c_out)
    if in_shift is not None:
        _check_vector("in_shift", in_shift, c_in)
    if skip is not None:
        _check_activation("skip", skip)
        if tuple(skip.shape) != (n, h, w, c_out):
            raise ValueError(f"skip must have shape {(n, h, w, c_out)}, got {tuple(skip.shape)}")
        if skip.dtype != x.dtype:
            raise TypeError(f"skip must have x's dtype {x.dtype}, got {skip.dtype}")
    _check_same_device(x, w_packed=w_packed, bias=bias, in_shift=in_shift, skip=skip, out=out)
    r = shuffle
    out = _check_out(out, (n, h * r, w * r, c_out // (r * r)), x, dict(x=x, w_packed=w_packed, skip=skip))

    m = n * h * w
    if m == 0:
        return out
    if m > _INT32_MAX:
        raise ValueError(f"x has {m} pixels; at most {_INT32_MAX} are supported")

    block_n = _block_n(c_out)
    num_n_blocks = triton.cdiv(c_out, block_n)
    dummy = x  # never read: the matching HAS_* flag is False
    args = (
        x, w_packed,
        bias if bias is not None else dummy,
        in_shift if in_shift is not None else dummy,
        skip if skip is not None else dummy,
        out,
        m, h, w, float(res_scale),
    )
    meta = dict(
        C_IN=c_in, C_OUT=c_out, KS=ks, SHUFFLE=r,
        HAS_BIAS=bias is not None, HAS_SHIFT=in_shift is not None, RELU=bool(relu),
        HAS_SKIP=skip is not None,
        BLOCK_N=block_n, BLOCK_K=_block_k(c_in, x.dtype),
        **_launch_config_args(x.dtype),
    )

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * num_n_blocks,)

    if _INTERPRET:
        _conv2d_nhwc_kernel[grid](*args, BLOCK_M=_INTERPRET_BLOCK_M, **meta)
    else:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _conv2d_nhwc_tuned[grid](*args, **meta)
    return out

