"""Bad input gets one clear message naming file, line and field; with data.drop_bad_rows=true the bad row
(and only it) is dropped with a counted warning. Awkward but valid text trains and evaluates, and is
counted in summary.json."""

import json
import re

import pytest
from conftest import CONF, NOT_A_MODEL
from hydra import compose, initialize_config_dir

from embtune.data.beir import load_beir
from embtune.data.checks import check_label_range
from embtune.data.files import load_hf, load_jsonl
from embtune.data.formats import Pairwise, ScoredPairs
from embtune.losses.pointwise_bce import PointwiseBCE


def _jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _file(tmp_path, name, content):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _rows_through_format(path, drop, fmt=None, loss=None):
    """Load, map to examples, check labels: what train() does before the model loads."""
    data = load_jsonl(str(path), drop_bad_rows=drop)
    examples, origins = (fmt or Pairwise()).convert(data.rows, data.source, data.problems)
    if loss is not None:
        examples, origins = check_label_range(examples, origins, data.source, loss, "label", data.problems)
    return data.problems, len(examples)


def _beir(tmp_path, corpus, queries, qrels):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(_jsonl(corpus))
    (folder / "queries.jsonl").write_text(_jsonl(queries))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels))
    return folder


CORPUS = [{"_id": "d1", "text": "one"}, {"_id": "d2", "text": "two"}]
QUERIES = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}]
GOOD = [{"query": "a", "positive": "b"}, {"query": "c", "positive": "d"}, {"query": "e", "positive": "f"}]


def _case(name, tmp_path, drop):
    """Build one bad-input case; returns (DataProblems, rows or examples kept)."""
    if name == "missing column":
        return _rows_through_format(_file(tmp_path, "t.jsonl", _jsonl([GOOD[0], {"query": "c"}, GOOD[2]])), drop)
    if name == "list where a string is expected":
        return _rows_through_format(_file(tmp_path, "t.jsonl", _jsonl([GOOD[0], {"query": ["c", "x"], "positive": "d"},
                                                                       GOOD[2]])), drop)
    if name == "string score":
        path = _file(tmp_path, "t.csv", "sentence1,sentence2,score\na,b,1.5\nc,d,high\ne,f,0\n")
        return _rows_through_format(path, drop, fmt=ScoredPairs())
    if name == "label outside its range":
        rows = [{"query": "a", "positive": "b", "label": 1}, {"query": "c", "positive": "d", "label": 3},
                {"query": "e", "positive": "f", "label": 0}]
        return _rows_through_format(_file(tmp_path, "t.jsonl", _jsonl(rows)), drop, Pairwise(label="label"),
                                    PointwiseBCE())
    if name == "invalid JSON row":
        return _rows_through_format(_file(tmp_path, "t.jsonl", _jsonl([GOOD[0], '{"query": "c", "positive": ', GOOD[2]])),
                                    drop)
    if name == "unterminated JSON string":
        return _rows_through_format(_file(tmp_path, "t.jsonl", _jsonl([GOOD[0], '{"query": "c', GOOD[2]])), drop)
    if name == "undecodable byte":
        content = _jsonl([GOOD[0]]).encode() + b'{"query": "caf\xe9", "positive": "d"}\n' + _jsonl([GOOD[2]]).encode()
        return _rows_through_format(_file(tmp_path, "t.jsonl", content), drop)
    if name == "wrong field count (TSV)":
        return _rows_through_format(_file(tmp_path, "t.tsv", "query\tpositive\na\tb\nc\td\textra\ne\tf\n"), drop)
    if name == "qrels names a missing query":
        data = load_beir(str(_beir(tmp_path, CORPUS, QUERIES, [("q1", "d1"), ("q9", "d1"), ("q2", "d2")])),
                         drop_bad_rows=drop)
        return data.problems, len(data.rows)
    if name == "qrels names a missing document":
        data = load_beir(str(_beir(tmp_path, CORPUS, QUERIES, [("q1", "d1"), ("q1", "d7"), ("q2", "d2")])),
                         drop_bad_rows=drop)
        return data.problems, len(data.rows)
    if name == "duplicate id":
        corpus = [*CORPUS, {"_id": "d1", "text": "again"}]
        data = load_beir(str(_beir(tmp_path, corpus, QUERIES, [("q1", "d1"), ("q2", "d2")])), drop_bad_rows=drop)
        return data.problems, len(data.rows)
    if name == "wrong type in the corpus":
        corpus = [*CORPUS, {"_id": "d3", "text": 5}]
        data = load_beir(str(_beir(tmp_path, corpus, QUERIES, [("q1", "d1"), ("q2", "d2")])), drop_bad_rows=drop)
        return data.problems, len(data.rows)
    raise KeyError(name)


CASES = [  # name, what the message must say (file:line: field ...), what is kept when the bad row is dropped
    ("missing column", r"t\.jsonl:2: missing field 'positive'", 2),
    ("list where a string is expected", r"t\.jsonl:2: field 'query' must be a string, got list", 2),
    ("string score", r"t\.csv:3: field 'score' must be a finite number, got str: 'high'", 2),
    ("label outside its range", r"t\.jsonl:2: field 'label' must be in \[0, 1\] for loss=pointwise_bce, got 3", 2),
    ("invalid JSON row", r"t\.jsonl:2: bad JSON \(Expecting value at column 27\)", 2),
    ("unterminated JSON string", r"t\.jsonl:2: bad JSON \(Unterminated string starting at column 11\)", 2),
    ("undecodable byte", r"t\.jsonl:2: not UTF-8 text \(byte 0xe9 at byte 15 of the line\)", 2),
    ("wrong field count (TSV)", r"t\.tsv:3: expected 2 fields \(query, positive\), got 3", 2),
    ("qrels names a missing query", r"qrels/train\.tsv:3: field 'query-id': unknown query id 'q9'", 2),
    ("qrels names a missing document", r"qrels/train\.tsv:3: field 'corpus-id': unknown document id 'd7'", 2),
    ("duplicate id", r"corpus\.jsonl:3: field '_id': duplicate id 'd1', first on line 1", 2),
    ("wrong type in the corpus", r"corpus\.jsonl:3: field 'text' must be a string, got int: '5'", 2),
]


@pytest.mark.parametrize("name,message,kept", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_then_dropped_only_when_allowed(tmp_path, name, message, kept):
    with pytest.raises(ValueError, match=message + r".*data\.drop_bad_rows=true"):
        _case(name, tmp_path / "strict", drop=False)
    problems, n = _case(name, tmp_path / "drop", drop=True)
    assert n == kept  # every good row is kept: only the bad one is lost
    assert problems.dropped_rows == problems.warnings == 1 and "row dropped" in problems.first[0]


def test_missing_file_and_missing_folder_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such training file"):
        load_jsonl(str(tmp_path / "nope.jsonl"))
    folder = _beir(tmp_path, CORPUS, QUERIES, [("q1", "d1")])
    (folder / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"no queries\.jsonl or queries\.jsonl\.gz"):
        load_beir(str(folder))


def test_query_id_that_also_names_a_document_is_counted_not_a_problem(tmp_path):
    # ArguAna-style: BEIR allows it (evaluation leaves the query's own document out of its ranking)
    queries = [{"_id": "d1", "text": "first"}, {"_id": "q2", "text": "second"}]
    folder = _beir(tmp_path, CORPUS, queries, [("d1", "d1"), ("q2", "d2")])
    (folder / "qrels" / "test.tsv").write_text("d1\td2\t1\nq2\td1\t1\n")
    data = load_beir(str(folder))
    assert data.problems.warnings == 0 and data.problems.dropped_rows == 0 and len(data.rows) == 2
    assert data.summary()["identical_ids"] == 1  # d1 is both a test query and a document


def test_ids_are_always_strings(tmp_path):
    corpus = [{"_id": 1, "text": "one"}, {"_id": "2", "text": "two"}]
    data = load_beir(str(_beir(tmp_path, corpus, [{"_id": 10, "text": "q"}], [("10", "1")])))
    assert data.rows[0]["query_id"] == "10" and data.rows[0]["doc_id"] == "1"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path


def test_hub_style_dataset_rows_are_named_by_split_and_row(hf_cache):
    folder = hf_cache / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(_jsonl([GOOD[0], {"query": "c", "positive": None}, GOOD[2]]))
    data = load_hf(str(folder))
    with pytest.raises(ValueError, match=r"ds\[train\]:2: field 'positive' must be a string .*got NoneType"):
        Pairwise().convert(data.rows, data.source, data.problems)
    data = load_hf(str(folder), drop_bad_rows=True)
    assert len(Pairwise().convert(data.rows, data.source, data.problems)[0]) == 2


# --- awkward but valid text ----------------------------------------------------------------------------


def test_tsv_and_csv_fields_may_hold_quoted_tabs_and_newlines(tmp_path):
    tsv = _file(tmp_path, "t.tsv", 'query\tpositive\n"a\tb"\t"c\nd"\nplain "quote\tx\n')
    assert load_jsonl(str(tsv)).rows == [{"query": "a\tb", "positive": "c\nd"}, {"query": 'plain "quote', "positive": "x"}]
    csv_file = _file(tmp_path, "t.csv", 'query,positive\n"a,\tb","multi\nline"\n')
    data = load_jsonl(str(csv_file))
    assert data.rows == [{"query": "a,\tb", "positive": "multi\nline"}] and data.source[0][1] == 2


AWKWARD = [
    {"query": "", "positive": "doc for empty query"},
    {"query": "   ", "positive": "doc for blank query"},
    {"query": "机器学习是什么？", "positive": "机器学习是人工智能的一个分支。"},
    {"query": "rocket 🚀 launch", "positive": "🔥🔥🔥"},
    {"query": "tabs\tand\nnewlines", "positive": "long " * 300},   # 300 tokens > document_max_length 256
    {"query": "word " * 100, "positive": ""},                       # 100 tokens > query_max_length 64
    {"query": "normal query", "positive": "   "},
    {"query": "another query", "positive": "another document"},
]


def test_awkward_text_trains_evaluates_and_is_counted(tmp_path, tiny_bert):
    from embtune.recipes.finetune import train
    from embtune.run.logger import RunLogger

    path = _file(tmp_path, "awkward.jsonl", _jsonl(AWKWARD))
    corpus = [{"_id": "d1", "text": ""}, {"_id": "d2", "text": "🚀 launch"}, {"_id": "d3", "text": "機器"},
              {"_id": "d4", "text": "long " * 300}]
    queries = [{"_id": "q1", "text": "   "}, {"_id": "q2", "text": "机器"}]
    beir = _beir(tmp_path, corpus, queries, [])
    (beir / "qrels" / "test.tsv").write_text("q1\td1\t1\nq2\td3\t1\n")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model.name_or_path={tiny_bert}", "data=jsonl", f"data.path={path}", f"data.test_path={beir}",
            "train.batch_size=4", "train.max_steps=2", "train.log_every=1", "eval.batch_size=4",
            "eval.cache_base=false"])
    logger = RunLogger(tmp_path / "run", wandb=False)
    summary = train(cfg, tmp_path / "run", logger)
    logger.finish()
    losses = [json.loads(x)["train/loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in x]
    assert len(losses) == 2 and all(x is not None for x in losses)  # finite (null would mean NaN)
    assert all(0 <= v <= 1 for v in summary["final"].values())
    texts = summary["data"]["texts"]
    drop_max = {split: {role: {k: v for k, v in c.items() if k != "max_tokens"} for role, c in parts.items()}
                for split, parts in texts.items()}
    assert drop_max == {
        "train": {"queries": {"distinct": 8, "empty": 1, "whitespace_only": 1, "non_ascii": 2, "truncated": 1},
                  "documents": {"distinct": 8, "empty": 1, "whitespace_only": 1, "non_ascii": 2, "truncated": 1}},
        "test": {"queries": {"distinct": 2, "empty": 1, "whitespace_only": 0, "non_ascii": 1, "truncated": 0},
                 "documents": {"distinct": 4, "empty": 1, "whitespace_only": 0, "non_ascii": 2, "truncated": 1}},
    }
    assert texts["train"]["documents"]["max_tokens"] == 302  # 300 words + [CLS] + [SEP]


def _numbered_rows(n):
    return [{"query": f"q{i}", "positive": f"p{i}"} for i in range(1, n + 1)]


def test_every_bad_row_is_named_in_one_error(tmp_path):
    rows = _numbered_rows(30)
    del rows[7]["positive"], rows[23]["positive"]  # lines 8 and 24
    data = load_jsonl(str(_file(tmp_path, "t.jsonl", _jsonl(rows))))
    with pytest.raises(ValueError) as e:
        Pairwise().convert(data.rows, data.source, data.problems)
    f = tmp_path / "t.jsonl"
    assert str(e.value) == ("2 bad rows (set data.drop_bad_rows=true to drop such rows with a warning):\n"
                            f"  {f}:8: missing field 'positive' (row has ['query'])\n"
                            f"  {f}:24: missing field 'positive' (row has ['query'])")


def test_a_bad_csv_line_is_named_by_the_loader_and_an_empty_cell_by_the_format(tmp_path):
    lines = ["query,positive"] + [f"q{n},p{n}" for n in range(2, 41)]  # the record on line n is q{n},p{n}
    lines[6], lines[31] = "q7,", "q32,p32,extra"  # line 7: an empty positive; line 32: three fields
    path = _file(tmp_path, "t.csv", "\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:  # the file's own problems: raised once the file is read
        load_jsonl(str(path))
    assert str(e.value) == (f"{path}:32: expected 2 fields (query, positive), got 3 (set data.drop_bad_rows=true to "
                            "drop such rows with a warning)")
    lines[31] = "q32,p32"
    path.write_text("\n".join(lines) + "\n")
    data = load_jsonl(str(path))
    assert len(data.rows) == 39 and data.rows[5] == {"query": "q7", "positive": None}
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:7: field 'positive' must be a string or a "
                       r"non-empty list of strings, got NoneType \(a JSON null or an empty CSV/TSV cell\)"):
        Pairwise().convert(data.rows, data.source, data.problems)
    lines[31] = "q32,p32,extra"
    path.write_text("\n".join(lines) + "\n")
    dropped = load_jsonl(str(path), drop_bad_rows=True)
    assert len(Pairwise().convert(dropped.rows, dropped.source, dropped.problems)[0]) == 37  # 39 records - 2
    assert dropped.problems.dropped_rows == 2


def test_many_bad_rows_list_the_first_twenty_and_count_the_rest(tmp_path):
    rows = [{"query": f"q{i}"} for i in range(1, 26)] + _numbered_rows(2)  # lines 1-25 lack a positive
    data = load_jsonl(str(_file(tmp_path, "t.jsonl", _jsonl(rows))))
    with pytest.raises(ValueError) as e:
        Pairwise().convert(data.rows, data.source, data.problems)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("25 bad rows (")
    assert [line.split(":")[-2] for line in lines[1:21]] == [str(n) for n in range(1, 21)]  # file:LINE: ...
    assert lines[21:] == ["  and 5 more"]


def test_training_names_every_bad_row_before_the_model_loads(tmp_path):
    from embtune.recipes.finetune import train
    from embtune.run.logger import RunLogger

    rows = _numbered_rows(12)
    rows[2]["positive"] = ["fine", 3]  # line 3: a wrong type (the data format's check)
    del rows[6]["positive"]  # line 7: a missing field
    path = _file(tmp_path, "t.jsonl", _jsonl(rows))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model.name_or_path={NOT_A_MODEL}", "data=jsonl", f"data.path={path}", "logger=none"])
    with pytest.raises(ValueError) as e:  # a folder that is no model: the data is refused before it loads
        train(cfg, tmp_path / "run", RunLogger(tmp_path / "run", wandb=False))
    assert str(e.value).splitlines() == [
        "2 bad rows (set data.drop_bad_rows=true to drop such rows with a warning):",
        f"  {path}:3: field 'positive' must be a string or a non-empty list of strings, got list: \"['fine', 3]\"",
        f"  {path}:7: missing field 'positive' (row has ['query'])"]
