"""The run folder's files: atomic writes with one-line errors, the CSV/JSON logs and
curves.png, last.pt (write, read, and the checks a resume makes against it).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import importlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from fastsr.errors import FastSRError
from fastsr.train.config import ConfigError


CHECKPOINT_FORMAT = "fastsr-train-v1"


# Every file a run writes atomically (their killed writes' temp files are cleared on start).
RUN_FILES = ("last.pt", "config.toml", "log.csv", "log.jsonl", "curves.png", "best.safetensors",
              "final.safetensors", "result.json")


class WriteError(FastSRError):
    """A run file could not be written (full disk, permissions); the message names it."""


@contextlib.contextmanager
def writing(path: Path, what: str):
    """Turn a failed write inside the block into a one-line WriteError naming `what` and `path`.

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
        raise WriteError(f"{why}: writing {what} {path} failed ({detail})") from None


def write_run_text(path: Path, text: str, what: str) -> None:
    from fastsr.atomic import atomic_write

    with writing(path, what):
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


_CSV_COLUMNS = ("step", "loss", "lr", "steps_per_s", "elapsed_s", "val_psnr", "val_ssim")


class RunLog:
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
        write_run_text(self.csv_path, text.getvalue(), "the log")
        write_run_text(self.json_path, "".join(json.dumps(r) + "\n" for r in self.rows), "the log")

    @staticmethod
    def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
        return {k: row.get(k, "") for k in _CSV_COLUMNS}

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        # Appended (a kill can cut the last line: the resume that follows rewrites both files).
        with writing(self.csv_path, "the log"), open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, _CSV_COLUMNS, extrasaction="ignore").writerow(self._csv_row(row))
        with writing(self.json_path, "the log"), open(self.json_path, "a") as f:
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

        with writing(self.plot_path, "the plot"):
            atomic_write(self.plot_path, lambda tmp: fig.savefig(tmp, format="png"))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def save_last(path: Path, state: dict[str, Any]) -> None:
    from fastsr.atomic import atomic_write

    def write(tmp: str) -> None:
        # Through a Python file: a failed write raises OSError(ENOSPC, ...); torch.save(state,
        # a_path) reports the same as "RuntimeError: unexpected pos".
        with open(tmp, "wb") as f:
            torch.save(state, f)

    with writing(path, "the checkpoint"):
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
