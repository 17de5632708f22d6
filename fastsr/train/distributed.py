"""DDP under torchrun: the rank/world of this process and its device for a training config
(`fastsr.distributed` holds `Dist`, its collectives and the process group's start and end).
"""
from __future__ import annotations

import torch

from fastsr.distributed import Dist, from_env, rank_device, start
from fastsr.train.config import ConfigError, TrainConfig


def init_dist(cfg: TrainConfig) -> tuple[Dist, torch.device]:
    """This rank's Dist (process group started when WORLD_SIZE > 1) and device for cfg.device."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' = {cfg.device!r}: CUDA is not available here")
    d = from_env()
    device = rank_device(cfg.device, d)
    return start(d, device), device


__all__ = ["Dist", "init_dist"]
