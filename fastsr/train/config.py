"""Training configuration: `TrainConfig` (every key, its default and help), TOML and
`--set key=value` parsing with errors that name the key, and the data-folder checks made
before anything is written.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fastsr.errors import FastSRError


class ConfigError(FastSRError):
    """A training config is invalid: unknown key, wrong type, out-of-range value."""


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
    scale: int = _key(2, "EDSR scale (2, 3, 4, 8); MDSR trains all of its scales")
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
    val_dir: str = _key("", "validation HR folder ('': no validation)")
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


def packaged_configs_dir() -> Path:
    """The folder of the configs fastsr ships: ``fastsr/configs`` when installed (setup.py maps
    the repository's ``configs/`` there), ``configs/`` beside the package in a checkout."""
    here = Path(__file__).resolve().parent.parent  # the fastsr package
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return here / "configs"


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A config file by path, or by the name of a packaged config (``edsr_baseline_x2`` or
    ``edsr_baseline_x2.toml``). Raises ConfigError listing the packaged names."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = packaged_configs_dir()
    candidate = packaged / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if path.parent == Path(".") and candidate.is_file():
        return candidate
    if path.exists():
        raise ConfigError(f"{path}: cannot read config (not a file)")
    names = sorted(p.stem for p in packaged.glob("*.toml"))
    raise ConfigError(f"{path}: no such config file, and no packaged config of that name "
                      f"(packaged: {', '.join(names) or 'none found'})")


def config_values(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                  values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keys a user set, checked and typed: TOML file `path` (a path or a packaged config's
    name) < `overrides` ('key=value') < `values`. Defaults are not included.

    Raises ConfigError for an unreadable file, an unknown key (listing the valid ones), or a
    value of the wrong type.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
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
    return merged


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                values: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults < TOML file `path` (a path or a packaged config's name) <
    `overrides` ('key=value') < `values`; see `config_values`. Raises ConfigError, also for
    a value out of range."""
    return TrainConfig(**config_values(path, overrides, values)).validate()


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
