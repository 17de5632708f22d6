"""Host-side pieces every launcher in fastsr.kernels shares: code-path flags read at import,
block sizes, the SM count, input checks, output allocation, and the one launch helper.

Private to the package (the leading underscore): the kernel modules import from here, never
from each other's internals. Device code they share is in `_jit.py`.
"""
from __future__ import annotations

import contextlib
import inspect
import os

import torch
import triton
import triton.language as tl

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
# Block sizes, tuning lists, launch arguments
# --------------------------------------------------------------------------------------


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



# The interpreter runs one program at a time in Python: a small fixed configuration, never
# tuned. BLOCK_N / BLOCK_K caps are smaller there than on the GPU on purpose, so the tests'
# small channel counts still exercise several channel blocks and K chunks with tails.
_INTERPRET_BLOCK_M = 32


def pad_weight_columns(w_packed: torch.Tensor, block_n: int) -> torch.Tensor:
    """A narrow packed weight (Cout < block_n, one N tile: the tail's 3 columns) with its columns
    zero-padded to block_n, so the kernel loads each row as aligned 16-byte vectors instead of
    Cout 2-byte scalars; any other weight as it is. One small copy (EDSR's tail: 576 x 16 bf16,
    18 KB) per call, against the 9 x (K x Cout) scalar loads per tile it replaces."""
    c_out = w_packed.shape[1]
    if c_out >= block_n:
        return w_packed
    return torch.nn.functional.pad(w_packed, (0, block_n - c_out))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _block_n(c_out: int, shuffle: int = 1) -> int:
    # tl.dot needs every block dim >= 16; F = 64 -> one 64-wide block holding all of Cout.
    # A pixel-shuffle conv (the upsampler) whose Cout fits wgmma's widest N (256: r = 2 at
    # F = 64) is one N tile, so its input is gathered once. Wider ones (r = 3 at F = 64: 576)
    # keep 128-column tiles: 5 tiles with 11% padding and BLOCK_M up to 256 move fewer L2
    # bytes than 3 tiles of 256 (33% padding, BLOCK_M <= 128 for the registers).
    cap = 64 if _INTERPRET else 256 if shuffle > 1 and c_out <= 256 else 128
    return min(max(16, _next_pow2(c_out)), cap)


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


def _has_tma(device: torch.device) -> bool:
    """Whether launches on `device` may use Hopper's tensor memory accelerator (TMA: bulk tensor
    copies through host-built descriptors): a CUDA GPU of compute capability 9.0 or newer. The
    one place the TMA kernels' selection asks (bench/compile_check.py replaces it to record the
    launches of the arch it compiles for; tests patch it to run the TMA path in the interpreter)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"



def _launch_config_args(dtype: torch.dtype) -> dict:
    return dict(
        INTERP=_INTERPRET,
        PREC=_dot_precision(dtype),
        USE_INPUT_PRECISION=_DOT_HAS_INPUT_PRECISION,
    )



def pinned_configs() -> bool:
    """Whether launchers with a pinned config (wgrad) run it instead of the autotuned one.

    The autotuner picks a config by timing, so two processes may pick different ones; where
    the config sets a summation order, torch.use_deterministic_algorithms (or
    FASTSR_DETERMINISTIC=1) makes every process run the pinned one."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FASTSR_DETERMINISTIC") == "1"


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(kernel, tuned, grid, args, meta: dict, *, interpret: dict, like: torch.Tensor,
            pinned: dict | None = None) -> None:
    """Launch `kernel` the one way every launcher does: under the interpreter with the fixed
    small config `interpret`; with `pinned` when deterministic configs are asked for
    (`pinned_configs`) and the launcher has one; otherwise through the autotuned `tuned`.
    GPU launches run on `like`'s device (the current device may be another)."""
    if _INTERPRET:
        kernel[grid](*args, **interpret, **meta)
        return
    with _device_ctx(like):
        if pinned is not None and pinned_configs():
            kernel[grid](*args, **pinned, **meta)
        else:
            tuned[grid](*args, **meta)


# --------------------------------------------------------------------------------------
# Input checks and outputs
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


def _check_shuffle(shuffle, c_out: int | None) -> int:
    """shuffle must be one of SUPPORTED_SHUFFLES and, when c_out is given, divide it as r^2."""
    if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle not in SUPPORTED_SHUFFLES:
        raise ValueError(f"shuffle must be one of {SUPPORTED_SHUFFLES}, got {shuffle!r}")
    if c_out is not None and c_out % (shuffle * shuffle):
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


