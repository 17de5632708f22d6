"""The Triton kernels compile for a GPU (sm_90) even where none is present, as the JIT would
compile them for real CUDA arguments: bench/compile_check.py drives the fused model itself,
records its launches and compiles them ahead of time, then reads the SASS.

The full emission (every config, 540x960, all presets) is run by hand (bench/README.md); here
its quick form: EDSR-baseline x2 bf16 at a small LR size, one config per launch, inference and
one training step. And the check that catches a compile without the JIT's specialization: the
body conv must load its operands 16 bytes at a time."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from testenv import REPO_ROOT

SCRIPT = str(REPO_ROOT / "bench" / "compile_check.py")


def _has_cuda_compiler() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia.compiler") is not None
    except ImportError:  # no triton at all
        return False


needs_compiler = pytest.mark.skipif(not _has_cuda_compiler(), reason="this Triton build has no CUDA backend")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # The GPU code path; and the autotuned configs a default run has (testenv pins them).
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSR_DETERMINISTIC")}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


@needs_compiler
def test_model_emission_quick_form(tmp_path):
    """Every launch of a fused inference forward and a training step compiles for sm_90 with
    16-byte body-conv loads; the manifest names every role and points at real cubins."""
    proc = _run("--model", "edsr_baseline", "--scale", "2", "--lr-size", "36x64", "--dtype", "bfloat16",
                "--first-config", "--check-wide-loads", "--emit", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " 0 problem(s)" in proc.stdout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["arch"] == 90
    kernels = manifest["kernels"]
    roles = {k["role"] for k in kernels}
    assert roles == {"head", "body", "block", "upsampler", "tail", "dgrad", "wgrad", "reduce", "pad"}, roles
    for k in kernels:
        assert set(k) >= {"name", "role", "config", "cubin"}
        assert (tmp_path / k["cubin"]).stat().st_size > 0
    # The JIT's attributes reached the compile: the activation pointer is 16-byte divisible
    # and the batch of 1 became a constant, as at a real launch.
    block = next(k for k in kernels if k["role"] == "block" and "inference" in k["phases"])
    assert "x_ptr" in block["divisible_by_16"] and block["constant_ints"] == ["N"], block
    # One training step's launches are there too: forward and backward phases.
    phases = {p for k in kernels for p in k["phases"]}
    assert phases == {"inference", "train.forward", "train.backward"}, phases
    rows = json.loads((tmp_path / "sass_report.json").read_text())["rows"]
    body = [r for r in rows if r["role"] == "body" and r["dtype"] == "bf16"]
    # sm_90 has TMA: the body convs run kernels/conv2d_tma.py, operand boxes by UTMALDG in the
    # hot loop and no cp.async (the pointer kernel's 16-byte loads: the --arch 80 test below).
    assert body and all(r["name"] == "_conv2d_tma_kernel" and r["sass"]["hot_loop_tma_loads"] > 0
                        and r["sass"]["cp_async"] == 0 and r["sass"]["mma"] == "HGMMA" for r in body), body
    assert all(r["sass"]["regs"] > 0 for r in rows)
    # The block runs kernels/resblock_tma.py on sm_90: boxes by UTMALDG in the hot loop, HGMMA from
    # shared memory, 16-byte stores (workspace, out), no cp.async, no spills.
    block_rows = [r for r in rows if r["role"] == "block"]
    assert block_rows and all(
        r["name"] == "_resblock_tma_kernel" and r["sass"]["mma"] == "HGMMA" and r["sass"]["hgmma_a_from_smem"]
        and r["sass"]["hot_loop_tma_loads"] > 0 and r["sass"]["cp_async"] == 0 and r["sass"]["narrowest_store"] == 16
        and r["sass"]["spill_store_bytes"] == 0 for r in block_rows), block_rows
    # Both candidates of each residual block: the block launch, then the two conv launches the
    # dispatch's "triton_convs" runs instead (conv + ReLU, then conv + res_scale + skip), which
    # point at it; in both phases with a block forward.
    recs = manifest["launches"]
    for phase in ("inference", "train.forward"):
        blocks = [r for r in recs if r["phase"] == phase and r["candidate"] == "triton_block"]
        assert all(r["kernel"] == "_resblock_tma_kernel" for r in blocks), phase
        assert len(blocks) == 16 and all(r["role"] == "block" for r in blocks), phase
        for b in blocks:
            alt = [r for r in recs if r["alternative_of"] == b["index"]]
            assert [r["index"] for r in alt] == [b["index"] + 1, b["index"] + 2], alt
            assert all(r["candidate"] == "triton_convs" and r["launcher"] == "conv2d_nhwc" and r["phase"] == phase
                       and r["kernel"] == "_conv2d_tma_kernel" for r in alt), alt
            assert alt[0]["args"]["RELU"] and not alt[0]["args"]["HAS_SKIP"], alt[0]["args"]
            assert alt[1]["args"]["HAS_SKIP"] and not alt[1]["args"]["RELU"], alt[1]["args"]
            assert alt[1]["args"]["res_scale"] == b["args"]["res_scale"]
    assert not any(r["candidate"] for r in recs if r["phase"] == "train.backward")
    _check_static_model(tmp_path)


def _check_static_model(emit_dir):
    """bench/static_model.py reads the emission: per launch, FLOPs that are the layer's, bounds,
    a prediction; inference and training phases both covered."""
    out = emit_dir / "model.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "static_model.py"), str(emit_dir),
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "measured" in proc.stdout and "assumed" in proc.stdout  # the ceilings are labelled
    got = json.loads(out.read_text())
    inf = got["inference"]["launches"]
    assert [e["role"] for e in inf] == ["pad", "head"] + ["block"] * 16 + ["body", "upsampler", "tail"]
    # Per block: both candidates predicted, the lower one counted in the total, the pinned total
    # (the block kernel everywhere: the numbers before both were recorded) beside it.
    blocks = [e for e in inf if e["role"] == "block"]
    for e in blocks:
        convs = sum(a["best"]["predicted_s"] for a in e["alternative"])
        assert len(e["alternative"]) == 2 and convs > 0
        assert e["picked"] == ("triton_convs" if convs < e["best"]["predicted_s"] else "triton_block"), e
    totals = got["inference"]["totals"]
    rest = sum(e["best"]["predicted_s"] for e in inf if e["role"] != "block")
    picked = sum(min(e["best"]["predicted_s"], sum(a["best"]["predicted_s"] for a in e["alternative"]))
                 for e in blocks)
    assert totals["predicted_s"] == pytest.approx(rest + picked)
    assert totals["pinned_predicted_s"] == pytest.approx(rest + sum(e["best"]["predicted_s"] for e in blocks))
    assert "residual blocks: both candidates" in proc.stdout and "pinned (the one-launch block" in proc.stdout
    body = next(e for e in inf if e["role"] == "body")
    h, w = 36, 64
    assert body["best"]["work"]["useful_flops"] == 2 * h * w * 9 * 64 * 64
    for phase in ("inference", "train"):
        for e in got[phase]["launches"]:
            b = e["best"]
            assert b["predicted_s"] > 0 and b["binds"] in b["times_s"], e
            assert b["predicted_s"] == max(b["times_s"].values())
        totals = got[phase]["totals"]
        assert totals["predicted_s"] >= totals["per_layer_floor_s"] > 0
    roles = {e["role"] for e in got["train"]["launches"]}
    assert {"dgrad", "wgrad", "reduce"} <= roles, roles


@needs_compiler
def test_pre_hopper_arch_records_the_pointer_kernel(tmp_path):
    """--arch 80 (no TMA): the selection records the pointer kernel for the body convs, which
    compiles for sm_80 with 16-byte cp.async in its hot loop; no TMA kernel is launched."""
    proc = _run("--model", "edsr_baseline", "--lr-size", "36x64", "--first-config", "--no-train",
                "--arch", "80", "--check-wide-loads", "--no-block-candidates", "--emit", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # --no-block-candidates: only what backend="triton" pins (the block launch), no alternatives.
    recs = json.loads((tmp_path / "manifest.json").read_text())["launches"]
    assert sum(r["role"] == "block" for r in recs) == 16
    assert not any(r["candidate"] or r["alternative_of"] is not None for r in recs)
    rows = json.loads((tmp_path / "sass_report.json").read_text())["rows"]
    assert rows and not any(r["name"] == "_conv2d_tma_kernel" for r in rows)
    assert {r["name"] for r in rows if r["role"] == "block"} == {"_resblock_nhwc_kernel"}  # no TMA on sm_80
    body = [r for r in rows if r["role"] == "body"]
    assert body and all(r["sass"]["hot_loop_widest_load"] == 16 and r["sass"]["tma_loads"] == 0 for r in body)


@needs_compiler
def test_check_catches_a_compile_without_jit_specialization(tmp_path):
    """--no-specialize is how the kernels were compiled before (no pointer alignment): the
    16-byte-load check must fail on it (on the pointer kernel: --arch 80 selects it)."""
    proc = _run("--model", "edsr_baseline", "--lr-size", "36x64", "--first-config", "--no-train",
                "--arch", "80", "--no-specialize", "--check-wide-loads")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NARROW body conv" in proc.stdout, proc.stdout[-3000:]


def test_gpu_check_script_parses_and_measure_needs_a_gpu():
    """bench/gpu_check.sh runs only on a lent GPU: here, that it parses, and that the static
    model's GPU part refuses cleanly without one (the prediction itself is tested above)."""
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "bench" / "gpu_check.sh")]).returncode == 0
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu_check.sh is the test")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "static_model.py"), str(REPO_ROOT),
                           "--measure"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--measure needs a CUDA GPU" in proc.stderr, proc.stderr



_CHECK_HOPPER_CASES = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from compile_check import check_hopper

def row(role, **sass):
    base = dict(mma="HGMMA", spill_store_bytes=0, ldl=0, stl=0, hot_loop_narrowest_load=16,
                hot_loop_loads_by_width={"16": 4}, hot_loop_tma_loads=0, stg=4, narrowest_store=16)
    return dict(role=role, name="_k_kernel", constexprs={"C_IN": 64, "C_OUT": 64, "KS": 3}, config_text="cfg",
                sass={**base, **sass})

clean = [row("body", hot_loop_tma_loads=9), row("block", hot_loop_tma_loads=6), row("upsampler", narrowest_store=8),
         row("reduce", mma="none", hot_loop_narrowest_load=4), row("head", hot_loop_narrowest_load=None)]
cases = {
    "mma none, not HGMMA": row("wgrad", mma="none"),
    "spills (24 B": row("head", spill_store_bytes=24),
    "not all 16 B or TMA": row("dgrad", hot_loop_narrowest_load=2, hot_loop_loads_by_width={"2": 8, "16": 1}),
    "no TMA load (UTMALDG)": row("body"),
    "2-byte global stores": row("upsampler", narrowest_store=2),
    "serialized its wgmmas (C7514": row("body", hot_loop_tma_loads=3, wgmma_serialized=True),
}
print(json.dumps({"clean": check_hopper(clean), **{k: check_hopper([r]) for k, r in cases.items()}}))
"""


def test_check_hopper_flags_each_done_when_rule():
    """The issue-13 check (--check-hopper), on hand-made SASS facts: one problem per broken
    rule, none for clean rows, and no HGMMA or load-width demand on the non-conv roles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CHECK_HOPPER_CASES, str(REPO_ROOT / "bench")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("clean") == []
    for text, problems in got.items():
        assert len(problems) == 1 and text in problems[0], (text, problems)
