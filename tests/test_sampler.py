"""Batches without repeated texts, with an exact length."""

from embtune.data.sampler import NoDuplicatesBatchSampler


def _sampler(texts, batch_size, **kw):
    return NoDuplicatesBatchSampler(lambda i: texts[i], len(texts), batch_size, **kw)


def test_no_batch_repeats_a_text_and_every_example_is_used_once():
    # 5 queries with 2 positives each, and a text that is one row's query and another's positive
    texts = [(f"q{i // 2}", f"p{i}") for i in range(10)] + [("p0", "x"), ("y", "q1")]
    sampler = _sampler(texts, batch_size=4, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    for b in batches:
        flat = [t for i in b for t in texts[i]]
        assert len(flat) == len(set(flat)), b
    assert len(sampler) == len(batches)


def test_length_is_exact_and_order_is_seeded_per_epoch():
    texts = [(f"q{i % 7}", f"p{i}") for i in range(50)]
    a, b = _sampler(texts, 8, seed=1), _sampler(texts, 8, seed=1)
    assert list(a) == list(b) and len(a) == len(list(a))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and len(a) == len(list(a))


def test_drop_last_drops_only_a_short_final_batch():
    texts = [(f"q{i}", f"p{i}") for i in range(10)]
    assert [len(b) for b in _sampler(texts, 4, drop_last=True)] == [4, 4]
    assert [len(b) for b in _sampler(texts, 4)] == [4, 4, 2]
