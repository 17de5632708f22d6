"""Trained weights shipped inside the package (if any).

The files, when present, are `edsr_baseline_x{2,3,4}.safetensors` in this folder, as
written by `fastsr.checkpoints.save_safetensors`. Nothing here downloads anything: when a
file is absent the command line says so and falls back to bicubic, never to random weights.
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent


def default_weights(scale: int) -> Path | None:
    """Path of the shipped EDSR-baseline weights for `scale`, or None when not shipped."""
    path = WEIGHTS_DIR / f"edsr_baseline_x{int(scale)}.safetensors"
    return path if path.is_file() else None
