"""The OpenVINO backend's tests (tests/openvino_cases.py), run in a child pytest process.

Why a child: run inside the suite's own process, they left its Python heap damaged for a later,
unrelated test: a segfault in pure Python code (PyObject_GetAttr on a freed object, in
subprocess's selector loop) a few tests into test_train.py, in CI and locally, reproduced at
commits back to 47dd784 and gone without these tests (2026-12-03). Both halves of the file
trigger it on their own; every other test pins the fused path (FASTSR_DETERMINISTIC=1), so
this file is where OpenVINO really runs. The cause is not found yet (the closing note of that
day says what was tried); in a child of their own the cases still fail the suite when they
fail, and cannot damage what runs after them.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_openvino_cases_pass_in_their_own_process():
    pytest.importorskip("openvino")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "openvino_cases.py")],
                          capture_output=True, text=True, timeout=1200, cwd=HERE.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 10 and "failed" not in proc.stdout, out[-3000:]
    print(proc.stdout.strip().splitlines()[-1])
