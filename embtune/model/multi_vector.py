"""Multi-vector (ColBERT-style) embedder: one vector per token instead of one per text
(Khattab & Zaharia 2020, "ColBERT", SIGIR, §3.1-3.2).

``model.multi_vector=true``: the encoder's last hidden state [B,T,H] is projected by a learned linear
layer (no bias, as in ColBERT) to ``model.multi_vector_dim`` and L2-normalised per token; texts are then
scored by MaxSim (``embtune.objectives.maxsim``). The projection is saved with the model as a sentence-transformers
``Dense`` module on the token embeddings (``1_Dense/``), so ``embtune.load`` restores it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from embtune.model.embedder import Embedder
from embtune.model.io import _write_json
from embtune.objectives.maxsim import TokenVectors

DENSE = "1_Dense"


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
            raise ValueError("model.multi_vector=true needs model.normalize=true (MaxSim sums cosines)")
        if kwargs.get("document_encoder") is not None:
            raise ValueError("model.multi_vector=true supports one shared tower only (model.shared_weights=true)")
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
               max_length: int | None = None) -> TokenVectors:
        """Token vectors of ``texts`` in length-sorted chunks of ``batch_size`` (float32, on the CPU).

        Args:
            kind: "query" or "document": picks the max length when ``max_length`` is None.
        """
        if max_length is None:
            max_length = self.query_max_length if kind == "query" else self.document_max_length
        was_training = self.training
        self.eval()
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
        finally:
            self.train(was_training)
        return TokenVectors(chunks)

    def save(self, path: str | Path, matryoshka_dims: list[int] | None = None, config: dict | None = None) -> None:
        """The encoder as :meth:`Embedder.save` writes it, with the projection as ``1_Dense`` (a
        sentence-transformers ``Dense`` on ``token_embeddings``, identity activation) instead of pooling
        and normalisation; ``embtune.json`` records ``multi_vector_dim``. Written under a temporary name.

        Raises:
            FileExistsError: ``path`` exists.
        """
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists; embtune never overwrites a saved model")
        staging = path.with_name(path.name + ".mv")
        shutil.rmtree(staging, ignore_errors=True)
        super().save(staging, matryoshka_dims, config)
        for sub in ("1_Pooling", "2_Normalize"):  # one vector per text: not this model's output
            shutil.rmtree(staging / sub, ignore_errors=True)
        (staging / DENSE).mkdir()
        save_file({"linear.weight": self.projection.weight.detach().cpu().contiguous()},
                  str(staging / DENSE / "model.safetensors"))
        _write_json(staging / DENSE / "config.json", {
            "in_features": self.projection.in_features, "out_features": self.dim, "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity",
            "module_input_name": "token_embeddings", "module_output_name": "token_embeddings"})
        _write_json(staging / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": DENSE, "type": "sentence_transformers.models.Dense"}])
        meta = json.loads((staging / "embtune.json").read_text())
        _write_json(staging / "embtune.json", {**meta, "multi_vector_dim": self.dim})
        for f in staging.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        os.replace(staging, path)


def stored_projection(path: str | Path) -> Tensor | None:
    """The projection weight [D,H] saved in a model folder's ``1_Dense``, or None."""
    file = Path(path) / DENSE / "model.safetensors"
    return load_file(str(file))["linear.weight"] if file.is_file() else None
