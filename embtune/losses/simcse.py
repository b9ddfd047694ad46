"""SimCSE: InfoNCE where each text's positive is the same text encoded a second time."""

from __future__ import annotations

from embtune.losses.info_nce import InfoNCE


class SimCSE(InfoNCE):
    """Unsupervised SimCSE (Gao et al. 2021, "SimCSE: Simple Contrastive Learning of Sentence
    Embeddings", §3): each anchor text is encoded twice with different dropout masks; the second
    encoding is its positive and the other texts' second encodings are the in-batch negatives. The
    loss is InfoNCE on those scores, so this class only names the option and tells the loop, through
    ``same_text_positive``, to encode the anchor twice instead of reading a positive column:

        loss = CE(scores / τ, target),   scores[i,j] = cos(h_i, h'_j),   target[i] = i

    Supervised SimCSE (§4: NLI entailment as positive, contradiction as hard negative) needs no
    special loss: use ``loss=info_nce negatives=hard`` with data_format=triplet.

    Input kind "scores"; data formats: any that has anchor texts (pointwise, pairwise, triplet, ...);
    only the anchors are read, positives and negatives in the data are ignored. Needs no negatives.

    Args, inputs, raises: as ``InfoNCE`` (temperature 0.05, label_smoothing 0, learnable False), except
    that ``symmetric`` is off by default, as in the paper.
    """

    name = "simcse"
    input_kind = "scores"
    needs_negatives = False
    same_text_positive = True

    def __init__(self, temperature: float = 0.05, label_smoothing: float = 0.0, learnable: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 1.0, symmetric: bool = False):
        super().__init__(temperature, label_smoothing, learnable, min_temperature, max_temperature, symmetric)
