"""bench/run.py --quick runs end to end on CPU and writes well-formed rows."""
import csv
import json
import math
import subprocess
import sys

from testenv import REPO_ROOT

NUMERIC = ["median_ms", "q25_ms", "q75_ms", "gflops", "tflops_per_s", "flop_frac_of_peak", "gbytes", "gb_per_s",
           "bw_frac_of_peak", "peak_mem_mb"]


def test_quick_benchmark_writes_finite_rows_and_records_the_fused_backend(tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--quick", "--no-compile", "--out", str(tmp_path),
           "--tag", "quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "quick.csv")))
    from_json = json.loads((tmp_path / "quick.json").read_text())
    assert len(rows) == len(from_json) > 0
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from run import COLUMNS

    assert list(rows[0]) == COLUMNS
    for r in rows:
        for col in NUMERIC:
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (r["workload"], r["provider"], col, v)
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(float(r["act_mem_mb"]) > 0 for r in train)  # no compile rows here
    fused = [r for r in rows if r["provider"] == "fused"]
    assert fused and all(r["backend"] == "cpu" for r in fused)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"kernel", "model", "train"}
    for r in rows:  # every provider's ratio is against the fused row of its group
        assert float(r["ratio_vs_fused"]) > 0
    assert (tmp_path / "quick.png").stat().st_size > 1000
