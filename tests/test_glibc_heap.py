"""The native CPU path keeps large buffers on glibc's heap (fastsr/ops/backends/glibc_heap.py).

Each case runs in a fresh interpreter: the setting is process-wide and applied once. The
effect is read back from glibc itself (mallinfo2: bytes in mmapped blocks), so a test fails
if the setting does not change how a large tensor is allocated."""
import os
import subprocess
import sys

import pytest

from fastsr.ops.backends import glibc_heap

pytestmark = pytest.mark.skipif(glibc_heap._libc() is None or not hasattr(glibc_heap._libc(), "mallinfo2"),
                                reason="needs glibc >= 2.33 (mallinfo2)")

_PROBE = r"""
import ctypes, torch, fastsr, fastsr.inference
from fastsr.ops.backends import glibc_heap


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2


def mmapped_growth(nbytes):
    before = libc.mallinfo2().hblkhd
    t = torch.empty(nbytes, dtype=torch.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del t
    return grown


big = 48 * 1024 * 1024  # above glibc's largest mmap threshold (32 MiB)
print("before", mmapped_growth(big) >= big)
# A conv of the native CPU path whose output (1 x 64 x 256 x 512 fp32 = 33.6 MB) is above it:
x = torch.rand(1, 64, 256, 512)
w = torch.rand(64, 64, 3, 3) * 0.01
with torch.no_grad():
    y = fastsr.ops.conv2d(x, w, None, backend="cpu")
print("applied", glibc_heap.applied(), glibc_heap._state["reason"])
print("after", mmapped_growth(big) >= big)
# A freed buffer stays on the heap (resident) until trim() hands it back.
t = torch.ones(256 * 1024 * 1024, dtype=torch.uint8)  # touched: its pages are resident
del t
kept = libc.mallinfo2().fordblks >= 256 * 1024 * 1024
rss = fastsr.inference.resident_bytes()
returned = glibc_heap.trim()
dropped = rss - fastsr.inference.resident_bytes()
print("trim", kept, returned, dropped >= 200 * 1024 * 1024)
"""


def _run(env_extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.pop("FASTSR_CPU_HEAP", None)
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_a_large_cpu_conv_keeps_later_large_buffers_off_mmap_until_trimmed():
    assert _run({}) == ["before True", "applied True applied", "after False", "trim True True True"]


def test_fastsr_cpu_heap_0_leaves_the_allocator_alone():
    # The freed buffer was an mmap, already given back: nothing for trim() to do.
    assert _run({"FASTSR_CPU_HEAP": "0"}) == ["before True", "applied False FASTSR_CPU_HEAP=0", "after True",
                                              "trim False False False"]


def test_an_allocator_setting_in_the_environment_is_respected():
    out = _run({"MALLOC_TOP_PAD_": "0"})
    assert out[1] == "applied False the environment sets the allocator: MALLOC_TOP_PAD_", out
    assert out[2] == "after True"
