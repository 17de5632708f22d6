"""`fastsr train` / `python -m fastsr.train`: options, config resolution and resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from fastsr.errors import FastSRError
from fastsr.train.config import ConfigError, TrainConfig, _toml_value, config_values
from fastsr.train.loop import say, train
from fastsr.train.resume import checkpoint_path, resumed_config


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
    parser.add_argument("--config", "-c", metavar="TOML",
                        help="TOML file of config keys, or a packaged config's name (e.g. edsr_baseline_x2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set steps=1000")
    for flag, key, kind in _FLAGS:
        parser.add_argument(flag, dest=f"cfg_{key}", type=kind, default=None, metavar=key.upper(),
                            help=f"same as --set {key}=...")
    parser.add_argument("--fused", dest="cfg_fused", action=argparse.BooleanOptionalAction, default=None,
                        help="run the fused ops (default on)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue a run in place with its saved config: RUN_DIR or RUN_DIR/last.pt "
                             "(alone: the out_dir of the given config); 'auto': resume out_dir's run if "
                             "it has a last.pt, else start it fresh")
    parser.add_argument("--override", action="store_true",
                        help="with --resume: apply settings that differ from the run's saved config "
                             "(refused otherwise; more --steps is always fine)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys this command line sets (-c file < --set < flags), defaults left out."""
    values = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    return config_values(args.config, args.set, values)


def resolve_run(args: argparse.Namespace) -> tuple[TrainConfig, Path | bool]:
    """(config, resume) for `train()`: a fresh run's config and False, or the config a resume
    continues with (the run's saved one, see fastsr.train.resume) and its last.pt."""
    given = _given_values(args)
    if args.override and not args.resume:
        raise ConfigError("--override only applies with --resume")
    if args.resume is False or args.resume is True or args.resume == "auto":
        fresh = TrainConfig(**given).validate()  # a fresh run's config; its out_dir names the run
        if not args.resume:
            return fresh, False
        last = fresh.run_dir / "last.pt"
        if args.resume == "auto" and not last.exists():
            say(f"--resume auto: no {last}, starting the run fresh", main=os.environ.get("RANK", "0") == "0")
            return fresh, False
    else:
        last = checkpoint_path(args.resume)
    return resumed_config(last, given, args.override), last


def run_cli(args: argparse.Namespace) -> int:
    """Run `fastsr train` from parsed arguments; 0 done, 130 interrupted (checkpoint saved)."""
    cfg, resume = resolve_run(args)
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    result = train(cfg, resume=resume)
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
