"""Data formats: rows -> examples, with errors that name the file, row and field."""

import pytest

from embtune.data.formats import Example, Pairwise, Triplet


def test_pairwise_expands_a_list_of_positives():
    rows = [{"q": "a", "p": ["b", "c"]}, {"q": "d", "p": "e"}]
    assert Pairwise(query="q", positive="p")(rows) == [Example("a", "b"), Example("a", "c"), Example("d", "e")]


def test_triplet_pairs_positives_with_negatives():
    rows = [{"query": "q", "pos": ["p1", "p2", "p3"], "neg": ["n1", "n2"]}]
    out = Triplet(positive="pos", negative="neg")(rows)
    assert out == [Example("q", "p1", ("n1",)), Example("q", "p2", ("n2",)), Example("q", "p3", ("n1",))]


def test_missing_field_names_file_row_and_field():
    rows = [{"query": "a", "positive": "b"}, {"query": "c"}]
    with pytest.raises(ValueError, match=r"train\.jsonl:7: missing field 'positive'"):
        Pairwise()(rows, [("train.jsonl", 6), ("train.jsonl", 7)])


def test_wrong_type_names_the_field_and_type():
    with pytest.raises(ValueError, match=r"row 1: field 'query' must be a string, got list"):
        Pairwise()([{"query": ["a"], "positive": "b"}])
    with pytest.raises(ValueError, match=r"field 'negative' must be a string or a non-empty list"):
        Triplet()([{"query": "a", "positive": "b", "negative": 3}])
