"""Loaders for BEIR folders, local files and ``datasets`` data sets (embtune.data.beir, embtune.data.files)."""

from __future__ import annotations

import gzip
import inspect
import json
import logging
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embtune.data import RetrievalSet, TrainingData, beir
from embtune.data.beir import load_beir, load_beir_test
from embtune.data.files import load_hf, load_jsonl
from embtune.data.stdlib import load_stdlib

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SCIFACT = DATA / "scifact"
TOY = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"
STSB = DATA / "stsb" / "train.tsv"

needs_scifact = pytest.mark.skipif(not SCIFACT.is_dir(), reason="../shared/data/scifact absent")

CORPUS = [
    {"_id": 10, "title": "Cats", "text": "Cats purr. "},
    {"_id": "d2", "title": "", "text": " Dogs bark."},
    {"_id": "d3", "text": "Birds sing."},
]
QUERIES = [{"_id": 1, "text": "what purrs?"}, {"_id": "q2", "text": "what barks?"}, {"_id": "q3", "text": "who sings?"}]
TRAIN = "query-id\tcorpus-id\tscore\n1\t10\t1\nq2\td2\t1\nq2\td3\t0\n"
TEST = "q3\td3\t2\r\nq2\td2\t0\r\n"  # no header; CRLF; q2 has only a zero grade


def _jsonl(objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def write_beir(root: Path, corpus=None, queries=None, qrels=None, gz=False, qrels_dir="qrels") -> Path:
    """A tiny BEIR folder; each file's content is raw text (to allow malformed lines) or a list of objects."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"corpus.jsonl": corpus if corpus is not None else CORPUS, "queries.jsonl": queries or QUERIES}
    for name, content in files.items():
        text = content if isinstance(content, str) else _jsonl(content)
        if gz:
            with gzip.open(root / f"{name}.gz", "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            (root / name).write_text(text, encoding="utf-8")
    (root / qrels_dir).mkdir(parents=True, exist_ok=True)
    for split, text in (qrels if qrels is not None else {"train": TRAIN, "test": TEST}).items():
        (root / qrels_dir / f"{split}.tsv").write_text(text, encoding="utf-8", newline="")
    return root


# --- real data -----------------------------------------------------------------------------------


@needs_scifact
def test_scifact_counts_match_source_md():
    data = load_beir(str(SCIFACT))
    assert isinstance(data, TrainingData) and isinstance(data.test, RetrievalSet)
    assert len(data.rows) == 919 == len(data.source)
    assert len({r["query_id"] for r in data.rows}) == 809 and len({r["doc_id"] for r in data.rows}) == 565
    assert len(data.test.queries) == len(data.test.qrels) == 300 and set(data.test.queries) == set(data.test.qrels)
    assert len(data.test.corpus) == 5183 and sum(len(docs) for docs in data.test.qrels.values()) == 339
    ids = [i for r in data.rows for i in (r["query_id"], r["doc_id"])] + [*data.test.corpus, *data.test.queries]
    assert all(isinstance(i, str) for i in ids + [d for docs in data.test.qrels.values() for d in docs])
    query = "0-dimensional biomaterials lack inductive properties."
    doc = data.test.corpus["31715818"]
    assert data.rows[0] == {"query": query, "positive": doc, "query_id": "0", "doc_id": "31715818"}
    assert data.source[0] == (str(SCIFACT / "qrels" / "train.tsv"), 2) and data.source[-1][1] == 920  # header: line 1
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        first = json.loads(f.readline())  # title + " " + text
    assert data.test.corpus[first["_id"]] == f"{first['title'].strip()} {first['text'].strip()}"
    assert data.test.corpus["4983"].startswith("Microstructural development of human newborn cerebral white")
    assert load_beir_test(str(SCIFACT)) == data.test


@needs_scifact
def test_scifact_subsample_is_deterministic():
    a, b, c = (load_beir(str(SCIFACT), max_train_pairs=50, max_test_queries=20, seed=seed) for seed in (3, 3, 4))
    assert len(a.rows) == 50 and len(a.test.qrels) == 20 == len(a.test.queries) and len(a.test.corpus) == 5183
    assert a.rows == b.rows and a.fingerprint == b.fingerprint and a.test.qrels == b.test.qrels
    assert a.rows != c.rows and a.fingerprint != c.fingerprint
    assert [s[1] for s in a.source] == sorted(s[1] for s in a.source)  # file order kept


@pytest.mark.parametrize("option, value", [("max_train_pairs", -3), ("max_train_pairs", "abc"),
                                           ("max_train_pairs", True), ("max_test_queries", -1)])
def test_a_bad_sample_size_is_refused_by_name_before_any_file_is_read(tmp_path, option, value):
    missing = str(tmp_path / "nowhere")  # the size is checked first: the missing folder is never reached
    loaders = [lambda **kw: load_beir(missing, **kw), lambda **kw: load_stdlib(cache_dir=missing, **kw)]
    if option == "max_train_pairs":
        loaders += [lambda **kw: load_jsonl(missing + ".jsonl", **kw), lambda **kw: load_hf(missing, **kw)]
    else:
        loaders.append(lambda **kw: load_beir_test(missing, **kw))
    for load in loaders:
        with pytest.raises(ValueError, match=rf"^data\.{option}={value!r}: must be an integer >= 0 or null"):
            load(**{option: value})


def test_a_shuffle_buffer_without_streaming_is_refused_by_name_before_any_file_is_read(tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")  # checked first: the missing file is never reached
    for load in (load_jsonl, load_hf):
        with pytest.raises(ValueError, match=r"^data.shuffle_buffer=64 is only read with data.streaming=true"):
            load(missing, shuffle_buffer=64)
    assert load_jsonl(str(TOY), dev_queries=0).rows  # the default (null) is not a value given


# --- small BEIR folders --------------------------------------------------------------------------


def test_ids_are_strings_zero_grades_train_nothing_and_stay_judged_for_evaluation(tmp_path):
    data = load_beir(str(write_beir(tmp_path)))
    assert data.rows == [
        {"query": "what purrs?", "positive": "Cats Cats purr.", "query_id": "1", "doc_id": "10"},
        {"query": "what barks?", "positive": "Dogs bark.", "query_id": "q2", "doc_id": "d2"},
    ]
    assert [s[1] for s in data.source] == [2, 3]
    # line 1 is data (no header); q2 has no relevant doc but stays judged: it scores 0, as in pytrec_eval
    assert data.test.qrels == {"q3": {"d3": 2}, "q2": {"d2": 0}}
    assert data.test.queries == {"q3": "who sings?", "q2": "what barks?"}
    assert data.test.corpus == {"10": "Cats Cats purr.", "d2": "Dogs bark.", "d3": "Birds sing."}
    root_qrels = load_beir(str(write_beir(tmp_path / "flat", gz=True, qrels_dir=".")))  # {split}.tsv beside corpus
    assert root_qrels.rows == data.rows and root_qrels.test == data.test


def test_hub_layout_uses_snapshot_download(tmp_path, monkeypatch):
    main = write_beir(tmp_path / "main", gz=True, qrels={}, qrels_dir=".")  # BeIR/<name>: corpus and queries only
    qrels = tmp_path / "qrels"  # BeIR/<name>-qrels: {split}.tsv at its root
    write_beir(qrels, qrels_dir=".")
    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, **kwargs):
        calls.append((repo_id, repo_type))
        repos = {"BeIR/tiny": main, "BeIR/tiny-qrels": qrels, "BeIR/with_qrels": write_beir(tmp_path / "w")}
        return str(repos[repo_id])

    monkeypatch.setattr(beir, "snapshot_download", fake_snapshot_download)
    data = load_beir("BeIR/tiny")
    assert calls == [("BeIR/tiny", "dataset"), ("BeIR/tiny-qrels", "dataset")]
    assert data.name == "BeIR/tiny" and len(data.rows) == 2 and data.rows[0]["doc_id"] == "10"
    assert data.source[0] == (str(qrels / "train.tsv"), 2)
    assert data.test.qrels == {"q3": {"d3": 2}, "q2": {"d2": 0}} and len(data.test.corpus) == 3
    calls.clear()  # a hub repo with its own qrels/ folder needs no "-qrels" download
    assert len(load_beir("BeIR/with_qrels").rows) == 2 and calls == [("BeIR/with_qrels", "dataset")]
    with pytest.raises(FileNotFoundError, match=r"'BeIR/nope' is not a local folder.*KeyError"):
        load_beir("BeIR/nope")


def test_missing_splits(tmp_path, caplog):
    write_beir(tmp_path, qrels={"train": TRAIN})
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        load_beir(str(tmp_path), train_split="dev")
    with caplog.at_level(logging.WARNING, logger="embtune.data.beir"):
        data = load_beir(str(tmp_path))
    assert data.test is None and len(data.rows) == 2
    assert "test.tsv" in caplog.text
    with pytest.raises(FileNotFoundError, match="test.tsv"):
        load_beir_test(str(tmp_path))


BAD = [
    ("corpus.jsonl", dict(corpus=_jsonl(CORPUS[:1]) + '{"_id": "x", "text": \n'), 2, "bad JSON"),
    ("corpus.jsonl", dict(corpus=_jsonl(CORPUS[:2]) + '["d9", "text"]\n'), 3, "expected a JSON object"),
    ("corpus.jsonl", dict(corpus=_jsonl(CORPUS[:1] + [{"title": "t", "text": "x"}])), 2, "'_id'"),
    ("corpus.jsonl", dict(corpus=_jsonl(CORPUS[:1] + [{"_id": 1.5, "text": "x"}])), 2, "'_id'"),
    ("corpus.jsonl", dict(corpus=_jsonl(CORPUS[:1] + [{"_id": "d9", "title": "t"}])), 2, "'text'"),
    ("corpus.jsonl", dict(corpus=_jsonl(CORPUS[:2] + [{"_id": "d9", "text": 5}])), 3, "'text'"),
    ("corpus.jsonl", dict(corpus=_jsonl(CORPUS[:2] + [{"_id": "d9", "title": 1, "text": "x"}])), 3, "'title'"),
    ("corpus.jsonl", dict(corpus=_jsonl(CORPUS + [{"_id": "d2", "text": "again"}])), 4, "duplicate id 'd2'"),
    ("queries.jsonl", dict(queries=_jsonl(QUERIES + [{"_id": "1", "text": "again"}])), 4, "duplicate id '1'"),
    ("queries.jsonl", dict(queries=_jsonl(QUERIES[:1] + [{"_id": "q2"}])), 2, "'text'"),
    ("queries.jsonl", dict(queries=_jsonl(QUERIES[:1] + [{"_id": "q2", "text": ["a"]}])), 2, "'text'"),
    ("train.tsv", dict(qrels={"train": TRAIN + "q3 d3 1\n"}), 5, "3 tab-separated columns"),
    ("train.tsv", dict(qrels={"train": TRAIN + "q3\td3\t1\textra\n"}), 5, "3 tab-separated columns"),
    ("train.tsv", dict(qrels={"train": TRAIN + "q3\td3\t1.0\n"}), 5, "'score' must be an integer, got '1.0'"),
    ("train.tsv", dict(qrels={"train": TRAIN + "q9\td3\t1\n"}), 5, "'query-id': unknown query id 'q9'"),
    ("train.tsv", dict(qrels={"train": TRAIN + "q3\td9\t1\n"}), 5, "'corpus-id': unknown document id 'd9'"),
    ("train.tsv", dict(qrels={"train": TRAIN + "q2\td2\t1\n"}), 5, "duplicate judgment"),
    ("test.tsv", dict(qrels={"train": TRAIN, "test": "q3\td3\t1\nq9\td3\t1\n"}), 2, "unknown query id 'q9'"),
]


@pytest.mark.parametrize("file,files,line,field", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_malformed_beir_files_name_file_line_and_field(tmp_path, file, files, line, field):
    write_beir(tmp_path, **files)
    with pytest.raises(ValueError) as err:
        load_beir(str(tmp_path))
    message = str(err.value)
    assert f"{file}:{line}:" in message and field in message, message


def test_test_split_alone_evaluates_and_dangling_judgments_are_counted_warnings(tmp_path):
    # only a test split (ArguAna, most of BEIR); one judgment names a document missing from the corpus
    write_beir(tmp_path, qrels={"test": "q3\td3\t2\nq2\tgone\t1\nq2\td2\t1\n1\tgone\t1\n"})
    with pytest.raises(FileNotFoundError, match="no train qrels file train.tsv"):  # training needs them
        load_beir(str(tmp_path))
    data = load_beir(str(tmp_path), train_split=None)  # evaluation only: no train file read
    assert data.rows == [] and data.problems.dropped_rows == 0 and data.problems.warnings == 2
    assert "test.tsv:2: field 'corpus-id': document id 'gone' is not in corpus.jsonl" in data.problems.first[0]
    # kept: a relevant document never retrieved (query 1 has no other one, so it will score 0)
    assert data.test.qrels == {"q3": {"d3": 2}, "q2": {"gone": 1, "d2": 1}, "1": {"gone": 1}}
    assert data.test == load_beir_test(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no qrels file dev.tsv"):
        load_beir(str(tmp_path), train_split=None, test_split="dev")


def test_gzipped_corpus_error_and_file_path(tmp_path):
    write_beir(tmp_path, corpus=_jsonl(CORPUS) + "{oops\n", gz=True)
    with pytest.raises(ValueError, match=r"corpus\.jsonl\.gz:4: bad JSON"):
        load_beir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="expected a BEIR folder"):
        load_beir(str(tmp_path / "qrels" / "train.tsv"))


# --- local training files ------------------------------------------------------------------------


@pytest.mark.skipif(not TOY.is_file(), reason="../shared/data/triplets absent")
def test_jsonl_flagembedding_toy_file():
    data = load_jsonl(str(TOY))
    assert len(data.rows) == 10 and data.test is None
    assert data.source == [(str(TOY), i) for i in range(1, 11)]
    assert data.rows[0]["query"] == "Five women walk along a beach wearing flip-flops."
    assert isinstance(data.rows[0]["pos"], list) and len(data.rows[0]["neg"]) == 7
    assert sum(len(r["neg"]) for r in data.rows) == 70
    sub = load_jsonl(str(TOY), max_train_pairs=4, seed=1)
    assert len(sub.rows) == 4 and sub.rows == load_jsonl(str(TOY), max_train_pairs=4, seed=1).rows
    assert [s[1] for s in sub.source] == sorted(s[1] for s in sub.source)
    if SCIFACT.is_dir():
        test = load_jsonl(str(TOY), test_path=str(SCIFACT)).test
        assert len(test.qrels) == 300 and len(test.corpus) == 5183


@pytest.mark.skipif(not STSB.is_file(), reason="../shared/data/stsb absent")
def test_tsv_stsb_keeps_quotes_and_strings():
    data = load_jsonl(str(STSB))
    assert len(data.rows) == 5749
    first = {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "score": "5.000"}
    assert data.rows[0] == first
    assert data.source[0] == (str(STSB), 2)
    assert any("Nigeria\\'s" in r["sentence1"] + r["sentence2"] for r in data.rows)


def test_csv_and_tsv(tmp_path):
    (tmp_path / "a.csv").write_text('query,positive\n"hello, world","two\nlines"\nq2,p2\n')
    data = load_jsonl(str(tmp_path / "a.csv"))
    assert data.rows == [{"query": "hello, world", "positive": "two\nlines"}, {"query": "q2", "positive": "p2"}]
    assert [s[1] for s in data.source] == [2, 4]
    (tmp_path / "a.tsv").write_text('query\tpositive\n"quoted" start\t5" tall\n\nq2\tp2\n')
    data = load_jsonl(str(tmp_path / "a.tsv"))
    assert data.rows == [{"query": '"quoted" start', "positive": '5" tall'}, {"query": "q2", "positive": "p2"}]
    assert [s[1] for s in data.source] == [2, 4]
    (tmp_path / "a.json").write_text(json.dumps([{"query": "a", "positive": "b"}, {"query": "c", "positive": "d"}]))
    data = load_jsonl(str(tmp_path / "a.json"))
    assert len(data.rows) == 2 and data.source[1] == (str(tmp_path / "a.json"), 2)


FILE_ERRORS = [
    ("a.jsonl", '{"query": "a"}\n{"query": \n', ValueError, r"a\.jsonl:2: bad JSON"),
    ("a.jsonl", '{"query": "a"}\n\n[1, 2]\n', ValueError, r"a\.jsonl:3: expected a JSON object, got list"),
    ("a.jsonl", "\n\n", ValueError, r"a\.jsonl: empty training file"),
    ("a.json", '{"query": "a"}', ValueError, r"a\.json: expected a JSON list"),
    ("a.json", '[{"query": "a"}, 3]', ValueError, r"a\.json: element 2: expected a JSON object"),
    ("a.csv", "", ValueError, r"a\.csv: empty training file"),
    ("a.csv", "query,positive\n", ValueError, r"a\.csv: empty training file"),
    ("a.tsv", "query\tpositive\na\tb\nc\n", ValueError, r"a\.tsv:3: expected 2 fields"),
    ("a.txt", "hello\n", ValueError, "unsupported training file type"),
    ("nope.jsonl", None, FileNotFoundError, r"nope\.jsonl: no such training file"),
]


@pytest.mark.parametrize("name,text,error,match", FILE_ERRORS)
def test_training_file_errors(tmp_path, name, text, error, match):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(error, match=match):
        load_jsonl(str(tmp_path / name))


# --- datasets --------------------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets  # heavy; only these tests need it
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path


def test_load_hf_local_jsonl(hf_cache):
    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}", f"m{i}"]} for i in range(5)]
    (hf_cache / "train.jsonl").write_text(_jsonl(rows))
    data = load_hf(str(hf_cache / "train.jsonl"))
    assert data.rows == rows and data.test is None
    assert data.source[0] == (str(hf_cache / "train.jsonl"), 1)  # a local text file: errors name its lines
    assert data.fingerprint == load_jsonl(str(hf_cache / "train.jsonl")).fingerprint
    assert len(load_hf(str(hf_cache / "train.jsonl"), split="dev", max_train_pairs=2).rows) == 2


def test_load_hf_local_tsv_and_test_set(hf_cache):
    (hf_cache / "pairs.tsv").write_text('query\tpositive\n"a\tb "c\nd\te\n')
    data = load_hf(str(hf_cache / "pairs.tsv"), test_path=str(write_beir(hf_cache / "beir")))
    assert data.rows == [{"query": '"a', "positive": 'b "c'}, {"query": "d", "positive": "e"}]
    assert data.test.qrels == {"q3": {"d3": 2}, "q2": {"d2": 0}}
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_hf(str(hf_cache / "missing.jsonl"))
    with pytest.raises(ValueError, match="subset"):
        load_hf(str(hf_cache / "pairs.tsv"), subset="triplet")


# --- configs ---------------------------------------------------------------------------------------


CONFIGS = [("beir", load_beir, "path"), ("jsonl", load_jsonl, "path"), ("hf", load_hf, "name")]


@pytest.mark.parametrize("name,func,mandatory", CONFIGS)
def test_configs_list_every_argument_and_instantiate(hf_cache, name, func, mandatory):
    cfg = OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml")
    import embtune.data

    # the public name, and the function it names
    assert cfg._target_ == f"embtune.data.{func.__name__}" and getattr(embtune.data, func.__name__) is func
    assert OmegaConf.is_missing(cfg, mandatory)
    params = inspect.signature(func).parameters
    assert set(cfg) - {"_target_"} == set(params)
    assert all(cfg[k] == p.default for k, p in params.items() if k != mandatory)
    (hf_cache / "t.jsonl").write_text(_jsonl([{"query": "a", "positive": "b"}]))
    cfg[mandatory] = str(write_beir(hf_cache / "beir") if name == "beir" else hf_cache / "t.jsonl")
    data = instantiate(cfg)
    assert isinstance(data, TrainingData) and len(data.rows) == (2 if name == "beir" else 1)


@needs_scifact
def test_beir_random_negatives_are_never_relevant():
    data = load_beir(str(SCIFACT), random_negatives=3, max_train_pairs=50, seed=1)
    full = load_beir(str(SCIFACT))
    positives: dict[str, set[str]] = {}
    for r in full.rows:
        positives.setdefault(r["query_id"], set()).add(r["positive"])
    for row in data.rows:
        assert len(row["negative"]) == 3
        assert not positives[row["query_id"]] & set(row["negative"])
    assert load_beir(str(SCIFACT), random_negatives=3, max_train_pairs=50, seed=1).rows == data.rows
