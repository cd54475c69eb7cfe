"""Fixtures of the Triton kernel tests: a tuner reset around each test (skips where triton is missing)."""
import pytest

from drift.field import dispatch

try:  # triton may be missing on CPU-only installs: fresh_tuner skips then
    from drift.kernels import field_launch, field_multi, field_tuning
except ImportError:
    field_launch = field_multi = field_tuning = None


@pytest.fixture
def fresh_tuner(monkeypatch):
    """Tuning off, no on-disk store of tuning results (a test never reads or writes the user's cache) and clean
    config and call-plan caches for the test (skips where triton is not installed)."""
    if field_tuning is None or not dispatch.has_triton():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(field_tuning, "AUTOTUNE", False)
    monkeypatch.setattr(field_tuning, "STORE", None)
    field_launch.reset_tuning()
    field_multi.reset()
    yield
    field_launch.reset_tuning()
    field_multi.reset()
