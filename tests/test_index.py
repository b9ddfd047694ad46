"""Corpus search (embtune/eval/index.py): the exact search in torch blocks and in faiss against a reference
ranking computed here (numpy, float64, sorted by score then index), ties included; the approximate indexes;
the settings refused by name; the corpus encoded in chunks into a memory-mapped file."""

from pathlib import Path

import numpy as np
import pytest
import torch

from embtune.eval.index import CorpusSearch, encoded_corpus, search

TORCH, FAISS = {"faiss_min_docs": 10 ** 9}, {"faiss_min_docs": 0}  # force each path of the exact search


def reference(q: np.ndarray, d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product in float64, ties by lower document index: the order :func:`search` promises."""
    s = q.astype(np.float64) @ d.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(d.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- the exact search, torch blocks ---------------------------------------------------------------------

@pytest.mark.parametrize("k", [5, 20])  # 20 > block_size: the merge must keep more than one block's worth
def test_search_blocked_equals_full_topk(k):
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(37, 16, generator=g), torch.randn(53, 16, generator=g)
    scores, indices = search(q, d, k=k, block_size=8)  # 8 < Q and < N, neither divides evenly
    ref_scores, ref_indices = (q @ d.T).topk(k, dim=1)
    assert scores.shape == indices.shape == (37, k) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(indices, ref_indices)


def test_search_k_larger_than_corpus_returns_every_doc_sorted():
    g = torch.Generator().manual_seed(1)
    q, d = torch.randn(5, 4, generator=g, requires_grad=True), torch.randn(7, 4, generator=g)
    scores, indices = search(q, d, k=100, block_size=3)
    assert scores.shape == (5, 7) and not scores.requires_grad  # k' = min(100, 7)
    assert torch.equal(indices.sort(dim=1).values, torch.arange(7).expand(5, 7))
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_search_rejects_bad_inputs():
    with pytest.raises(ValueError, match="embeddings"):
        search(torch.zeros(2, 3), torch.zeros(4, 5), k=1)
    with pytest.raises(ValueError, match="k and block_size"):
        search(torch.zeros(2, 3), torch.zeros(4, 3), k=0)


# --- faiss flat = torch = the reference -------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 10, 111, 705])  # 705 > N: every document, ranked
@pytest.mark.parametrize("path", [TORCH, FAISS], ids=["torch", "faiss"])
def test_exact_search_on_random_unit_vectors_equals_the_reference(path, k):
    rng = np.random.default_rng(0)
    q, d = unit(rng, 50, 32), unit(rng, 700, 32)
    ref_s, ref_i = reference(q, d, k)
    scores, indices = search(torch.from_numpy(q), torch.from_numpy(d), k, block_size=64, **path)
    assert indices.shape == (50, min(k, 700)) and indices.dtype == torch.int64
    assert np.array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-6)


@pytest.mark.parametrize("k", [3, 40, 64, 203])  # 203 > N
@pytest.mark.parametrize("path", [TORCH, FAISS], ids=["torch", "faiss"])
def test_exact_search_breaks_ties_by_lower_index_also_at_the_kth_place(path, k):
    # entries ±1/4 in 16 dims: exactly unit vectors, every inner product an exact multiple of 1/16 in float32,
    # so only 33 scores exist and ties are everywhere, across the k-th place too; plus duplicated documents
    rng = np.random.default_rng(1)
    d = rng.choice([-0.25, 0.25], size=(200, 16)).astype(np.float32)
    d[150:] = d[:50]
    q = rng.choice([-0.25, 0.25], size=(30, 16)).astype(np.float32)
    ref_s, ref_i = reference(q, d, k)
    assert (ref_s[:, :-1] == ref_s[:, 1:]).any()  # the fixture does tie
    scores, indices = search(q, d, k, block_size=16, **path)  # numpy inputs too
    assert np.array_equal(indices.numpy(), ref_i)
    assert np.array_equal(scores.numpy(), ref_s.astype(np.float32))  # exact: no rounding in these products


def test_faiss_reads_a_memory_mapped_matrix_in_place(tmp_path):
    rng = np.random.default_rng(2)
    q, d = unit(rng, 20, 8), unit(rng, 300, 8)
    mm = np.lib.format.open_memmap(tmp_path / "d.npy", mode="w+", dtype=np.float32, shape=d.shape)
    mm[:] = d
    ref_s, ref_i = reference(q, d, 25)
    scores, indices = search(q, torch.from_numpy(mm), 25, **FAISS)
    assert np.array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-6)


def test_faiss_uses_torchs_thread_count():
    import faiss

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        search(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), 1, **FAISS)
        assert faiss.omp_get_max_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- the approximate indexes --------------------------------------------------------------------------

def test_ivf_probing_every_cell_is_exact_and_hnsw_recalls_most_of_the_exact_top10():
    rng = np.random.default_rng(3)
    q, d = unit(rng, 40, 16), unit(rng, 2000, 16)
    ref_s, ref_i = reference(q, d, 10)
    # IVF with all 8 cells probed scans every document: the exact ranking (Jégou et al. 2011, §4)
    scores, indices = CorpusSearch("ivf", ivf_nlist=8, ivf_nprobe=8)(q, d, 10)
    assert np.array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-6)
    scores, indices = CorpusSearch("hnsw", hnsw_m=16)(torch.from_numpy(q), torch.from_numpy(d), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(indices.numpy(), ref_i)])
    assert recall >= 0.9  # approximate, but close on 2,000 vectors with efSearch 128
    true = np.take_along_axis(q.astype(np.float64) @ d.T.astype(np.float64), indices.numpy(), 1)
    np.testing.assert_allclose(scores.numpy(), true, atol=1e-6)  # the scores are exact inner products
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_an_approximate_gap_is_index_minus_one_and_last():
    # 1 cell probed of 8: each query scans only its cell, fewer than k documents may be found
    rng = np.random.default_rng(4)
    q, d = unit(rng, 10, 8), unit(rng, 400, 8)
    scores, indices = CorpusSearch("ivf", ivf_nlist=8, ivf_nprobe=1)(q, d, 300)
    gaps = indices.numpy() < 0
    assert gaps.any() and np.all(np.isneginf(scores.numpy()[gaps]))
    assert np.all(np.diff(gaps.astype(int), axis=1) >= 0)  # gaps only at the end of a row


@pytest.mark.parametrize("kwargs,message", [
    ({"index": "annoy"}, r"miner.index='annoy': must be one of flat, hnsw, ivf"),
    ({"index": "flat", "hnsw_m": 16}, r"miner.hnsw_m=16 is a setting of miner.index=hnsw, not of miner.index=flat"),
    ({"index": "hnsw", "ivf_nprobe": 4}, r"miner.ivf_nprobe=4 is a setting of miner.index=ivf"),
    ({"index": "ivf", "faiss_min_docs": 10}, r"miner.faiss_min_docs=10 is a setting of miner.index=flat"),
    ({"index": "hnsw", "hnsw_ef_search": 0}, r"miner.hnsw_ef_search=0: must be >= 1"),
])
def test_search_settings_are_refused_by_name(kwargs, message):
    from embtune.mining import HardNegativeMiner

    with pytest.raises(ValueError, match=message):
        HardNegativeMiner(**kwargs)


def test_the_eval_and_miner_options_accept_each_index_and_refuse_a_bad_one_by_name():
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from embtune.config import build

    for name, group in (("mine", "miner"), ("config", "eval")):
        for index in ("flat", "hnsw", "ivf"):
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose(config_name=name, overrides=[f"{group}.index={index}"])
            assert build(cfg, group).search.index == index
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name=name, overrides=[f"{group}.index=hnws", f"{group}.ivf_nlist=4"])
        with pytest.raises(ValueError, match=rf"^{group}.index='hnws': must be one of flat, hnsw, ivf"):
            build(cfg, group)


def test_an_approximate_index_for_a_multi_vector_model_is_refused_before_it_loads():
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from embtune.config import build, check_multi_vector

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=multi_vector", "model.name_or_path=/nonexistent",
                                                       "eval.index=ivf", "negatives=in_batch"])
    with pytest.raises(ValueError, match=r"model=multi_vector with eval.index=ivf: MaxSim is searched exactly"):
        check_multi_vector(cfg.model, build(cfg, "negatives"), [], build(cfg, "eval"))


def test_more_ivf_cells_than_documents_is_refused_before_encoding():
    with pytest.raises(ValueError, match=r"eval.ivf_nlist=64: more IVF cells than the 10 documents"):
        CorpusSearch("ivf", ivf_nlist=64, option="eval").check_size(10)


# --- the corpus encoded in chunks -----------------------------------------------------------------------

def test_chunked_memory_mapped_encoding_equals_one_shot_encoding(tiny_bert, tmp_path, monkeypatch):
    from embtune.model import from_pretrained

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path))
    model = from_pretrained(tiny_bert)
    words = "the quick brown fox jumps over a lazy dog while seven tired owls watch".split()
    texts = [" ".join(words[i % 7:i % 7 + 1 + i % 9]) for i in range(23)]  # lengths 1..9 words
    one_shot = model.encode(texts, kind="document", batch_size=4)
    with encoded_corpus(model, texts, "document", batch_size=4, chunk_size=5) as emb:  # 5 chunks, the last of 3
        assert isinstance(emb, np.memmap) and emb.shape == one_shot.shape and emb.dtype == np.float32
        folder = Path(emb.filename).parent
        assert folder.parent == tmp_path / "tmp" and folder.is_dir()
        np.testing.assert_allclose(emb, one_shot, atol=1e-5)  # padding differs between the batches only
    assert not folder.exists()  # removed afterwards
    with encoded_corpus(model, texts, "document", batch_size=4, chunk_size=23) as emb:  # one chunk: in memory
        assert not isinstance(emb, np.memmap)
        np.testing.assert_allclose(emb, one_shot, atol=1e-5)
