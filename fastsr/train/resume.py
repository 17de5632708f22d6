"""Continuing a run: which last.pt `--resume` names, the config it continues with, and the
checks a resumed config must pass.

`fastsr train --resume RUN_DIR` (or RUN_DIR/last.pt) continues that run in place with the
config saved in its checkpoint. A setting given on the command line (or in `-c FILE`) that
differs from the saved one is refused unless `--override` is given, except the keys that do
not change the training trajectory (TrainConfig.FREE_KEYS: more steps, logging, devices).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from fastsr.train.config import ConfigError, TrainConfig
from fastsr.train.runfiles import load_train_checkpoint


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, path: Path, say: Callable[[str], None]) -> None:
    """Refuse a different network; say which other settings differ from the checkpoint's."""
    arch = [k for k in TrainConfig.ARCH_KEYS if saved.get(k) != getattr(cfg, k)]
    if arch:
        diffs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in arch)
        raise ConfigError(f"{path} was trained with a different network ({diffs}); resume with the same settings")
    changed = [k for k, v in saved.items() if k not in TrainConfig.FREE_KEYS and hasattr(cfg, k)
               and getattr(cfg, k) != v]
    if changed:
        say("resuming with changed settings (the run will differ from an uninterrupted one): "
            + ", ".join(f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed))


def checkpoint_path(target: str | os.PathLike) -> Path:
    """RUN_DIR or RUN_DIR/last.pt -> the last.pt path (which may not exist)."""
    path = Path(target)
    return path / "last.pt" if path.is_dir() else path


def resumed_config(last: Path, given: dict[str, Any], override: bool) -> TrainConfig:
    """The config a resume of `last` runs with: the checkpoint's saved config, with the keys
    the user `given` (from -c, --set and flags) applied where they agree with it or are free
    to change, and the run folder fixed to the checkpoint's folder.

    Raises CheckpointError if `last` is not a training checkpoint, ConfigError for a given
    key that conflicts with the saved config (unless `override`).
    """
    saved = load_train_checkpoint(last)["config"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in saved.items() if k in known}
    run_dir = last.parent
    free = set(TrainConfig.FREE_KEYS) - {"out_dir", "name"}
    conflicts = []
    for key, value in given.items():
        if key in ("out_dir", "name"):
            # Only a different run folder conflicts: resuming happens in place.
            probe = dataclasses.replace(TrainConfig(**base), **{key: value})
            if probe.run_dir.resolve() != run_dir.resolve():
                conflicts.append((key, value))
        elif key not in free and value != base.get(key, getattr(TrainConfig, key, None)):
            conflicts.append((key, value))
    if conflicts and not override:
        listed = "; ".join(f"{k} = {v!r} (the run has {base.get(k)!r})" for k, v in conflicts)
        raise ConfigError(f"{last}: these settings differ from the run's saved config: {listed}. "
                          "--resume continues the saved config; drop them, or pass --override to change "
                          "them anyway (the run then differs from an uninterrupted one)")
    merged = {**base, **{k: v for k, v in given.items() if k not in ("out_dir", "name")}}
    merged["out_dir"] = str(run_dir)
    return TrainConfig(**merged).validate()
