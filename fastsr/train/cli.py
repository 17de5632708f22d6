"""`fastsr train` / `python -m fastsr.train`: options, config resolution and resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from fastsr.errors import FastSRError
from fastsr.train.config import TrainConfig, _toml_value, load_config
from fastsr.train.loop import train


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
