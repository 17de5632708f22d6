"""`fastsr train CONFIG [overrides]`: the entry into `fastsr.train`'s own command line,
imported on use (training pulls in the optimizer stack, which upscale / eval never need)."""
from __future__ import annotations

import argparse

from fastsr.cli.common import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """fastsr.train's arguments."""
    from fastsr import train

    train.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    """fastsr.train's run_cli."""
    from fastsr import train

    return train.run_cli(args)


COMMAND = Command("train EDSR/MDSR with the paper's recipe (config file + overrides)", add_arguments, run)
