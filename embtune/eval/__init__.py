"""Evaluation: retrieval (NDCG@10, MRR@10, Recall@k) and STS (Spearman), and the base model's cached metrics."""

from embtune.eval.evaluators import STS, Retrieval

__all__ = ["STS", "Retrieval"]
