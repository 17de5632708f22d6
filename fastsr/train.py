"""The paper's training recipe (Lim et al. 2017) with the fused ops on.

L1 loss; Adam(0.9, 0.999, 1e-8); lr 1e-4 halved every 2e5 updates (StepLR); batch 16 of
48x48 LR patches with flips and 90-degree rotations; x3/x4 EDSR start from x2 weights
(`init_from`); MDSR draws one scale per batch. Around it: AMP, EMA, gradient clipping,
validation under the papers' protocol with the best weights kept, CSV/JSON logs and a
plot, checkpoints that never lose work and resume bitwise-exactly on the CPU, Ctrl-C that
saves, and DDP under torchrun.

Faults: every file is written atomically (a kill at any moment leaves the previous last.pt;
a resume drops the log rows past it and removes the kill's temp files); a full disk stops
the run with a one-line error naming the file, the previous last.pt intact; a NaN/inf loss
is checked every step (agreed across DDP ranks) and handled by `nan_policy`: "stop" (the
default) fails naming the step, "skip" drops that update and counts it (`skipped_steps` in
the logs, checkpoint and result.json) until `nan_max_consecutive` in a row.

    python -m fastsr.train --config configs/edsr_baseline_x2.toml [--set key=value ...] [--resume]
    torchrun --nproc-per-node 2 -m fastsr.train --config ... (batch_size is the global batch)

AMP: with fused=True, `amp` sets the fused model's compute dtype (what torch.autocast
around it would choose too, with the image kept fp32 in and out); with fused=False it is
torch.autocast. fp16 adds a GradScaler.
Weights, optimizer state and the loss stay float32 either way.

Run folder (`out_dir`): config.toml (the resolved config), last.pt (the resumable state),
best.safetensors (best validation PSNR), final.safetensors, log.csv + log.jsonl, curves.png,
result.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import difflib
import errno
import gc
import hashlib
import importlib
import io
import json
import math
import os
import random
import re
import reprlib
import signal
import sys
import threading
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsr.errors import FastSRError

__all__ = ["ConfigError", "StepInfo", "TrainConfig", "TrainResult", "add_arguments", "load_config", "run_cli", "train"]

CHECKPOINT_FORMAT = "fastsr-train-v1"


class ConfigError(FastSRError):
    """A training config is invalid: unknown key, wrong type, out-of-range value."""


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def _key(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every training setting; the TOML file and `--set key=value` use these names.

    Empty strings mean "not set" (TOML has no null). Paths are relative to the directory
    the run is launched from.
    """

    name: str = _key("", "run name (default: <model>_x<scale>, or <model> for MDSR)")
    model: str = _key("edsr_baseline", "preset: edsr_baseline, edsr, mdsr_baseline, mdsr")
    scale: int = _key(2, "EDSR scale (2, 3, 4); MDSR trains all of its scales")
    n_resblocks: int = _key(0, "override the preset's residual blocks (0: preset)")
    n_feats: int = _key(0, "override the preset's feature count (0: preset)")
    res_scale: float = _key(0.0, "override the preset's residual scaling (0: preset)")
    fused: bool = _key(True, "run the fused ops (they have autograd)")
    backend: str = _key("", "fused backend by name: triton, cpu, reference ('' : auto)")
    amp: str = _key("", "bf16, fp16 or '' (fp32); fused: the ops' compute dtype, eager: torch.autocast")
    recompute: str = _key("auto", "fused: recompute block conv1 and the upsampler in backward (less memory, "
                                  "more work): true, false, auto (false on CPU, true on GPUs)")
    train_dir: str = _key("data/train_photos", "HR folder(s), searched recursively (a list, or comma-separated), "
                                               "or a DIV2K root (DIV2K_train_HR + DIV2K_train_LR_bicubic)")
    train_lr_dir: str = _key("", "LR folder paired by name (X<s> subfolders for several scales); '': made on the fly")
    cache_dir: str = _key("", "folder for decoded-image .npy files ('': decode every run)")
    loader: str = _key("device", "device (whole dataset on the device, batched gather) or dataloader (workers)")
    num_workers: int = _key(2, "DataLoader workers (loader = dataloader)")
    patch_size: int = _key(48, "LR patch size (HR patch = patch_size * scale)")
    batch_size: int = _key(16, "global batch size (split evenly across DDP ranks)")
    steps: int = _key(300_000, "total optimizer steps")
    lr: float = _key(1e-4, "Adam learning rate")
    lr_step: int = _key(200_000, "StepLR period in steps")
    lr_gamma: float = _key(0.5, "StepLR factor")
    beta1: float = _key(0.9, "Adam beta1")
    beta2: float = _key(0.999, "Adam beta2")
    eps: float = _key(1e-8, "Adam epsilon")
    weight_decay: float = _key(0.0, "Adam weight decay")
    grad_clip: float = _key(0.0, "clip the gradient norm to this (0: off)")
    nan_policy: str = _key("stop", "a step whose loss is NaN/inf on any rank: stop (error naming the step) "
                                   "or skip (no update, counted in skipped_steps)")
    nan_max_consecutive: int = _key(10, "nan_policy = skip: stop after this many non-finite steps in a row")
    ema_decay: float = _key(0.0, "EMA of the weights with this decay, used for validation and saved weights (0: off)")
    init_from: str = _key("", "weights to start from; x2 weights into an x3/x4 model keep all but the upsampler")
    val_dir: str = _key("../shared/data/Set5", "validation HR folder ('': no validation)")
    val_images: str = _key("", "validate on only these images of val_dir (names or stems, a list or "
                               "comma-separated), held out of the training data ('': all of val_dir)")
    val_protocol: str = _key("paper", "validation scoring (fastsr.evaluation): paper (Y, shave = scale), official, "
                                      "div2k (RGB, shave = scale + 6, as the official DIV2K training logs)")
    val_every: int = _key(1000, "validate every N steps (0: only at the end)")
    log_every: int = _key(100, "log loss / lr / speed every N steps")
    ckpt_every: int = _key(1000, "write last.pt every N steps (and at the end, and on Ctrl-C)")
    out_dir: str = _key("", "run folder (default: out/<name>)")
    seed: int = _key(0, "seed for the initialization and the patch sampling")
    device: str = _key("auto", "auto, cpu, cuda, cuda:N")
    threads: int = _key(0, "torch CPU threads (0: torch's default)")
    deterministic: bool = _key(False, "deterministic CUDA kernels (slower); the CPU path is deterministic anyway")
    tensorboard: bool = _key(False, "also log to TensorBoard (needs the tensorboard package)")
    plot: bool = _key(True, "write curves.png (loss and validation PSNR; needs matplotlib)")

    # Keys that define the network: a resumed run must keep them.
    ARCH_KEYS: typing.ClassVar[tuple[str, ...]] = ("model", "scale", "n_resblocks", "n_feats", "res_scale")
    # Keys that may change on resume without touching the training trajectory.
    FREE_KEYS: typing.ClassVar[tuple[str, ...]] = (
        "name", "steps", "val_dir", "val_protocol", "val_every", "log_every", "ckpt_every", "out_dir", "device", "threads",
        "tensorboard", "plot", "cache_dir", "num_workers", "init_from", "nan_policy", "nan_max_consecutive",
        "recompute",
    )

    @property
    def is_mdsr(self) -> bool:
        return self.model.startswith("mdsr")

    @property
    def run_name(self) -> str:
        return self.name or (self.model if self.is_mdsr else f"{self.model}_x{self.scale}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or os.path.join("out", self.run_name))

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    def validate(self) -> "TrainConfig":
        """Check every value; returns self. Raises ConfigError naming the key."""
        from fastsr.models.edsr import PRESETS, SUPPORTED_SCALES

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"config key {key!r} = {_short_repr(getattr(self, key))}: {why}")

        for f in dataclasses.fields(self):  # types first: TrainConfig(...) from Python skips load_config
            value = _coerce(f.name, getattr(self, f.name), "the config")
            setattr(self, f.name, value)
            if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
                raise bad(f.name, "out of range (a 64-bit integer)")
            if isinstance(value, str) and "\0" in value:
                raise bad(f.name, "contains a NUL character")
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad(f.name, "is not valid UTF-8 text") from None
        if self.model not in PRESETS:
            raise bad("model", f"expected one of {', '.join(PRESETS)}")
        if self.scale not in SUPPORTED_SCALES:
            raise bad("scale", f"expected one of {SUPPORTED_SCALES}")
        self.amp = "" if self.amp.lower() in ("", "none", "fp32", "float32") else self.amp.lower()
        if self.amp not in ("", "bf16", "fp16"):
            raise bad("amp", "expected bf16, fp16 or '' (fp32)")
        if self.backend not in ("", "triton", "cpu", "reference"):
            raise bad("backend", "expected triton, cpu, reference or '' (auto)")
        from fastsr.evaluation import PROTOCOLS

        if self.val_protocol not in PROTOCOLS:
            raise bad("val_protocol", f"expected one of {', '.join(PROTOCOLS)}")
        self.recompute = self.recompute.lower()
        if self.recompute not in ("auto", "true", "false"):
            raise bad("recompute", "expected auto, true or false")
        if self.loader not in ("device", "dataloader"):
            raise bad("loader", "expected device or dataloader")
        for key in ("patch_size", "batch_size", "steps", "lr_step", "log_every", "ckpt_every"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be positive")
        for key in ("n_resblocks", "n_feats", "num_workers", "val_every", "threads", "seed"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        for key in ("num_workers", "threads"):
            if getattr(self, key) > 1024:
                raise bad(key, "must be at most 1024")
        for key in ("lr", "lr_gamma", "eps"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                raise bad(key, "must be a positive number")
        if self.lr > 1e10:  # Adam's step size lr / (1 - beta1**t) must fit a float32
            raise bad("lr", "must be at most 1e10")
        for key in ("beta1", "beta2", "ema_decay"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(key, "must be in [0, 1)")
        for key in ("res_scale", "weight_decay", "grad_clip"):
            if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
                raise bad(key, "must be >= 0")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise bad("device", "expected auto, cpu, cuda or cuda:N")
        if self.nan_policy not in ("stop", "skip"):
            raise bad("nan_policy", "expected stop or skip")
        if self.nan_max_consecutive <= 0:
            raise bad("nan_max_consecutive", "must be positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML text that `load_config` reads back unchanged."""
        lines = []
        for f in dataclasses.fields(self):
            lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    # A TOML basic string: escape quotes, backslashes and the control characters TOML forbids
    # raw (json.dumps is not enough: it writes DEL raw and non-BMP characters as surrogate pairs).
    return '"' + "".join(f"\\{c}" if c in '"\\' else f"\\u{ord(c):04X}" if c < " " or c == "\x7f" else c
                         for c in str(v)) + '"'


def _short_repr(value: Any) -> str:
    """repr for a one-line message: long values cut to ~80 characters."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict = 80, 80, 6, 4
    return r.repr(value)


_FIELD_TYPES: dict[str, type] = {}


def _field_types() -> dict[str, type]:
    if not _FIELD_TYPES:
        hints = typing.get_type_hints(TrainConfig)
        _FIELD_TYPES.update({f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)})
    return _FIELD_TYPES


def _unknown_key(key: str, where: str) -> ConfigError:
    valid = list(_field_types())
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(valid)}")


def _coerce(key: str, value: Any, where: str) -> Any:
    kind = _field_types()[key]
    got = f"{type(value).__name__} {_short_repr(value)}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r} in {where}: expected true or false, got {got}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # TOML 2e5 is a float
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} in {where}: expected an integer, got {got}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"config key {key!r} in {where}: {got} is out of range for a number") from None
        raise ConfigError(f"config key {key!r} in {where}: expected a number, got {got}")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and key in _LIST_KEYS and all(isinstance(v, str) and "," not in v for v in value):
        return ", ".join(value)  # a TOML array of names or folders: kept in the comma form
    raise ConfigError(f"config key {key!r} in {where}: expected a string, got {got}")


_LIST_KEYS = ("train_dir", "val_images")  # string keys that also take a TOML array of strings


def _toml_module():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("reading TOML configs needs Python 3.11+ "
                              "or the tomli package (pip install tomli)") from None
    return tomllib


def _parse_set(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value); value read as a TOML value, else kept as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {_short_repr(item)}")
    key, text = (s.strip() for s in item.split("=", 1))
    if key not in _field_types():
        raise _unknown_key(key, "--set")
    if _field_types()[key] is str:
        # Paths and names need no TOML quoting on the command line.
        return key, text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text
    try:
        doc = _toml_module().loads(f"v = {text}")
    except Exception:
        return key, text
    # 'steps=5\nlr=1' parses as two keys: keep the text whole (a type error) rather than drop a part.
    return key, doc["v"] if list(doc) == ["v"] else text


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                values: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults < TOML file `path` < `overrides` ('key=value') < `values`.

    Raises ConfigError for an unreadable file, an unknown key (listing the valid ones), or a
    value of the wrong type or range.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        toml = _toml_module()
        try:
            data = toml.loads(p.read_bytes().decode("utf-8"))
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a TOML file (not UTF-8 text: byte {e.object[e.start]:#04x} "
                              f"at offset {e.start})") from None
        except toml.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
        except RecursionError:
            raise ConfigError(f"{p}: invalid TOML (nested too deeply)") from None
        for key, value in data.items():
            if key not in _field_types():
                raise _unknown_key(key, str(p))
            merged[key] = _coerce(key, value, str(p))
    for item in overrides:
        key, value = _parse_set(item)
        merged[key] = _coerce(key, value, "--set")
    for key, value in (values or {}).items():
        if key not in _field_types():
            raise _unknown_key(key, "the command line")
        merged[key] = _coerce(key, value, "the command line")
    return TrainConfig(**merged).validate()


# ---------------------------------------------------------------------------------------
# Results and callbacks
# ---------------------------------------------------------------------------------------


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
    (data + forward + backward + update), first step and validation/checkpoint time excluded."""

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


# ---------------------------------------------------------------------------------------
# Distributed setup
# ---------------------------------------------------------------------------------------


@dataclass
class _Dist:
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


def _init_dist(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
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
    d = _Dist(rank, world, local, False)
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


# ---------------------------------------------------------------------------------------
# Model, EMA, validation
# ---------------------------------------------------------------------------------------


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


class _EMA:
    """Exponential moving average of a model's weights, in a separate copy used for validation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)


class Validator:
    """The evaluation protocol (fastsr.evaluation, `protocol`) on validation HR images, with
    the HR cropped and the LR made once per scale. Means over the images."""

    def __init__(self, folder: str | os.PathLike, scales: Sequence[int], device: torch.device,
                 paths: Sequence[Path] | None = None, protocol: str = "paper"):
        """folder: the validation HR folder; paths: only these images of it (None: all)."""
        from fastsr.data import DatasetError
        from fastsr.evaluation import get_protocol, make_lr, prepare_hr
        from fastsr.imageio import list_images, read_image

        self.folder = Path(folder)
        self.protocol = get_protocol(protocol)
        if not self.folder.is_dir():
            raise DatasetError(f"{self.folder}: validation folder does not exist")
        paths = list(paths) if paths is not None else list_images([self.folder])
        if not paths:
            raise DatasetError(f"{self.folder}: no image files in the validation folder")
        self.items: dict[int, list[tuple[str, bool, torch.Tensor, torch.Tensor]]] = {s: [] for s in scales}
        for path in paths:
            image = read_image(path)
            for s in scales:
                try:
                    hr = prepare_hr(image.rgb, s, self.protocol, str(path))
                except FastSRError as e:
                    raise DatasetError(str(e)) from None
                self.items[s].append((path.name, image.gray, make_lr(hr, s)[None].float().to(device), hr))

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict[str, float]:
        """{'psnr_x2': .., 'ssim_x2': .., ..., 'psnr': mean over scales, 'ssim': ...}."""
        from fastsr.evaluation import score
        from fastsr.metrics import quantize

        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            for s, items in self.items.items():
                ps, ss = [], []
                for _, gray, lr, hr in items:
                    sr = quantize(model(lr, scale=s).float())[0].cpu()
                    p, q = score(sr, hr, s, self.protocol, gray)
                    ps.append(p)
                    ss.append(q)
                out[f"psnr_x{s}"], out[f"ssim_x{s}"] = sum(ps) / len(ps), sum(ss) / len(ss)
        finally:
            model.train(was_training)
        scales = list(self.items)
        out["psnr"] = sum(out[f"psnr_x{s}"] for s in scales) / len(scales)
        out["ssim"] = sum(out[f"ssim_x{s}"] for s in scales) / len(scales)
        return out


def weights_checksum(model: nn.Module) -> str:
    """sha256 (16 hex digits) of every state_dict tensor's bytes: equal iff bitwise-equal weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        # reshape(-1) first: a channels-last (3, 3, 1, 1) tensor counts as contiguous with stride 3 last.
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# RNG state (as tensors and plain types: loadable with torch.load(weights_only=True))
# ---------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
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


# ---------------------------------------------------------------------------------------
# Writing run files
# ---------------------------------------------------------------------------------------

# Every file a run writes atomically (their killed writes' temp files are cleared on start).
_RUN_FILES = ("last.pt", "config.toml", "log.csv", "log.jsonl", "curves.png", "best.safetensors",
              "final.safetensors", "result.json")


class _WriteError(FastSRError):
    """A run file could not be written (full disk, permissions); the message names it."""


@contextlib.contextmanager
def _writing(path: Path, what: str):
    """Turn a failed write inside the block into a one-line _WriteError naming `what` and `path`.

    OSError, and the errors of libraries that write from native code and only print the OS
    error (safetensors: "... No space left on device (os error 28)").
    """
    try:
        yield
    except Exception as e:
        code = e.errno if isinstance(e, OSError) else None
        found = None if isinstance(e, OSError) else re.search(r"\(os error (\d+)\)", str(e))
        if found:
            code = int(found.group(1))
        elif not isinstance(e, OSError):
            raise
        why = "the disk is full" if code in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
        detail = os.strerror(code) if code is not None else str(e)
        raise _WriteError(f"{why}: writing {what} {path} failed ({detail})") from None


def _write_text(path: Path, text: str, what: str) -> None:
    from fastsr.atomic import atomic_write

    with _writing(path, what):
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


# ---------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------

_CSV_COLUMNS = ("step", "loss", "lr", "steps_per_s", "elapsed_s", "val_psnr", "val_ssim")


class _RunLog:
    """log.csv (fixed columns) and log.jsonl (every field) appended per interval; curves.png."""

    def __init__(self, run_dir: Path, resume_step: int | None, plot: bool, tensorboard: bool):
        self.csv_path, self.json_path = run_dir / "log.csv", run_dir / "log.jsonl"
        self.plot_path = run_dir / "curves.png"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.json_path.exists():
            # Rows past the checkpoint are about to be redone: drop them from both logs.
            for line in self.json_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if row.get("step", 0) <= resume_step:
                        self.rows.append(row)
        self._rewrite()
        self.plot = plot
        self.plot_note: str | None = None
        if plot:
            try:
                importlib.import_module("matplotlib")  # a probe: draw() imports what it uses
            except ImportError:
                self.plot, self.plot_note = False, "matplotlib is not installed: no curves.png (pip install matplotlib)"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard = true but the tensorboard package is not installed "
                                  "(pip install tensorboard, or set tensorboard = false)") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)

    def _rewrite(self) -> None:
        # Atomic: a kill while a resume trims the logs must not lose the rows before the checkpoint.
        text = io.StringIO()
        w = csv.DictWriter(text, _CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(self._csv_row(r) for r in self.rows)
        _write_text(self.csv_path, text.getvalue(), "the log")
        _write_text(self.json_path, "".join(json.dumps(r) + "\n" for r in self.rows), "the log")

    @staticmethod
    def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
        return {k: row.get(k, "") for k in _CSV_COLUMNS}

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        # Appended (a kill can cut the last line: the resume that follows rewrites both files).
        with _writing(self.csv_path, "the log"), open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, _CSV_COLUMNS, extrasaction="ignore").writerow(self._csv_row(row))
        with _writing(self.json_path, "the log"), open(self.json_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def draw(self) -> None:
        if not self.plot:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # Figure + Agg canvas directly: no pyplot, so no global backend switch in the caller.
        fig = Figure(figsize=(10, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax_loss, ax_val = fig.subplots(1, 2)
        loss = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        if loss:
            ax_loss.plot(*zip(*loss), lw=1)
        ax_loss.set(xlabel="step", ylabel="L1 loss (0..255)", title="training loss")
        ax_loss.grid(alpha=0.3)
        val_keys = sorted({k for r in self.rows for k in r if k.startswith("val_psnr_x")})
        for k in val_keys:
            pts = [(r["step"], r[k]) for r in self.rows if k in r]
            ax_val.plot(*zip(*pts), marker="o", ms=3, label=k.replace("val_psnr_", ""))
        ax_val.set(xlabel="step", ylabel="PSNR Y (dB)", title="validation")
        ax_val.grid(alpha=0.3)
        if val_keys:
            ax_val.legend()
        fig.tight_layout()
        from fastsr.atomic import atomic_write

        with _writing(self.plot_path, "the plot"):
            atomic_write(self.plot_path, lambda tmp: fig.savefig(tmp, format="png"))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------


class _StopRequest:
    """SIGINT / SIGTERM set a flag checked between steps; a second Ctrl-C aborts at once."""

    def __init__(self, enabled: bool):
        self.requested = False
        self._old: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nfastsr train: {signal.Signals(signum).name} received: saving a checkpoint after this step "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def _save_last(path: Path, state: dict[str, Any]) -> None:
    from fastsr.atomic import atomic_write

    def write(tmp: str) -> None:
        # Through a Python file: a failed write raises OSError(ENOSPC, ...); torch.save(state,
        # a_path) reports the same as "RuntimeError: unexpected pos".
        with open(tmp, "wb") as f:
            torch.save(state, f)

    with _writing(path, "the checkpoint"):
        atomic_write(path, write)


def load_train_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a last.pt (weights_only=True). Raises CheckpointError if it is not one."""
    from fastsr.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a fastsr training checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig, path: Path, say) -> None:
    arch = [k for k in TrainConfig.ARCH_KEYS if saved.get(k) != getattr(cfg, k)]
    if arch:
        diffs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in arch)
        raise ConfigError(f"{path} was trained with a different network ({diffs}); resume with the same settings")
    changed = [k for k, v in saved.items() if k not in TrainConfig.FREE_KEYS and hasattr(cfg, k)
               and getattr(cfg, k) != v]
    if changed:
        say("resuming with changed settings (the run will differ from an uninterrupted one): "
            + ", ".join(f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed))


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """One training run: built by __init__, advanced by `step()`, closed by `finish()`.

    Holds the model, optimizer, scheduler, scaler, EMA, batch source and counters, and
    turns them into (and back from) the checkpoint dictionary.
    """

    def __init__(self, cfg: TrainConfig, dist: _Dist, device: torch.device, resume: bool | str | os.PathLike):
        from fastsr.checkpoints import load_weights, model_arch_tag
        from fastsr.data import DeviceSampler, LoaderSource, SRData, select_images
        from fastsr.models.edsr import MDSR, count_parameters

        self.cfg, self.dist, self.device = cfg, dist, device
        self.run_dir = cfg.run_dir
        self.last_path = self.run_dir / "last.pt"
        checkpoint, ckpt_path = None, None
        if resume:
            ckpt_path = self.last_path if resume is True else Path(resume)
            checkpoint = load_train_checkpoint(ckpt_path)
            _check_resume_config(checkpoint["config"], cfg, ckpt_path, self.say)
        elif dist.main and self.last_path.exists():
            raise ConfigError(f"{self.run_dir} already holds a run (last.pt): pass --resume to continue it, "
                              "or choose another out_dir")
        # The step last.pt holds (None: nothing saved yet), for the messages of a failed run.
        self.saved_step: int | None = int(checkpoint["step"]) if checkpoint is not None else None
        self.skipped_steps = 0  # updates dropped by nan_policy = skip
        self.nan_streak = 0     # ... of them in a row up to the current step
        if dist.main:
            with self.noting_checkpoint():
                self._prepare_folder()
        # Initialization: the same seed on every rank (DDP also broadcasts rank 0's weights).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        self.scales = model_scales(model)
        if cfg.init_from and checkpoint is None:
            self.say(f"init_from {cfg.init_from}: {load_weights(model, cfg.init_from, partial_upsampler=True)}")
        model.to(device)
        if not cfg.fused:
            # oneDNN (CPU) and cuDNN's tensor-core kernels both prefer channels-last; the
            # fused path converts its input itself.
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                          weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.ema = _EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # With fused=True, AMP is the fused model's compute dtype (build_model), set once
        # instead of autocast's per-call dtype checks; autocast wraps only the eager model.
        self.autocast = (torch.autocast(device.type, dtype=cfg.amp_dtype) if cfg.amp and not cfg.fused
                         else contextlib.nullcontext())

        # A named validation split is held out of the training images (same folders).
        val_paths = select_images(cfg.val_dir, cfg.val_images) if (cfg.val_dir and cfg.val_images) else None
        data = SRData.load(cfg.train_dir, self.scales, lr_dir=cfg.train_lr_dir or None,
                           cache_dir=cfg.cache_dir or None, patch_size=cfg.patch_size, progress=dist.main,
                           exclude=val_paths or ())
        self.say(f"data: {data.description}; {data.hr.nbytes / 2**20:.0f} MiB HR in memory")
        if data.skipped:
            self.say(f"warning: left out of training, smaller than the LR patch: {', '.join(data.skipped)}")
        per_rank = cfg.batch_size // dist.world
        kw = dict(seed=cfg.seed, rank=dist.rank, device=device)
        if cfg.loader == "device":
            self.source = DeviceSampler(data, per_rank, cfg.patch_size, **kw)
        else:
            self.source = LoaderSource(data, per_rank, cfg.patch_size, num_workers=cfg.num_workers, **kw)

        self.step_no = 0
        self.best_psnr: float | None = None
        self.best_step: int | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
            self.say(f"resumed {model_arch_tag(model)} at step {self.step_no} from {ckpt_path}")

        self.net: nn.Module = model
        if dist.active:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                # MDSR: the other scales' branches get no gradient in a step.
                find_unused_parameters=isinstance(model, MDSR),
            )
        self.validator = (Validator(cfg.val_dir, self.scales, device, val_paths, cfg.val_protocol)
                          if (cfg.val_dir and dist.main) else None)
        with self.noting_checkpoint():
            self.log = (_RunLog(self.run_dir, self.step_no if checkpoint is not None else None, cfg.plot,
                                cfg.tensorboard) if dist.main else None)
        if self.log is not None and self.log.plot_note:
            self.say(self.log.plot_note)
        compute = (f"fused ({cfg.backend or 'auto backend'}, {cfg.amp or 'fp32'} compute)" if cfg.fused
                   else f"eager ({'autocast ' + cfg.amp if cfg.amp else 'fp32'})")
        self.say(f"model {model_arch_tag(model)}: {count_parameters(model):,} parameters, {compute}, on {device}"
                 + (f", DDP over {dist.world} ranks ({per_rank} patches each)" if dist.active else "")
                 + f"; loader {cfg.loader}")

    def _prepare_folder(self) -> None:
        """Rank 0: the run folder, without the temp files of killed writes, with config.toml."""
        from fastsr.atomic import remove_stale_temps

        with _writing(self.run_dir, "the run folder"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # Temp files of writes a kill (SIGKILL, power cut) interrupted; never a checkpoint.
        # safetensors (>= 0.7) writes through its own .tmpXXXXXX beside the target.
        stale = [t for name in _RUN_FILES for t in remove_stale_temps(self.run_dir / name)]
        for t in self.run_dir.glob(".tmp??????"):
            if t.is_file():
                t.unlink()
                stale.append(t)
        if stale:
            self.say(f"removed {len(stale)} temp file(s) of an interrupted write: " + ", ".join(t.name for t in stale))
        toml = self.cfg.to_toml()
        _write_text(self.run_dir / "config.toml", toml, "the config")
        self.say(f"resolved config (saved in {self.run_dir / 'config.toml'}):\n" + toml.rstrip())

    def saved_note(self) -> str:
        """Where the run can continue from, for the message of a run that stops on an error."""
        if self.saved_step is None:
            return f"no checkpoint was saved yet ({self.last_path})"
        return f"{self.last_path} holds step {self.saved_step} (continue with --resume)"

    @contextlib.contextmanager
    def noting_checkpoint(self, stopped: bool = False):
        """Add where the run can continue from (and the step it stopped at) to a _WriteError."""
        try:
            yield
        except _WriteError as e:
            at = f"stopped at step {self.step_no}; " if stopped else ""
            raise _WriteError(f"{e}; {at}{self.saved_note()}") from None

    def say(self, msg: str) -> None:
        if self.dist.main:
            from tqdm import tqdm

            tqdm.write(f"fastsr train: {msg}", file=sys.stdout)  # keeps a live progress bar intact
            sys.stdout.flush()

    # -- checkpoint state --------------------------------------------------------------

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else self.model.state_dict())
        self.step_no = int(ckpt["step"])
        self.best_psnr, self.best_step = ckpt.get("best_psnr"), ckpt.get("best_step")
        self.skipped_steps, self.nan_streak = int(ckpt.get("skipped_steps", 0)), int(ckpt.get("nan_streak", 0))
        _set_rng_state(ckpt["rng"])
        samplers = ckpt["sampler"]
        kind = self.source.state_dict()["kind"]
        if len(samplers) == self.dist.world and samplers[self.dist.rank].get("kind") == kind:
            self.source.load_state_dict(samplers[self.dist.rank])
        else:
            self.say(f"the checkpoint's sampler state ({len(samplers)} rank(s), {samplers[0].get('kind')}) does not "
                     f"fit this run ({self.dist.world} rank(s), {kind}): patch sampling restarts from the seed")

    def save(self) -> None:
        """Write last.pt atomically (rank 0; every rank contributes its sampler state).

        A failed write (full disk) raises on every rank: the ranks agree on it instead of
        leaving the others waiting at the next collective.
        """
        samplers = self.dist.gather(self.source.state_dict())
        error: _WriteError | None = None
        if self.dist.main:
            try:
                _save_last(self.last_path, {
                    "format": CHECKPOINT_FORMAT, "step": self.step_no, "config": self.cfg.to_dict(),
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    "ema": self.ema.model.state_dict() if self.ema is not None else None,
                    "rng": _rng_state(), "sampler": samplers, "world_size": self.dist.world,
                    "best_psnr": self.best_psnr, "best_step": self.best_step,
                    "skipped_steps": self.skipped_steps, "nan_streak": self.nan_streak,
                })
            except _WriteError as e:
                error = e
        if self.dist.any(error is not None, self.device):  # also the barrier
            raise error or _WriteError(f"rank 0 failed to write {self.last_path}")
        self.saved_step = self.step_no

    # -- one optimizer step ------------------------------------------------------------

    def step(self) -> tuple[torch.Tensor, int, bool]:
        """Draw a batch, update the weights once; returns (detached loss, scale drawn, skipped).

        A loss that is not finite on any rank skips the update on every rank (no backward,
        no optimizer step, no EMA update); the step still counts, for the counter, the lr
        schedule and the data stream, so a resumed run stays exact. `_loop` applies nan_policy.
        """
        batch = self.source.next()
        self.optimizer.zero_grad(set_to_none=True)  # None, not 0: Adam skips unused MDSR branches
        with self.autocast:
            sr = self.net(batch.lr, scale=batch.scale)
        loss = F.l1_loss(sr.float(), batch.hr)
        # One host sync per step (fp16's GradScaler makes one anyway); under DDP one tiny
        # all-reduce, so the ranks agree before any of them starts the backward's collectives.
        skipped = self.dist.any(not bool(torch.isfinite(loss)), self.device)
        self.nan_streak = self.nan_streak + 1 if skipped else 0
        if skipped:
            self.skipped_steps += 1
            self._advance_schedule()
            return loss.detach(), batch.scale, True
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self._advance_schedule()
        return loss.detach(), batch.scale, False

    def _advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # fp16: GradScaler skips steps whose gradients overflowed; the schedule still counts them.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.step_no += 1

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- validation --------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Rank 0: the papers' protocol on val_dir; keeps best.safetensors."""
        from fastsr.checkpoints import save_safetensors

        target = self.ema.model if self.ema is not None else self.model
        metrics = self.validator.run(target)
        if self.best_psnr is None or metrics["psnr"] > self.best_psnr:
            self.best_psnr, self.best_step = metrics["psnr"], self.step_no
            best = self.run_dir / "best.safetensors"
            with _writing(best, "the best weights"):
                save_safetensors(target, best, extra_metadata={
                    "step": str(self.step_no), "val_psnr": f"{metrics['psnr']:.4f}",
                    "val_set": str(self.cfg.val_dir), "ema": str(self.ema is not None)})
        per_scale = ", ".join(f"x{s} {metrics[f'psnr_x{s}']:.3f} dB / {metrics[f'ssim_x{s}']:.4f}" for s in self.scales)
        self.say(f"step {self.step_no}: validation on {self.cfg.val_dir}: {per_scale} "
                 f"(best {self.best_psnr:.3f} dB at step {self.best_step})")
        return metrics


def _missing_folder_hint(folder: Path, key: str) -> str:
    parts = folder.as_posix()
    if "shared/data" in parts:
        return ("the shipped configs read the 291-image set (T91 + BSD200) from ../shared/data beside this "
                "repository; point train_dir / val_dir at your own HR images, "
                "e.g. --set train_dir=DIR --set val_dir=DIR --set val_images=''")
    if folder.name == "train_photos":
        return "python scripts/make_train_photos.py makes it (public-domain photos scikit-image ships)"
    return f"point {key} at a folder of images (--set {key}=DIR)"


def check_data_folders(cfg: TrainConfig) -> None:
    """Fail before anything is written when a data folder of `cfg` is missing, saying how
    to make it or point elsewhere (DatasetError)."""
    from fastsr.data import DatasetError, split_folders

    folders = [("training", "train_dir", f) for f in split_folders(cfg.train_dir)]
    folders += [("LR", "train_lr_dir", Path(cfg.train_lr_dir))] if cfg.train_lr_dir else []
    folders += [("validation", "val_dir", Path(cfg.val_dir))] if cfg.val_dir else []
    for what, key, folder in folders:
        if not folder.is_dir():
            why = "does not exist" if not folder.exists() else "is not a folder"
            raise DatasetError(f"{folder}: {what} folder {why}; {_missing_folder_hint(folder, key)}")


def train(config: TrainConfig, *, resume: bool | str | os.PathLike = False,
          on_step: Callable[[StepInfo], None] | None = None, handle_signals: bool = True) -> TrainResult:
    """Train with `config`; returns a TrainResult (also written to <out_dir>/result.json).

    resume: False (fresh run; refuses an out_dir that already holds last.pt), True (continue
    <out_dir>/last.pt) or a path to a last.pt. on_step(StepInfo) runs after every step; a
    KeyboardInterrupt from it (or Ctrl-C / SIGTERM) saves last.pt and returns with
    `interrupted=True`. Under torchrun (WORLD_SIZE > 1) this is one rank of a DDP run.
    """
    cfg = dataclasses.replace(config).validate()
    check_data_folders(cfg)
    wall_start = time.perf_counter()
    dist, device = _init_dist(cfg)
    threads_before = torch.get_num_threads()
    stop = run = None
    try:
        if cfg.batch_size % dist.world:
            raise ConfigError(f"batch_size {cfg.batch_size} does not split evenly across {dist.world} ranks")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch sizes: autotuning pays off
        run = _Run(cfg, dist, device, resume)
        stop = _StopRequest(handle_signals)
        with run.noting_checkpoint(stopped=True):
            return _loop(run, stop, on_step, wall_start)
    finally:
        if stop is not None:
            stop.restore()
        torch.set_num_threads(threads_before)
        if dist.active and torch.distributed.is_initialized():
            if sys.exc_info()[0] is None:
                # Every rank done before any tears gloo's connections down. After an
                # error, no barrier: the peers may be gone.
                torch.distributed.barrier()
            # The group's C++ object, and with it gloo's worker threads, goes with its
            # last reference; DDP's reducer holds one, inside reference cycles only the
            # garbage collector frees. Freed here, destroy_process_group joins the
            # threads now instead of leaving them to interpreter shutdown (see _init_dist).
            run = None
            gc.collect()
            torch.distributed.destroy_process_group()


def _loop(run: _Run, stop: _StopRequest, on_step: Callable[[StepInfo], None] | None,
          wall_start: float) -> TrainResult:
    """Step until cfg.steps or a stop request; log, validate and checkpoint on the way."""
    from tqdm import tqdm

    cfg, dist, device = run.cfg, run.dist, run.device
    start_step = run.step_no
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step",
               disable=None if dist.main else True, dynamic_ncols=True, file=sys.stderr)
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses not yet copied to the host (one sync per log interval)
    interrupted = in_update = False
    excluded = 0.0                    # seconds spent validating / logging / checkpointing
    t_first: float | None = None
    t_log, step_log, excl_log = time.perf_counter(), start_step, 0.0
    last_val: dict[str, float] = {}
    mean_loss = float("nan")
    check_every = 10 if dist.active else 1  # agreeing on a stop is a collective under DDP

    def flush() -> float:
        """Mean loss of the steps since the last flush, skipped (non-finite) ones left out."""
        nonlocal losses
        values = torch.stack(pending).float().cpu().tolist()
        pending.clear()
        losses += values
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else float("nan")

    try:
        while run.step_no < cfg.steps:
            if (run.step_no - start_step) % check_every == 0 and dist.any(stop.requested, device):
                interrupted = True
                break
            in_update = True
            loss, scale, skipped = run.step()
            in_update = False
            step = run.step_no
            pending.append(loss)
            if skipped:
                _apply_nan_policy(run, float(loss))
            if t_first is None:
                _sync(device)
                t_first = time.perf_counter()
            bar.update(1)
            if on_step is not None:
                on_step(StepInfo(step, loss, run.lr, scale, run.model, run.optimizer, skipped))

            row: dict[str, Any] = {}
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = flush()  # NaN only when every step of the interval was skipped
                now = time.perf_counter()
                sps = (step - step_log) / max(now - t_log - excl_log, 1e-9)
                t_log, step_log, excl_log = now, step, 0.0
                row.update(step=step, loss=mean_loss, lr=run.lr, steps_per_s=sps, elapsed_s=now - wall_start,
                           skipped_steps=run.skipped_steps)
                if not math.isfinite(mean_loss):
                    del row["loss"]
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{run.lr:.1e}", refresh=False)
                if bar.disable:  # no live bar (not a terminal, or not rank 0): a log line instead
                    run.say(f"step {step}/{cfg.steps} loss {mean_loss:.4f} lr {run.lr:.2e} {sps:.2f} steps/s "
                            f"eta {_format_eta((cfg.steps - step) / sps if sps > 0 else math.inf)}")
            # Decided identically on every rank: rank 0 validates, all meet at the barrier.
            do_val = bool(cfg.val_dir) and ((cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps)
            do_ckpt = step % cfg.ckpt_every == 0 and step != cfg.steps
            if do_val or do_ckpt or row:
                _sync(device)
                t0 = time.perf_counter()
                if do_val and run.validator is not None:
                    last_val = run.validate()
                    row.update(step=step, val_psnr=last_val["psnr"], val_ssim=last_val["ssim"],
                               **{f"val_{k}": v for k, v in last_val.items() if "_x" in k})
                if row and run.log is not None:
                    run.log.write(row)
                    if do_val:
                        run.log.draw()
                if do_val:
                    dist.barrier()
                if do_ckpt:
                    run.save()
                spent = time.perf_counter() - t0
                excluded += spent
                excl_log += spent
    except KeyboardInterrupt:
        if in_update:
            # Stopped inside an update: the weights may be half-updated, so the previous
            # checkpoint stays the latest good state.
            bar.close()
            run.say(f"interrupted during step {run.step_no + 1}; kept the previous checkpoint {run.last_path}")
            raise
        interrupted = True
    bar.close()
    _sync(device)
    t_end = time.perf_counter()
    if pending:
        mean_loss = flush()
    if hasattr(run.source, "close"):
        run.source.close()
    run.save()
    return _finish(run, interrupted, losses, mean_loss, last_val, start_step, t_first, t_end, excluded, wall_start)


def _apply_nan_policy(run: _Run, loss: float) -> None:
    """After a skipped step (non-finite loss on some rank; every rank gets here together)."""
    cfg, step = run.cfg, run.step_no
    what = f"the loss is {loss}" if not math.isfinite(loss) else "the loss is not finite on another rank"
    if cfg.nan_policy == "stop":
        raise FastSRError(f"{what} at step {step} (nan_policy = 'stop'); the update was not applied; "
                          f"{run.saved_note()}; lower lr, check the data, or set nan_policy = 'skip'")
    if run.nan_streak >= cfg.nan_max_consecutive:
        raise FastSRError(f"the loss was not finite for {run.nan_streak} steps in a row (steps "
                          f"{step - run.nan_streak + 1}-{step}, nan_max_consecutive = {cfg.nan_max_consecutive}); "
                          f"their updates were skipped; {run.saved_note()}; lower lr or check the data")
    run.say(f"step {step}: {what}: update skipped ({run.skipped_steps} skipped so far, "
            f"{run.nan_streak} in a row)")


def _finish(run: _Run, interrupted: bool, losses: list[float], mean_loss: float, last_val: dict[str, float],
            start_step: int, t_first: float | None, t_end: float, excluded: float, wall_start: float) -> TrainResult:
    """Speed, final weights, rank agreement, result.json and the closing line."""
    from fastsr.checkpoints import save_safetensors

    n_run = run.step_no - start_step
    if t_first is not None and n_run > 1:
        # The first step (allocation, oneDNN/cuDNN setup) is left out of the rate.
        train_seconds = t_end - t_first - excluded
        steps_per_s = (n_run - 1) / max(train_seconds, 1e-9)
    else:
        train_seconds = t_end - wall_start
        steps_per_s = n_run / max(train_seconds, 1e-9)
    checksum = weights_checksum(run.model)
    rank_sums = run.dist.gather(checksum)
    final_weights = None
    if run.dist.main:
        if not interrupted:
            target = run.ema.model if run.ema is not None else run.model
            with _writing(run.run_dir / "final.safetensors", "the final weights"):
                final_weights = save_safetensors(target, run.run_dir / "final.safetensors", extra_metadata={
                    "step": str(run.step_no), "ema": str(run.ema is not None)})
        if run.log is not None:
            run.log.draw()
            run.log.close()
    result = TrainResult(
        step=run.step_no, steps_run=n_run, interrupted=interrupted, out_dir=run.run_dir,
        last_checkpoint=run.last_path,
        best_weights=(run.run_dir / "best.safetensors") if run.best_step is not None else None,
        final_weights=final_weights, final_loss=mean_loss, best_psnr=run.best_psnr, best_step=run.best_step,
        val=last_val, steps_per_s=steps_per_s, train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - wall_start, losses=losses, weights_checksum=checksum,
        rank_checksums=rank_sums, world_size=run.dist.world, skipped_steps=run.skipped_steps,
    )
    if run.dist.main:
        _write_text(run.run_dir / "result.json", json.dumps(result.to_json(), indent=2) + "\n", "the result")
        if len(set(rank_sums)) > 1:
            run.say(f"WARNING: the ranks ended with different weights: {rank_sums}")
        if interrupted:
            run.say(f"interrupted at step {run.step_no}; checkpoint saved to {run.last_path} (continue with --resume)")
        else:
            best = (f", best validation {run.best_psnr:.3f} dB at step {run.best_step}"
                    if run.best_step is not None else "")
            skips = f", {run.skipped_steps} update(s) skipped (non-finite loss)" if run.skipped_steps else ""
            run.say(f"done: {run.step_no} steps, {steps_per_s:.3f} steps/s{best}{skips}; weights in {final_weights}")
    return result


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

# Explicit flags for the common keys: (flag, config key, type).
_FLAGS = (
    ("--model", "model", str), ("--scale", "scale", int), ("--steps", "steps", int),
    ("--batch-size", "batch_size", int), ("--patch-size", "patch_size", int), ("--lr", "lr", float),
    ("--train-dir", "train_dir", str), ("--val-dir", "val_dir", str), ("--init-from", "init_from", str),
    ("--out-dir", "out_dir", str), ("--amp", "amp", str), ("--device", "device", str), ("--seed", "seed", int),
    ("--loader", "loader", str),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `train` options to `parser` (for `fastsr train` and `python -m fastsr.train`)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    width = max(len(f.name) for f in dataclasses.fields(TrainConfig))
    keys = "\n".join(f"  {f.name:<{width}} {_toml_value(f.default):<22} {f.metadata['help']}"
                     for f in dataclasses.fields(TrainConfig))
    parser.epilog = ("config keys (TOML file, --set key=value), with defaults:\n" + keys +
                     "\n\nprecedence: defaults < --config file < --set < explicit flags")
    parser.add_argument("--config", "-c", metavar="TOML", help="TOML file of config keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set steps=1000")
    for flag, key, kind in _FLAGS:
        parser.add_argument(flag, dest=f"cfg_{key}", type=kind, default=None, metavar=key.upper(),
                            help=f"same as --set {key}=...")
    parser.add_argument("--fused", dest="cfg_fused", action=argparse.BooleanOptionalAction, default=None,
                        help="run the fused ops (default on)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="LAST_PT",
                        help="continue the run in out_dir (its last.pt), or the given last.pt")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    return load_config(args.config, args.set, values)


def run_cli(args: argparse.Namespace) -> int:
    """Run `fastsr train` from parsed arguments; 0 done, 130 interrupted (checkpoint saved)."""
    cfg = config_from_args(args)
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    result = train(cfg, resume=args.resume)
    return 130 if result.interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsr.train",
                                     description="Train EDSR/MDSR with the paper's recipe (fused ops on).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except FastSRError as e:
        print(f"fastsr train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfastsr train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Import the installed module rather than running this __main__ copy, so classes and
    # module state are the same ones the rest of fastsr sees.
    from fastsr.train import main as _main

    sys.exit(_main())
