"""What a person sees while texts are encoded to evaluate or mine (embtune.run.progress.encoding_progress):
a transient bar on a terminal that advances to the number of texts, nothing drawn anywhere else (a pipe,
a log file, a torchrun rank other than 0), and one plain line at the start and at the end of an evaluation;
no library bar while embtune.load reads a model."""

import io
import logging

import pytest
from rich.console import Console

from embtune.data import RetrievalSet, TrainingData
from embtune.data.formats import Pairwise
from embtune.eval import Retrieval
from embtune.mining.miner import HardNegativeMiner
from embtune.model import from_pretrained, pooling
from embtune.run import progress

BAR = "━"  # what rich's BarColumn draws (finished and unfinished parts); no plain log line holds it


def _data(n_queries: int = 5, n_docs: int = 13) -> TrainingData:
    queries = {f"q{i}": f"question number {i} about paths" for i in range(n_queries)}
    corpus = {f"d{j}": f"document {j}: " + "words " * j for j in range(n_docs)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(n_queries)}
    rows = [{"query": queries[f"q{i}"], "positive": corpus[f"d{i}"]} for i in range(n_queries)]
    return TrainingData(rows=rows, test=RetrievalSet(queries, corpus, qrels), name="hand-made")


@pytest.fixture(scope="module")
def model(tiny_bert):
    return from_pretrained(tiny_bert, pooling=pooling.Mean())


def _console(monkeypatch, terminal: bool) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=out, force_terminal=terminal, width=120))
    return out


def test_on_a_terminal_the_evaluation_bar_is_drawn_and_reaches_the_number_of_texts(monkeypatch, model):
    out = _console(monkeypatch, terminal=True)
    monkeypatch.delenv("RANK", raising=False)
    data = _data(n_queries=5, n_docs=13)
    Retrieval(batch_size=4)(model, data, [])  # batches of 4: the bar moves 2 + 4 times
    drawn = out.getvalue()
    assert BAR in drawn and "evaluate hand-made test set" in drawn
    assert "18/18" in drawn  # 5 queries + 13 documents, every one encoded once
    assert "19/18" not in drawn and "texts/s" in drawn


def test_off_a_terminal_no_bar_is_written_and_the_evaluation_logs_its_start_and_end(monkeypatch, model, caplog):
    out = _console(monkeypatch, terminal=False)
    with caplog.at_level(logging.INFO, logger="embtune.eval.evaluators"):
        Retrieval(batch_size=4, metric="ndcg@10")(model, _data(), [])
    assert out.getvalue() == ""  # not a bar, not a half-drawn line: nothing
    lines = [r.getMessage() for r in caplog.records]
    assert "evaluating hand-made test set: 5 queries, 13 documents" in lines
    assert any(line.startswith("evaluated hand-made test set in ") and " s: ndcg@10 " in line for line in lines)


@pytest.mark.parametrize("launcher", [{"RANK": "1", "WORLD_SIZE": "2"},  # torchrun
                                      {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}])  # srun
def test_a_rank_other_than_0_draws_no_bar(monkeypatch, model, launcher):
    out = _console(monkeypatch, terminal=True)
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    Retrieval(batch_size=4)(model, _data(), [])
    assert BAR not in out.getvalue()


def test_mining_draws_the_same_bar_over_its_queries_and_pool(monkeypatch, model):
    out = _console(monkeypatch, terminal=True)
    monkeypatch.delenv("RANK", raising=False)
    data = _data(n_queries=5, n_docs=13)
    miner = HardNegativeMiner(range_min=0, range_max=10, relative_margin=None, max_score=None, num_negatives=3,
                              candidates="all", batch_size=4)
    miner(model, data, Pairwise())
    # 5 queries + a pool of the 13 corpus documents (the positives are among them: the same texts)
    assert BAR in out.getvalue() and "mine" in out.getvalue() and "18/18" in out.getvalue()


def test_embtune_load_draws_no_loading_bar_and_leaves_the_bars_as_they_were(tiny_bert, capfd):
    from transformers.utils import logging as transformers_logging

    import embtune

    was = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()  # as in a fresh Python session (a CLI run in this process turns it off)
    try:
        capfd.readouterr()
        embtune.load(tiny_bert)
        out, err = capfd.readouterr()
        assert "Loading weights" not in out + err
        assert transformers_logging.is_progress_bar_enabled()  # the user's own setting, restored
    finally:
        (transformers_logging.enable_progress_bar if was else transformers_logging.disable_progress_bar)()


def test_a_resumed_run_estimates_its_time_left_from_its_own_first_step(monkeypatch, caplog):
    clock = iter([0.0, 2.0, 3.0])  # the bar opens at 0 s; resumed steps 6 and 7 end at 2 s and 3 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(progress, "console", Console(file=io.StringIO(), force_terminal=False))
    with caplog.at_level(logging.INFO, logger=progress.log.name), progress.progress_bar(10, 5, log_every=1) as bar:
        bar.update(6, loss=0.5, lr=1e-5, pairs_per_s=8.0)
        bar.update(7, loss=0.4, lr=1e-5, pairs_per_s=8.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[0].endswith("ETA 0:00:08")  # 2 s for its first step x 4 steps left
    assert lines[1].endswith("ETA 0:00:04")  # 1.5 s a step x 3 left, in whole seconds
