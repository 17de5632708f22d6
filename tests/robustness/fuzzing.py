"""Helpers shared by the robustness tests (imported by name, like tests/parity.py)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from hypothesis import strategies as st

# 1 to 4 bit flips, each at a relative position in the file and a bit index.
flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=4)


def flip_bits(data: bytes, where: list[tuple[float, int]]) -> bytes:
    out = bytearray(data)
    for position, bit in where:
        out[int(position * len(out))] ^= 1 << bit
    return bytes(out)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


@contextmanager
def quick(seconds: float):
    """The body must finish in time (a real hang is stopped by conftest's guard)."""
    start = time.perf_counter()
    yield
    assert time.perf_counter() - start < seconds, f"took over {seconds} s"
