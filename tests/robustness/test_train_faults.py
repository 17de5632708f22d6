"""Training under faults: SIGKILL at chosen and random moments, a full disk, NaN/inf losses.

The runs are `fastsr train` (fastsr.cli.main) in child processes started from a fork server
that has torch and fastsr.train imported already, so a kill-and-resume cycle costs a
fraction of a second instead of a Python start and a torch import. Faults are injected by
DRIVER below, chosen by FASTSR_FAULT=phase:target:n (the n-th matching event in that
process): a SIGKILL with the temp file partly written, before its fsync, before or right
after its rename, after a log line cut short; a full disk (the temp file is a link to
/dev/full, so the kernel itself answers ENOSPC to the real write path); a NaN in one
rank's batch. Every run is checked against an uninterrupted in-process run of the same
config: the checkpoint a kill leaves holds the weights of exactly the step it says, the
resumed run ends bitwise equal, and the logs hold every step once with the same losses.

FASTSR_FUZZ_EXAMPLES=N sets N/10 random kills (at least 4); FASTSR_KILL_SEED replays a schedule.
"""
import errno
import json
import math
import multiprocessing
import os
import random
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import fastsr.data
from fastsr.cli import main as cli_main
from fastsr.errors import FastSRError
from fastsr.train import load_config, load_train_checkpoint, train, weights_checksum

REPO = Path(__file__).resolve().parents[2]
RANDOM_KILLS = max(4, int(os.environ.get("FASTSR_FUZZ_EXAMPLES") or 0) // 10)

TINY = {
    "n_resblocks": 1, "n_feats": 8, "res_scale": 1.0, "batch_size": 2, "patch_size": 8,
    "val_dir": "", "plot": False, "log_every": 1, "threads": 1,
}

DRIVER = r'''
"""`fastsr train` with one fault injected: FASTSR_FAULT=phase:target:n (the n-th matching event)."""
import os
import signal
import sys


def install(spec):
    phase, target, n = spec.split(":")
    n, seen = int(n), [0]

    def nth():
        seen[0] += 1
        return seen[0] == n

    def is_temp(p):  # a temp file of atomic_write(<run>/target)
        base = os.path.basename(os.fsdecode(p))
        return base.startswith("." + target + ".") and base.endswith(".tmp")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if phase == "partial":  # SIGKILL with 16 KiB of the temp file written
        import torch
        real_save = torch.save

        class Cut:
            def __init__(self, f):
                self.f, self.n = f, 0

            def write(self, b):
                self.f.write(b)
                self.n += len(b)
                if self.n >= 16384:
                    self.f.flush()
                    die()
                return len(b)

            def flush(self):
                self.f.flush()

        def save(obj, f, *a, **kw):
            return real_save(obj, Cut(f) if is_temp(getattr(f, "name", "")) and nth() else f, *a, **kw)

        torch.save = save
    elif phase == "before_fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if is_temp(os.readlink(f"/proc/self/fd/{fd}")) and nth():
                die()
            return real_fsync(fd)

        os.fsync = fsync
    elif phase in ("before_rename", "after_rename"):
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            hit = is_temp(src) and nth()
            if hit and phase == "before_rename":
                die()
            real_replace(src, dst, *a, **kw)
            if hit:
                die()

        os.replace = replace
    elif phase == "cut_line":  # the n-th log append cut short, as a kill mid-write leaves it
        import fastsr.train.runfiles
        real_write = fastsr.train.runfiles.RunLog.write

        def write(self, row):
            real_write(self, row)
            if nth():
                path = self.json_path if target == "log.jsonl" else self.csv_path
                os.truncate(path, path.stat().st_size - 7)
                die()

        fastsr.train.runfiles.RunLog.write = write
    elif phase == "enospc":  # the temp file is /dev/full: the kernel answers the writes ENOSPC
        import tempfile
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*a, **kw):
            fd, name = real_mkstemp(*a, **kw)
            if is_temp(name) and nth():
                os.unlink(name)
                os.symlink("/dev/full", name)
            return fd, name

        tempfile.mkstemp = mkstemp
    elif phase == "nan":  # a NaN in rank `target`'s n-th batch
        import fastsr.data
        real_next = fastsr.data.DeviceSampler.next

        def next_batch(self):
            batch = real_next(self)
            if os.environ.get("RANK", "0") == target and self.batches == n:
                batch.lr[0, 0, 0, 0] = float("nan")
            return batch

        fastsr.data.DeviceSampler.next = next_batch
    else:
        raise SystemExit(f"unknown fault {spec!r}")


if __name__ == "__main__":
    argv, fault, log = globals().get("ARGV"), globals().get("FAULT"), globals().get("LOG")
    if log:  # a fork-server child: stdout and stderr into a file
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    fault = fault if argv is not None else os.environ.get("FASTSR_FAULT")
    if fault:
        install(fault)
    from fastsr.cli import main

    sys.exit(main(["train", *(argv if argv is not None else sys.argv[1:])]))
'''


# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Small crops of scikit-image's CC0 / public-domain photos (scripts/make_train_photos.py)."""
    skdata = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    for name, (y, x) in {"astronaut": (60, 180), "chelsea": (90, 150), "coffee": (120, 200)}.items():
        Image.fromarray(getattr(skdata, name)()[y:y + 40, x:x + 48]).save(folder / f"{name}.png")
    (folder / "val").mkdir()
    Image.fromarray(skdata.astronaut()[200:240, 240:280]).save(folder / "val" / "val.png")
    return folder


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "fault_driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo: Adam's first construction imports it (~2.5 s per process otherwise).
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "fastsr.train", "fastsr.cli", "fastsr.data",
                                "fastsr.models.fused", "fastsr.checkpoints", "fastsr.imageio", "fastsr.imresize",
                                "fastsr.metrics", "safetensors.torch", "tqdm"])
    return ctx


def settings(photos: Path, out: Path, **kw) -> dict:
    return {**TINY, "train_dir": str(photos), "out_dir": str(out), **kw}


def as_args(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def reference(values: dict) -> tuple[dict[int, str], list[dict]]:
    """An uninterrupted in-process run: {step: weights checksum after it} and its log rows."""
    sums = {}
    result = train(load_config(values=values), on_step=lambda i: sums.setdefault(i.step, weights_checksum(i.model)))
    assert result.step == values["steps"]
    return sums, log_rows(result.out_dir)


def log_rows(run: Path) -> list[dict]:
    keep = ("step", "loss", "lr", "val_psnr", "val_ssim", "skipped_steps")
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keep if k in r} for r in rows]


def checkpoint_step(run: Path, ref_sums: dict[int, str]) -> int | None:
    """The step last.pt holds (None: no last.pt), after checking its weights are that step's."""
    if not (run / "last.pt").exists():
        return None
    state = load_train_checkpoint(run / "last.pt")  # a partial or corrupt file raises here
    step = state["step"]
    got = weights_checksum(SimpleNamespace(state_dict=lambda: state["model"]))
    assert got == ref_sums[step], f"last.pt says step {step} but holds other weights"
    return step


def temp_files(run: Path) -> list[str]:
    """atomic_write's .<name>.<random>.tmp and safetensors' own .tmpXXXXXX."""
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp"))


class Child:
    """`fastsr train ARGS` in a fork-server child, with an optional fault; output in a log file."""

    def __init__(self, ctx, driver: Path, values: dict, fault: str | None, log: Path):
        self.log = log
        args = as_args(values) + (["--resume"] if (Path(values["out_dir"]) / "last.pt").exists() else [])
        self.proc = ctx.Process(target=runpy.run_path, args=(str(driver),), kwargs=dict(
            run_name="__main__", init_globals={"ARGV": args, "FAULT": fault, "LOG": str(log)}))
        self.start = time.monotonic()
        self.proc.start()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait(self, timeout: float = 120) -> int:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, "the training child hung:\n" + self.output()[-3000:]
        return self.proc.exitcode


def finish_and_compare(ctx, driver, values, ref_sums, ref_rows, log: Path) -> None:
    """Resume to the end without a fault; the run must equal the uninterrupted one."""
    run = Path(values["out_dir"])
    child = Child(ctx, driver, values, None, log)
    assert child.wait() == 0, child.output()[-3000:]
    assert checkpoint_step(run, ref_sums) == values["steps"]
    assert log_rows(run) == ref_rows, "the log lost, repeated or changed rows"
    csv_steps = [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert csv_steps == [str(r["step"]) for r in ref_rows]
    assert temp_files(run) == []
    result = json.loads((run / "result.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert result["step"] == values["steps"] and result["weights_checksum"] == ref_sums[values["steps"]]


# ---------------------------------------------------------------------------------------
# SIGKILL
# ---------------------------------------------------------------------------------------

# (fault, the step last.pt must hold after the kill). Checkpoints at steps 2, 4, 6, 8 and the
# end (10); validation (best.safetensors) at 5 and 10; "n" counts within one process.
KILL_CHAIN = [
    ("partial:last.pt:1", None),            # the first checkpoint half written: nothing to resume
    ("before_fsync:last.pt:2", 2),          # step 4's temp file complete, not yet fsynced
    ("partial:last.pt:2", 4),               # resumed at 2; step 6's temp file half written
    ("before_rename:last.pt:1", 4),         # resumed at 4; step 6 fsynced, not renamed
    ("after_rename:last.pt:1", 6),          # resumed at 4; killed right after step 6's rename
    ("before_rename:log.jsonl:1", 6),       # killed while the resume trims the logs to step 6
    ("cut_line:log.jsonl:2", 6),            # step 8's log line cut short, before its checkpoint
    ("before_rename:final.safetensors:1", 10),  # last.pt at the end written, final weights not
    ("before_rename:result.json:1", 10),    # final weights written, result.json not
]


def test_sigkill_at_each_write_phase_resumes_exactly(photos, driver, forkserver, tmp_path):
    values = settings(photos, tmp_path / "run", steps=10, ckpt_every=2, val_dir=str(photos / "val"), val_every=5)
    ref_sums, ref_rows = reference(settings(photos, tmp_path / "ref", **{k: values[k] for k in (
        "steps", "ckpt_every", "val_dir", "val_every")}))
    run = Path(values["out_dir"])
    for i, (fault, expect) in enumerate(KILL_CHAIN):
        had_temps = run.exists() and temp_files(run)
        child = Child(forkserver, driver, values, fault, tmp_path / f"kill{i}.log")
        code, out = child.wait(), child.output()
        assert code == -9, f"{fault}: the kill point was not reached (exit {code}):\n{out[-3000:]}"
        assert checkpoint_step(run, ref_sums) == expect, fault
        if "resumed" in out:  # it resumed from the checkpoint the previous kill left
            assert f"at step {KILL_CHAIN[i - 1][1]} from" in out, out
        if had_temps:
            assert "temp file(s) of an interrupted write" in out, out
    finish_and_compare(forkserver, driver, values, ref_sums, ref_rows, tmp_path / "final.log")
    shutil.rmtree(run)


def test_sigkill_at_random_moments_never_loses_a_checkpoint(photos, driver, forkserver, tmp_path):
    """RANDOM_KILLS kills at random times (many inside checkpoint writes: one per step)."""
    seed = int(os.environ.get("FASTSR_KILL_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    ref_values = settings(photos, tmp_path / "ref", steps=40, ckpt_every=1)
    ref_sums, ref_rows = reference(ref_values)
    kills = chains = 0
    while kills < RANDOM_KILLS:
        values = {**ref_values, "out_dir": str(tmp_path / f"run{chains}")}
        run, last = Path(values["out_dir"]), None
        for attempt in range(40):
            child = Child(forkserver, driver, values, None, tmp_path / f"c{chains}-{attempt}.log")
            if rng.random() < 0.25:  # during start-up or the resume's log rewrite
                time.sleep(rng.uniform(0, 1.0))
            else:                    # during training: after the first step line
                while "fastsr train: step " not in child.output() and child.proc.is_alive():
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, 0.5))
            child.proc.kill()
            code = child.wait()
            step = checkpoint_step(run, ref_sums)
            msg = f"FASTSR_KILL_SEED={seed}, chain {chains}, attempt {attempt}"
            assert step is None or last is None or step >= last, msg  # never an older checkpoint
            if last is not None:
                assert f"at step {last} from" in child.output() or "resumed" not in child.output(), msg
            last = step
            if code == 0:
                break
            assert code == -9, msg + "\n" + child.output()[-3000:]
            kills += 1
            if kills >= RANDOM_KILLS:
                break
        finish_and_compare(forkserver, driver, values, ref_sums, ref_rows, tmp_path / f"c{chains}-final.log")
        shutil.rmtree(run)
        chains += 1


# ---------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------


def enospc_on(monkeypatch, name: str, nth: int) -> None:
    """Make the nth temp file of atomic_write(<run>/name) a link to /dev/full (real ENOSPC).

    safetensors writes through a temp file of its own, renamed over ours, so for .safetensors
    the error is the one it raises for ENOSPC (its text carries "(os error 28)").
    """
    import tempfile

    if name.endswith(".safetensors"):
        import safetensors.torch
        from safetensors import SafetensorError

        def save_file(*a, **kw):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        return
    real, seen = tempfile.mkstemp, []

    def mkstemp(*a, **kw):
        fd, path = real(*a, **kw)
        if os.path.basename(path).startswith(f".{name}."):
            seen.append(path)
            if len(seen) == nth:
                os.unlink(path)
                os.symlink("/dev/full", path)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("name, nth, holds", [("last.pt", 2, 2), ("final.safetensors", 1, 6), ("log.jsonl", 1, 4)])
def test_full_disk_keeps_the_previous_checkpoint_and_says_where(photos, tmp_path, monkeypatch, name, nth, holds):
    values = settings(photos, tmp_path / "run", steps=6, ckpt_every=2)
    ref_sums, ref_rows = reference({**values, "out_dir": str(tmp_path / "ref")})
    run = tmp_path / "run"
    if name == "log.jsonl":  # the logs are rewritten when a run resumes
        train(load_config(values={**values, "steps": 4}))
    enospc_on(monkeypatch, name, nth)
    with pytest.raises(FastSRError) as e:
        train(load_config(values=values), resume=(run / "last.pt").exists())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the disk is full: writing ") and str(run / name) in msg, msg
    assert "No space left on device" in msg and f"last.pt holds step {holds}" in msg, msg
    monkeypatch.undo()
    assert checkpoint_step(run, ref_sums) == holds
    assert temp_files(run) == []
    result = train(load_config(values=values), resume=True)
    assert result.weights_checksum == ref_sums[6] and log_rows(run) == ref_rows


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_on_the_command_line_is_one_line_and_exit_1(photos, driver, forkserver, tmp_path):
    values = settings(photos, tmp_path / "run", steps=6, ckpt_every=2)
    child = Child(forkserver, driver, values, "enospc:last.pt:2", tmp_path / "child.log")
    assert child.wait() == 1
    lines = [line for line in child.output().splitlines() if "error" in line or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("fastsr: error: the disk is full: writing the checkpoint "), lines
    assert f"{tmp_path / 'run' / 'last.pt'} holds step 2 (continue with --resume)" in lines[0]
    assert load_train_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2 and temp_files(tmp_path / "run") == []


# ---------------------------------------------------------------------------------------
# NaN / inf loss
# ---------------------------------------------------------------------------------------


def nan_in_batches(monkeypatch, batches) -> None:
    """A NaN pixel in the given (1-based) batches of the device sampler."""
    real = fastsr.data.DeviceSampler.next

    def next_batch(self):
        batch = real(self)
        if self.batches in batches:
            batch.lr[0, 0, 0, 0] = float("nan")
        return batch

    monkeypatch.setattr(fastsr.data.DeviceSampler, "next", next_batch)


def test_nan_skip_drops_the_update_counts_it_and_resumes_exactly(photos, tmp_path, monkeypatch):
    nan_in_batches(monkeypatch, {3})
    values = settings(photos, tmp_path / "full", steps=6, nan_policy="skip", ema_decay=0.5)
    sums = {}
    full = train(load_config(values=values), on_step=lambda i: sums.setdefault(i.step, (i.skipped,
                                                                                      weights_checksum(i.model))))
    assert full.skipped_steps == 1 and [s for s, (skipped, _) in sums.items() if skipped] == [3]
    assert sums[3][1] == sums[2][1] != sums[4][1]  # step 3 left the weights alone
    assert math.isnan(full.losses[2]) and all(math.isfinite(v) for i, v in enumerate(full.losses) if i != 2)
    rows = log_rows(tmp_path / "full")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1] and "loss" not in rows[2]
    state = load_train_checkpoint(tmp_path / "full" / "last.pt")
    assert state["skipped_steps"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {5}  # Adam made 5 updates
    assert json.loads((tmp_path / "full" / "result.json").read_text())["skipped_steps"] == 1
    # Split at step 3 (just after the skip) and resumed: the same run.
    part = {**values, "out_dir": str(tmp_path / "part")}
    train(load_config(values={**part, "steps": 3}))
    resumed = train(load_config(values=part), resume=True)
    assert resumed.skipped_steps == 1 and resumed.weights_checksum == full.weights_checksum
    assert log_rows(tmp_path / "part") == rows


def test_nan_skip_stops_after_too_many_in_a_row(photos, tmp_path, monkeypatch):
    nan_in_batches(monkeypatch, set(range(4, 100)))
    values = settings(photos, tmp_path / "run", steps=20, nan_policy="skip", nan_max_consecutive=3, ckpt_every=2)
    with pytest.raises(FastSRError, match=r"not finite for 3 steps in a row \(steps 4-6, nan_max_consecutive = 3\)"
                                          r".*last.pt holds step 4"):
        train(load_config(values=values))


def test_nan_stop_names_the_step_and_keeps_the_checkpoint(photos, tmp_path, monkeypatch, capsys):
    nan_in_batches(monkeypatch, {5})
    values = settings(photos, tmp_path / "run", steps=20, ckpt_every=2)  # nan_policy = stop: the default
    assert cli_main(["train", *as_args(values)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert len(err) == 1 and err[0].startswith("fastsr: error: the loss is nan at step 5 (nan_policy = 'stop')"), err
    assert "last.pt holds step 4" in err[0]
    assert load_train_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_huge_learning_rate_is_caught(photos, tmp_path, policy):
    values = settings(photos, tmp_path / "run", steps=20, lr=1e10, nan_policy=policy, nan_max_consecutive=2)
    with pytest.raises(FastSRError, match="at step 2 " if policy == "stop" else "2 steps in a row"):
        train(load_config(values=values))


def test_nan_on_one_ddp_rank_skips_the_step_on_every_rank(photos, driver, tmp_path):
    run = tmp_path / "ddp"
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTSR_FAULT": "nan:1:2"}  # rank 1, its 2nd batch
    values = settings(photos, run, steps=4, batch_size=4, nan_policy="skip")
    r = subprocess.run([*launcher, "--standalone", "--nproc-per-node", "2", str(driver), *as_args(values)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # slow when the machine is busy
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["step"] == 4 and result["skipped_steps"] == 1
    assert len(set(result["rank_checksums"])) == 1
    assert "step 2: the loss is not finite on another rank: update skipped" in r.stdout  # rank 0 speaks
    state = load_train_checkpoint(run / "last.pt")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}


def test_full_disk_errors_are_recognized_by_errno():
    # EDQUOT (quota) reads as a full disk too; other write errors say what they are.
    from fastsr.train.runfiles import writing

    for code, words in ((errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "the disk is full"),
                        (errno.EACCES, "cannot write")):
        with pytest.raises(FastSRError, match=f"^{words}: writing the log x failed"):
            with writing(Path("x"), "the log"):
                raise OSError(code, os.strerror(code))
