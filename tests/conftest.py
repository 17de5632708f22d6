"""Fixtures shared by every test file; the shared constants live in tests/testenv.py."""
import pytest

from testenv import DEVICES  # first: sets TRITON_INTERPRET before any kernel is imported


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
