"""Backend resolution (drift.backends): "auto" per device type, the test override, caching and errors.

Run: pytest tests/kernels/test_backends.py
"""
import pytest
import torch

from drift import _ext, backends
from drift.field import drifting_field, drifting_field_reference
from tests.kernels.field_cases import case_inputs


@pytest.fixture(autouse=True)
def _restore():
    backends._override(None)
    yield
    backends._override(None)


def test_auto_resolution_per_device_type():
    assert backends.resolve("auto", "cpu") == ("cpp" if _ext.HAS_C_EXT else "reference")
    assert backends.resolve("auto", "cuda") == ("triton" if backends.has_triton() else "reference")
    assert backends.resolve("auto", "mps") == "reference"
    for name in ("reference", "cpp", "triton"):
        assert backends.resolve(name, "cpu") == name


def test_override_applies_to_auto_only_and_resets_cache():
    gen, pos, neg, w = case_inputs(2, 4, 3, 2, 5, 1.0, "random")
    drifting_field(gen, pos, neg, w)
    assert ("auto", "cpu") in backends._resolved
    backends._override("reference")
    assert not backends._resolved
    assert backends.resolve("auto", "cpu") == "reference"
    assert backends.resolve("cpp", "cpu") == "cpp"
    assert backends.field_impl("auto", gen) is drifting_field_reference
    backends._override(None)
    assert backends.resolve("auto", "cpu") == ("cpp" if _ext.HAS_C_EXT else "reference")


def test_choice_is_cached_once_per_device_type():
    gen = torch.zeros(1, 2, 3)
    a = backends.field_impl("auto", gen)
    b = backends.field_impl("auto", torch.ones(4, 5, 6))
    assert a is b


def test_unknown_backend_and_missing_extension_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend 'bogus' is not available"):
        backends._load("bogus")
    monkeypatch.setattr(_ext, "HAS_C_EXT", False)
    with pytest.raises(ValueError, match="backend='cpp' is not available: drift._C is not built"):
        backends._load("cpp")
    assert backends.resolve("auto", "cpu") == "reference"


def test_backend_argument_is_validated():
    gen, pos, neg, w = case_inputs(2, 4, 3, 2, 5, 1.0, "random")
    with pytest.raises(ValueError, match="backend must be one of"):
        drifting_field(gen, pos, neg, w, backend="cuda")
