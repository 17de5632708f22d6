"""The Triton kernels compile for a GPU (sm_90) even where none is present: bench/compile_check.py
drives the real launchers with the GPU code path, records the launches and compiles them ahead
of time. The full sweep (every shape, dtype and autotune config) is run by hand; here one
config per launch of the quick set."""
import importlib.util
import os
import subprocess
import sys

import pytest

from testenv import REPO_ROOT


def _has_cuda_compiler() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia.compiler") is not None
    except ImportError:  # no triton at all
        return False


@pytest.mark.skipif(not _has_cuda_compiler(), reason="this Triton build has no CUDA backend to compile with")
def test_every_kernel_launch_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "compile_check.py"), "--quick", "--first-config"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " 0 problem(s)" in proc.stdout
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("ok")]
    kernels = {line.split()[3] for line in compiled}
    assert kernels == {"_conv2d_nhwc_kernel", "_dgrad_kernel", "_wgrad_kernel", "_wgrad_reduce_kernel",
                       "_resblock_nhwc_kernel"}, kernels
