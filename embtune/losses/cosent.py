"""CoSENT: every pair with a higher gold score must get a higher similarity than every lower one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from embtune.losses.checks import positive


class CoSENT(nn.Module):
    """CoSENT (Su 2022, "CoSENT (1): A more effective sentence embedding than Sentence-BERT",
    https://kexue.fm/archives/8847): a ranking loss over all pairs of text pairs in the batch,

        loss = log(1 + Σ_{(i,j): y_i > y_j} exp((s_j − s_i) / τ))

    computed as logsumexp over the masked [B,B] matrix of (s_j − s_i)/τ with a 0 appended, so it is
    finite for small τ. Only the order of the gold scores matters, not their scale; pairs with equal
    gold scores are not compared. A single scalar for the batch, 0 when all gold scores are equal.
    sentence-transformers' CoSENTLoss(scale=20) is τ = 0.05.

    Input kind "pair_scores"; data formats: scored_pairs (text1, text2, score: any real number, e.g.
    STS-B's 0–5), or pairwise with a binary or graded ``label`` column. Needs no negatives.

    Args:
        temperature: τ > 0 (0.05).
    Inputs:
        scores [B]: similarity of each (text1, text2) pair.
        labels [B]: float gold score of each pair.
    Raises:
        ValueError: τ <= 0, or scores and labels not both of shape [B].
    """

    name = "cosent"
    input_kind = "pair_scores"
    needs_negatives = False
    margin = None

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = positive("temperature", temperature)

    def forward(self, scores: Tensor, labels: Tensor) -> Tensor:
        if scores.dim() != 1 or labels.shape != scores.shape:
            raise ValueError(f"cosent needs scores [B] and labels [B], got {tuple(scores.shape)} and "
                             f"{tuple(labels.shape)}")
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        diff = (scores[None, :] - scores[:, None]) / self.temperature  # [i,j] = (s_j − s_i)/τ
        ordered = labels[:, None] > labels[None, :]  # [i,j]: y_i > y_j
        terms = diff.masked_fill(~ordered, float("-inf")).flatten()
        return torch.cat([terms.new_zeros(1), terms]).logsumexp(dim=0)
