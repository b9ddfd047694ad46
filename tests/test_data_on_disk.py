"""Training rows, examples and token ids kept in Arrow files (embtune.data.rows, embtune.data.examples,
embtune.data.token_cache): the same rows, examples, fingerprints and batches as in memory; a second run
reads no row of the file and tokenises nothing; memory that does not grow with the rows."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tracemalloc

import pytest
import torch
from omegaconf import OmegaConf
from test_token_cache import CountingTokenizer

from embtune.data import Listwise, MultiNegative, Pairwise, Pointwise, RawTexts, ScoredPairs, Triplet
from embtune.data.batching import plan_batches
from embtune.data.cache import cache_dir
from embtune.data.checks import make_examples, text_report
from embtune.data.dataset import TrainingData
from embtune.data.dev_split import hold_out_dev
from embtune.data.examples import TextMap
from embtune.data.files import load_jsonl
from embtune.data.rows import RowTable
from embtune.data.sampler import NoDuplicatesBatchSampler
from embtune.data.token_cache import TokenCache
from embtune.losses import InfoNCE
from embtune.negatives import InBatch
from embtune.objectives import objective_for
from embtune.training.distributed import Dist

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _pairs(n: int, seed: int = 0, doc_words: int = 40) -> list[dict]:
    """n (query, positive) rows, a query repeated now and then (several positives), some positives shared."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(6)) + f" {i // 3 if i % 5 == 0 else i}"
        d = " ".join(rng.choice(WORDS) for _ in range(doc_words)) + f" {i // 2 if i % 7 == 0 else i}"
        out.append({"query": q, "positive": d})
    return out


def _digest(rows, test=None) -> str:
    """The fingerprint as embtune.data.dataset.fingerprint's docstring defines it, written out."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    if test is not None:
        for part in (test.queries, dict(test.corpus), test.qrels):
            h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def test_rows_on_disk_are_the_files_rows_with_their_lines_and_the_documented_fingerprint(tmp_path):
    rows = [{"query": "ünï ✓", "pos": ["a", "b"], "neg": [], "score": 0.5, "n": 3, "meta": {"k": [1, None]}},
            {"pos": "c", "query": "second", "extra": True}] + _pairs(5000)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + ("\n\n" if i == 0 else "\n")
                            for i, r in enumerate(rows)), encoding="utf-8")  # a blank line: lines are counted
    data = load_jsonl(str(path), dev_queries=0)
    assert isinstance(data.rows, RowTable) and len(data.rows) == len(rows)
    assert list(data.rows) == rows and data.rows[1] == rows[1] and data.rows[-1] == rows[-1]
    assert list(data.rows[1]) == ["pos", "query", "extra"]  # each row's keys in the file's order
    assert data.source[0] == (str(path), 1) and data.source[1] == (str(path), 3) and len(data.source) == len(rows)
    assert data.fingerprint == _digest(rows)
    again = load_jsonl(str(path), dev_queries=0)  # from the cache
    assert again.fingerprint == data.fingerprint and list(again.rows) == rows and list(again.source) == list(data.source)
    sub = load_jsonl(str(path), max_train_pairs=7, seed=3)
    assert sub.rows == load_jsonl(str(path), max_train_pairs=7, seed=3).rows and sub.fingerprint == _digest(sub.rows)
    assert [s[1] for s in sub.source] == sorted(s[1] for s in sub.source)


def test_an_edited_file_is_read_again(tmp_path):
    path = tmp_path / "train.jsonl"
    _write(path, _pairs(10))
    first = load_jsonl(str(path))
    _write(path, _pairs(10, seed=1))  # same size or not: the bytes key the cache
    second = load_jsonl(str(path))
    assert list(second.rows) == _pairs(10, seed=1) and second.fingerprint != first.fingerprint


def test_the_dev_split_of_rows_on_disk_equals_the_one_in_memory(tmp_path):
    rows = _pairs(300)
    path = tmp_path / "train.jsonl"
    _write(path, rows)
    on_disk = hold_out_dev(load_jsonl(str(path), dev_queries=20, seed=4), Pairwise())
    listed = load_jsonl(str(path), dev_queries=20, seed=4)
    in_memory = hold_out_dev(TrainingData(rows=list(listed.rows), test=None, name=listed.name,
                                          source=list(listed.source), dev=listed.dev), Pairwise())
    assert isinstance(on_disk.test.corpus, TextMap) and isinstance(in_memory.test.corpus, dict)
    assert list(on_disk.rows) == in_memory.rows and list(on_disk.source) == in_memory.source
    assert on_disk.test.queries == in_memory.test.queries and on_disk.test.qrels == in_memory.test.qrels
    assert on_disk.test.corpus == in_memory.test.corpus and list(on_disk.test.corpus) == list(in_memory.test.corpus)
    assert on_disk.held_out == in_memory.held_out
    assert on_disk.fingerprint == in_memory.fingerprint == _digest(in_memory.rows, in_memory.test)
    cached = hold_out_dev(load_jsonl(str(path), dev_queries=20, seed=4), Pairwise())  # made before: read back
    assert cached.fingerprint == on_disk.fingerprint and cached.test.qrels == on_disk.test.qrels
    assert "d3" in cached.test.corpus and "d03" not in cached.test.corpus and "x" not in cached.test.corpus


FORMATS = [
    (Pairwise(), [{"query": f"q{i % 4}", "positive": [f"p{i}", f"p{i + 1}"]} for i in range(9)]),
    (Triplet(positive_scores="ps", negative_scores="ns"),
     [{"query": f"q{i}", "positive": [f"p{i}"], "negative": [f"n{i}", "n"], "ps": [0.5], "ns": [0.25, i]}
      for i in range(9)]),
    (MultiNegative(), [{"query": f"q{i}", "pos": f"p{i}", "neg": [f"n{j}" for j in range(i % 3)]} for i in range(9)]),
    (Listwise(), [{"query": f"q{i}", "documents": ["a", f"b{i}"], "scores": [1, 0.5 * i]} for i in range(9)]),
    (ScoredPairs(score_scale=5), [{"sentence1": f"s{i}", "sentence2": "t", "score": str(i % 6)} for i in range(9)]),
    (Pointwise(texts=["query", "positive"], label="id"),
     [{"query": f"q{i}", "positive": f"p{i}", "id": i % 3} for i in range(9)]),
    (RawTexts(), [{"query": f"q{i % 3}", "positive": f"p{i}"} for i in range(9)]),
]


@pytest.mark.parametrize("fmt, rows", FORMATS, ids=[f.name for f, _ in FORMATS])
def test_examples_on_disk_read_back_as_the_formats_own(tmp_path, fmt, rows):
    path = tmp_path / "train.jsonl"
    _write(path, rows + [{"query": 5}])  # a bad row, dropped with its line
    data = load_jsonl(str(path), drop_bad_rows=True, dev_queries=0)
    expected, origins = fmt.convert(rows, [(str(path), i) for i in range(1, len(rows) + 1)])
    examples, row_of = make_examples(data, fmt, objective_for(InfoNCE(), InBatch()))
    assert list(examples) == expected and len(examples) == len(expected)
    assert [row_of(i) for i in range(len(expected))] == [f"{path}:{origins[i] + 1}" for i in range(len(expected))]
    assert data.problems.dropped_rows == 1 and "train.jsonl:10" in data.problems.first[0]
    again = load_jsonl(str(path), drop_bad_rows=True, dev_queries=0)  # both from the cache, the row's problem counted
    assert list(make_examples(again, fmt, objective_for(InfoNCE(), InBatch()))[0]) == expected
    assert again.problems.summary() == data.problems.summary()


def test_batches_are_planned_the_same_from_text_ids_as_from_texts(tmp_path):
    rows = [{"query": f"q{i % 40}", "positive": [f"p{i % 70}"]} for i in range(160)]
    path = tmp_path / "train.jsonl"
    _write(path, rows)
    t = OmegaConf.create({"seed": 3, "batch_size": 8, "min_batch_size": None, "no_duplicates": True})
    for loss in (InfoNCE(), __import__("embtune.losses", fromlist=["MultiLabelSoftmax"]).MultiLabelSoftmax()):
        objective = objective_for(loss, InBatch())
        stored, _ = make_examples(load_jsonl(str(path), dev_queries=0), Pairwise(), objective)
        listed = Pairwise()(rows)
        plans = []
        for examples in (stored, listed):
            sampler, _ = plan_batches(examples, objective, t, Dist())
            epochs = []
            for e in range(3):
                sampler.set_epoch(e)
                epochs.append(list(sampler))
            plans.append(epochs)
        assert plans[0] == plans[1] and len(plans[0][0]) > 1 and plans[0][0] != plans[0][1]


def test_the_sampler_plans_text_ids_as_it_plans_texts():
    texts = [(f"q{i % 9}", f"p{i % 13}") for i in range(120)]
    ids = {t: i for i, t in enumerate(dict.fromkeys(t for pair in texts for t in pair))}
    for kw in ({}, {"min_size": 5}, {"group_of": lambda i: texts[i][0]}):
        a = NoDuplicatesBatchSampler(lambda i: texts[i], len(texts), 8, seed=5, **kw)
        group = kw.get("group_of") and (lambda i: ids[texts[i][0]])
        b = NoDuplicatesBatchSampler(lambda i: tuple(ids[t] for t in texts[i]), len(texts), 8, seed=5,
                                     **({**kw, "group_of": group} if group else kw))
        assert list(a) == list(b) and a.unbatched == b.unbatched




def _prepare(path, tiny_bert, tokenizer=None):
    """What the training recipe does before the first step: load, dev split, examples, token ids, text counts."""
    from embtune.model import from_pretrained

    data = hold_out_dev(load_jsonl(str(path), dev_queries=10), Pairwise())
    examples, _ = make_examples(data, Pairwise(), objective_for(InfoNCE(), InBatch()))
    model = from_pretrained(tiny_bert, query_max_length=16, document_max_length=24)
    model.token_cache = TokenCache.for_run(tiny_bert, model.tokenizer, data.fingerprint, cache_dir())
    if tokenizer is not None:  # wrapped once the cache is keyed (the key names the tokenizer's class)
        model.tokenizer = tokenizer(model.tokenizer)
    model.token_cache.prepare(model, examples, data.test)
    report = text_report(examples, data.test, model.tokenizer, 16, 24, cache=model.token_cache)
    return data, examples, model, report


def test_a_second_run_reads_no_row_of_the_file_and_tokenises_nothing(tmp_path, tiny_bert, monkeypatch):
    path = tmp_path / "train.jsonl"
    _write(path, _pairs(200))
    data, examples, model, report = _prepare(path, tiny_bert)
    some = range(0, len(examples), 9)
    first = [model.tokenize([examples[i].query for i in some], kind="query"),
             model.tokenize([examples[i].positive for i in some], kind="document")]

    import embtune.data.files as files

    def no_reading(*args, **kwargs):  # a generator, as the reader: it fails when a row is asked for
        raise AssertionError("the file's rows were read again")
        yield

    monkeypatch.setattr(files, "read_json_objects", no_reading)
    again, examples2, model2, report2 = _prepare(path, tiny_bert, CountingTokenizer)
    second = [model2.tokenize([examples2[i].query for i in some], kind="query"),
              model2.tokenize([examples2[i].positive for i in some], kind="document")]
    assert model2.tokenizer.seen == 0  # token ids and text counts come from the cache
    assert again.fingerprint == data.fingerprint and list(examples2) == list(examples) and report2 == report
    plain = CountingTokenizer(model.tokenizer)  # the tokenizer's own batches, for the expected tensors
    for kind, got, length in (("query", second[0], 16), ("document", second[1], 24)):
        texts = [getattr(examples[i], "query" if kind == "query" else "positive") for i in some]
        want = plain(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
        assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "attention_mask"))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a)
    # the report counts what the tokenizer counts: every distinct training query, untruncated
    queries = sorted({e.query for e in examples})
    lengths = [len(x) for x in model.tokenizer(queries)["input_ids"]]
    assert report["train"]["queries"]["distinct"] == len(queries)
    assert report["train"]["queries"]["max_tokens"] == max(lengths)
    assert report["test"]["documents"]["distinct"] == len(set(data.test.corpus.values()))


def test_a_cold_run_tokenises_each_distinct_text_once_and_counts_as_the_tokenizer(tmp_path, tiny_bert):
    rows = _pairs(120, doc_words=12)
    for i, r in enumerate(rows):
        if i % 4 == 0:  # some positives longer than document_max_length=24: truncated
            r["positive"] += " " + " ".join(WORDS * 3)
    path = tmp_path / "train.jsonl"
    _write(path, rows)
    data, examples, model, report = _prepare(path, tiny_bert, CountingTokenizer)
    seen = model.tokenizer.texts
    queries = {e.query for e in examples}
    documents = {e.positive for e in examples}
    candidates = set(data.test.corpus.values())
    assert candidates - documents  # the dev side's own positives: candidates that no training text holds
    assert not queries & (documents | candidates)  # so each text has one tower, one max length
    distinct = queries | documents | candidates | set(data.test.queries.values())
    assert set(seen) == distinct and max(seen.values()) == 1  # every distinct text tokenised once, no other

    plain = CountingTokenizer(model.tokenizer.tok)  # the counts, from the plain tokenizer's untruncated ids

    def counts(texts, max_length):
        lengths = [len(x) for x in plain(sorted(texts))["input_ids"]]
        return {"distinct": len(texts), "empty": sum(t == "" for t in texts),
                "whitespace_only": sum(t != "" and not t.strip() for t in texts),
                "non_ascii": sum(not t.isascii() for t in texts),
                "truncated": sum(n > max_length for n in lengths), "max_tokens": max(lengths)}

    assert report == {"train": {"queries": counts(queries, 16), "documents": counts(documents, 24)},
                      "test": {"queries": counts(set(data.test.queries.values()), 16),
                               "documents": counts(candidates, 24)}}
    assert report["train"]["documents"]["truncated"] > 0 and report["test"]["documents"]["truncated"] > 0
    # the candidates' batches: from the files (training texts' ids or the candidates' own), as the tokenizer's
    texts = sorted(candidates)
    got = model.tokenize(texts, kind="document")
    want = plain(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "attention_mask"))
    assert max(seen.values()) == 1  # nothing tokenised again


def test_the_cold_start_tokenises_on_every_core_and_training_batches_on_one(tmp_path, tiny_bert, monkeypatch):
    import embtune.data.token_cache as token_cache

    seen = []
    real = token_cache.encode

    def encode(*args):
        seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return real(*args)

    monkeypatch.setattr(token_cache, "encode", encode)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # as the embtune command sets it
    path = tmp_path / "train.jsonl"
    _write(path, _pairs(60))
    _, examples, model, _ = _prepare(path, tiny_bert)
    assert seen and set(seen) == {"true"}  # every table call on the tokenizer's thread pool
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"  # and put back for training's batches
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    path2 = tmp_path / "other.jsonl"
    _write(path2, _pairs(40, doc_words=7))
    _prepare(path2, tiny_bert)
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # unset before, unset after


def test_the_embtune_command_keeps_the_tokenizer_on_one_thread_unless_told_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    code = "import os, embtune.cli; print(os.environ['TOKENIZERS_PARALLELISM'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "false"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "TOKENIZERS_PARALLELISM": "true"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "true"


def _peak_bytes(path, tiny_bert) -> int:
    tracemalloc.start()
    try:
        _prepare(path, tiny_bert)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_of_loading_and_tokenising_grows_far_slower_than_the_rows(tmp_path, tiny_bert, monkeypatch):
    """Before the rows went to disk, loading held each row as dicts (~1.4 KB a row here) and the text
    counts tokenised every text in one call (tens of KB a row); now the peak grows by a few hundred
    bytes a row: the dictionaries that number distinct texts while the tables are built."""
    sizes, peaks = (400, 4000), []
    for n in sizes:
        path = tmp_path / f"train{n}.jsonl"
        _write(path, _pairs(n, doc_words=120))
        monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / f"cache{n}"))
        _peak_bytes(tmp_path / "train400.jsonl", tiny_bert) if n == sizes[0] else None  # imports, warm-up
        monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / f"cold{n}"))
        peaks.append(_peak_bytes(path, tiny_bert))
    per_row = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    assert per_row < 1000, f"peak traced memory grows by {per_row:.0f} bytes a row"
