"""Hypothesis profiles shared by the robustness tests (see README.md here).

"ci" (the default): few examples, derandomized, so CI is fast and repeatable.
"long": set FASTSR_FUZZ_EXAMPLES=N to run N examples per property test, with fresh
random seeds each run, e.g. `FASTSR_FUZZ_EXAMPLES=2000 python -m pytest tests/robustness`.
"""
import os

from hypothesis import HealthCheck, settings

# The CI machine is shared and slow: no per-example deadline, and no complaint when
# generating / running examples takes a while (decoding and model loading dominate).
# Tests write each example's files under tmp_path, overwriting the last example's.
_COMMON = dict(
    deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("FASTSR_FUZZ_EXAMPLES") or 0) or 20, **_COMMON)
settings.load_profile("long" if os.environ.get("FASTSR_FUZZ_EXAMPLES") else "ci")
