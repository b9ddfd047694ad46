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


# --- the floor: no batch below min_size; what cannot be batched is counted --------------------------------

# 12 rows, 8 of which share the positive "P" (queries q0..q7); rows 8..11 are distinct pairs
SHARED = [(f"q{i}", "P") for i in range(8)] + [(f"q{i}", f"p{i}") for i in range(8, 12)]


def test_duplicate_heavy_data_gets_no_batch_below_the_floor():
    # seed 0 shuffles the rows to 1 9 8 5 10 2 3 7 4 0 11 6 (random.Random(0 * 1_000_003 + 0)).
    # Greedy, batches of 4: [1 9 8 10] (5 clashes with 1 on "P" and waits), [5 11], then one P-row each:
    # [2] [3] [7] [4] [0] [6] -- six batches of one, whose in-batch loss is exactly 0.
    assert list(_sampler(SHARED, 4, seed=0)) == [[1, 9, 8, 10], [5, 11], [2], [3], [7], [4], [0], [6]]
    # Floor 2: the six single P-rows cannot merge (they share "P"); each borrows a row from the latest full
    # batch that can spare one and keep 2: [5 11] cannot; [1 9 8 10] gives 10 to [2], then 8 to [3].
    # [7] [4] [0] [6] find no donor: 4 rows unbatched this epoch, and counted.
    sampler = _sampler(SHARED, 4, seed=0, min_size=2)
    assert list(sampler) == [[1, 9], [5, 11], [2, 10], [3, 8]]
    assert sampler.unbatched == 4 and sampler.unbatched_in(0) == 4 and len(sampler) == 4


def test_a_short_last_batch_is_filled_from_the_last_full_one():
    from embtune.data.sampler import ShuffledBatchSampler

    # seed 0 order of 9 rows: 7 5 1 3 4 2 0 8 6 -> [7 5 1 3] [4 2 0 8] [6]; [6] takes 8 from the batch before
    sampler = ShuffledBatchSampler(9, 4, seed=0, min_size=2)
    assert list(sampler) == [[7, 5, 1, 3], [4, 2, 0], [6, 8]] and sampler.unbatched == 0
    assert list(ShuffledBatchSampler(9, 4, seed=0)) == [[7, 5, 1, 3], [4, 2, 0, 8], [6]]  # no floor: as before


def test_a_plan_without_short_batches_is_unchanged_by_the_floor():
    texts = [(f"q{i % 20}", f"p{i}") for i in range(53)]  # batches of 8, 8, 8, 8, 8, 8, 5
    plain = list(_sampler(texts, 8, seed=1))
    assert [len(b) for b in plain] == [8, 8, 8, 8, 8, 8, 5] and list(_sampler(texts, 8, seed=1, min_size=4)) == plain


def test_two_processes_get_equal_shares_and_every_row_is_used_or_counted():
    from embtune.training.distributed import ShardedBatchSampler

    # 19 distinct rows, 2 processes x 4: global batches of 8, floor 2 x 2 = 4, sizes a multiple of 2.
    # seed 0 order: 9 11 14 18 0 16 10 2 | 3 5 17 4 6 7 15 8 | 1 13 12. The last (3 rows) takes 8 from
    # the batch before, which is left with 7 and cut to 6: row 15 is unbatched (counted), none is lost.
    texts = [(str(i),) for i in range(19)]
    sampler = _sampler(texts, 8, seed=0, min_size=4, multiple=2)
    assert list(sampler) == [[9, 11, 14, 18, 0, 16, 10, 2], [3, 5, 17, 4, 6, 7], [1, 13, 12, 8]]
    assert sampler.unbatched == 1
    parts = [list(ShardedBatchSampler(sampler, r, 2)) for r in (0, 1)]
    assert parts == [[[9, 11, 14, 18], [3, 5, 17], [1, 13]], [[0, 16, 10, 2], [4, 6, 7], [12, 8]]]
    assert sorted(i for p in parts for b in p for i in b) == sorted(set(range(19)) - {15})


def test_the_rows_of_one_group_are_planned_into_one_batch():
    # groups (first appearance): q0 = rows 0 1, q1 = rows 2 3 4, q2 = row 5, q3 = row 6 (its positive "a"
    # is also q0's); seed 0 shuffles the 4 groups to q2 q0 q1 q3. Batches of 4: q2 + q0 = 3 rows; q1 (3
    # rows) does not fit and q3 clashes on "a": both wait and make the next batch.
    texts = [("q0", "a"), ("q0", "b"), ("q1", "c"), ("q1", "d"), ("q1", "e"), ("q2", "f"), ("q3", "a")]
    sampler = _sampler(texts, 4, seed=0, group_of=lambda i: texts[i][0])
    assert list(sampler) == [[5, 0, 1], [2, 3, 4, 6]] and sampler.unbatched == 0


def test_a_floor_above_the_batch_size_is_refused():
    import pytest

    with pytest.raises(ValueError, match="min_size <= batch_size"):
        _sampler(SHARED, 4, min_size=5)
