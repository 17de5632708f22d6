"""The measured choice between implementations (fastsr.ops.dispatch) and model.plan.

Timing needs CUDA; here the timer is replaced by fake timings and the signatures say
"cuda", so the selection logic (winner, cache keys, disk cache, deterministic pin, forced
family) is tested without a GPU. bench/gpu_check.sh makes a real selection on one."""
from __future__ import annotations

import json

import pytest
import torch

import fastsr
from fastsr.errors import BackendUnavailable
from fastsr.ops import dispatch


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    monkeypatch.setenv("FASTSR_PLAN_CACHE", "")  # off: never a default path under $HOME
    monkeypatch.delenv("FASTSR_DETERMINISTIC", raising=False)
    dispatch.clear_cache()
    monkeypatch.setattr(dispatch, "_disk", None)
    yield
    dispatch.set_timer(None)
    dispatch.clear_cache()


def gpu_sig(op="resblock", shape=(1, 64, 540, 960), dtype=torch.bfloat16, gpu="NVIDIA H200", k=3):
    return dispatch.Signature(op, "cuda", gpu, dtype, shape, shape[1], k)


class FakeTimer:
    """Timings by implementation name; counts the calls and what each one timed."""

    def __init__(self, **ms):
        self.ms, self.calls = ms, []

    def __call__(self, runs):
        self.calls.append(sorted(runs))
        return {name: self.ms[name] for name in runs}


def never_run(name):
    return lambda: pytest.fail(f"the fake timer must not run {name}")


def test_the_fastest_candidate_wins_and_is_cached():
    timer = FakeTimer(triton_block=2.0, triton_convs=1.5, aten=1.8)
    dispatch.set_timer(timer)
    choice = dispatch.choose("resblock", gpu_sig(), None, never_run)
    assert (choice.name, choice.family) == ("triton_convs", "triton")
    assert choice.times_ms == {"triton_block": 2.0, "triton_convs": 1.5, "aten": 1.8}
    assert timer.calls == [["aten", "triton_block", "triton_convs"]]  # every candidate that can run
    assert dispatch.choose("resblock", gpu_sig(), None, never_run) == choice
    assert len(timer.calls) == 1  # cached: timed once per key
    timer.ms.update(aten=0.5, triton_conv=0.7)
    assert dispatch.choose("conv2d", gpu_sig("conv2d"), None, never_run).name == "aten"  # the floor can win


def test_would_time_says_what_choose_will_do(monkeypatch, tmp_path):
    dispatch.set_timer(FakeTimer(triton_block=2.0, triton_convs=1.5, aten=1.8))
    assert dispatch.would_time("resblock", gpu_sig())
    assert not dispatch.would_time("resblock", gpu_sig(), "triton_block")  # one candidate
    assert not dispatch.would_time("resblock", gpu_sig(), "reference")
    dispatch.choose("resblock", gpu_sig(), None, never_run)
    assert not dispatch.would_time("resblock", gpu_sig())  # remembered
    assert dispatch.would_time("resblock", gpu_sig(shape=(1, 64, 270, 480)))
    monkeypatch.setenv("FASTSR_PLAN_CACHE", str(tmp_path / "plans.json"))
    dispatch.choose("resblock", gpu_sig(shape=(1, 64, 270, 480)), None, never_run)  # saved to disk
    dispatch.clear_cache()
    assert not dispatch.would_time("resblock", gpu_sig(shape=(1, 64, 270, 480)))  # on disk
    monkeypatch.setenv("FASTSR_DETERMINISTIC", "1")
    assert not dispatch.would_time("resblock", gpu_sig(shape=(1, 64, 135, 240)))  # pinned


def test_the_cache_key_separates_shapes_dtypes_and_gpus():
    timer = FakeTimer(triton_block=1.0, triton_convs=2.0, aten=3.0)
    dispatch.set_timer(timer)
    for sig in (gpu_sig(), gpu_sig(shape=(1, 64, 270, 480)), gpu_sig(dtype=torch.float16), gpu_sig(gpu="NVIDIA A100"),
                gpu_sig(shape=(16, 64, 48, 48))):
        dispatch.choose("resblock", sig, None, never_run)
    assert len(timer.calls) == 5
    dispatch.choose("resblock", gpu_sig(gpu="NVIDIA A100"), None, never_run)
    assert len(timer.calls) == 5


def test_forcing_triton_bypasses_the_aten_floor_and_a_name_is_exact():
    timer = FakeTimer(triton_block=3.0, triton_convs=2.0, aten=0.1)
    dispatch.set_timer(timer)
    assert dispatch.choose("resblock", gpu_sig(), "triton", never_run).name == "triton_convs"
    assert timer.calls == [["triton_block", "triton_convs"]]  # aten never timed
    assert dispatch.choose("resblock", gpu_sig(), "triton_block", never_run).name == "triton_block"
    assert dispatch.choose("conv2d", gpu_sig("conv2d"), "triton", never_run).name == "triton_conv"
    assert len(timer.calls) == 1  # one candidate left: nothing to time
    wide = gpu_sig(shape=(1, 256, 64, 64))  # EDSR's F = 256: beyond the block kernel's limit
    assert dispatch.choose("resblock", wide, "triton", never_run).name == "triton_convs"
    with pytest.raises(BackendUnavailable, match="one-launch block kernel does not take C=256"):
        dispatch.choose("resblock", wide, "triton_block", never_run)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.choose("resblock", wide, "cudnn", never_run)


@pytest.mark.parametrize("how", ["torch", "env"])
def test_deterministic_mode_pins_the_declared_choice_without_timing(how, monkeypatch):
    timer = FakeTimer(triton_block=9.0, triton_convs=1.0, aten=1.0)
    dispatch.set_timer(timer)
    if how == "env":
        monkeypatch.setenv("FASTSR_DETERMINISTIC", "1")
    else:
        torch.use_deterministic_algorithms(True)
    try:
        assert dispatch.choose("resblock", gpu_sig(), None, never_run) == dispatch.Choice("triton_block", "triton")
        assert dispatch.choose("conv2d", gpu_sig("conv2d"), None, never_run).name == "triton_conv"
        assert dispatch.choose("conv2d_backward", gpu_sig("conv2d_backward"), None, never_run).name == "triton"
    finally:
        torch.use_deterministic_algorithms(False)
    assert timer.calls == []


def test_the_disk_cache_round_trips_and_rejects_a_stale_version(tmp_path, monkeypatch):
    path = tmp_path / "plans.json"
    monkeypatch.setenv("FASTSR_PLAN_CACHE", str(path))
    timer = FakeTimer(triton_block=1.0, triton_convs=2.0, aten=3.0)
    dispatch.set_timer(timer)
    first = dispatch.choose("resblock", gpu_sig(), None, never_run)
    data = json.loads(path.read_text())
    assert data["versions"] == dispatch.cache_versions() and "NVIDIA H200" in next(iter(data["choices"]))
    dispatch.clear_cache()  # a new process: only the file remembers
    monkeypatch.setattr(dispatch, "_disk", None)
    assert dispatch.choose("resblock", gpu_sig(), None, never_run) == first
    assert len(timer.calls) == 1
    data["versions"]["fastsr"] = "0.0.0-old"
    path.write_text(json.dumps(data))
    dispatch.clear_cache()
    monkeypatch.setattr(dispatch, "_disk", None)
    dispatch.choose("resblock", gpu_sig(), None, never_run)
    assert len(timer.calls) == 2  # stale: measured again, and the file rewritten for this version
    assert json.loads(path.read_text())["versions"] == dispatch.cache_versions()
    path.write_text("{not json")
    dispatch.clear_cache()
    monkeypatch.setattr(dispatch, "_disk", None)
    dispatch.choose("resblock", gpu_sig(), None, never_run)
    assert len(timer.calls) == 3  # damaged: ignored, measured again


def test_cpu_is_chosen_without_timing():
    dispatch.set_timer(lambda runs: pytest.fail("nothing is timed on the CPU"))
    sig = dispatch.Signature.of("resblock", torch.zeros(1, 8, 4, 4), torch.zeros(8, 8, 3, 3))
    assert dispatch.choose("resblock", sig, None, never_run) == dispatch.Choice("cpu", "cpu")
    assert dispatch.choose("conv2d", dispatch.Signature.of("conv2d", torch.zeros(1, 3, 4, 4, dtype=torch.int32),
                                                           torch.zeros(8, 3, 3, 3)), None).name == "reference"


def test_model_plan_names_every_layer_and_what_ran(monkeypatch):
    monkeypatch.setenv("FASTSR_DETERMINISTIC", "1")  # fastsr's own ops, not a timed OpenVINO run
    model = fastsr.EDSR(4, n_resblocks=2, n_feats=8, fused=True).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 5, 6) * 255)
    assert [e["layer"] for e in model.plan] == ["head.0", "body.0", "body.1", "body.2", "tail.0.0", "tail.0.2",
                                                "tail.1"]
    assert {e["implementation"] for e in model.plan} == {"cpu"} and model.backend == "cpu"
    assert not any("times_ms" in e for e in model.plan)  # nothing timed on the CPU

    mdsr = fastsr.MDSR((2, 3), n_resblocks=1, n_feats=8, fused=True, recompute=False).train()
    out = mdsr(torch.rand(1, 3, 5, 6) * 255, scale=3)
    layers = [e["layer"] for e in mdsr.plan]
    assert layers[:3] == ["head.0", "pre_process.1.0.body.0", "pre_process.1.0.body.2"]  # saving: two convs each
    assert layers[-3:] == ["body.1", "upsample.1.0", "tail.0"]
    out.sum().backward()
    assert len(mdsr.plan) == len(layers)  # backward's recompute does not grow the last forward's plan


def test_model_plan_under_the_interpreter_reports_the_triton_kernels():
    if dispatch.unsupported_reasons("triton", torch.zeros(1)):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    model = fastsr.EDSR(2, n_resblocks=1, n_feats=8, backend="triton").eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 4, 5) * 255)
    assert [(e["layer"], e["implementation"]) for e in model.plan] == [
        ("head.0", "triton_conv"), ("body.0", "triton_block"), ("body.1", "triton_conv"),
        ("tail.0.0", "triton_conv"), ("tail.1", "triton_conv")]
    assert model.backend == "triton"


def test_plan_check_script_prints_and_writes_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTSR_DETERMINISTIC", "1")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "plan_check.py"
    spec = importlib.util.spec_from_file_location("plan_check", path)
    plan_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_check)
    out = tmp_path / "plan.json"
    assert plan_check.main(["--device", "cpu", "--lr-size", "6x7", "--dtype", "float32", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["backend"] == "cpu" and len(data["plan"]) == 1 + 16 + 1 + 1 + 1  # head, blocks, body conv, up, tail
    assert "body.15" in capsys.readouterr().out


def test_the_command_line_keeps_choices_under_home_and_the_library_nowhere(monkeypatch, tmp_path):
    from fastsr import cli

    monkeypatch.setattr(dispatch, "_default_plan_cache", None)  # restored after the test
    monkeypatch.delenv("FASTSR_PLAN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dispatch.plan_cache_path() is None  # the library: no file unless asked for
    cli.main(["upscale", str(tmp_path / "none.png"), "-o", str(tmp_path / "o"), "-s", "2", "--bicubic"])
    assert dispatch.plan_cache_path() == str(tmp_path / ".cache" / "fastsr" / "plans.json")
    monkeypatch.setenv("FASTSR_PLAN_CACHE", "")
    assert dispatch.plan_cache_path() is None  # the variable wins, "" is off
