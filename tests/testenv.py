"""What the tests share besides fixtures: the Triton interpreter switch, devices, data paths.

A module of its own (not conftest.py) because tests/robustness has a conftest.py too, and
`from conftest import ...` would find whichever of the two pytest imported last.

The Triton kernels run on CPU tensors under Triton's interpreter. `TRITON_INTERPRET` is
read when a kernel is decorated, so it is set here, before anything imports the kernels
(tests/conftest.py imports this module first).
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing is reported by the imports below
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The pinned choice everywhere (fastsr.ops.dispatch): the tests check fastsr's own fused path,
# so a CPU forward must not be timed against OpenVINO and handed to it when it wins (and
# convert the model for ~10 s on the way). tests/test_dispatch.py and tests/openvino_cases.py
# lift it where the measured choice is what they test.
os.environ.setdefault("FASTSR_DETERMINISTIC", "1")
# No OpenVINO IR cache in ~/.cache from the tests (tests/openvino_cases.py tests it in a tmp dir).
os.environ.setdefault("FASTSR_OPENVINO_CACHE", "")
os.environ.setdefault("FASTSR_PLAN_CACHE", "")  # nor choices (the command line's default is under $HOME)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTSR_DATA", REPO_ROOT.parent / "shared" / "data"))

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# Where the "triton" backend runs in tests: the GPU, else CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def shared_set(name: str) -> Path:
    """Path of a benchmark set under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (../shared/data is only beside the project on dev/CI machines)")
    return path


def tiny_random(model):
    """`model` with small random weights (seeded): outputs that differ by input, for CLI tests."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return model


# The end of a torchrun driver script: exit with `code`, after printing the names of the gloo
# threads still running in this rank (none once the process group is destroyed).
GLOO_THREADS_REPORT = r"""
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank {os.environ['RANK']} gloo threads left: {[n for n in names if 'gloo' in n]}", flush=True)
sys.exit(code)
"""


def torchrun_command(nproc: int, script: Path) -> list[str]:
    """torchrun (or python -m torch.distributed.run) --standalone with nproc ranks on script."""
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc-per-node", str(nproc), str(script)]
