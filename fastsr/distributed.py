"""Several processes under torchrun: this process's rank and world, the collectives the
command line and training need (barrier, gather, broadcast, any), and starting and ending
the process group so that it shuts down cleanly.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them (a plain run) everything here
is a no-op for a world of one.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from fastsr.errors import FastSRError


@dataclass
class Dist:
    """This process's place in the run; `active` once the process group is up."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints summaries and writes shared files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable objects)."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is True on any."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)


def from_env() -> Dist:
    """Rank, world size and local rank from torchrun's environment (a world of one without it)."""
    return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(want: str, dist: Dist) -> torch.device:
    """The device for this rank: 'auto' or 'cuda' under several ranks is cuda:LOCAL_RANK;
    'cpu' and an explicit 'cuda:N' are kept. Sets the current CUDA device."""
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if not want.startswith("cuda"):
        return torch.device("cpu")
    device = torch.device(f"cuda:{dist.local_rank}") if want == "cuda" and dist.world > 1 else torch.device(want)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def start(dist: Dist, device: torch.device) -> Dist:
    """Start the process group (nccl on CUDA, gloo on the CPU) when the world has several ranks."""
    if dist.world <= 1:
        return dist
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
    dist.active = True
    return dist


def stop(dist: Dist) -> None:
    """End the process group: gloo's worker threads are joined now, not at interpreter
    shutdown. Free whatever holds collective tensors (DDP) first."""
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    dist.active = False


__all__ = ["Dist", "from_env", "rank_device", "start", "stop"]
