"""Hypothesis profiles and a hang guard shared by the robustness tests (see README.md here).

"ci" (the default): few examples, derandomized, so CI is fast and repeatable.
"long": set FASTSR_FUZZ_EXAMPLES=N to run N examples per property test, with fresh
random seeds each run, e.g. `FASTSR_FUZZ_EXAMPLES=2000 python -m pytest tests/robustness`.
"""
import faulthandler
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("FASTSR_FUZZ_EXAMPLES") or 0)

# The CI machine is shared and slow: no per-example deadline, and no complaint when
# generating / running examples takes a while (decoding and model loading dominate).
# Tests write each example's files under tmp_path, overwriting the last example's.
_COMMON = dict(
    deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=EXAMPLES or 20, **_COMMON)
settings.load_profile("long" if EXAMPLES else "ci")

# Seconds one test may run before the whole run is stopped with every thread's traceback.
HANG_SECONDS = max(600, EXAMPLES)


@pytest.fixture(autouse=True)
def _no_hang():
    """A test that hangs, even inside C code (a decoder, torch.load), ends the run with a
    traceback instead of stalling CI until its global timeout."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=sys.__stderr__)
    yield
    faulthandler.cancel_dump_traceback_later()
