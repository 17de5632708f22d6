"""Backends and the honest choice between them (xformers-style declared capabilities).

- "triton":    the Triton kernels in fastsr.kernels; CUDA tensors, or CPU tensors when
               TRITON_INTERPRET=1 was set before the kernels were imported (the
               interpreter: correct but slow, for testing).
- "cpu":       channels-last oneDNN convolutions with folded constants and in-place
               epilogues; the fast path for CPU tensors (fp32, and bf16 on CPUs with
               bf16 instructions).
- "reference": the eager references in fastsr.ops.reference, any device.

An automatically chosen backend may fall back (and the module reports what ran); a
backend requested by name fails loudly with every reason it cannot run.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from fastsr.errors import BackendUnavailable

BACKENDS = ("triton", "cpu", "reference")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def machine_reasons(backend: str) -> list[str]:
    """Why `backend` cannot run on this machine at all, whatever the tensor (empty: it may).

    Checked when a model is built with backend=...: a machine without triton, or without
    CUDA and without the interpreter, fails then instead of at the first call.
    """
    check_backend_name(backend)
    if backend != "triton":
        return []
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed (pip install triton)")
    if not torch.cuda.is_available() and not triton_interpreting():
        reasons.append("no CUDA device is available (torch.cuda.is_available() is False), and CPU tensors need "
                       "TRITON_INTERPRET=1 (the Triton interpreter, slow, for testing)")
    return reasons


def unsupported_reasons(backend: str, x: torch.Tensor) -> list[str]:
    """Why `backend` cannot run on a tensor like x (empty list: it can)."""
    check_backend_name(backend)
    reasons: list[str] = []
    if not x.is_floating_point():
        reasons.append(f"dtype {x.dtype} is not floating point")
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed (pip install triton)")
        if x.device.type == "cpu" and not triton_interpreting():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter, slow, for testing)")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"device {x.device.type} is not supported (CUDA, or CPU under the interpreter)")
        if x.dtype not in _TRITON_DTYPES:
            reasons.append(f"dtype {x.dtype} is not one of float32/float16/bfloat16")
    elif backend == "cpu":
        if x.device.type != "cpu":
            reasons.append(f"the cpu backend runs on CPU tensors, got a {x.device.type} tensor")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            reasons.append(f"dtype {x.dtype} is not one of float32/bfloat16/float16")
    return reasons


def choose_backend(x: torch.Tensor, requested: str | None = None) -> str:
    """The backend to run for input x: `requested` or raise; else the best that can run."""
    if requested is not None:
        reasons = unsupported_reasons(requested, x)
        if reasons:
            raise BackendUnavailable(
                f"backend {requested!r} cannot run on a {x.device.type} {x.dtype} tensor: " + "; ".join(reasons)
            )
        return requested
    preferred = ("triton",) if x.device.type == "cuda" else ("cpu",) if x.device.type == "cpu" else ()
    for name in preferred:
        if not unsupported_reasons(name, x):
            return name
    return "reference"
