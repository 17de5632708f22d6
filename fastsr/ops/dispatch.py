"""Backend names and the rules for choosing one (filled in by the fused path)."""
from __future__ import annotations

BACKENDS = ("triton", "cpu", "reference")


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name
