"""DDP under torchrun: the rank/world of this process, and the collectives the loop needs
(barrier, gather, any).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from fastsr.errors import FastSRError
from fastsr.train.config import ConfigError, TrainConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def any(self, flag: bool, device: torch.device) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)


def init_dist(cfg: TrainConfig) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device' = {cfg.device!r}: CUDA is not available here")
        device = torch.device(f"cuda:{local}") if want == "cuda" and world > 1 else torch.device(want)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    d = Dist(rank, world, local, False)
    if world > 1:
        if not torch.distributed.is_available():
            raise FastSRError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if not torch.distributed.is_initialized():
            # torch.distributed.nn.functional binds `group.WORLD` as a default argument
            # when first imported, and torch._dynamo imports it (Adam and DDP import
            # dynamo). Imported after the group exists, it holds the group forever:
            # destroy_process_group can then not join gloo's worker threads, and one
            # still releasing a collective's tensors during interpreter shutdown aborts
            # the process (SIGABRT after a successful run). Imported first, it holds None.
            importlib.import_module("torch.distributed.nn.functional")

            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        d.active = True
    return d, device
