"""bench/run.py: --quick runs end to end on CPU and writes well-formed rows; the pieces that make
its output readable (header line, fused-vs-eager_cl summary, peaks, output folder) on hand-made rows."""
import csv
import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest

from testenv import REPO_ROOT

NUMERIC = ["median_ms", "q25_ms", "q75_ms", "gflops", "tflops_per_s", "flop_frac_of_peak", "flop_peak_tflops", "gbytes",
           "gb_per_s", "bw_frac_of_peak", "bw_peak_gb_per_s", "peak_mem_mb"]
NAN = float("nan")


@pytest.fixture(scope="module")
def bench():
    """bench/run.py as a module, under a name of its own (a plain `import run` could find another run.py)."""
    spec = importlib.util.spec_from_file_location("fastsr_bench_run", REPO_ROOT / "bench" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_quick_benchmark_writes_finite_rows_and_records_the_fused_backend(tmp_path, bench):
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--quick", "--no-compile", "--out", str(tmp_path),
           "--tag", "quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "quick.csv")))
    from_json = json.loads((tmp_path / "quick.json").read_text())
    assert len(rows) == len(from_json) > 0
    assert list(rows[0]) == bench.COLUMNS
    for r in rows:
        for col in NUMERIC:
            v = float(r[col])
            if col == "peak_mem_mb" and r["provider"] in bench.ENGINES:
                assert math.isnan(v)  # an engine's memory is outside torch's allocator: not claimed
                continue
            assert math.isfinite(v) and v > 0, (r["workload"], r["provider"], col, v)
        # the peak is a real large matmul, 2048 at least on CPU even in --quick, and says so
        n = re.fullmatch(r"measured matmul peak \((\d+)x\1\)", r["flop_peak_source"])
        assert n and int(n.group(1)) >= 2048, r["flop_peak_source"]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(float(r["act_mem_mb"]) > 0 for r in train)  # no compile rows here
    fused = [r for r in rows if r["provider"] == "fused"]
    assert fused and all(r["backend"] == "cpu" for r in fused)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"kernel", "model", "train"}
    for r in rows:  # every provider's ratio is against the fused row of its group
        assert float(r["ratio_vs_fused"]) > 0
    assert (tmp_path / "quick.png").stat().st_size > 1000
    # what a reader sees: the column header before the first row, a summary per dtype, where the files went
    out = proc.stdout.splitlines()
    first_row = next(i for i, line in enumerate(out) if line.startswith("resblock_f64"))
    assert bench.header_line() in out[:first_row]
    for dt in ("fp32", "bf16"):
        line = next(line for line in out if line.startswith(f"fused vs eager_cl ({dt}): "))
        assert "x forward (" in line and "x training step (" in line and "x activation memory (" in line, line
    assert f"wrote quick.csv, quick.json, quick.png to {tmp_path.resolve()}" in out


# ------------------------------------------------------------------ summary on hand-made rows


def _row(workload, provider, median_ms, dtype="float32", kind="kernel", mode="forward", act=NAN, device="cpu X"):
    return dict(workload=workload, kind=kind, mode=mode, shape="1x1", provider=provider, dtype=dtype,
                median_ms=median_ms, act_mem_mb=act, device=device)


def test_summary_is_geometric_means_of_the_pairs_and_says_what_they_cover(bench):
    rows = [
        # fp32: forward ratios 2 (kernel) and 8 (model): geomean 4; train full 10/20 = 0.5, act 30/60 = 0.5
        _row("k", "eager_cl", 4.0), _row("k", "fused", 2.0), _row("k", "eager_nchw", 100.0),
        _row("m", "eager_cl", 16.0, kind="model"), _row("m", "fused", 2.0, kind="model"),
        _row("t", "eager_cl", 10.0, kind="train", mode="full", act=60.0),
        _row("t", "fused", 20.0, kind="train", mode="full", act=30.0),
        _row("t", "compile", 1.0, kind="train", mode="full"),  # not eager_cl: ignored
        # bf16: a forward pair only; the train row has no eager_cl partner (a missing pair)
        _row("k", "eager_cl", 3.0, dtype="bfloat16"), _row("k", "fused", 4.0, dtype="bfloat16"),
        _row("t", "fused", 5.0, dtype="bfloat16", kind="train", mode="full", act=1.0),
        # fp16: fused alone, no line at all; data rows never pair
        _row("k", "fused", 1.0, dtype="float16"),
        _row("imresize", "eager_cl", 2.0, kind="data"), _row("imresize", "fused", 1.0, kind="data"),
    ]
    assert bench.summarize_vs_eager(rows) == [
        "fused vs eager_cl (fp32): 4.00x forward (2 pairs: 1 kernel, 1 model), "
        "0.50x training step (1 pair: 1 train/full), 0.50x activation memory (1 pair: 1 train/full)",
        "fused vs eager_cl (bf16): 0.75x forward (1 pair: 1 kernel)",
    ]


def test_summary_leaves_out_unknown_activation_memory_and_names_devices_when_several(bench):
    rows = [
        _row("t", "eager_cl", 9.0, kind="train", mode="backward", act=NAN),  # e.g. not measured
        _row("t", "fused", 3.0, kind="train", mode="backward", act=10.0),
        _row("k", "eager_cl", 1.0, device="gpu Y"), _row("k", "fused", 1.0, device="gpu Y"),
    ]
    assert bench.summarize_vs_eager(rows) == [
        "fused vs eager_cl (cpu X, fp32): 3.00x training step (1 pair: 1 train/backward)",
        "fused vs eager_cl (gpu Y, fp32): 1.00x forward (1 pair: 1 kernel)",
    ]
    assert bench.summarize_vs_eager([_row("k", "fused", 1.0)]) == []


# --------------------------------------------------------------------------- header and rows


def _full_row(**kw):
    r = dict(workload="edsr_baseline_x2", kind="train", mode="full", shape="16x3x24x24", provider="eager_cl",
             dtype="float32", backend="aten", median_ms=123.456, q25_ms=120.0, q75_ms=130.5, ratio_vs_fused=1.25,
             tflops_per_s=0.15, flop_frac_of_peak=0.9, peak_mem_mb=55.5, act_mem_mb=33.3, compile_s=2.5)
    r.update(kw)
    return r


def test_header_line_lines_up_with_the_row_fields(bench):
    header, row = bench.header_line(), bench._fmt_row(_full_row())
    assert header.split()[:6] == ["workload", "mode", "shape", "dtype", "provider", "backend"]
    assert len(header) == len(row)  # every cell filled: the last column ends where its title does
    for title, cell in (("median ms", "123.46"), ("t/t_fused", "1.25x"), ("%peak", "90%"), ("act MB", "33.3")):
        assert header.index(title) + len(title) == row.index(cell) + len(cell), title  # right-aligned numbers
    assert header.index("provider") == row.index("eager_cl")


def test_row_printer_prints_the_header_first_and_marks_the_peak_a_lower_bound_once_exceeded(bench):
    lines = []
    printer = bench.RowPrinter(out=lines.append)
    printer.start()
    printer.rows([_full_row()])
    assert lines == [bench.header_line(), bench._fmt_row(_full_row())]
    over = _full_row(dtype="bfloat16", flop_frac_of_peak=1.4)
    printer.rows([over])
    assert lines[2:] == [bench.header_line(["bfloat16"]), bench._fmt_row(over)]
    assert "%peak*" in lines[2] and "lower bound for bfloat16" in lines[2]
    assert "140%" in lines[3]  # printed as measured, not clamped
    printer.rows([over])  # same dtype again: no second marked header
    assert len(lines) == 5


# ------------------------------------------------------------------------------ peaks, output


def test_matmul_peak_starts_at_2048_on_cpu_and_stops_at_the_budget(bench):
    assert bench.MATMUL_SIZES["cpu"][0] >= 2048
    import torch

    flops, n = bench.measure_matmul_peak("cpu", torch.float32, (128, 256), budget_s=0.0)
    assert n == 128 and flops > 0  # no budget: the first size only
    flops, n = bench.measure_matmul_peak("cpu", torch.float32, (128, 256), budget_s=60.0)
    assert n in (128, 256) and flops > 0


def test_quick_run_writes_outside_the_committed_results_by_default(bench, monkeypatch, tmp_path):
    monkeypatch.delenv("FASTSR_BENCH_OUT", raising=False)
    out = bench.parse_args(["--quick"]).out
    assert out == bench.default_out_dir()
    committed = (REPO_ROOT / "bench" / "results").resolve()
    assert out.resolve() != committed and committed not in out.resolve().parents
    monkeypatch.setenv("FASTSR_BENCH_OUT", str(tmp_path / "env"))
    assert bench.parse_args(["--quick"]).out == tmp_path / "env"
    assert bench.parse_args(["--quick", "--out", "bench/results"]).out.as_posix() == "bench/results"  # deliberate
    assert bench.default_out_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "fastsr" / "bench"
