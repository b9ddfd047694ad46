"""Multi-vector (ColBERT-style) embedder: one vector per token instead of one per text
(Khattab & Zaharia 2020, "ColBERT", SIGIR, §3.1-3.2).

``model=multi_vector``: the encoder's last hidden state [B,T,H] is projected by a learned linear
layer (no bias, as in ColBERT) to ``model.multi_vector_dim`` and L2-normalised per token; texts are then
scored by MaxSim (``embtune.objectives.maxsim``). :func:`embtune.model.save` writes the projection as a
sentence-transformers ``Dense`` module on the token embeddings (``1_Dense/``), so ``embtune.load`` restores it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embtune.model.embedder import Embedder
from embtune.objectives.maxsim import TokenVectors
from embtune.training.precision import use_bf16


class MultiVectorEmbedder(Embedder):
    """Encoder + linear projection + per-token L2 normalisation: texts -> token vectors.

    ``forward(input_ids [B,T], attention_mask [B,T]) -> (vectors [B,T,D], mask [B,T] bool)``, D =
    ``projection_dim``; padded positions are zero vectors and False in the mask. ``encode`` returns
    :class:`embtune.objectives.maxsim.TokenVectors`. The pooling is not used. Prompts and an appended EOS are
    tokenised as for :class:`Embedder` and their tokens kept as token vectors; one tower only.

    Args:
        projection_dim: D (ColBERT uses 128).
        projection: a trained [D,H] weight to start from; None draws a fresh one (``nn.Linear``'s init,
            from torch's global seed).
        **kwargs: :class:`Embedder`'s ``query_prompt``, ``document_prompt``, ``append_eos``, ``lora_save``.
    Raises:
        ValueError: ``normalize=False`` (MaxSim needs unit token vectors), a projection of another shape,
            or a ``document_encoder`` (two towers).
    """

    multi_vector = True

    def __init__(self, encoder, tokenizer, pooling: nn.Module, normalize: bool = True,
                 query_max_length: int = 64, document_max_length: int = 256, projection_dim: int = 128,
                 projection: Tensor | None = None, **kwargs):
        if not normalize:
            raise ValueError("model=multi_vector needs model.normalize=true (MaxSim sums cosines)")
        if kwargs.get("document_encoder") is not None:
            raise ValueError("model=multi_vector supports one shared tower only, not a document_encoder")
        super().__init__(encoder, tokenizer, pooling, normalize, query_max_length, document_max_length, **kwargs)
        self.projection = nn.Linear(encoder.config.hidden_size, projection_dim, bias=False)
        if projection is not None:
            if projection.shape != self.projection.weight.shape:
                raise ValueError(f"stored projection is {tuple(projection.shape)}, expected "
                                 f"{tuple(self.projection.weight.shape)} (model.multi_vector_dim, hidden size)")
            with torch.no_grad():
                self.projection.weight.copy_(projection)

    @property
    def dim(self) -> int:
        return self.projection.out_features

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor | None = None,
                kind: str = "document", **kwargs) -> tuple[Tensor, Tensor]:
        """``prompt_mask`` is accepted and ignored: every token, prompt included, gets a vector."""
        hidden = self.hidden_states(input_ids, attention_mask, kind, **kwargs)
        mask = attention_mask.bool()
        # the projection stays float32 when the encoder's weights are bf16/fp16 (model.dtype)
        vectors = F.normalize(self.projection(hidden.to(self.projection.weight.dtype)), dim=-1)
        return vectors * mask.unsqueeze(-1).to(vectors.dtype), mask

    @torch.no_grad()
    def encode(self, texts: list[str], kind: str = "document", batch_size: int = 64,
               max_length: int | None = None, progress: Callable[[int], None] | None = None,
               bf16: bool | str = False) -> TokenVectors:
        """Token vectors of ``texts`` in length-sorted chunks of ``batch_size`` (float32, on the CPU).

        Args:
            kind: "query" or "document": picks the max length when ``max_length`` is None.
            progress: called with each chunk's number of texts once it is encoded (as in ``Embedder.encode``).
            bf16: the tower's precision, as for :meth:`Embedder.encode`.
        Raises:
            TypeError: one string instead of a list (it would be a text per character).
        """
        if isinstance(texts, str):
            raise TypeError("MultiVectorEmbedder.encode takes a list of texts; for one text, encode([text])")
        if max_length is None:
            max_length = self.query_max_length if kind == "query" else self.document_max_length
        on = use_bf16(bf16, self.device, option="encode(bf16=...)")
        was_training, was_bf16 = self.training, self.bf16
        self.eval()
        self.bf16 = on
        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = []
        try:
            for i in range(0, len(texts), batch_size):
                idx = order[i:i + batch_size]
                batch = self.tokenize([texts[j] for j in idx], max_length, kind)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                vectors, mask = self(**batch, kind=kind)
                used = mask.any(0)  # drop columns that are padding in every row (left or right padding)
                chunks.append((torch.from_numpy(idx.copy()), vectors[:, used].float().cpu(), mask[:, used].cpu()))
                if progress is not None:
                    progress(len(idx))
        finally:
            self.train(was_training)
            self.bf16 = was_bf16
        return TokenVectors(chunks)
