"""Keep large CPU buffers on glibc's heap, so a freed F-map is reused instead of unmapped.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB, however it
adapts) with fresh pages from mmap and returns them to the kernel on free. A 1080p F-map
is larger than that (540x960 LR x 64 channels: 66 MB in bf16, 133 MB in fp32), so every conv
of the native CPU path pays a page fault and a kernel zero-fill for each page of its output:
measured on 2 cores (Xeon, AMX), one 64->64 bf16 conv at 540x960 took 40 ms with glibc's
defaults and 20.7 ms with the allocations kept on the heap, and EDSR-baseline x2 at 1080p
went from 1.69 s to about 1.0 s. Below the threshold (a 256x256 image's 8 MB F-maps) nothing
changes: those already come from the heap.

What it does, once per process, the first time the native CPU path makes a buffer above
the threshold: `mallopt(M_MMAP_MAX, 0)` (no allocation is served by mmap) and
`mallopt(M_TRIM_THRESHOLD, 1 GiB)` (freed memory at the top of the heap is not handed back
at once, so the next forward finds it). The cost is that the process keeps its peak heap
(the largest forward's working set) instead of returning it between calls. The setting is
process-wide and stays: glibc cannot report its previous values, and it also stops
adapting its thresholds once they are set. So it is never applied when the user chose
otherwise: `FASTSR_CPU_HEAP=0` turns it off, and an allocator setting in the environment
(`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, or a
`glibc.malloc` tunable in `GLIBC_TUNABLES`) or a non-glibc C library leaves it untouched.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["MMAP_THRESHOLD_MAX", "keep_large_allocations", "reason_not_applied", "applied", "trim"]

# glibc's largest mmap threshold on 64-bit (4 * 1024 * 1024 * sizeof(long)): from this size
# on, an allocation is always an mmap, whatever the dynamic threshold has grown to.
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_TRIM_THRESHOLD = 1 << 30
_ENV_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_state: dict = {"done": False, "applied": False, "reason": "not asked yet"}
_log = logging.getLogger("fastsr")


def _libc():
    """glibc's handle, or None on another C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # absent from musl and other C libraries
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def reason_not_applied() -> str | None:
    """Why the setting would not be applied in this process (None: it would be)."""
    if os.environ.get("FASTSR_CPU_HEAP", "1").strip().lower() in ("0", "off", "false", "no"):
        return "FASTSR_CPU_HEAP=0"
    chosen = [name for name in _ENV_SETTINGS if name in os.environ]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES (glibc.malloc)")
    if chosen:
        return "the environment sets the allocator: " + ", ".join(chosen)
    if _libc() is None:
        return "not glibc"
    return None


def keep_large_allocations() -> bool:
    """Apply the setting (module docstring) once per process; True if it is in effect.

    Cheap after the first call (a dict lookup): the native CPU path calls it before making
    each buffer above MMAP_THRESHOLD_MAX."""
    if _state["done"]:
        return _state["applied"]
    _state["done"] = True
    reason = reason_not_applied()
    if reason is None:
        libc = _libc()
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
        reason = None if ok else "mallopt refused"
    _state["applied"] = reason is None
    _state["reason"] = reason or "applied"
    if reason is None:
        _log.info("fastsr: large CPU buffers kept on the heap (mallopt M_MMAP_MAX=0; FASTSR_CPU_HEAP=0 turns it off)")
    return _state["applied"]


def applied() -> bool:
    """Whether this process runs with the setting (it is applied lazily, at the first large buffer)."""
    return _state["applied"]


def trim() -> bool:
    """Hand the heap's free memory back to the kernel now (glibc's malloc_trim(0)), when the
    setting is in effect; True if anything was returned. For a caller bounding the process's
    memory: the kept heap is the working set of the largest forward so far, sized and
    fragmented by its input shape, which a forward of another shape reuses only in part."""
    if not _state["applied"]:
        return False
    libc = _libc()
    return libc is not None and libc.malloc_trim(0) == 1
