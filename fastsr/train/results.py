"""What a training run reports: `StepInfo` (to the per-step callback) and `TrainResult`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


@dataclass
class StepInfo:
    """Passed to `on_step` after every optimizer step (gradients are still in place)."""

    step: int
    loss: torch.Tensor  # 0-d, on the training device
    lr: float
    scale: int
    model: nn.Module    # the bare model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    skipped: bool = False  # nan_policy = skip dropped this step's update (its loss was not finite)


@dataclass
class TrainResult:
    """What a `train` call did. steps_per_s: optimizer steps per second of training
    (data + forward + backward + update), first step and validation/checkpoint time excluded;
    steps_per_s_overall: the same steps over wall-clock time, validation and checkpoints included."""

    step: int
    steps_run: int
    interrupted: bool
    out_dir: Path
    last_checkpoint: Path | None
    best_weights: Path | None
    final_weights: Path | None
    final_loss: float
    best_psnr: float | None
    best_step: int | None
    val: dict[str, float]
    steps_per_s: float
    steps_per_s_overall: float
    train_seconds: float
    wall_seconds: float
    losses: list[float]
    weights_checksum: str
    rank_checksums: list[str]
    world_size: int
    skipped_steps: int = 0  # updates dropped by nan_policy = skip, over the whole run

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("out_dir", "last_checkpoint", "best_weights", "final_weights"):
            d[k] = None if d[k] is None else str(d[k])
        d.pop("losses")
        # Strict JSON: no NaN / Infinity tokens (final_loss of a run that made no step).
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}
