"""The training loop: `train(config)` builds a `_Run` (model, optimizer, data, DDP, logs),
steps it, validates and checkpoints on the way, and finishes with the weights and result.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsr.errors import FastSRError
from fastsr.train.config import ConfigError, TrainConfig, check_data_folders
from fastsr.train.distributed import Dist, init_dist
from fastsr.train.results import StepInfo, TrainResult
from fastsr.train.resume import check_resume_config
from fastsr.train.runfiles import (
    CHECKPOINT_FORMAT, RUN_FILES, RunLog, WriteError, load_train_checkpoint, save_last,
    write_run_text, writing,
)
from fastsr.train.state import TrainState, build_model, model_scales, rng_state, set_rng_state, weights_checksum
from fastsr.train.validation import Validator


def say(msg: str, main: bool = True) -> None:
    """One `fastsr train: msg` line on stdout, from rank 0 only (`main`), kept clear of a
    live progress bar."""
    if main:
        from tqdm import tqdm

        tqdm.write(f"fastsr train: {msg}", file=sys.stdout)  # keeps a live progress bar intact
        sys.stdout.flush()


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

    Holds the trained state (model, optimizer, schedule, scaler, EMA: `TrainState`), the
    batch source, the logs and the counters, and turns them into (and back from) the
    checkpoint dictionary.
    """

    def __init__(self, cfg: TrainConfig, dist: Dist, device: torch.device, resume: bool | str | os.PathLike):
        self.cfg, self.dist, self.device = cfg, dist, device
        self.run_dir = cfg.run_dir
        self.last_path = self.run_dir / "last.pt"
        self.step_no = 0
        self.best_psnr: float | None = None
        self.best_step: int | None = None
        self.skipped_steps = 0  # updates dropped by nan_policy = skip
        self.nan_streak = 0     # ... of them in a row up to the current step
        # 1. The checkpoint to continue (None: a fresh run), checked before anything is written.
        checkpoint, ckpt_path = self._open_checkpoint(resume)
        # The step last.pt holds (None: nothing saved yet), for the messages of a failed run.
        self.saved_step: int | None = int(checkpoint["step"]) if checkpoint is not None else None
        if dist.main:
            with self.noting_checkpoint():
                self._prepare_folder()
        # 2. Model, optimizer and the rest of the trained state, seeded alike on every rank.
        self.model = self._build_model(init=checkpoint is None)
        self.scales = model_scales(self.model)
        self.state = TrainState(cfg, self.model, device)
        # With fused=True, AMP is the fused model's compute dtype (build_model), set once
        # instead of autocast's per-call dtype checks; autocast wraps only the eager model.
        self.autocast = (torch.autocast(device.type, dtype=cfg.amp_dtype) if cfg.amp and not cfg.fused
                         else contextlib.nullcontext())
        # 3. Data: the training images (a named validation split held out) and the patch source.
        val_paths = self._load_data()
        # 4. A resume restores everything the checkpoint holds, the samplers' streams included.
        if checkpoint is not None:
            from fastsr.checkpoints import model_arch_tag

            self._restore(checkpoint)
            self.say(f"resumed {model_arch_tag(self.model)} at step {self.step_no} from {ckpt_path}")
        # 5. DDP, validation (rank 0) and the logs.
        self.net = self._wrap_ddp()
        self.validator = (Validator(cfg.val_dir, self.scales, device, val_paths, cfg.val_protocol)
                          if (cfg.val_dir and dist.main) else None)
        with self.noting_checkpoint():
            self.log = (RunLog(self.run_dir, self.step_no if checkpoint is not None else None, cfg.plot,
                               cfg.tensorboard) if dist.main else None)
        if self.log is not None and self.log.plot_note:
            self.say(self.log.plot_note)
        self._describe()

    def _open_checkpoint(self, resume: bool | str | os.PathLike) -> tuple[dict[str, Any] | None, Path | None]:
        """(checkpoint, its path) to resume, or (None, None); refuses to start over a run."""
        if resume:
            path = self.last_path if resume is True else Path(resume)
            checkpoint = load_train_checkpoint(path)
            check_resume_config(checkpoint["config"], self.cfg, path, self.say)
            return checkpoint, path
        if self.dist.main and self.last_path.exists():
            raise ConfigError(f"{self.run_dir} already holds a run (last.pt): pass --resume to continue it, "
                              "or choose another out_dir")
        return None, None

    def _build_model(self, init: bool) -> nn.Module:
        """The network on the device; `init`: also load cfg.init_from (a fresh run only)."""
        from fastsr.checkpoints import load_weights

        cfg = self.cfg
        # Initialization: the same seed on every rank (DDP also broadcasts rank 0's weights).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        if cfg.init_from and init:
            self.say(f"init_from {cfg.init_from}: {load_weights(model, cfg.init_from, partial_upsampler=True)}")
        model.to(self.device)
        if not cfg.fused:
            # oneDNN (CPU) and cuDNN's tensor-core kernels both prefer channels-last; the
            # fused path converts its input itself.
            model.to(memory_format=torch.channels_last)
        return model

    def _load_data(self) -> list[Path] | None:
        """Decode the training images into self.source; returns the held-out validation paths."""
        from fastsr.data import DeviceSampler, LoaderSource, SRData, select_images

        cfg, dist = self.cfg, self.dist
        # A named validation split is held out of the training images (same folders).
        val_paths = select_images(cfg.val_dir, cfg.val_images) if (cfg.val_dir and cfg.val_images) else None
        data = SRData.load(cfg.train_dir, self.scales, lr_dir=cfg.train_lr_dir or None,
                           cache_dir=cfg.cache_dir or None, patch_size=cfg.patch_size, progress=dist.main,
                           exclude=val_paths or ())
        self.say(f"data: {data.description}; {data.hr.nbytes / 2**20:.0f} MiB HR in memory")
        if data.skipped:
            self.say(f"warning: left out of training, smaller than the LR patch: {', '.join(data.skipped)}")
        per_rank = cfg.batch_size // dist.world
        kw = dict(seed=cfg.seed, rank=dist.rank, device=self.device)
        if cfg.loader == "device":
            self.source = DeviceSampler(data, per_rank, cfg.patch_size, **kw)
        else:
            self.source = LoaderSource(data, per_rank, cfg.patch_size, num_workers=cfg.num_workers, **kw)
        return val_paths

    def _wrap_ddp(self) -> nn.Module:
        """The module the step calls: the model, or its DDP wrapper under torchrun."""
        from fastsr.models.edsr import MDSR

        if not self.dist.active:
            return self.model
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # MDSR: the other scales' branches get no gradient in a step.
            find_unused_parameters=isinstance(self.model, MDSR),
        )

    def _describe(self) -> None:
        from fastsr.checkpoints import model_arch_tag
        from fastsr.models.edsr import count_parameters

        cfg, dist = self.cfg, self.dist
        compute = (f"fused ({cfg.backend or 'auto backend'}, {cfg.amp or 'fp32'} compute)" if cfg.fused
                   else f"eager ({'autocast ' + cfg.amp if cfg.amp else 'fp32'})")
        self.say(f"model {model_arch_tag(self.model)}: {count_parameters(self.model):,} parameters, {compute}, "
                 f"on {self.device}"
                 + (f", DDP over {dist.world} ranks ({cfg.batch_size // dist.world} patches each)" if dist.active
                    else "")
                 + f"; loader {cfg.loader}")

    def _prepare_folder(self) -> None:
        """Rank 0: the run folder, without the temp files of killed writes, with config.toml."""
        from fastsr.atomic import remove_stale_temps

        with writing(self.run_dir, "the run folder"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # Temp files of writes a kill (SIGKILL, power cut) interrupted; never a checkpoint.
        # safetensors (>= 0.7) writes through its own .tmpXXXXXX beside the target.
        stale = [t for name in RUN_FILES for t in remove_stale_temps(self.run_dir / name)]
        for t in self.run_dir.glob(".tmp??????"):
            if t.is_file():
                t.unlink()
                stale.append(t)
        if stale:
            self.say(f"removed {len(stale)} temp file(s) of an interrupted write: " + ", ".join(t.name for t in stale))
        toml = self.cfg.to_toml()
        write_run_text(self.run_dir / "config.toml", toml, "the config")
        self.say(f"resolved config (saved in {self.run_dir / 'config.toml'}):\n" + toml.rstrip())

    def saved_note(self) -> str:
        """Where the run can continue from, for the message of a run that stops on an error."""
        if self.saved_step is None:
            return f"no checkpoint was saved yet ({self.last_path})"
        return f"{self.last_path} holds step {self.saved_step} (continue with --resume)"

    @contextlib.contextmanager
    def noting_checkpoint(self, stopped: bool = False):
        """Add where the run can continue from (and the step it stopped at) to a WriteError."""
        try:
            yield
        except WriteError as e:
            at = f"stopped at step {self.step_no}; " if stopped else ""
            raise WriteError(f"{e}; {at}{self.saved_note()}") from None

    def say(self, msg: str) -> None:
        say(msg, self.dist.main)

    # -- checkpoint state --------------------------------------------------------------

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.state.load_state_dict(ckpt)
        self.step_no = int(ckpt["step"])
        self.best_psnr, self.best_step = ckpt.get("best_psnr"), ckpt.get("best_step")
        self.skipped_steps, self.nan_streak = int(ckpt.get("skipped_steps", 0)), int(ckpt.get("nan_streak", 0))
        set_rng_state(ckpt["rng"])
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
        error: WriteError | None = None
        if self.dist.main:
            try:
                save_last(self.last_path, {
                    "format": CHECKPOINT_FORMAT, "step": self.step_no, "config": self.cfg.to_dict(),
                    **self.state.state_dict(), "rng": rng_state(), "sampler": samplers, "world_size": self.dist.world,
                    "best_psnr": self.best_psnr, "best_step": self.best_step,
                    "skipped_steps": self.skipped_steps, "nan_streak": self.nan_streak,
                })
            except WriteError as e:
                error = e
        if self.dist.any(error is not None, self.device):  # also the barrier
            raise error or WriteError(f"rank 0 failed to write {self.last_path}")
        self.saved_step = self.step_no

    # -- one optimizer step ------------------------------------------------------------

    def step(self) -> tuple[torch.Tensor, int, bool]:
        """Draw a batch, update the weights once; returns (detached loss, scale drawn, skipped).

        A loss that is not finite on any rank skips the update on every rank (no backward,
        no optimizer step, no EMA update); the step still counts, for the counter, the lr
        schedule and the data stream, so a resumed run stays exact. `_loop` applies nan_policy.
        """
        batch = self.source.next()
        self.state.optimizer.zero_grad(set_to_none=True)  # None, not 0: Adam skips unused MDSR branches
        with self.autocast:
            sr = self.net(batch.lr, scale=batch.scale)
        loss = F.l1_loss(sr.float(), batch.hr)
        # One host sync per step (fp16's GradScaler makes one anyway); under DDP one tiny
        # all-reduce, so the ranks agree before any of them starts the backward's collectives.
        skipped = self.dist.any(not bool(torch.isfinite(loss)), self.device)
        self.nan_streak = self.nan_streak + 1 if skipped else 0
        if skipped:
            self.skipped_steps += 1
            self.state.advance_schedule()
        else:
            self.state.update(loss)
        self.step_no += 1
        return loss.detach(), batch.scale, skipped

    @property
    def lr(self) -> float:
        return self.state.lr

    # -- validation --------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Rank 0: the papers' protocol on val_dir; keeps best.safetensors."""
        from fastsr.checkpoints import save_safetensors

        target = self.state.eval_model
        metrics = self.validator.run(target)
        if self.best_psnr is None or metrics["psnr"] > self.best_psnr:
            self.best_psnr, self.best_step = metrics["psnr"], self.step_no
            best = self.run_dir / "best.safetensors"
            with writing(best, "the best weights"):
                save_safetensors(target, best, extra_metadata={
                    "step": str(self.step_no), "val_psnr": f"{metrics['psnr']:.4f}",
                    "val_set": str(self.cfg.val_dir), "ema": str(self.state.ema is not None)})
        per_scale = ", ".join(f"x{s} {metrics[f'psnr_x{s}']:.3f} dB / {metrics[f'ssim_x{s}']:.4f}" for s in self.scales)
        self.say(f"step {self.step_no}: validation on {self.cfg.val_dir}: {per_scale} "
                 f"(best {self.best_psnr:.3f} dB at step {self.best_step})")
        return metrics


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
    dist, device = init_dist(cfg)
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
            # threads now instead of leaving them to interpreter shutdown (see init_dist).
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
                on_step(StepInfo(step, loss, run.lr, scale, run.model, run.state.optimizer, skipped))

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
    return _finish(run, interrupted, _LoopTotals(start_step, losses, mean_loss, last_val, t_first, t_end, excluded,
                                                 wall_start))


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


@dataclasses.dataclass
class _LoopTotals:
    """What the loop hands `_finish`: counts, losses and its clock readings (perf_counter s)."""

    start_step: int              # the step the loop started from (a resume's checkpoint step)
    losses: list[float]          # every step's loss, in order
    mean_loss: float             # over the last log interval
    last_val: dict[str, float]   # the last validation's metrics ({} if none ran)
    t_first: float | None        # after the first step (None: no step ran)
    t_end: float                 # after the last step
    excluded: float              # seconds spent validating, logging and checkpointing
    wall_start: float            # when train() was called


def _finish(run: _Run, interrupted: bool, totals: _LoopTotals) -> TrainResult:
    """Speed, final weights, rank agreement, result.json and the closing line."""
    from fastsr.checkpoints import save_safetensors

    t = totals
    n_run = run.step_no - t.start_step
    if t.t_first is not None and n_run > 1:
        # The first step (allocation, oneDNN/cuDNN setup) is left out of the rate.
        train_seconds = t.t_end - t.t_first - t.excluded
        steps_per_s = (n_run - 1) / max(train_seconds, 1e-9)
        # What a clock on the wall sees over the same steps, validation and checkpoints included.
        overall_per_s = (n_run - 1) / max(t.t_end - t.t_first, 1e-9)
    else:
        train_seconds = t.t_end - t.wall_start
        steps_per_s = overall_per_s = n_run / max(train_seconds, 1e-9)
    checksum = weights_checksum(run.model)
    rank_sums = run.dist.gather(checksum)
    final_weights = None
    if run.dist.main:
        if not interrupted:
            target = run.state.eval_model
            with writing(run.run_dir / "final.safetensors", "the final weights"):
                final_weights = save_safetensors(target, run.run_dir / "final.safetensors", extra_metadata={
                    "step": str(run.step_no), "ema": str(run.state.ema is not None)})
        if run.log is not None:
            run.log.draw()
            run.log.close()
    result = TrainResult(
        step=run.step_no, steps_run=n_run, interrupted=interrupted, out_dir=run.run_dir,
        last_checkpoint=run.last_path,
        best_weights=(run.run_dir / "best.safetensors") if run.best_step is not None else None,
        final_weights=final_weights, final_loss=t.mean_loss, best_psnr=run.best_psnr, best_step=run.best_step,
        val=t.last_val, steps_per_s=steps_per_s, steps_per_s_overall=overall_per_s, train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - t.wall_start, losses=t.losses, weights_checksum=checksum,
        rank_checksums=rank_sums, world_size=run.dist.world, skipped_steps=run.skipped_steps,
    )
    if run.dist.main:
        write_run_text(run.run_dir / "result.json", json.dumps(result.to_json(), indent=2) + "\n", "the result")
        if len(set(rank_sums)) > 1:
            run.say(f"WARNING: the ranks ended with different weights: {rank_sums}")
        if interrupted:
            run.say(f"interrupted at step {run.step_no}; checkpoint saved to {run.last_path}; "
                    f"continue with: fastsr train --resume {shlex.quote(str(run.run_dir))}")
        else:
            best = (f", best validation {run.best_psnr:.3f} dB at step {run.best_step}"
                    if run.best_step is not None else "")
            skips = f", {run.skipped_steps} update(s) skipped (non-finite loss)" if run.skipped_steps else ""
            pause = (f" ({overall_per_s:.3f} with validation and checkpoints)"
                     if overall_per_s < 0.99 * steps_per_s else "")
            run.say(f"done: {run.step_no} steps, {steps_per_s:.3f} steps/s of training{pause}{best}{skips}; "
                    f"weights in {final_weights}")
    return result
