"""The trained model and what goes with it: building the network from a config, its scales,
the weights' EMA, a weights checksum, and the RNG state a checkpoint carries.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
import random
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fastsr.train.config import TrainConfig


def build_model(cfg: TrainConfig) -> nn.Module:
    """The network `cfg` describes, freshly initialized (the global torch RNG is used)."""
    import inspect

    from fastsr.models.edsr import EDSR, MDSR, PRESETS

    factory = PRESETS[cfg.model]
    takes_scale = "scale" in inspect.signature(factory).parameters
    fused_kw = dict(fused=cfg.fused, backend=cfg.backend or None,
                    dtype=cfg.amp_dtype if (cfg.fused or cfg.backend) else None,
                    recompute={"auto": None, "true": True, "false": False}[cfg.recompute])
    overrides = (cfg.n_resblocks, cfg.n_feats, cfg.res_scale if takes_scale else 1.0)
    if not any(overrides):
        return factory(cfg.scale, **fused_kw) if takes_scale else factory(**fused_kw)
    if all(overrides):
        blocks, feats, res_scale = overrides
        scales = None
    else:
        with torch.device("meta"):  # the preset's sizes without allocating it
            ref = factory(cfg.scale) if takes_scale else factory()
        blocks, feats = cfg.n_resblocks or ref.n_resblocks, cfg.n_feats or ref.n_feats
        res_scale, scales = cfg.res_scale or ref.res_scale, getattr(ref, "scales", None)
    if not takes_scale:
        return MDSR(scales or (2, 3, 4), blocks, feats, **fused_kw)
    return EDSR(cfg.scale, blocks, feats, res_scale, **fused_kw)


def model_scales(model: nn.Module) -> tuple[int, ...]:
    return tuple(model.scales) if hasattr(model, "scales") else (model.scale,)


class EMA:
    """Exponential moving average of a model's weights, in a separate copy used for validation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)


class TrainState:
    """What an optimizer step changes and a checkpoint holds: the model, Adam, the StepLR
    schedule, fp16's GradScaler and the weights' EMA (the paper's recipe, from `cfg`)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, device: torch.device):
        self.cfg, self.model = cfg, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                          weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation scores and the run saves: the EMA when there is one."""
        return self.ema.model if self.ema is not None else self.model

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def update(self, loss: torch.Tensor) -> None:
        """One optimizer step from `loss` (backward, optional clipping, Adam, EMA, schedule)."""
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self.advance_schedule()

    def advance_schedule(self) -> None:
        """The lr schedule's step; also for a skipped update, so a resumed run stays exact."""
        with warnings.catch_warnings():
            # fp16: GradScaler skips steps whose gradients overflowed; the schedule still counts them.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's entries: model, optimizer, scheduler, scaler (None: fp16 off), ema (None: off)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`'s entries (an EMA started from the weights if none was saved)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"] if state.get("ema") is not None else self.model.state_dict())


def weights_checksum(model: nn.Module) -> str:
    """sha256 (16 hex digits) of every state_dict tensor's bytes: equal iff bitwise-equal weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        # reshape(-1) first: a channels-last (3, 3, 1, 1) tensor counts as contiguous with stride 3 last.
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
