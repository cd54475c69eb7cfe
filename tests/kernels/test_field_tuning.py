"""The Triton backend's launch-configuration logic on the CPU (no kernel runs): candidates, the autotuner and the
route choice with fake timings, the stored and split routes' memory rules, the pass-2/3 fallback, the bounded
caches, and the constants drift.kernels keeps in step with drift.field.

Run: pytest tests/kernels/test_field_tuning.py   (needs triton installed, not a GPU)
"""
import types

import pytest
import torch

from drift.field import core

try:  # triton may be missing on CPU-only installs: the fixture below skips then
    from drift.kernels import field_device as device_code
    from drift.kernels import field_launch as launch
    from drift.kernels import field_tuning as tuning
except ImportError:
    device_code = launch = tuning = None


@pytest.fixture(autouse=True)
def _tuner_off(fresh_tuner):
    """Every test runs with tuning off and a clean config cache (tests/kernels/conftest.py)."""
    yield


def test_kernel_constants_match_drift_field():
    # drift.kernels may not import drift, so it keeps its own copies of the official numbers.
    assert tuning.R_LIST_DEFAULT == core.R_LIST_DEFAULT
    for name in ("DIST_EPS", "SCALE_EPS", "SELF_MASK", "AFFINITY_EPS", "RMS_EPS"):
        assert getattr(device_code, name) == getattr(core, name), name
    assert set(launch.NORM_CODES) == set(core.NORMALIZATIONS)


def test_launch_caches_are_bounded_lru():
    cache = launch._LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert list(cache) == ["a", "c"] and cache.get("b") is None and cache.get("b", 0) == 0
    cache.put("a", 4)
    assert cache.get("a") == 4 and len(cache) == 2
    assert launch._PLANS.cap == launch.PLAN_CACHE_SIZE and launch._CONSTS.cap == launch.CONSTS_CACHE_SIZE


def test_field_triton_candidates():
    import triton

    for S in (1, 7, 64, 256, 640, 4096):
        for kernel in ("scale", "sumsq", "force"):
            cands = tuning.candidates(kernel, 64, 16, 64, S)
            assert cands and len(set(cands)) == len(cands)
            assert all(16 <= c.BS <= max(16, triton.next_power_of_2(S)) for c in cands)
            assert all(c.GRAM is False for c in cands) or kernel == "sumsq"
    # Pass 2's route: the Gram route where it needs under half the multiply-adds of streaming (with the
    # streaming default last, in case no Gram configuration fits), the streaming route only where it needs
    # under half of the Gram route's, both in between.
    assert tuning.gram_ratio(64, 16, 64, 4096, 3) < 0.5 and tuning.gram_ratio(64, 16, 64, 64, 3) > 2.0
    wide = tuning.candidates("sumsq", 64, 16, 64, 4096)
    assert all(c.GRAM for c in wide[:-1]) and wide[-1] == tuning.candidates("sumsq", 64, 16, 64, 64)[0]
    assert {c.GRAM for c in tuning.candidates("sumsq", 64, 16, 64, 64)} == {False}
    assert {c.GRAM for c in tuning.candidates("sumsq", 64, 16, 64, 256)} == {True, False}
    assert tuning.Config(32, 8, 2, True).label() == "BS32/w8/s2/gram"
    with pytest.raises(ValueError, match="unknown kernels"):
        with tuning.forced_configs(bogus=tuning.Config(16, 4, 1)):
            pass


def test_field_triton_tuner_logic(monkeypatch):
    # The tuner with a fake launch and fake timings: it keeps the fastest candidate that launches, logs the
    # others' times and the failures, launches the winner last, and later calls reuse it without timing.
    cands = [tuning.Config(32, 8, 1), tuning.Config(16, 8, 2), tuning.Config(64, 8, 2), tuning.Config(32, 8, 3)]
    fake_ms = {cands[0]: 3.0, cands[1]: 1.0, cands[3]: 2.0}
    calls = []

    def launch(c):
        calls.append(c)
        if c == cands[2]:
            raise RuntimeError("out of resource: shared memory, Required: 300000, Hardware limit: 232448")

    monkeypatch.setattr(tuning, "INTERPRETED", False)
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    monkeypatch.setattr(tuning, "_time_ms", lambda run, best: (run(), fake_ms[calls[-1]])[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert tuning.tuned_launch("force", ("k",), cands, launch) == cands[1]
    assert calls[-1] == cands[1]
    (entry,) = tuning.tuning_log()
    assert entry["best"] == cands[1].label() and set(entry["times_ms"]) == {cands[i].label() for i in (0, 1, 3)}
    assert "shared memory" in entry["errors"][cands[2].label()]
    calls.clear()
    assert tuning.tuned_launch("force", ("k",), cands, launch) == cands[1] and calls == [cands[1]]
    # Tuning off: the first candidate that launches, no timing; a failure is logged, not raised.
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    assert tuning.tuned_launch("scale", ("k",), cands[2:], launch) == cands[3]
    assert tuning.tuning_log()[-1]["errors"].keys() == {cands[2].label()}
    with pytest.raises(RuntimeError, match="no launch configuration"):
        tuning.tuned_launch("sumsq", ("k",), cands[2:3], launch)


def test_field_triton_stored_route_memory_rule(monkeypatch):
    # The stored route keeps K in the force output, so it is offered exactly where K fits there: no memory
    # beyond the output on either route. At the default row shape K has 64*144 + 16*16 + 16*64 + 64*64 = 14592
    # floats, i.e. S >= 228; the benchmark grid's S = 64 stays on the recompute route (a separate [B, 14592]
    # scratch there would be ~0.14x of the reference's peak on its own, over the 0.1x target).
    assert tuning.gram_floats(64, 16, 64) == 14592
    assert not tuning.stored_fits(64, 16, 64, 227) and tuning.stored_fits(64, 16, 64, 228)
    assert [tuning.stored_fits(64, 16, 64, S) for S in (64, 256, 640, 4096)] == [False, True, True, True]
    assert tuning.stored_fits(64, 0, 64, 192) and not tuning.stored_fits(64, 0, 64, 191)  # no negatives: 12288
    for S in (256, 640, 4096):  # where it fits it needs fewer multiply-adds (the untuned choice)
        macs = tuning.route_macs(64, 16, 64, S)
        assert macs["stored"] < 0.75 * macs["recompute"], (S, macs)
    stored = tuning.candidates("force", 64, 16, 64, 640, stored=True)
    assert stored and all(c.STORED and not c.GRAM and c.label().endswith("/stored") for c in stored)
    assert not any(c.STORED for k in ("scale", "sumsq", "force") for c in tuning.candidates(k, 64, 16, 64, 640))
    monkeypatch.setattr(tuning, "STORED_ROUTE", False)  # DRIFT_TRITON_STORED=0
    assert not tuning.stored_fits(64, 16, 64, 4096)


def test_field_triton_split_blocks():
    # The split stored route's column blocks: widths multiples of 128 that hold K (>= 228 columns at the default
    # row shape, so >= 256), about one program per SM for B rows, the last block between W and 2W wide.
    assert tuning.split_blocks(64, 16, 64, 4096, 8, 132) == (16, 256)
    assert tuning.split_blocks(64, 16, 64, 640, 8, 132) == (2, 256)  # blocks of 256 and 384 columns
    assert tuning.split_blocks(64, 16, 64, 4096, 64, 132) == (3, 1280)
    assert tuning.split_blocks(64, 16, 64, 4096, 24, 132) == (6, 640)
    for B, S in ((8, 256), (8, 511), (132, 4096), (4096, 4096), (8, 64)):  # too narrow, enough rows, no fit
        assert tuning.split_blocks(64, 16, 64, S, B, 132) == (1, S), (B, S)
    assert tuning.split_blocks(64, 16, 64, 4096, 8, 0) == (1, 4096)  # no SM count (CPU): only when asked for
    assert tuning.split_blocks(5, 3, 4, 400, 2, 0, J=3) == (3, 128)
    for G, U, P, S, B in ((64, 16, 64, 4096, 1), (13, 7, 29, 641, 37), (64, 0, 64, 1000, 3)):
        J, W = tuning.split_blocks(G, U, P, S, B, 132)
        last = S - (J - 1) * W
        assert W % 128 == 0 and G * W >= tuning.gram_floats(G, U, P) and W <= last < 2 * W, (G, U, P, S, J, W)
        assert all(W % c.BS == 0 for k in ("scale", "force") for c in tuning.candidates(k, G, U, P, S, stored=True,
                                                                                       split=True))
    with pytest.raises(ValueError, match="not a multiple of BS"):  # a chunk would cross into the next block
        launch._check_blocks(384, tuning.Config(256, 8, 1, False, True, True))


def _plan_stub(key, stored_ok=True, split=(1, 640)):
    return types.SimpleNamespace(key=key, stored_ok=stored_ok, split=split)


def test_field_triton_route_choice_logic(monkeypatch):
    # The route decision with fake measurements: the fastest offered route wins and is logged with every
    # route's time; a route whose passes have no configuration that runs loses; a shape where K does not fit
    # only has the recompute route (nothing measured); tuning off takes the last offered route (split, else
    # stored, else recompute).
    measured = []
    fake_ms = {0: 3.0, 1: 2.0, 2: 2.5}

    def measure(route):
        measured.append(route)
        if fake_ms[route] is None:
            raise RuntimeError("no launch configuration of sumsq ran")
        return fake_ms[route]

    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    tuning.choose_route(_plan_stub(("a",), split=(2, 256)), measure)
    assert tuning.ROUTES[("a",)] == 1 and measured == [0, 1, 2]
    (entry,) = tuning.tuning_log()
    assert entry["kernel"] == "route" and entry["best"] == "stored"
    assert entry["times_ms"] == {"recompute": 3.0, "stored": 2.0, "split": 2.5}
    fake_ms.update({1: None, 0: 5.0})
    measured.clear()
    tuning.choose_route(_plan_stub(("b",)), measure)  # no split offered
    assert tuning.ROUTES[("b",)] == 0 and measured == [0, 1] and "stored" in tuning.tuning_log()[-1]["errors"]
    measured.clear()
    tuning.choose_route(_plan_stub(("c",), stored_ok=False), measure)
    assert tuning.ROUTES[("c",)] == 0 and measured == []
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    tuning.choose_route(_plan_stub(("d",), split=(2, 256)), measure)
    tuning.choose_route(_plan_stub(("e",)), measure)
    assert tuning.ROUTES[("d",)] == 2 and tuning.ROUTES[("e",)] == 1 and measured == []


def test_field_triton_pass2_skips_k_holding_configs_once_k_does_not_fit(monkeypatch):
    """Pass 2's stored and Gram configurations hold the same K blocks in shared memory whatever their BS, warps
    or stages: after one runs out of shared memory at a row shape, the others of that shape are skipped, not
    compiled to fail too (the pixel presets' (64, 32, 128) rows on an H100: 6 failing compiles -> 1); the
    streaming configurations, and K-holding ones of another shape, still launch."""
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(tuning, "INTERPRETED", False)
    tried = []

    def launch(c):
        tried.append(c)
        if c.GRAM or c.STORED:
            raise OutOfResources(401408, 232448, "shared memory")

    key = (64, 32, 128, 1024, "torch.float32", True, True, True, 2, "cuda:0", 0, 3, 1)
    stored = tuning.candidates("sumsq", 64, 32, 128, 1024, stored=True)
    with pytest.raises(RuntimeError, match="no launch configuration"):
        tuning.tuned_launch("sumsq", key, stored, launch)
    assert tried == stored[:1]  # the first fails, the others are skipped
    tried.clear()
    mixed = [tuning.Config(32, 8, 2, True), tuning.Config(16, 8, 3, True), tuning.Config(64, 8, 2)]
    assert tuning.tuned_launch("sumsq", key[:-1] + (0,), mixed, launch) == mixed[2]
    assert tried == [mixed[2]]  # the Gram configs (same K) are not tried: the streaming one runs
    assert "K does not fit" in tuning.tuning_log()[-1]["errors"][mixed[0].label()]
    tried.clear()
    other = (64, 16, 64) + key[3:]
    with pytest.raises(RuntimeError, match="no launch configuration"):
        tuning.tuned_launch("sumsq", other, stored[:2], launch)
    assert tried == stored[:1]  # another row shape is tried again
    tuning.reset()
    tried.clear()
    with pytest.raises(RuntimeError):
        tuning.tuned_launch("sumsq", key, stored[:2], launch)
    assert tried == stored[:1]  # reset forgets the shapes


def test_field_triton_stored_pass_falls_back():
    # A stored pass 2/3 without a configuration that compiles runs its recompute kernel instead (which does
    # not read the buffer); the choice is kept for the plan. A forced stored config after a recompute pass 1
    # is refused: it would read a buffer that holds no K.
    tried, launched = [], []

    def run(route):
        tried.append(route)
        if route != 0:
            raise RuntimeError("no launch configuration of force ran")
        return tuning.Config(64, 8, 2)

    plan = types.SimpleNamespace(cfg={})
    assert launch._pass23(plan, "force", (0, 3), run, launched.append, 1) == tuning.Config(64, 8, 2)
    assert tried == [1, 0] and plan.cfg == {("force", 0, 3, 1): tuning.Config(64, 8, 2)} and launched == []
    tried.clear()
    launch._pass23(plan, "force", (0, 3), run, launched.append, 1)
    assert tried == [] and launched == [tuning.Config(64, 8, 2)]
    with pytest.raises(ValueError, match="did not run the stored route"):
        with tuning.forced_configs(force=tuning.Config(64, 8, 2, False, True)):
            launch._pass23(types.SimpleNamespace(cfg={}), "force", (0, 3), run, launched.append, 0)


class _FakeStore:
    """A store of tuning results in a dict, with the tuner's get/put interface (drift/field/tune_cache.py)."""

    def __init__(self, entries=None):
        self.entries = dict(entries or {})
        self.puts = []

    def get(self, device, entry):
        return self.entries.get(entry)

    def put(self, device, entry, value):
        self.entries[entry] = value
        self.puts.append(entry)


def test_field_triton_tuner_uses_and_fills_the_store(monkeypatch):
    # A result stored by an earlier process is launched without timing, in either mode; with tuning on a new
    # key's winner is stored; a stored configuration that is not among today's candidates is stale (tuned
    # again); the device entry of the key is left out of the stored key (ranks on one GPU model share it).
    cands = [tuning.Config(32, 8, 1), tuning.Config(16, 8, 2), tuning.Config(64, 8, 2)]
    dev = "cuda:3"
    key = (64, 16, 64, 256, dev)
    store = _FakeStore({("cfg", "force", 64, 16, 64, 256): {"config": list(cands[2]), "ms": 0.5},
                        ("cfg", "sumsq", 64, 16, 64, 256): {"config": [128, 4, 1, False, False, False], "ms": 0.1}})
    monkeypatch.setattr(tuning, "STORE", store)
    monkeypatch.setattr(tuning, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    timed, calls = [], []
    monkeypatch.setattr(tuning, "_time_ms", lambda run, best: (run(), timed.append(calls[-1]), 1.0 + len(timed))[2])
    for autotune in (False, True):
        monkeypatch.setattr(tuning, "AUTOTUNE", autotune)
        tuning.reset()
        assert tuning.tuned_launch("force", key, cands, calls.append, device=dev) == cands[2]
        assert calls[-1] == cands[2] and timed == [] and store.puts == []
        assert tuning.BEST_MS[("force",) + key] == 0.5 and tuning.tuning_log()[-1]["source"] == "store"
    # Stale entry (BS 128 is no candidate) with tuning on: every candidate is timed, the fastest kept and stored.
    calls.clear()
    assert tuning.tuned_launch("sumsq", key, cands, calls.append, device=dev) == cands[0]
    assert timed == cands and store.puts == [("cfg", "sumsq", 64, 16, 64, 256)]
    assert store.entries[store.puts[0]] == {"config": list(cands[0]), "ms": 2.0}
    # Without a device (or with tuning off) nothing is stored.
    tuning.tuned_launch("scale", key, cands, calls.append)
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    tuning.tuned_launch("scale", key + ("x",), cands, calls.append, device=dev)
    assert len(store.puts) == 1


def test_field_triton_route_choice_uses_the_store(monkeypatch):
    dev = "cuda:0"
    store = _FakeStore({("route", "a"): {"route": "recompute"}, ("route", "b"): {"route": "split"}})
    monkeypatch.setattr(tuning, "STORE", store)
    measured = []
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    plan = lambda key, split: types.SimpleNamespace(key=key, stored_ok=True, split=split, device=dev)  # noqa: E731
    tuning.choose_route(plan(("a", dev), (1, 640)), lambda r: measured.append(r) or 1.0)
    assert tuning.ROUTES[("a", dev)] == 0 and measured == []
    # A stored route that these rows do not offer (split without >= 2 blocks) is ignored: measured and stored.
    tuning.choose_route(plan(("b", dev), (1, 640)), lambda r: measured.append(r) or 2.0 - r)
    assert tuning.ROUTES[("b", dev)] == 1 and measured == [0, 1] and store.entries[("route", "b")] == {
        "route": "stored"}


def test_field_triton_default_configs_are_the_calibrated_ones():
    # Tuning off runs each list's first candidate: the H200 tuner's usual winner (field_tuning._CANDIDATES).
    first = {k: tuning.candidates(k, 64, 16, 64, 640)[0] for k in ("scale", "sumsq", "force")}
    assert first == {"scale": tuning.Config(64, 8, 2), "sumsq": tuning.Config(32, 8, 2, True),
                     "force": tuning.Config(64, 8, 2)}
    assert tuning.candidates("sumsq", 64, 16, 64, 64)[0] == tuning.Config(64, 8, 2)
    stored = {k: tuning.candidates(k, 64, 16, 64, 640, stored=True)[0] for k in ("scale", "sumsq", "force")}
    assert stored == {"scale": tuning.Config(32, 8, 2, False, True), "sumsq": tuning.Config(32, 8, 1, False, True),
                      "force": tuning.Config(64, 8, 3, False, True)}
    split = {k: tuning.candidates(k, 64, 16, 64, 4096, stored=True, split=True)[0] for k in ("scale", "reduce")}
    assert split == {"scale": tuning.Config(32, 8, 2, False, True, True),
                     "reduce": tuning.Config(16, 8, 1, False, True, True)}
