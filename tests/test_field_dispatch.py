"""Backend choice of the drifting field (drift/field/dispatch.py): "auto" per device type, the test override,
caching and errors.

Run: pytest tests/test_field_dispatch.py
"""
import pytest
import torch

from drift import _ext
from drift.field import dispatch, drifting_field, drifting_field_reference
from tests.utils import make_field_inputs


@pytest.fixture(autouse=True)
def _restore():
    dispatch._override(None)
    yield
    dispatch._override(None)


def test_auto_resolution_per_device_type():
    assert dispatch.resolve("auto", "cpu") == ("cpp" if _ext.HAS_C_EXT else "reference")
    assert dispatch.resolve("auto", "cuda") == ("triton" if dispatch.has_triton() else "reference")
    assert dispatch.resolve("auto", "mps") == "reference"
    for name in ("reference", "cpp", "triton"):
        assert dispatch.resolve(name, "cpu") == name


def test_override_applies_to_auto_only_and_resets_cache():
    gen, pos, neg, w = make_field_inputs(2, 4, 3, 2, 5)
    drifting_field(gen, pos, neg, w)
    assert ("auto", "cpu") in dispatch._resolved
    dispatch._override("reference")
    assert not dispatch._resolved
    assert dispatch.resolve("auto", "cpu") == "reference"
    assert dispatch.resolve("cpp", "cpu") == "cpp"
    assert dispatch.field_impl("auto", gen) is drifting_field_reference
    dispatch._override(None)
    assert dispatch.resolve("auto", "cpu") == ("cpp" if _ext.HAS_C_EXT else "reference")


def test_choice_is_cached_once_per_device_type():
    gen = torch.zeros(1, 2, 3)
    a = dispatch.field_impl("auto", gen)
    b = dispatch.field_impl("auto", torch.ones(4, 5, 6))
    assert a is b


def test_unknown_backend_and_missing_extension_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend 'bogus' is not available"):
        dispatch._load("bogus")
    monkeypatch.setattr(_ext, "HAS_C_EXT", False)
    with pytest.raises(ValueError, match="backend='cpp' is not available: drift._C is not built"):
        dispatch._load("cpp")
    assert dispatch.resolve("auto", "cpu") == "reference"


def test_missing_triton_error(monkeypatch):
    from drift import kernels

    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert not dispatch.has_triton() and dispatch.resolve("auto", "cuda") == "reference"
    with pytest.raises(ValueError, match="backend='triton' needs the triton package"):
        dispatch._load("triton")


def test_backend_argument_is_validated():
    gen, pos, neg, w = make_field_inputs(2, 4, 3, 2, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        drifting_field(gen, pos, neg, w, backend="cuda")
