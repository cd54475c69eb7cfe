"""Fixtures of the Triton kernel tests: a tuner reset around each test (skips where triton is missing)."""
import pytest

from drift.field import dispatch

try:  # triton may be missing on CPU-only installs: fresh_tuner skips then
    from drift.kernels import field_launch, field_tuning
except ImportError:
    field_launch = field_tuning = None


@pytest.fixture
def fresh_tuner(monkeypatch):
    """Tuning off and a clean config cache for the test (skips where triton is not installed)."""
    if field_tuning is None or not dispatch.has_triton():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(field_tuning, "AUTOTUNE", False)
    field_launch.reset_tuning()
    yield
    field_launch.reset_tuning()
