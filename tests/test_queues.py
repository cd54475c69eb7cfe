"""Sample-queue semantics (drift.queues): ring order, draws with/without replacement, isolation, state."""
import io

import pytest
import torch

from drift.queues import ClassQueues, GlobalQueue


def _push_one_by_one(num_classes, size, xs, labels):
    """Sequential model of the official ArrayMemoryBank.add: returns (data, ptr, count) as Python lists."""
    data = [[None] * size for _ in range(num_classes)]
    ptr = [0] * num_classes
    count = [0] * num_classes
    for x, c in zip(xs, labels):
        data[c][ptr[c]] = x
        ptr[c] = (ptr[c] + 1) % size
        count[c] = min(count[c] + 1, size)
    return data, ptr, count


def _valid_items(q, c):
    return sorted(q.data[c, : int(q.counts[c])].tolist())


def test_class_queue_matches_sequential_ring_buffer():
    g = torch.Generator().manual_seed(0)
    C, size = 5, 4
    q = ClassQueues(C, size=size, item_shape=())
    xs_all, labels_all = [], []
    # several pushes of varying size, including one class receiving more than `size` items in a single push
    for n in (3, 7, 1, 13, 0, 6):
        labels = torch.randint(0, C, (n,), generator=g)
        if n == 13:
            labels[:9] = 2
        xs = torch.arange(len(xs_all), len(xs_all) + n, dtype=torch.float32)
        q.push(xs, labels)
        xs_all += xs.tolist()
        labels_all += labels.tolist()
        data, ptr, count = _push_one_by_one(C, size, xs_all, labels_all)
        assert q.ptr.tolist() == ptr
        assert q.counts.tolist() == count
        for c in range(C):
            assert q.data[c, : count[c]].tolist() == data[c][: count[c]], (n, c)


def test_class_queue_ring_overwrite_order_and_isolation():
    q = ClassQueues(3, size=4, item_shape=(2,))
    x = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 2)  # items 0..5
    q.push(x, torch.zeros(6, dtype=torch.long))
    # items 4, 5 overwrote the two oldest (0, 1) in slots 0, 1: ring order
    assert q.data[0, :, 0].tolist() == [4.0, 5.0, 2.0, 3.0]
    assert q.ptr.tolist() == [2, 0, 0] and q.count().tolist() == [4, 0, 0]
    q.push(torch.full((1, 2), 9.0), torch.tensor([1]))
    assert q.count(torch.tensor([0, 1, 2])).tolist() == [4, 1, 0]
    assert q.data[0, :, 0].tolist() == [4.0, 5.0, 2.0, 3.0]  # class 0 untouched by a class-1 push
    # per-class isolation: samples of class 1 are only class-1 items
    s = q.sample(torch.tensor([1, 1, 0]), 3, generator=torch.Generator().manual_seed(1))
    assert s.shape == (3, 3, 2)
    assert (s[:2] == 9.0).all()
    assert set(s[2, :, 0].tolist()) <= {2.0, 3.0, 4.0, 5.0}


def test_class_queue_push_more_than_size_keeps_newest():
    q = ClassQueues(2, size=5, item_shape=(1,))
    x = torch.arange(23, dtype=torch.float32)[:, None]
    q.push(x, torch.ones(23, dtype=torch.long))
    assert sorted(q.data[1, :, 0].tolist()) == [18.0, 19.0, 20.0, 21.0, 22.0]
    assert q.counts.tolist() == [0, 5]
    assert q.ptr.tolist() == [0, 23 % 5]


def test_class_queue_without_replacement_when_enough():
    q = ClassQueues(2, size=16, item_shape=())
    q.push(torch.arange(16, dtype=torch.float32), torch.zeros(16, dtype=torch.long))
    q.push(torch.arange(100, 110, dtype=torch.float32), torch.ones(10, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    s = q.sample(torch.tensor([0] * 50 + [1] * 50), 10, generator=g)
    for row in s[:50]:
        assert len(set(row.tolist())) == 10  # no duplicates: 16 items available
    for row in s[50:]:
        assert sorted(row.tolist()) == list(range(100, 110))  # exactly all 10: a permutation
    # all 16 items get drawn eventually, roughly uniformly (each is in 10/16 of the rows)
    freq = torch.bincount(s[:50].long().flatten(), minlength=16)
    assert freq.min() > 15 and freq.max() < 50


def test_class_queue_with_replacement_when_short():
    q = ClassQueues(1, size=8, item_shape=())
    q.push(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, dtype=torch.long))
    s = q.sample(torch.zeros(40, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    assert set(s.flatten().tolist()) == {1.0, 2.0, 3.0}  # only valid slots, never the empty (zero) ones
    # n larger than the queue size: must fall back to replacement too
    s = q.sample(torch.zeros(2, dtype=torch.long), 20, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 20) and set(s.flatten().tolist()) <= {1.0, 2.0, 3.0}


def test_class_queue_state_round_trip_reproduces_samples():
    q = ClassQueues(4, size=6, item_shape=(2, 3))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        q.push(torch.randn(7, 2, 3, generator=g), torch.randint(0, 4, (7,), generator=g))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    q2 = ClassQueues(4, size=6, item_shape=(2, 3))
    q2.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 2, 3, generator=g)
    lab = torch.tensor([0, 1, 1, 3, 2])
    for qq in (q, q2):
        qq.push(x, lab)
    a = q.sample(torch.tensor([0, 1, 2, 3]), 4, generator=torch.Generator().manual_seed(9))
    b = q2.sample(torch.tensor([0, 1, 2, 3]), 4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert torch.equal(q.sample_recent_labels(3, torch.Generator().manual_seed(2)),
                       q2.sample_recent_labels(3, torch.Generator().manual_seed(2)))


def test_sample_recent_labels_are_distinct_positions_of_last_push():
    q = ClassQueues(10, size=4, item_shape=())
    q.push(torch.zeros(3), torch.tensor([7, 7, 7]))
    q.push(torch.zeros(5), torch.tensor([1, 2, 3, 4, 5]))
    lab = q.sample_recent_labels(5, torch.Generator().manual_seed(0))
    assert sorted(lab.tolist()) == [1, 2, 3, 4, 5]
    lab = q.sample_recent_labels(2, torch.Generator().manual_seed(0))
    assert len(set(lab.tolist())) == 2 and set(lab.tolist()) <= {1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="k must be"):
        q.sample_recent_labels(6)


def test_class_queue_errors():
    q = ClassQueues(3, size=4, item_shape=(2,))
    with pytest.raises(ValueError, match="x must have shape"):
        q.push(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels has 1 entries"):
        q.push(torch.zeros(2, 2), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be a 1-D integer"):
        q.push(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        q.push(torch.zeros(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        q.push(torch.zeros(1, 2), torch.tensor([-1]))
    assert q.counts.sum() == 0  # failed pushes changed nothing
    q.push(torch.ones(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"empty class queue\(s\) \[2\]"):
        q.sample(torch.tensor([0, 2]), 1)
    with pytest.raises(ValueError, match=r"labels must lie in"):
        q.sample(torch.tensor([5]), 1)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        q.sample(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="num_classes"):
        ClassQueues(0, size=4, item_shape=(2,))
    with pytest.raises(ValueError, match="size"):
        ClassQueues(3, size=0, item_shape=(2,))
    with pytest.raises(ValueError, match="'data' has shape"):
        ClassQueues(3, size=5, item_shape=(2,)).load_state_dict(q.state_dict())
    with pytest.raises(ValueError, match="missing"):
        q.load_state_dict({"data": q.data})


def test_global_queue_ring_and_overflow():
    g = GlobalQueue(size=5, item_shape=(1,))
    g.push(torch.arange(3, dtype=torch.float32)[:, None])
    assert len(g) == 3 and int(g.ptr) == 3
    g.push(torch.arange(3, 7, dtype=torch.float32)[:, None])  # 5, 6 wrap onto slots 0, 1 (evicting 0, 1)
    assert g.data[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    g.push(torch.arange(10, 22, dtype=torch.float32)[:, None])  # 12 > size: the newest 5 survive
    assert sorted(g.data[:, 0].tolist()) == [17.0, 18.0, 19.0, 20.0, 21.0]
    # and they sit where a one-by-one push would have put them
    seq = [None] * 5
    for i, v in enumerate(list(range(7)) + list(range(10, 22))):
        seq[i % 5] = float(v)
    assert g.data[:, 0].tolist() == seq
    assert int(g.ptr) == 19 % 5 and int(g.count()) == 5


def test_global_queue_sampling():
    g = GlobalQueue(size=32, item_shape=())
    g.push(torch.arange(20, dtype=torch.float32))
    s = g.sample(64, 8, generator=torch.Generator().manual_seed(0))
    assert s.shape == (64, 8)
    assert all(len(set(r.tolist())) == 8 for r in s)  # without replacement: 20 >= 8
    assert set(s.flatten().tolist()) == set(float(i) for i in range(20))  # never an empty slot
    assert not all(torch.equal(s[0], r) for r in s[1:])  # independent draws per row
    s = g.sample(4, 25, generator=torch.Generator().manual_seed(0))  # short: with replacement
    assert s.shape == (4, 25) and set(s.flatten().tolist()) <= set(float(i) for i in range(20))
    with pytest.raises(ValueError, match="empty GlobalQueue"):
        GlobalQueue(size=4, item_shape=()).sample(1, 1)
    with pytest.raises(ValueError, match="x must have shape"):
        g.push(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="k must be"):
        g.sample(0, 1)


def test_global_queue_state_round_trip():
    g = GlobalQueue(size=10, item_shape=(3,))
    gen = torch.Generator().manual_seed(0)
    g.push(torch.randn(13, 3, generator=gen))
    buf = io.BytesIO()
    torch.save(g.state_dict(), buf)
    buf.seek(0)
    g2 = GlobalQueue(size=10, item_shape=(3,))
    g2.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(4, 3, generator=gen)
    g.push(x)
    g2.push(x)
    assert torch.equal(g.sample(3, 6, torch.Generator().manual_seed(5)), g2.sample(3, 6, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="'data' has shape"):
        GlobalQueue(size=11, item_shape=(3,)).load_state_dict(g.state_dict())


def test_uint8_image_queues_give_back_the_loaders_values():
    """uint8 storage of [-1, 1] images on the uint8 grid: samples equal the float32 queue's bit for bit, also when
    the loader's normalization rounded a value one ulp off (DALI's multiply by 1/127.5), in a quarter of the bytes."""
    u = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    x = (u.float() - 127.5) / 127.5  # the PIL loader's normalization
    off = torch.nextafter(x, torch.full_like(x, 2.0))  # one ulp up
    labels = torch.tensor([0, 1, 0, 1])
    q8, q32 = ClassQueues(2, 4, (1, 8, 8), dtype=torch.uint8), ClassQueues(2, 4, (1, 8, 8))
    g8, g32 = GlobalQueue(4, (1, 8, 8), dtype=torch.uint8), GlobalQueue(4, (1, 8, 8))
    q8.push(off, labels)
    q32.push(x, labels)
    g8.push(off)
    g32.push(x)
    assert q8.data.dtype == torch.uint8 and q8.data.element_size() * 4 == q32.data.element_size()
    assert torch.equal(q8.data[0, :2], u[[0, 2]])  # stored as the original bytes
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = q8.sample(torch.tensor([0, 1, 1]), 2, gen()), q32.sample(torch.tensor([0, 1, 1]), 2, gen())
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(g8.sample(2, 3, gen()), g32.sample(2, 3, gen()))


def test_queue_dtype_is_checked():
    with pytest.raises(ValueError, match="dtype"):
        ClassQueues(2, 3, (2,), dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        GlobalQueue(3, (2,), dtype=torch.int32)
    q32 = ClassQueues(2, 3, (2,))
    with pytest.raises(ValueError, match="queue_dtype"):  # a float32 checkpoint into a uint8 run, never a cast
        ClassQueues(2, 3, (2,), dtype=torch.uint8).load_state_dict(q32.state_dict())
    with pytest.raises(ValueError, match="queue_dtype"):
        GlobalQueue(3, (2,)).load_state_dict(GlobalQueue(3, (2,), dtype=torch.uint8).state_dict())


def test_uint8_queues_train_like_float32_queues_on_image_data(tmp_path):
    """queue_dtype="uint8" (the pixel presets'): a run on images of the uint8 grid equals the float32 run step for
    step; resuming a float32 run with uint8 queues, or keeping latents in uint8, is refused with the reason."""
    from drift.checkpoint import CheckpointError
    from drift.trainer import Trainer, train
    from tests.trainer_utils import history, loader_factory, tiny
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (32, 1, 8, 8), generator=g, dtype=torch.uint8)
    x, y = (u.float() - 127.5) / 127.5, torch.arange(32) % 4
    runs = {}
    for dt in ("float32", "uint8"):
        cfg = tiny(tmp_path / dt, max_steps=4, ckpt_every=4, queue_dtype=dt)
        runs[dt] = history(train(cfg, loader_factory=loader_factory(x, y)))
    assert runs["uint8"] == runs["float32"]  # bit for bit
    with pytest.raises(CheckpointError, match="queue_dtype"):
        Trainer(tiny(tmp_path / "float32", max_steps=6, queue_dtype="uint8"), resume="auto",
                loader_factory=loader_factory(x, y))

    def latents(cfg, info):
        loader = loader_factory(x, y)(cfg, info)
        loader.kind = "latents"
        return loader

    with pytest.raises(ValueError, match="queue_dtype='uint8'.*latents"):
        Trainer(tiny(tmp_path / "lat", queue_dtype="uint8"), loader_factory=latents)
