"""Training: exact resume, safe checkpoints, Ctrl-C, DDP, MDSR branches, fused vs eager, config errors.

Tiny models (1 block, 8 features) on tiny random images keep each run to a fraction of a
second; the subprocess tests pay mostly for starting Python and importing torch.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastsr.errors import FastSRError
from fastsr.train import ConfigError, TrainConfig, load_config, load_train_checkpoint, train
from testenv import GLOO_THREADS_REPORT, torchrun_command

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "n_resblocks": 1, "n_feats": 8, "res_scale": 1.0, "batch_size": 2, "patch_size": 8,
    "val_dir": "", "plot": False, "log_every": 1, "ckpt_every": 1000, "threads": 1,
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(40, 48), (44, 36), (52, 52)]):
        # Smooth-ish content (upsampled noise) so the network has something learnable.
        small = torch.rand(1, 3, h // 4, w // 4, generator=g)
        img = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"p{i}.png")
    return folder


def config(photos: Path, out: Path, **kw) -> TrainConfig:
    values = {**TINY, "train_dir": str(photos), "out_dir": str(out), **kw}
    return load_config(values=values)


def cli_args(photos: Path, out: Path, **kw) -> list[str]:
    values = {**TINY, "train_dir": str(photos), "out_dir": str(out), **kw}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def run_module(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastsr.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


def model_state(run_dir: Path) -> dict:
    return load_train_checkpoint(run_dir / "last.pt")["model"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---------------------------------------------------------------------------------------
# Resume, checkpoints, interruption
# ---------------------------------------------------------------------------------------


def test_resume_in_a_new_process_is_bitwise_exact(photos, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = run_module(cli_args(photos, straight, steps=6))
    assert r.returncode == 0, r.stderr
    r = run_module(cli_args(photos, split, steps=3))
    assert r.returncode == 0, r.stderr
    r = run_module(cli_args(photos, split, steps=6) + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "at step 3" in r.stdout
    a, b = load_train_checkpoint(straight / "last.pt"), load_train_checkpoint(split / "last.pt")
    assert a["step"] == b["step"] == 6
    assert_bitwise_equal(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_bitwise_equal(sa, sb)
    # The logs of the split run read like the straight run's (same steps, same losses).
    rows = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]


def test_dataloader_path_with_ema_and_clipping_resumes_exactly(photos, tmp_path):
    kw = dict(loader="dataloader", num_workers=1, ema_decay=0.9, grad_clip=1.0)
    full = train(config(photos, tmp_path / "full", steps=5, **kw))
    train(config(photos, tmp_path / "part", steps=2, **kw))
    resumed = train(config(photos, tmp_path / "part", steps=5, **kw), resume=True)
    assert full.losses[2:] == resumed.losses
    a, b = load_train_checkpoint(tmp_path / "full" / "last.pt"), load_train_checkpoint(tmp_path / "part" / "last.pt")
    assert_bitwise_equal(a["model"], b["model"])
    assert_bitwise_equal(a["ema"], b["ema"])
    assert not torch.equal(a["ema"]["head.0.weight"], a["model"]["head.0.weight"])


def test_checkpoint_is_loadable_with_weights_only_and_holds_every_state(photos, tmp_path):
    train(config(photos, tmp_path / "run", steps=2, amp="fp16", fused=False))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 2
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "sampler", "config"):
        assert state[key] is not None, key
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["sampler"][0]["kind"] == "device"


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(photos, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: half a file, then the disk "fills up"
            f.write(b"PK\x03\x04 partial checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(FastSRError, match="the disk is full: writing the checkpoint .*last.pt holds step 2"):
        train(config(photos, run, steps=4, ckpt_every=2))
    monkeypatch.undo()
    assert load_train_checkpoint(run / "last.pt")["step"] == 2
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []
    # ... and the run continues from it.
    result = train(config(photos, run, steps=4, ckpt_every=2), resume=True)
    assert result.step == 4 and result.steps_run == 2


def test_keyboard_interrupt_from_a_callback_saves_and_returns(photos, tmp_path):
    def stop_at_3(info):
        if info.step == 3:
            raise KeyboardInterrupt

    result = train(config(photos, tmp_path / "run", steps=50), on_step=stop_at_3)
    assert result.interrupted and result.step == 3
    assert load_train_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3
    assert result.final_weights is None


def interrupt_after_first_step(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`python -m fastsr.train ARGS` in `cwd`, SIGINT once it reports step 1: (code, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastsr.train", *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if "step 1/" in line:
                break
            assert time.monotonic() < deadline, "no step reported"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, out, err


def test_sigint_saves_a_checkpoint_and_exits_cleanly(photos, tmp_path):
    run = tmp_path / "run"
    code, out, err = interrupt_after_first_step(cli_args(photos, run, steps=100000), REPO)
    assert code == 130, err
    lines = [line for line in out.splitlines() if "interrupted at step" in line]
    assert len(lines) == 1 and "checkpoint saved to" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in err
    assert load_train_checkpoint(run / "last.pt")["step"] >= 1


def test_a_fresh_run_refuses_to_overwrite_a_run_folder(photos, tmp_path):
    train(config(photos, tmp_path / "run", steps=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config(photos, tmp_path / "run", steps=2))
    with pytest.raises(ConfigError, match="different network"):
        train(config(photos, tmp_path / "run", steps=2, n_feats=16), resume=True)


# ---------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------


# `fastsr.train.main`, then the names of the gloo threads still running in this process.
DDP_DRIVER = r"""
import os, sys
from fastsr.train import main
code = main(sys.argv[1:])
""" + GLOO_THREADS_REPORT


def test_two_process_gloo_ddp_ends_with_identical_weights(photos, tmp_path):
    run = tmp_path / "ddp"
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DDP_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*torchrun_command(2, driver), *cli_args(photos, run, steps=4, batch_size=4)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    if Path("/proc/self/task").is_dir():
        # The process group is gone when train returns: gloo's worker threads joined. A group
        # that outlives it (torch.distributed.nn.functional imported after init binds it as
        # a default argument) leaves them to interpreter shutdown, where one releasing a
        # collective's tensors aborts the process now and then (SIGABRT after a good run).
        assert r.stdout.count("gloo threads left: []") == 2, r.stdout[-2000:]
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["step"] == 4
    assert len(result["rank_checksums"]) == 2 and len(set(result["rank_checksums"])) == 1
    state = load_train_checkpoint(run / "last.pt")
    assert len(state["sampler"]) == 2  # each rank's sampling state, to resume exactly
    assert not torch.equal(state["sampler"][0]["patch_rng"], state["sampler"][1]["patch_rng"])
    assert r.stdout.count("resolved config") == 1  # rank 0 alone logs
    assert "DDP over 2 ranks (2 patches each)" in r.stdout


# ---------------------------------------------------------------------------------------
# MDSR, fused vs eager, AMP, validation and init_from
# ---------------------------------------------------------------------------------------


def test_mdsr_draws_every_scale_and_trains_only_the_drawn_branch(photos, tmp_path):
    drawn = []

    def check(info):
        model = info.model
        drawn.append(info.scale)
        for i, s in enumerate(model.scales):
            for branch in (model.upsample[i], model.pre_process[i]):
                grads = [p.grad for p in branch.parameters()]
                if s == info.scale:
                    assert all(g is not None and g.abs().sum() > 0 for g in grads), s
                else:
                    assert all(g is None for g in grads), (s, info.scale)
        assert model.head[0].weight.grad is not None and model.tail[0].weight.grad is not None

    result = train(config(photos, tmp_path / "mdsr", model="mdsr_baseline", steps=10), on_step=check)
    assert set(drawn) == {2, 3, 4} and result.step == 10


def test_fused_and_eager_training_agree(photos, tmp_path):
    fused = train(config(photos, tmp_path / "fused", steps=20, fused=True, seed=3))
    eager = train(config(photos, tmp_path / "eager", steps=20, fused=False, seed=3))
    assert torch.allclose(torch.tensor(fused.losses), torch.tensor(eager.losses), rtol=1e-5, atol=0)
    a, b = model_state(tmp_path / "fused"), model_state(tmp_path / "eager")
    for k in a:
        # An Adam step moves a weight by up to ~lr = 1e-4: a wrong or missing gradient term
        # shows up at that size, float rounding (measured ~1e-8 here) far below it.
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_amp_trains(photos, tmp_path, fused):
    result = train(config(photos, tmp_path / "amp", steps=3, amp="bf16", fused=fused))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert model_state(tmp_path / "amp")["head.0.weight"].dtype == torch.float32


def test_validation_logs_plot_and_x2_to_x3_init(photos, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    val = tmp_path / "val"
    val.mkdir()
    shutil.copy(sorted(photos.iterdir())[2], val / "v.png")
    x2 = tmp_path / "x2"
    result = train(config(photos, x2, steps=4, val_dir=str(val), val_every=2, log_every=2, plot=True))
    assert result.best_step in (2, 4) and result.best_psnr == max(result.best_psnr, result.val["psnr"])
    assert {p.name for p in x2.iterdir()} >= {"config.toml", "last.pt", "best.safetensors", "final.safetensors",
                                               "log.csv", "log.jsonl", "curves.png", "result.json"}
    header, *rows = (x2 / "log.csv").read_text().splitlines()
    assert header == "step,loss,lr,steps_per_s,elapsed_s,val_psnr,val_ssim"
    assert [r.split(",")[0] for r in rows] == ["2", "4"] and all(r.split(",")[5] for r in rows)
    assert load_config(x2 / "config.toml") == config(photos, x2, steps=4, val_dir=str(val), val_every=2,
                                                     log_every=2, plot=True)
    capsys.readouterr()
    x3 = train(config(photos, tmp_path / "x3", steps=1, scale=3, init_from=str(x2 / "best.safetensors")))
    out = capsys.readouterr().out
    assert "skipped tail.0.0.weight: upsampler of another scale" in out
    best = load_file(x2 / "best.safetensors")
    x3_state = model_state(tmp_path / "x3")
    assert x3.step == 1 and x3_state["tail.0.0.weight"].shape[0] == 9 * 8  # x3 upsampler, freshly made
    assert not torch.equal(best["body.0.body.0.weight"], torch.zeros_like(best["body.0.body.0.weight"]))


def test_held_out_validation_split_from_the_training_folders(photos, tmp_path, capsys):
    """The shipped configs' shape: train on T91/ + BSD200/, validate on named images of one
    of them, which leave the training data."""
    root = tmp_path / "data"
    for sub, names in (("A", ["p0.png", "p1.png"]), ("B", ["p2.png"])):
        (root / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(photos / n, root / sub / n)
    shutil.copy(photos / "p0.png", root / "B" / "held.png")
    cfg = config(photos, tmp_path / "run", steps=1, train_dir=[str(root / "A"), str(root / "B")],
                 val_dir=str(root / "B"), val_images=["held"])
    assert cfg.train_dir == f"{root / 'A'}, {root / 'B'}" and cfg.val_images == "held"
    result = train(cfg)
    out = capsys.readouterr().out
    assert "3 HR images" in out and "1 held out for validation" in out and result.best_psnr is not None


def test_a_missing_data_folder_is_named_with_a_hint_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FastSRError, match=r"shared/data/train/T91: training folder does not exist; "
                                          r"the shipped configs read the 291-image set"):
        train(load_config(REPO / "configs" / "ship_edsr_baseline_x2.toml",
                          values={"train_dir": str(tmp_path / "shared/data/train/T91"), "out_dir": str(out)}))
    with pytest.raises(FastSRError, match=r"train_photos: training folder does not exist; "
                                          r"python scripts/make_train_photos.py makes it"):
        train(load_config(values={"train_dir": str(tmp_path / "train_photos"), "out_dir": str(out)}))
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def test_unknown_config_keys_are_named_with_the_valid_ones(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "edsr_baseline"\nlearning_rate = 1e-3\n')
    with pytest.raises(ConfigError) as e:
        load_config(toml)
    msg = str(e.value)
    assert "'learning_rate'" in msg and str(toml) in msg and "valid keys:" in msg and "batch_size" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'bach_size' in --set \(did you mean 'batch_size'\?\)"):
        load_config(overrides=["bach_size=4"])
    with pytest.raises(ConfigError, match="'steps'.*expected an integer"):
        load_config(overrides=["steps=many"])
    with pytest.raises(ConfigError, match="'amp'.*bf16, fp16"):
        load_config(overrides=["amp=fp8"])
    r = run_module(["--set", "nope=1"])
    assert r.returncode == 1 and r.stderr.startswith("fastsr train: error: unknown config key 'nope'")


def test_config_precedence_and_types(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 2e5\nlr = 1\ntrain_dir = "a"\nfused = false\n')
    cfg = load_config(toml, ["train_dir=b/c", "lr=3e-4"], {"steps": 7})
    assert (cfg.steps, cfg.lr, cfg.train_dir, cfg.fused) == (7, 3e-4, "b/c", False)
    assert load_config(toml).steps == 200000
    assert cfg.run_dir == Path("out/edsr_baseline_x2")


# ---------------------------------------------------------------------------------------
# Resume in place, packaged configs, a clean clone's defaults
# ---------------------------------------------------------------------------------------


def cli_main(args: list[str], capsys) -> tuple[int, str, str]:
    """`fastsr train ARGS` in this process: (exit code, stdout, stderr)."""
    from fastsr.train import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_sigint_then_resume_run_dir_finishes_in_place(photos, tmp_path):
    run, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    code, out, err = interrupt_after_first_step(cli_args(photos, run, steps=100000), cwd)
    assert code == 130, err
    assert f"continue with: fastsr train --resume {run}" in out
    assert "decoding training images" not in err  # piped: no progress bar glued to the log
    stopped = load_train_checkpoint(run / "last.pt")["step"]
    # Exactly the printed command, plus more steps than it had done (steps is free to change).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fastsr.train", "--resume", str(run), "--steps", str(stopped + 2)],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {stopped} from {run / 'last.pt'}" in r.stdout and "changed settings" not in r.stdout
    result = json.loads((run / "result.json").read_text())
    assert result["step"] == stopped + 2 and result["out_dir"] == str(run)
    assert list(cwd.iterdir()) == []  # no new run folder (out/<name>) where it was launched
    saved = load_train_checkpoint(run / "last.pt")["config"]
    assert saved["batch_size"] == TINY["batch_size"] and saved["patch_size"] == TINY["patch_size"]


def test_resume_takes_last_pt_and_refuses_conflicts_unless_override(photos, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(photos, run, steps=2))
    code, _, err = cli_main(["--resume", str(run / "last.pt"), "--set", "batch_size=4", "--lr", "0.001",
                             "--steps", "3"], capsys)
    assert code == 1
    assert "differ from the run's saved config" in err and "batch_size = 4 (the run has 2)" in err
    assert "lr = 0.001 (the run has 0.0001)" in err and "--override" in err
    assert load_train_checkpoint(run / "last.pt")["step"] == 2  # nothing ran
    code, out, err = cli_main(["--resume", str(run), "--set", "batch_size=4", "--steps", "3", "--override"], capsys)
    assert code == 0, err
    assert "resuming with changed settings" in out and "batch_size 2 -> 4" in out
    assert load_train_checkpoint(run / "last.pt")["step"] == 3
    # A different run folder is a conflict too; the same one, spelled another way, is not.
    code, _, err = cli_main(["--resume", str(run), "--out-dir", str(tmp_path / "elsewhere")], capsys)
    assert code == 1 and "out_dir" in err
    code, _, err = cli_main(["--resume", str(run), "--out-dir", f"{run}/.", "--steps", "4"], capsys)
    assert code == 0, err


def test_resume_auto_starts_fresh_then_continues(photos, tmp_path, capsys):
    run = tmp_path / "run"
    args = cli_args(photos, run, steps=2)
    code, out, err = cli_main([*args, "--resume", "auto"], capsys)
    assert code == 0, err
    assert "--resume auto: no" in out and "starting the run fresh" in out
    code, out, err = cli_main([*args, "--resume", "auto", "--steps", "3"], capsys)
    assert code == 0, err
    assert "at step 2 from" in out and load_train_checkpoint(run / "last.pt")["step"] == 3
    code, _, err = cli_main(["--resume", str(tmp_path / "nothing")], capsys)
    assert code == 1 and "no training checkpoint to resume from" in err
    code, _, err = cli_main([*args, "--override"], capsys)
    assert code == 1 and "--override only applies with --resume" in err


def test_packaged_configs_are_found_by_name(tmp_path, monkeypatch):
    from fastsr.train.config import resolve_config_path

    monkeypatch.chdir(tmp_path)  # not the repository: the name must not resolve as a relative path
    for name in ("edsr_baseline_x2", "edsr_baseline_x2.toml"):
        path = resolve_config_path(name)
        assert path.name == "edsr_baseline_x2.toml" and path.is_file()
        assert load_config(name).scale == 2
    with pytest.raises(ConfigError, match=r"no packaged config of that name \(packaged: edsr_baseline_x2, "):
        resolve_config_path("edsr_baseline_x9")


def test_the_wheel_ships_the_configs(tmp_path):
    """Build the wheel, unpack it alone on sys.path, and find the packaged config from there."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "wheel"), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import zipfile

    (wheel,) = (tmp_path / "wheel").glob("fastsr-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import fastsr.train.config as c; p = c.resolve_config_path('edsr_baseline_x2'); "
            "print(p); print(c.load_config('ship_edsr_baseline_x4').init_from)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    path = Path(r.stdout.splitlines()[0])
    assert path.is_relative_to(site) and path == site / "fastsr" / "configs" / "edsr_baseline_x2.toml"


def test_defaults_and_example_configs_hold_no_development_paths():
    assert "shared" not in TrainConfig().val_dir and "shared" not in TrainConfig().train_dir
    for scale in (2, 3, 4):
        cfg = load_config(REPO / "configs" / f"edsr_baseline_x{scale}.toml")
        assert "shared" not in cfg.train_dir + cfg.val_dir, scale
        assert cfg.val_dir == cfg.train_dir and cfg.val_images  # held out of the training photos


def test_a_missing_training_folder_says_how_to_make_it_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(["-c", "edsr_baseline_x2", "--set", "steps=1500"], capsys)
    assert code == 1 and "data/train_photos: training folder does not exist" in err
    assert "scripts/make_train_photos.py" in err
    assert list(tmp_path.iterdir()) == []


def test_the_summary_gives_the_training_rate_and_the_wall_clock_rate(photos, tmp_path):
    result = train(config(photos, tmp_path / "run", steps=6, val_dir=str(photos), val_every=2))
    assert 0 < result.steps_per_s_overall <= result.steps_per_s
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["steps_per_s_overall"] == result.steps_per_s_overall
