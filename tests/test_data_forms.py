"""The forms training data comes in: save_to_disk folders, Parquet and Arrow files, and the column names of
sentence-transformers, FlagEmbedding and BEIR, recognised with no column override (embtune.data.files,
embtune.data.formats)."""

from __future__ import annotations

import csv
import logging

import pytest
from conftest import CONF, logged
from hydra import compose, initialize_config_dir

from embtune.data import MultiNegative, Pairwise, ScoredPairs, Triplet
from embtune.data.files import load_hf, load_jsonl
from embtune.recipes.finetune import train

ST_TRIPLETS = [{"anchor": f"question {i}", "positive": f"answer {i}", "negative": f"unrelated {i}"} for i in range(12)]
FLAG = [{"query": f"query {i}", "pos": [f"relevant {i}"], "neg": [f"other {i}", f"another {i}"]} for i in range(12)]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path


def _train(tmp_path, tiny_bert, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model.name_or_path={tiny_bert}", "train.batch_size=4", "train.max_steps=2", "train.log_every=1",
            "eval.before=false", "eval.after=false", "data=jsonl",
            "data.dev_queries=0", *overrides])  # every row trains: the example counts below are the rows
    return logged(train, cfg, tmp_path / "run")


def test_a_save_to_disk_dataset_trains_with_no_column_override(hf_cache, tiny_bert, caplog):
    import datasets

    datasets.Dataset.from_list(ST_TRIPLETS).save_to_disk(str(hf_cache / "saved"))
    with caplog.at_level(logging.INFO, logger="embtune.data.formats"):
        summary = _train(hf_cache, tiny_bert, [f"data.path={hf_cache / 'saved'}"])
    assert summary["steps"] == 2 and summary["examples"] == len(ST_TRIPLETS)
    # pairwise reads two roles; the third column is named as not read
    assert "data_format=pairwise columns: query <- anchor, positive <- positive (not read: negative)" in caplog.text


def test_a_parquet_file_of_flagembedding_rows_trains_with_no_column_override(hf_cache, tiny_bert):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(FLAG), hf_cache / "train.parquet")
    summary = _train(hf_cache, tiny_bert, [f"data.path={hf_cache / 'train.parquet'}", "data_format=multi_negative",
                                           "negatives=hard"])
    assert summary["steps"] == 2 and summary["examples"] == len(FLAG)


def test_a_sentence_transformers_triplet_csv_trains_with_no_column_override(tmp_path, tiny_bert):
    path = tmp_path / "triplets.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["anchor", "positive", "negative"])
        writer.writeheader(), writer.writerows(ST_TRIPLETS)
    summary = _train(tmp_path, tiny_bert, [f"data.path={path}", "data_format=triplet", "negatives=hard"])
    assert summary["steps"] == 2 and summary["examples"] == len(ST_TRIPLETS)


def test_a_datasetdict_folder_is_read_by_split_and_a_missing_split_is_named(hf_cache):
    import datasets

    datasets.DatasetDict(train=datasets.Dataset.from_list(ST_TRIPLETS[:3]),
                         dev=datasets.Dataset.from_list(ST_TRIPLETS[3:5])).save_to_disk(str(hf_cache / "dd"))
    data = load_jsonl(str(hf_cache / "dd"))
    assert data.rows == ST_TRIPLETS[:3] and data.source[1] == (f"{hf_cache / 'dd'}[train]", 2)
    assert load_hf(str(hf_cache / "dd"), split="dev").rows == ST_TRIPLETS[3:5]
    with pytest.raises(ValueError, match=r"splits \['dev', 'train'\], not 'test': pick one with data.split="):
        load_jsonl(str(hf_cache / "dd"), split="test")


def test_arrow_files_in_stream_and_file_format_give_the_rows(hf_cache):
    import datasets
    import pyarrow as pa
    import pyarrow.feather as feather

    datasets.Dataset.from_list(FLAG).save_to_disk(str(hf_cache / "saved"))
    stream = next((hf_cache / "saved").glob("*.arrow"))  # the stream format save_to_disk writes
    feather.write_feather(pa.Table.from_pylist(FLAG), hf_cache / "file.arrow")  # the IPC file format
    assert load_jsonl(str(stream)).rows == FLAG
    assert load_jsonl(str(hf_cache / "file.arrow")).rows == FLAG


def test_a_beir_folder_or_another_folder_is_named_for_what_it_is(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"a BEIR folder .*use data=beir data.path="):
        load_jsonl(str(beir))
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=r"not a folder written by Dataset.save_to_disk"):
        load_jsonl(str(tmp_path / "other"))


@pytest.mark.parametrize("fmt,rows,expected", [
    (Triplet(), ST_TRIPLETS[:1], ("question 0", "answer 0", ("unrelated 0",))),
    (MultiNegative(), FLAG[:1], ("query 0", "relevant 0", ("other 0", "another 0"))),
    # sentence-transformers' n-tuple form: negative_1..negative_n, in number order (10 after 2)
    (MultiNegative(), [{"anchor": "a", "positive": "p", "negative_10": "n10", "negative_2": "n2", "negative_1": "n1"}],
     ("a", "p", ("n1", "n2", "n10"))),
    (Pairwise(), [{"question": "why?", "answer": "because"}], ("why?", "because", ())),
])
def test_column_conventions_are_recognised(fmt, rows, expected):
    assert tuple(fmt(rows)[0])[:3] == expected


def test_sts_columns_are_recognised_with_label_as_the_score():
    assert ScoredPairs()([{"sentence1": "a", "sentence2": "b", "label": "0.5"}])[0] == ("a", "b", 0.5)


def test_a_role_no_row_has_names_the_override_not_dropping_rows():
    with pytest.raises(ValueError) as e:
        Triplet()([{"anchor": "a", "positive": "b"}, {"anchor": "c", "positive": "d"}])
    assert "data_format.negative=<column>" in str(e.value) and "['anchor', 'positive']" in str(e.value)
    assert "drop_bad_rows" not in str(e.value)
    with pytest.raises(ValueError, match=r"column 'text' \(positive\) is in no row.*data_format.positive=<column>"):
        Pairwise(positive="text")([{"query": "a", "doc": "b"}])


def test_a_column_missing_from_some_rows_is_still_a_row_error():
    with pytest.raises(ValueError, match=r"t.csv:3: missing field 'positive'"):
        Pairwise()([{"query": "a", "positive": "b"}, {"query": "c"}], [("t.csv", 2), ("t.csv", 3)])
