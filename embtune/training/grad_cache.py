"""GradCache: contrastive batches larger than fit in memory, with the plain computation's gradients.

Gao, Zhang, Han and Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(RepL4NLP 2021), §3. The loss over a batch of B anchors needs every embedding at once, but its gradient
factorises through the embeddings: dL/dθ = Σ_i (dL/de_i)·(de_i/dθ). So

1. encode every text column in mini-batches **without** a graph, keeping only the embeddings [N,D];
2. compute the loss on the full batch from those embeddings (as leaves requiring grad) and backward to
   get dL/de [N,D] (and the gradients of the loss's own parameters: a learnable temperature, ArcFace);
3. encode each mini-batch again **with** a graph and backward ``e_chunk · dL/de_chunk`` into the encoder.

Peak activation memory is that of one mini-batch; compute is one extra forward pass. Dropout masks of
step 3 equal those of step 1 because the RNG state is saved before each mini-batch in step 1 and restored
for its re-forward, so the gradients equal those of encoding the same mini-batches with a graph and
backpropagating the full-batch loss directly (checked to 1e-5 in ``tests/test_grad_cache.py``).

Each column's rows are sorted by token length before they are cut into mini-batches, and each
mini-batch is cut to its own longest text: less padding, the same result (a row's embedding does not
depend on the other rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from embtune.data.formats import tower


def _chunks(tokens: dict[str, Tensor], size: int) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """Rows of one tokenised column, length-sorted, as (row indices, tokens trimmed to their own longest)."""
    mask = tokens["attention_mask"]
    order = torch.argsort(mask.sum(1), descending=True, stable=True)
    out = []
    for i in range(0, len(order), size):
        rows = order[i:i + size]
        keep = mask[rows].bool().any(0)  # a contiguous span for right and for left padding
        out.append((rows, {k: v[rows][:, keep] if v.dim() == 2 and v.shape == mask.shape else v[rows]
                           for k, v in tokens.items()}))
    return out


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay(state: tuple, device: torch.device):
    """Run the block from a saved RNG state, then put the RNG back where it was (so the replays leave
    the RNG where step 1 left it, as a plain step would)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def grad_cache_backward(model, batch: dict, loss_of: Callable[[dict[str, Tensor]], tuple[Tensor, dict]],
                        mini_batch_size: int, autocast=contextlib.nullcontext()) -> tuple[Tensor, dict]:
    """Compute the full-batch loss and accumulate its gradients into ``.grad`` (instead of ``loss.backward()``).

    Args:
        model: an :class:`embtune.model.embedder.Embedder`: ``(input_ids [n,T], attention_mask [n,T]) -> [n,D]``.
        batch: a collated batch (``embtune.data.batching.collate``); every dict value holding ``input_ids``
            is a text column to encode ([N,T] each; N may differ between columns, e.g. B·K negatives).
        loss_of: ``{column: embeddings [N,D]} -> (scalar loss, metrics)``; it must use only these
            embeddings and the batch's other tensors (an objective's ``loss`` with ``embeddings=``,
            ``embtune.objectives``); each column is encoded by its tower (``embtune.data.formats.tower``).
        mini_batch_size: rows encoded at once (>= 1).
        autocast: the autocast context of the forward passes (bf16 on GPUs).
    Returns:
        The loss, detached (a scalar tensor), and ``loss_of``'s metrics (e.g. ``train/candidates``).
    Raises:
        ValueError: ``mini_batch_size`` < 1.
    """
    if mini_batch_size < 1:
        raise ValueError(f"train.mini_batch_size must be >= 1, got {mini_batch_size}")
    device = model.device
    columns = [k for k, v in batch.items() if isinstance(v, Mapping) and "input_ids" in v]
    plan = {c: _chunks(batch[c], mini_batch_size) for c in columns}

    # 1. embeddings without a graph; the RNG state before each mini-batch, for its replay in 3.
    states: dict[str, list[tuple]] = {c: [] for c in columns}
    cached: dict[str, Tensor] = {}
    with torch.no_grad(), autocast:
        for c in columns:
            parts = []
            for rows, tokens in plan[c]:
                states[c].append(_rng_state(device))
                parts.append((rows, model(**tokens, kind=tower(c))))
            n = batch[c]["input_ids"].size(0)
            emb = torch.empty(n, parts[0][1].size(-1), dtype=parts[0][1].dtype, device=parts[0][1].device)
            for rows, e in parts:
                emb[rows] = e
            cached[c] = emb.requires_grad_()

    # 2. full-batch loss; backward fills the embeddings' grads (and the loss's own parameters')
    with autocast:
        loss, metrics = loss_of(cached)
    loss.backward()

    # 3. re-encode each mini-batch with a graph, same dropout masks, and push its slice of dL/de through
    for c in columns:
        grad = cached[c].grad
        for (rows, tokens), state in zip(plan[c], states[c]):
            with _replay(state, device), autocast:
                e = model(**tokens, kind=tower(c))
            e.backward(grad[rows].to(e.dtype))
    return loss.detach(), metrics
