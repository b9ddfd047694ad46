"""The training loop: one function, read top to bottom.

``train(cfg, output_dir, logger)`` builds data, format, negatives and loss from the config, checks
they fit together (``embtune.config``, before any model loads), evaluates the base model, fine-tunes
with AdamW and a linear warm-up/decay schedule, evaluates again and saves the model and ``summary.json``.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embtune.config import build, check_model_folder, check_run, normalize, yaml_word
from embtune.data import streaming
from embtune.data.batching import make_loader, plan_batches
from embtune.data.cache import cache_dir
from embtune.data.checks import make_examples, text_report
from embtune.data.dev_split import describe_held_out, hold_out_dev
from embtune.data.mixture import Mixture
from embtune.data.token_cache import TokenCache
from embtune.eval.base_cache import base_metrics
from embtune.eval.evaluators import Retrieval
from embtune.model import kernels, save
from embtune.model.cross_encoder import score_examples
from embtune.objectives.matryoshka import matryoshka_dims
from embtune.recipes import mixture as mix
from embtune.recipes.model_card import model_card, typed_overrides
from embtune.run.outputs import record_interrupted, write_json
from embtune.run.progress import print_comparison, progress_bar
from embtune.run.redact import redact
from embtune.training import checkpoint, distributed, fsdp
from embtune.training.grad_cache import grad_cache_backward
from embtune.training.numerics import finite_or_missing, skip_or_stop
from embtune.training.optim import clamp_after_step, lr_at, param_groups
from embtune.training.precision import precision_name, use_bf16
from embtune.training.selection import Best, check_selection, evaluate_and_select

log = logging.getLogger(__name__)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: ({n: x.to(device) for n, x in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items()}


def train(cfg: DictConfig, output_dir: str | Path, logger, base: dict | None = None, data=None) -> dict:
    """Fine-tune the configured model; returns the summary written to ``output_dir/summary.json``.

    ``base``: the metrics to report as the base model's when they are already known (the second stage
    of a two-stage run reports the original model's); None evaluates the model before training.
    ``data``: already loaded :class:`~embtune.data.TrainingData` (mining rounds pass their mined rows);
    None loads ``cfg.data``.

    With ``resume_from=RUN_DIR`` (or a checkpoint file) the run continues from that run's latest usable
    checkpoint, under the checkpoint's config; the result equals an uninterrupted run's.

    Under ``torchrun`` or ``srun`` (``embtune.training.distributed``) every process trains its share of each
    batch; only rank 0 logs, evaluates and saves (``logger`` may be None on the other ranks). With
    ``train.strategy=fsdp`` (``embtune.training.fsdp``) the weights are sharded, checkpoints too, and rank 0
    saves the gathered whole model."""
    output_dir = Path(output_dir)
    state = resumed = None
    if cfg.get("resume_from"):
        state, resumed = checkpoint.load(cfg.resume_from)
        cfg = OmegaConf.merge(OmegaConf.create(state["config"]), {"resume_from": str(cfg.resume_from)})
        log.info("resuming %s at step %d", resumed, state["step"])
    t = cfg.train
    started = time.perf_counter()  # startup = data, model, base metrics: what a sweep's caches shorten
    random.seed(t.seed), np.random.seed(t.seed), torch.manual_seed(t.seed)

    # -- data, format, negatives, loss: cheap, and checked before any model loads
    normalize(cfg)  # the values' types first (check_run reads them again), then the model's folder: before the data
    check_model_folder(cfg.model)
    device = distributed.pick_device(t.device)  # a device this machine lacks: refused before the data
    data = data if data is not None else build(cfg, "data")
    data_format, negatives, loss_fn = build(cfg, "data_format"), build(cfg, "negatives"), build(cfg, "loss")
    evaluator = build(cfg, "eval")
    mixed = isinstance(data, Mixture)  # data=mixture: per-source formats and dev splits, each batch from one source
    streamed = isinstance(data, streaming.StreamedData)  # data.streaming=true: rows read as training goes
    if mixed:
        evaluator = mix.prepare(data, cfg.data_format, data_format, evaluator)  # every source evaluated
    elif isinstance(evaluator, Retrieval):  # data without a test set: a dev split of its rows, by query
        data = hold_out_dev(data, data_format)
    if state is not None:  # resumed: on the checkpoint's data (the dev split held out as then), checked before the model
        checkpoint.check_data(state, data.fingerprint)
    patience = t.get("early_stopping_patience")
    check_selection(evaluator.every_steps, evaluator.keep, patience, evaluator.metric, evaluator.metrics,
                    evaluates=data.test is not None or not evaluator.uses_data)
    best = Best(evaluator.metric, evaluator.keep, patience)  # the best evaluation during training and its weights
    teacher = build(cfg, "teacher") if cfg.get("teacher") else None
    checked_format = data.sources[0].data_format if mixed else data_format  # mix.check: every source's format
    objective = check_run(cfg, checked_format, negatives, loss_fn, evaluator, teacher,  # embtune.objectives
                          where=f"data.sources[0] ({data.sources[0].name})" if mixed else None)
    if mixed:
        mix.check(data, objective, negatives, loss_fn, teacher)
    examples, row_of = (mix.make_examples if mixed else streaming.make_examples if streamed
                        else make_examples)(data, data_format, objective)
    if teacher is not None:
        examples, teacher = score_examples(teacher, examples), None  # None: free the cross-encoder

    # -- processes (torchrun) and model
    proc = distributed.setup(device.type)
    if proc.world > 1 and device.type == "cuda":
        device = torch.device("cuda", proc.local_rank)
        torch.cuda.set_device(device)
    main = proc.main
    bf16 = use_bf16(t.bf16, device)  # before the model loads: train.bf16=true on a CPU without bf16 is refused
    eval_bf16 = use_bf16(getattr(evaluator, "bf16", False), device, option="eval.bf16")  # the same for eval.bf16
    sampler, rng = (mix.plan_batches(examples, objective, t, proc, data) if mixed  # before the model: too few
                    else (streaming.plan_batches if streamed else plan_batches)(examples, objective, t, proc))  # rows
    if main:
        log.info(describe_held_out(data, evaluator))
        log.info("precision: %s on %s (train.bf16=%s), evaluation %s (eval.bf16=%s)", precision_name(bf16),
                 device.type, yaml_word(t.bf16), precision_name(eval_bf16), yaml_word(getattr(evaluator, "bf16", False)))
    model = instantiate(cfg.model, pooling=instantiate(cfg.pooling)).to(device)
    if t.cache_tokens is True or t.cache_tokens == "auto" and not streamed:  # each text tokenised once, for all jobs
        from embtune.model.resolve import resolve_model_path

        model.token_cache = TokenCache.for_run(resolve_model_path(cfg.model.name_or_path), model.tokenizer,
                                               data.fingerprint, cache_dir())
        model.token_cache.prepare(model, examples, data.test)  # examples on disk: their token ids, a chunk at a time
    dims = matryoshka_dims(cfg.matryoshka.dims, cfg.matryoshka.weights, model.dim)
    eval_dims = [d for d, _ in dims]
    objective.start(model, examples, evaluator.batch_size)  # e.g. ArcFace's class centres from the data
    loss_fn.to(device)
    # summary.json's text counts: rank 0 writes the summary, so only it tokenises every text for them
    texts = (text_report(examples, data.test, model.tokenizer, model.query_max_length, model.document_max_length,
                         cache=model.token_cache) if main and not streamed else None)  # a stream: every row unread

    # -- base metrics
    if state is not None:  # resumed: the base metrics were logged by the first run
        base = state["base"]
    elif base is None:
        base = (finite_or_missing(base_metrics(cfg, data, lambda: evaluator(model, data, eval_dims)))
                if evaluator.before and main else {})
        if base:
            logger.log({f"eval/{k}": v for k, v in base.items()}, step=0)

    # -- optimiser and schedule
    loader = (mix.make_loader if mixed else streaming.make_loader if streamed else make_loader)(
        examples, objective, t, model, sampler, rng)
    per_epoch = None if streamed else len(loader)  # a stream's epoch length is not known
    source_losses = mix.SourceLosses(examples)  # train/loss/<source> of a mixture
    sharded = fsdp.active(t.get("strategy", "ddp"), proc)  # FSDP2: weights, gradients, optimiser state split
    plain = fsdp.skeleton(model) if sharded else None  # the unsharded layout (meta device): rank 0 saves into it
    trained = fsdp.wrap(model, proc, device) if sharded else distributed.wrap(model, proc, device)  # DDP: averaged
    clip = fsdp.clip_grad_norm_ if sharded else torch.nn.utils.clip_grad_norm_  # the norm over every shard
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]  # not in DDP: averaged by hand
    total = t.max_steps or t.epochs * per_epoch  # a stream has train.max_steps (embtune.config.check_streaming)
    warmup = min(math.ceil(t.warmup_ratio * total), total - 1)  # the first step at lr 0 must not be the only one
    # fused: one pass over each parameter (all-MiniLM-L6-v2's optimiser step 5x faster on a CPU; transformers'
    # Trainer default too); FSDP's sharded DTensors take the per-tensor loop
    optimizer = torch.optim.AdamW(param_groups(model, loss_fn, t), lr=t.lr, weight_decay=t.weight_decay,
                                  fused=not sharded)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, warmup))

    # -- the backward step, chosen once: (batch) -> (loss, metrics), gradients accumulated in .grad
    def loss_of(batch: dict, embeddings: dict | None = None) -> tuple[torch.Tensor, dict]:
        return objective.loss(trained, batch, dims, embeddings)

    if t.grad_cache:  # Gao et al. 2021: the same gradients, one mini-batch's activations at a time
        def backward(batch: dict) -> tuple[torch.Tensor, dict]:
            return grad_cache_backward(trained, batch, lambda e: loss_of(batch, e), t.mini_batch_size)
    else:
        def backward(batch: dict) -> tuple[torch.Tensor, dict]:
            loss, metrics = loss_of(batch)
            loss.backward()
            return loss, metrics

    # -- the loop; one step counter drives schedule, logging and checkpoints
    unpadded = model.unpadded("query") and model.unpadded("document")  # after wrapping: FSDP's layers take the plain forward
    if main:
        log.info("unpadded forward: %s (model.unpad=%s)", "on" if unpadded else "off", cfg.model.get("unpad", "auto"))
    model.train()
    model.bf16 = bf16  # the encoder's forward in bf16 autocast; embeddings, scores, loss and weights fp32
    step = epoch = done = seen = skipped = 0  # done: batches of this epoch trained on
    if state is not None:
        c = checkpoint.restore_training(state, model=model, optimizer=optimizer, scheduler=scheduler,
                                        loss_fn=loss_fn, negatives_rng=rng, fingerprint=data.fingerprint,
                                        rank=proc.rank, world=proc.world)
        step, epoch, done, seen, skipped = c["step"], c["epoch"], c["done"], c["seen"], c["skipped"]
        if streamed:  # each process's own epoch and batches (each reads its own rows)
            epoch, done = sampler.resume(state["stream"], proc.rank)
        best.load_state_dict(state.get("selection"))
        if state.get("shards"):  # weights, optimiser state and this process's random state, from its shards
            fsdp.restore_sharded(state, model, optimizer, rng, proc)
    startup = time.perf_counter() - started
    start = time.perf_counter() - (state["seconds"] if state else 0.0)  # a resumed run's clock goes on
    saved_config = redact(OmegaConf.to_container(cfg, resolve=True))
    if main:
        logger.log({"time/startup_s": startup}, step=step)

    def save_checkpoint() -> Path | None:  # every process calls it: each gives its random state, or its shards
        rngs = None if sharded else checkpoint.rng_states(rng, proc)  # DDP: gathered to rank 0, which writes
        stream = sampler.positions(epoch, done, proc) if streamed else None  # every process's, on rank 0
        if not (main or sharded):
            return None
        state = {**checkpoint.training_state(
            model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, negatives_rng=rng, step=step,
            epoch=epoch, done=done, seen=seen, skipped=skipped, seconds=time.perf_counter() - start, base=base,
            fingerprint=data.fingerprint, config=saved_config, weights=not sharded, rng_by_rank=rngs),
            "selection": best.state_dict(), **({"stream": stream} if streamed else {})}
        if sharded:  # every process writes its shards
            return fsdp.save_sharded(output_dir, state, model, optimizer, rng, proc)
        return checkpoint.save(output_dir, state)

    def known(seconds: float) -> dict:  # summary.json's fields known at any step: interrupted or completed
        return {"base": base, "steps": step, "skipped_steps": skipped, "startup_seconds": round(startup, 2),
                "train_seconds": round(seconds, 2), "pairs_per_second": round(seen / max(seconds, 1e-9), 2),
                "examples": None if streamed else len(examples), "precision": precision_name(bf16),
                "eval_precision": precision_name(eval_bf16), "unpadded": unpadded,
                "temperature": loss_fn.temperature, "margin": loss_fn.margin,
                "data": {**data.summary(), "texts": texts}, "resumed_from": str(resumed) if resumed else None}

    every_eval, last, stopped = evaluator.every_steps, None, False  # last: the latest evaluation's metrics

    with (progress_bar(total, per_epoch, t.log_every, show=main) as bar, checkpoint.StopOnSignal() as stop,
          kernels.fast_dropout(model, t.fast_dropout and device.type == "cpu")):
        while step < total and not stopped:
            sampler.set_epoch(epoch, start=done)
            for idx, batch in loader:
                loss, extra = backward(_to(batch, device))
                distributed.average_gradients(loss_params, proc)
                grad_norm = clip(params, t.max_grad_norm)
                lr = t.lr * lr_at(step, total, warmup)  # the configured rate this step used (the top layer's)
                if torch.isfinite(loss) and torch.isfinite(grad_norm):
                    optimizer.step()
                    clamp_after_step(loss_fn)  # CLIP: a learnable τ is kept in its bounds on the parameter
                else:  # the step still counts: schedule and data order stay those of the config
                    skip_or_stop(t.on_nonfinite, step + 1, loss, grad_norm, [row_of(i) for i in idx])
                    skipped += 1
                    if main:
                        logger.log({"train/skipped_steps": skipped}, step=step + 1)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, done = step + 1, done + 1
                seen += len(idx) * proc.world
                pairs_per_s = seen / (time.perf_counter() - start)
                loss_value = distributed.mean_over_processes(loss, proc)  # every process's share of the batch
                source_losses.add(idx, loss_value)
                if main and (step % t.log_every == 0 or step == total):
                    logger.log({"train/loss": loss_value, "train/lr": lr,
                                "train/grad_norm": grad_norm.item(), "train/temperature": loss_fn.temperature,
                                "train/margin": loss_fn.margin, "train/pairs_per_s": pairs_per_s,
                                "train/epoch": step / per_epoch if per_epoch else epoch, **extra,
                                **source_losses.flush()}, step=step)
                bar.update(step=step, loss=loss_value, lr=lr, pairs_per_s=pairs_per_s)
                if every_eval and (step % every_eval == 0 or step == total):
                    last = evaluate_and_select(evaluator, model, data, eval_dims, best, step, proc)
                    if main:
                        logger.log({f"eval/{k}": v for k, v in last.items()}, step=step)
                    stopped = best.should_stop
                every, path = t.checkpoint_every, None
                signum = distributed.agreed_signal(stop.signum, proc)  # every process saves at the same step
                if signum or (every is not None and (step == total or stopped or (every and step % every == 0))):
                    path = save_checkpoint()  # rank 0 writes (the weights are the same on every process; fsdp: shards)
                if signum:
                    if main:  # the run folder says how far it got and how to go on
                        record_interrupted(output_dir, redact({
                            "status": "interrupted", **known(time.perf_counter() - start),
                            "signal": signal.Signals(signum).name, "checkpoint": str(path) if path else None}))
                    raise checkpoint.stop_after_signal(signum, step, path)
                if step >= total or stopped:
                    break
            else:
                epoch, done = epoch + 1, 0
    train_seconds = time.perf_counter() - start
    if sharded:  # the whole weights, gathered into rank 0's unsharded copy, which evaluates and saves
        model = fsdp.full_model(trained, plain, proc, device)
    if not main:  # rank 0 evaluates and saves
        distributed.barrier(proc)
        return {"base": {}, "final": {}, "steps": step}
    if skipped:
        log.warning("%d of %d steps skipped: non-finite loss or gradient", skipped, step)
    unbatched = sum(sampler.unbatched_in(e) for e in range(epoch + 1))  # the epochs this run's steps came from
    if unbatched:
        log.warning("%d rows (summed over %d epochs) were in no batch: they could not be batched without "
                    "repeating a text in a batch of at least train.min_batch_size (summary.json: unbatched_rows)",
                    unbatched, epoch + 1)

    # -- final metrics, model, summary
    if stopped:
        log.info("early stopping after step %d: %d evaluations without a better %s", step, best.since_best, best.metric)
    evaluation_stopped = False
    try:
        if best.evaluations and last is None:  # resumed at the last step: evaluate the last model again
            last = finite_or_missing(evaluator(model, data, eval_dims))
        if best.evaluations:  # evaluated during training: the saved model is the best (eval.keep=best) or the last
            final = best.metrics if best.restore(model) else last
        else:
            final = finite_or_missing(evaluator(model, data, eval_dims)) if evaluator.after else {}
    except KeyboardInterrupt:  # Ctrl-C after the last step: keep what was trained
        evaluation_stopped, final = True, {}
        log.warning("Ctrl-C during the final evaluation: the trained model is saved unevaluated (%s); score it "
                    "with embtune-eval model.name_or_path=%s", "the last step's weights" if best.evaluations
                    else "training was complete", output_dir / "model")
    if model.token_cache is not None:
        model.token_cache.save()
    if final and not best.evaluations:  # evaluations during training are logged at their steps
        logger.log({f"eval/{k}": v for k, v in final.items()}, step=step)
    save(model, output_dir / "model", matryoshka_dims=eval_dims if cfg.matryoshka.dims else None, config=saved_config)
    summary = redact({"status": "completed", **known(train_seconds), "final": final, "unbatched_rows": unbatched,
                      **({"selection": best.summary(), "last": last} if best.evaluations else {}),
                      **({"final_evaluation": "stopped by SIGINT"} if evaluation_stopped else {})})
    write_json(output_dir / "summary.json", summary)  # whole or absent: sweeps read it as "done"; replaces "interrupted"
    pooling_name = type(model.pooling).__name__ if model.pooling is not None else None  # the inherited one too
    card = model_card(summary, saved_config, pooling_name, model.normalize, typed_overrides())
    (output_dir / "model" / "README.md").write_text(card, encoding="utf-8")
    if not t.get("keep_checkpoint", False):  # completed: model/ holds the weights; the optimiser state is ~2x them
        shutil.rmtree(output_dir / checkpoint.FOLDER, ignore_errors=True)
    logger.summary(summary)
    if evaluation_stopped:
        raise SystemExit(128 + signal.SIGINT)
    if base or final:
        print_comparison(base, final)
    distributed.barrier(proc)
    return summary
