"""drift-prep: round trips, bad input, resume after a kill, reproducibility, index format, verify."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_prep import pack as packmod
from data_prep.cli import main
from drift import schema
from tests.data_fixtures import (fifo_with_eof_writer, make_bad_imagefolder, make_idx, make_imagefolder,
                                 unreadable_dir, write_idx)


def read_shards(out):
    """{key: (label, ext, bytes)} over all shards, checking the manifest's shard list on the way."""
    m = schema.read_manifest(out)
    samples = {}
    for s in m["shards"]:
        with tarfile.open(os.path.join(out, s["name"])) as tf:
            members = tf.getmembers()
            for mem in members:
                assert mem.mtime == packmod.TAR_MTIME and mem.uid == 0 and mem.uname == ""
                key, ext = schema.split_member(mem.name)
                assert schema.is_valid_key(key), mem.name
                d = samples.setdefault(key, {})
                d[ext] = tf.extractfile(mem).read()
        assert sum(1 for _ in members) == 2 * s["num_samples"]
    out_ = {}
    for key, d in samples.items():
        ext = "jpg" if "jpg" in d else "png"
        out_[key] = (schema.decode_cls(d["cls"]), ext, d[ext])
    return m, out_


def pixels(data, mode=None):
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert(mode) if mode else im)


def test_imagefolder_round_trip(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    truth = make_imagefolder(str(src), classes=("zebra", "ant", "moth"), per_class=5)
    assert main(["imagefolder", str(src), str(out), "--shard-size", "4", "--workers", "1", "--quiet"]) == 0
    m, samples = read_shards(str(out))
    assert m["classes"] == ["ant", "moth", "zebra"]  # sorted: the class map is stable across train/ and val/
    assert m["num_samples"] == 15 and m["num_classes"] == 3 and m["rejected"] == []
    assert m["class_counts"] == [5, 5, 5] and m["channels"] == 3 and m["image_size"] is None
    assert [s["name"] for s in m["shards"]] == [schema.shard_name(k) for k in range(4)]
    # every source file is in a shard, byte-exact, under its class index
    by_bytes = {v[2]: v for v in samples.values()}
    for rel, _ in truth.items():
        data = (src / rel).read_bytes()
        assert data in by_bytes, rel
        label, ext, _ = by_bytes[data]
        assert m["classes"][label] == rel.split(os.sep)[0] and ext == "jpg"
    # the seeded shuffle mixes classes across shards (labels of the first shard are not one class)
    first = [v[0] for k, v in sorted(samples.items())[:4]]
    assert len(set(first)) > 1


def test_bad_inputs_are_normalized_or_rejected(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    cases = make_bad_imagefolder(str(src))
    assert main(["imagefolder", str(src), str(out), "--shard-size", "6", "--workers", "2", "--quiet"]) == 0
    m, samples = read_shards(str(out))
    rejected = {r["path"]: r["reason"] for r in m["rejected"]}
    normalized = {n["path"]: n["action"] for n in m["normalized"]}
    assert m["files_seen"] == len(cases)
    assert m["num_samples"] + len(m["rejected"]) == m["files_seen"]
    assert m["empty_classes"] == ["gamma_empty"] and m["classes"][-1] == "gamma_empty"
    stored = {v[2] for v in samples.values()}
    for rel, outcome in cases.items():
        if outcome is None:
            assert rel not in rejected and rel not in normalized, rel
            assert (src / rel).read_bytes() in stored, f"{rel} should be stored byte-exact"
        elif outcome.startswith("rejected:"):
            assert rel in rejected and outcome.split(":", 1)[1] in rejected[rel], (rel, rejected.get(rel))
        else:
            assert rel in normalized, rel
    # what got re-encoded decodes to 8-bit L/RGB, and the EXIF rotation was applied (32x20 → 20x32)
    modes = {k.split("_", 1)[1]: pixels(v[2]).shape for k, v in samples.items()}
    assert modes["rotated"] == (32, 20, 3)
    assert modes["deep16"] == (20, 22) and modes["la"] == (24, 24)
    assert modes["cmyk"][2] == 3 and modes["rgba"][2] == 3 and modes["palette_alpha"][2] == 3
    for key, (label, ext, data) in samples.items():
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode in ("L", "RGB") and im.format == ("JPEG" if ext == "jpg" else "PNG"), key
            assert "transparency" not in im.info and im.getexif().get(0x0112, 1) == 1, key
    # a 16-bit PNG keeps its top 8 bits
    deep = np.asarray(Image.open(src / "beta/deep16.png"))
    packed_deep = next(v[2] for k, v in samples.items() if k.endswith("deep16"))
    assert np.array_equal(pixels(packed_deep), (deep.astype(np.uint32) >> 8).astype(np.uint8))
    # unicode / spaces / extra dots give dot-free keys with a readable hint
    keys = set(samples)
    assert any(k.endswith("_pic_v2_final") for k in keys) and any(k.endswith("_png_named") for k in keys)
    assert main(["verify", str(out), "--quiet"]) == 0


def test_idx_round_trip_gz_and_raw(tmp_path):
    for gz in (True, False):
        src, out = tmp_path / f"idx{gz}", tmp_path / f"out{gz}"
        data = make_idx(str(src), n_train=30, n_test=11, gz=gz)
        for split in ("train", "test"):
            o = out / split
            assert main(["idx", str(src), str(o), "--split", split, "--shard-size", "7", "--workers", "1",
                         "--quiet"]) == 0
            m, samples = read_shards(str(o))
            images, labels = data[split]
            assert m["num_samples"] == len(images) and m["channels"] == 1 and m["image_size"] == [12, 12]
            assert m["classes"] == [str(i) for i in range(5)]
            got = {}
            for key, (label, ext, blob) in samples.items():
                assert ext == "png"
                got[int(key.split("_")[1][len(split):])] = (label, pixels(blob))
            assert sorted(got) == list(range(len(images)))
            for i, (label, arr) in got.items():
                assert label == labels[i] and np.array_equal(arr, images[i])


def test_idx_errors_name_the_file(tmp_path, capsys):
    src = tmp_path / "idx"
    make_idx(str(src), n_train=10, n_test=4)
    write_idx(str(src / "train-labels-idx1-ubyte.gz"), np.zeros(9, np.uint8), True)  # 9 labels for 10 images
    assert main(["idx", str(src), str(tmp_path / "o"), "--quiet"]) == 2
    assert "train-labels-idx1-ubyte.gz" in capsys.readouterr().err
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip")
    assert main(["idx", str(src), str(tmp_path / "o"), "--split", "test", "--quiet"]) == 2
    assert "t10k-images-idx3-ubyte.gz" in capsys.readouterr().err
    assert main(["idx", str(tmp_path / "missing"), str(tmp_path / "o"), "--quiet"]) == 2
    assert main(["imagefolder", str(tmp_path / "missing"), str(tmp_path / "o"), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    make_imagefolder(str(tmp_path / "src"), per_class=1)
    assert main(["imagefolder", str(tmp_path / "src"), str(tmp_path / "src" / "out"), "--quiet"]) == 2
    assert "inside SRC" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects it before anything runs
        main(["imagefolder", str(tmp_path / "src"), str(tmp_path / "o"), "--shard-size", "0"])
    assert "--shard-size" in capsys.readouterr().err


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    src = tmp_path / "src"
    make_bad_imagefolder(str(src))
    digests = []
    for name, workers, seed in (("a", "1", "3"), ("b", "2", "3"), ("c", "1", "4")):
        assert main(["imagefolder", str(src), str(tmp_path / name), "--shard-size", "5", "--workers", workers,
                     "--seed", seed, "--quiet"]) == 0
        digests.append([(f, (tmp_path / name / f).read_bytes()) for f in sorted(os.listdir(tmp_path / name))
                        if f.endswith((".tar", ".idx"))])
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]  # another seed, another order


def test_index_matches_dali_wds2idx(tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    src, out = tmp_path / "src", tmp_path / "out"
    make_bad_imagefolder(str(src))
    assert main(["imagefolder", str(src), str(out), "--shard-size", "50", "--workers", "1", "--quiet"]) == 0
    ref = tmp_path / "ref.idx"
    with wds2idx.IndexCreator(str(out / "shard-000000.tar"), str(ref), verbose=False) as ic:
        ic.create_index()
    assert ref.read_text() == (out / "shard-000000.idx").read_text()


def test_resume_after_kill_keeps_finished_shards(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_imagefolder(str(src), per_class=6)  # 18 files, shard size 4 -> 5 shards
    args = ["--shard-size", "4", "--workers", "1", "--quiet"]
    assert main(["imagefolder", str(src), str(tmp_path / "ref")] + args) == 0
    out = tmp_path / "out"
    monkeypatch.setenv(packmod.FAIL_ENV, "3")
    with pytest.raises(RuntimeError, match="injected failure"):
        main(["imagefolder", str(src), str(out)] + args)
    monkeypatch.delenv(packmod.FAIL_ENV)
    done = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
    assert done == [schema.shard_name(k) for k in range(3)] and not (out / "manifest.json").exists()
    # simulate a kill mid-write and a damaged finished shard
    (out / "shard-000003.tar.partial").write_bytes(b"half a shard")
    with open(out / "shard-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    stamp0 = os.stat(out / "shard-000000.tar").st_mtime_ns
    assert main(["imagefolder", str(src), str(out)] + args) == 0
    assert os.stat(out / "shard-000000.tar").st_mtime_ns == stamp0  # kept, not rewritten
    assert not any(f.endswith(".partial") for f in os.listdir(out))
    for f in sorted(os.listdir(tmp_path / "ref")):
        if f.endswith((".tar", ".idx")) or f == "manifest.json":
            a, b = (tmp_path / "ref" / f).read_bytes(), (out / f).read_bytes()
            if f == "manifest.json":
                a, b = json.loads(a), json.loads(b)
            assert a == b, f
    # changed settings invalidate the progress record instead of mixing two shard layouts
    assert main(["imagefolder", str(src), str(out), "--shard-size", "5", "--workers", "1", "--quiet"]) == 0
    assert schema.read_manifest(str(out))["shard_size"] == 5 and main(["verify", str(out), "--quiet"]) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == [schema.shard_name(k) for k in range(4)]


def test_size_center_crops_everything(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_bad_imagefolder(str(src))
    assert main(["imagefolder", str(src), str(out), "--size", "16", "--workers", "1", "--quiet"]) == 0
    m, samples = read_shards(str(out))
    assert m["image_size"] == [16, 16] and m["size"] == 16
    assert all(pixels(v[2]).shape[:2] == (16, 16) for v in samples.values())


def test_verify_names_bad_shards_and_samples(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(str(src), per_class=4)
    assert main(["imagefolder", str(src), str(out), "--shard-size", "5", "--workers", "1", "--quiet"]) == 0
    assert main(["verify", str(out), "--quiet"]) == 0
    # flip bytes inside the first image of shard 1 (same length: only the hash and the decode can tell)
    idx = schema.parse_index((out / "shard-000001.idx").read_text())
    off, size, name = idx[0]["jpg"]
    blob = bytearray((out / "shard-000001.tar").read_bytes())
    blob[off + size // 3: off + size // 3 + 200] = b"\x00" * 200
    blob[off:off + 2] = b"XX"  # break the JPEG magic: not decodable at all
    (out / "shard-000001.tar").write_bytes(bytes(blob))
    # truncate shard 2
    data = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(data[: len(data) // 2])
    assert main(["verify", str(out), "--quiet", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "shard-000001.tar: sha256" in err and f"shard-000001.tar: sample {name.split('.')[0]}" in err
    assert "shard-000002.tar" in err and "shard-000000.tar" not in err
    os.remove(out / "manifest.json")
    assert main(["verify", str(out), "--quiet"]) == 1
    assert "manifest.json" in capsys.readouterr().err


def test_schema_rules():
    assert schema.make_key(7, "n01440764_10026.v2 copy") == "000000007_n01440764_10026_v2_copy"
    assert schema.is_valid_key(schema.make_key(3, "ünï cöde" * 30))
    assert schema.split_member("k_1.cls") == ("k_1", "cls") and schema.split_member("a.b.c") == ("a", "b.c")
    assert schema.encode_cls(7, 3) == b"007" and schema.decode_cls(b"007") == 7
    with pytest.raises(ValueError, match="label"):
        schema.decode_cls(b"x1")
    with pytest.raises(ValueError, match="num_samples"):
        schema.validate_manifest({"num_samples": 3, "num_classes": 1, "classes": ["a"], "rejected": [],
                                  "shards": [{"name": "shard-000000.tar", "num_samples": 2, "sha256": ""}]})
    with pytest.raises(ValueError, match="classes"):
        schema.validate_manifest({"num_samples": 0, "num_classes": 2, "classes": ["a"], "rejected": [],
                                  "shards": []})


def test_undecodable_file_names(tmp_path):
    """Names that are not UTF-8 (raw bytes from another system) still pack, and the manifest stays valid JSON."""
    src = tmp_path / "src"
    make_imagefolder(str(src), classes=("a",), per_class=2)
    raw_dir = os.path.join(os.fsencode(str(src)), b"cl\xe9ss")
    os.makedirs(raw_dir)
    good = (src / "a" / "a_0000.JPEG").read_bytes()
    with open(os.path.join(raw_dir, b"im\xff.JPEG"), "wb") as f:
        f.write(good)
    assert main(["imagefolder", str(src), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    m = schema.read_manifest(str(tmp_path / "out"))
    assert m["num_samples"] == 3 and m["classes"] == ["a", "cl\ufffdss"] and m["class_counts"] == [2, 1]


def _accounted(m):
    """The manifest's bookkeeping: every file seen is packed or rejected; returns the rejects by path."""
    files = [r for r in m["rejected"] if r.get("kind") != "directory"]
    assert m["num_samples"] + len(files) == m["files_seen"]
    return {r["path"]: r for r in m["rejected"]}


def test_unreadable_subdirectory_is_rejected_not_a_crash(tmp_path):
    """A directory that cannot be listed is one rejected entry (its files are unknown); the run finishes with a
    manifest instead of an internal assertion after the shards were written."""
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(str(src), per_class=2)  # cat, dog, fish
    make_imagefolder(str(src / "dog"), classes=("locked",), per_class=2, seed=1)
    with unreadable_dir(str(src / "dog" / "locked")):
        assert main(["imagefolder", str(src), str(out), "--workers", "1", "--quiet"]) == 0
    m = schema.read_manifest(str(out))
    rejected = _accounted(m)
    locked = rejected[os.path.join("dog", "locked")]
    assert locked["kind"] == "directory" and "unreadable directory" in locked["reason"]
    assert m["num_samples"] == 6 and m["files_seen"] == 6 and m["dirs_seen"] == 4
    assert m["class_counts"] == [2, 2, 2]


def test_unreadable_class_directory_is_an_empty_class(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(str(src), per_class=2)
    with unreadable_dir(str(src / "fish")):
        assert main(["imagefolder", str(src), str(out), "--workers", "1", "--quiet"]) == 0
    m = schema.read_manifest(str(out))
    assert _accounted(m)["fish"]["kind"] == "directory" and m["empty_classes"] == ["fish"]
    assert m["classes"] == ["cat", "dog", "fish"] and m["num_samples"] == 4


def test_symlinked_directories_are_followed_once(tmp_path):
    """A symlinked sub-directory inside a class folder is walked (its images are packed under that class); a link
    back to an ancestor (a loop) and a second link to an already walked directory are rejected with the path
    that was scanned first; a hidden top-level directory is rejected rather than skipped."""
    src, out, extra = tmp_path / "src", tmp_path / "out", tmp_path / "extra"
    make_imagefolder(str(src), per_class=2)
    make_imagefolder(str(extra), classes=("more",), per_class=3, seed=2)
    os.symlink(extra / "more", src / "cat" / "linked")
    os.symlink("..", src / "dog" / "loop")          # dog/loop -> src: the walk would never end
    os.symlink(src / "cat", src / "fish" / "cats")  # a second way into cat/
    make_imagefolder(str(src / ".cache"), classes=("x",), per_class=1, seed=3)
    assert main(["imagefolder", str(src), str(out), "--workers", "1", "--quiet"]) == 0
    m = schema.read_manifest(str(out))
    rejected = _accounted(m)
    assert m["classes"] == ["cat", "dog", "fish"] and m["class_counts"] == [5, 2, 2] and m["num_samples"] == 9
    assert "already scanned as '.'" in rejected[os.path.join("dog", "loop")]["reason"]
    assert "already scanned as 'cat'" in rejected[os.path.join("fish", "cats")]["reason"]
    assert "hidden directory" in rejected[".cache"]["reason"]
    assert all(r["kind"] == "directory" for r in rejected.values())
    _, samples = read_shards(str(out))
    packed = {v[2] for v in samples.values()}
    assert all((extra / "more" / f).read_bytes() in packed for f in os.listdir(extra / "more"))
    os.symlink("self", src / "cat" / "self")  # a link to itself cannot even be stat'ed (ELOOP)
    assert main(["imagefolder", str(src), str(tmp_path / "out2"), "--workers", "1", "--quiet"]) == 0
    reason = _accounted(schema.read_manifest(str(tmp_path / "out2")))[os.path.join("cat", "self")]["reason"]
    assert "unreadable" in reason


def test_fifo_is_rejected_without_opening_it(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(str(src), per_class=1)
    with fifo_with_eof_writer(str(src / "cat" / "pipe.JPEG")):
        assert main(["imagefolder", str(src), str(out), "--workers", "1", "--quiet"]) == 0
    rejected = _accounted(schema.read_manifest(str(out)))
    assert "not a regular file" in rejected[os.path.join("cat", "pipe.JPEG")]["reason"]


def test_count_mismatch_refused_before_writing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(str(src), per_class=2)
    scan = packmod.scan_imagefolder(str(src))
    with pytest.raises(RuntimeError, match="nothing written"):
        packmod.pack(str(out), scan.classes, scan.candidates, packmod.Settings(progress=False),
                     source_kind="imagefolder", source=str(src), scan_rejected=scan.rejected,
                     files_seen=scan.files_seen + 1)
    assert not out.exists() or not any(f.endswith(".tar") for f in os.listdir(out))


def test_count_mismatch_after_writing_still_writes_the_manifest(tmp_path):
    """A failed final count check (here forced by a progress record edited by hand) leaves a manifest that says
    what was packed and what went wrong, then raises."""
    src, out = tmp_path / "src", tmp_path / "out"
    make_bad_imagefolder(str(src))
    args = ["imagefolder", str(src), str(out), "--shard-size", "50", "--workers", "1", "--quiet"]
    assert main(args) == 0
    progress = out / packmod.PROGRESS_NAME
    rec = json.loads(progress.read_text())
    rec["shards"]["shard-000000.tar"]["rejected"].pop()
    progress.write_text(json.dumps(rec))
    os.remove(out / "manifest.json")
    with pytest.raises(RuntimeError, match="manifest lists what was packed"):
        main(args)
    m = json.loads((out / "manifest.json").read_text())
    assert "rejected files" in m["consistency_error"] and m["num_samples"] > 0 and m["shards"]
    assert main(["verify", str(out), "--quiet"]) == 1  # verify reports it too


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    src = tmp_path / "src"
    make_imagefolder(str(src), per_class=1)
    (tmp_path / "afile").write_text("x")
    assert main(["imagefolder", str(src), str(tmp_path / "afile"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("drift-prep: error: ") and "afile" in err
    with unreadable_dir(str(src)):
        assert main(["imagefolder", str(src), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err and "src" in err
    with pytest.raises(NotADirectoryError):  # --debug: the traceback instead of the one line
        main(["imagefolder", str(src), str(tmp_path / "afile"), "--quiet", "--debug"])
