"""The on-disk store of Triton tuning results (drift/field/tune_cache.py): save and load across processes, a
corrupt file, a GPU / Triton / kernel-code change, several writers at once, an unwritable location, and the
environment variable. Pure Python: no GPU, no triton (a fake GPU name stands in for the device's).

Run: pytest tests/test_tune_cache.py
"""
import json
import multiprocessing as mp

import pytest

from drift.field import tune_cache
from drift.field.tune_cache import TuneStore

ENTRY = ("cfg", "force", 64, 16, 64, 256, "torch.float32", True, True, True, 2, "multi", 0, 3, 1, 1)
VALUE = {"config": [64, 8, 3, False, True, False], "ms": 0.125}


def _store(path, gpu="NVIDIA H100 80GB HBM3", triton="3.6.0", code="abc"):
    return TuneStore(str(path), triton, code, device_name=lambda d: gpu if d.type == "cuda" else None)


def test_save_then_load_in_a_new_store(tmp_path):
    path = tmp_path / "sub" / "tune.json"  # the folder is created on the first write
    a = _store(path)
    assert a.get("cuda:0", ENTRY) is None
    a.put("cuda:0", ENTRY, VALUE)
    a.put("cuda:1", ("route", 64, 16, 64, 256), {"route": "stored"})
    b = _store(path)  # another process: reads the file
    assert b.get("cuda:5", ENTRY) == VALUE  # any device index of the same GPU model
    assert b.get("cuda:0", ("route", 64, 16, 64, 256)) == {"route": "stored"}
    assert b.get("cpu", ENTRY) is None  # no GPU name: nothing stored for it
    data = json.loads(path.read_text())
    assert data["format"] == tune_cache.FORMAT and list(data["environments"]) == [
        "NVIDIA H100 80GB HBM3|triton 3.6.0|kernels abc"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".triton-tune-")]  # no temp files left


def test_other_gpu_triton_or_kernel_code_is_a_miss(tmp_path):
    path = tmp_path / "tune.json"
    _store(path).put("cuda:0", ENTRY, VALUE)
    for kw in (dict(gpu="NVIDIA H200"), dict(triton="3.7.0"), dict(code="def")):
        other = _store(path, **kw)
        assert other.get("cuda:0", ENTRY) is None, kw
        other.put("cuda:0", ENTRY, {"config": [32, 8, 1, False, False, False], "ms": 1.0})
    assert _store(path).get("cuda:0", ENTRY) == VALUE  # the first environment's entry is kept beside the others
    assert len(json.loads(path.read_text())["environments"]) == 4


def test_only_the_most_recent_environments_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_cache, "MAX_ENVIRONMENTS", 2)
    path = tmp_path / "tune.json"
    for code in ("a", "b", "c"):
        _store(path, code=code).put("cuda:0", ENTRY, VALUE)
    envs = json.loads(path.read_text())["environments"]
    assert sorted(e.rsplit(" ", 1)[1] for e in envs) == ["b", "c"]


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "environments": {}}', "[1, 2]",
                                     '{"format": 1, "environments": {"x": 5}}'])
def test_corrupt_or_foreign_file_reads_empty_and_is_repaired(tmp_path, content):
    path = tmp_path / "tune.json"
    path.write_text(content)
    s = _store(path)
    with pytest.warns(RuntimeWarning, match="ignoring the Triton tuning cache"):
        assert s.get("cuda:0", ENTRY) is None
    s.put("cuda:0", ENTRY, VALUE)  # rewrites the file whole
    assert _store(path).get("cuda:0", ENTRY) == VALUE


def _writer(path, worker, n):
    s = _store(path)
    for i in range(n):
        s.put("cuda:0", ("cfg", "scale", worker, i), {"config": [16, 8, 1, False, False, False], "ms": float(i)})


def test_concurrent_writers_lose_nothing(tmp_path):
    # Several ranks tuning at once: every write re-reads the file under a lock, so all entries survive and
    # the file is valid JSON throughout.
    path = str(tmp_path / "tune.json")
    ctx = mp.get_context("fork")  # (the writers only do file work: no torch threads in use)
    procs = [ctx.Process(target=_writer, args=(path, w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = _store(path)
    for w in range(4):
        for i in range(15):
            assert s.get("cuda:0", ("cfg", "scale", w, i)) is not None, (w, i)


def test_unwritable_location_warns_once_and_keeps_results_in_memory(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache's folder would have to be created where a file is (also fails as root)
    s = _store(blocker / "tune.json")
    with pytest.warns(RuntimeWarning, match="cannot write the Triton tuning cache"):
        s.put("cuda:0", ENTRY, VALUE)
    s.put("cuda:0", ("route", 1), {"route": "stored"})  # no second warning, no exception
    assert s.get("cuda:0", ENTRY) == VALUE and s.get("cuda:0", ("route", 1)) == {"route": "stored"}


def test_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(tune_cache.ENV_VAR, str(tmp_path / "x.json"))
    assert tune_cache.default_path() == str(tmp_path / "x.json")
    for off in ("off", "0", ""):
        monkeypatch.setenv(tune_cache.ENV_VAR, off)
        assert tune_cache.default_path() is None and tune_cache.default_store("3.6.0", "abc") is None
    monkeypatch.delenv(tune_cache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tune_cache.default_path() == str(tmp_path / "drift" / "triton-tune.json")


def test_code_version_follows_the_sources(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("x = 1\n")
    mod = type("M", (), {"__file__": str(pkg / "__init__.py")})
    v1 = tune_cache.code_version(mod)
    assert v1 == tune_cache.code_version(mod)
    (pkg / "a.py").write_text("x = 2\n")
    assert tune_cache.code_version(mod) != v1
