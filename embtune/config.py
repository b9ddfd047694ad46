"""A run's config: where it lives, how a group is built, and every pre-flight check that can be judged
before any model loads.

A clash between options is named by both options; a setting that would train nothing names its key.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig

from embtune.eval.evaluators import Retrieval
from embtune.model import builds_multi_vector
from embtune.model.cross_encoder import check_distillation
from embtune.objectives.matryoshka import matryoshka_dims

# conf/ beside the package in a source checkout; the packaged copy in an installed wheel.
_REPO_CONF = Path(__file__).resolve().parents[1] / "conf"
CONFIG_PATH = str(_REPO_CONF) if (_REPO_CONF / "config.yaml").is_file() else "pkg://embtune.conf"


def check_run(cfg: DictConfig, data_format, negatives, loss_fn, evaluator, teacher) -> str:
    """Every pre-flight check of one run; returns the loss's input kind (``scores``, ``pair_scores``, ...).

    Raises:
        ValueError: naming the clashing options or the bad key.
    """
    t = cfg.train
    check_compatible(data_format, negatives, loss_fn)
    check_distillation(data_format, negatives, loss_fn, teacher)
    kind = getattr(loss_fn, "input_kind", "scores")
    check_train_settings(t, kind, negatives, loss_fn)
    matryoshka_dims(cfg.matryoshka.dims, cfg.matryoshka.weights, size=10**9)  # the model's size: once it loads
    check_multi_vector(cfg.model, kind, negatives, cfg.matryoshka.dims, evaluator)
    if t.grad_cache and builds_multi_vector(cfg.model):
        raise ValueError("train.grad_cache=true with model=multi_vector: GradCache caches one vector per text, "
                         "not token vectors; train a multi-vector model without grad_cache")
    return kind


def check_multi_vector(model_cfg, kind: str, negatives, matryoshka_dims, evaluator) -> None:
    """Refuse, before the model loads, what a multi-vector model cannot do (yet).

    Raises:
        ValueError: a loss over pairs/lists/classes instead of candidates, negatives other than
            ``in_batch``/``hard``, Matryoshka dims, an evaluation other than retrieval, or a dim < 1.
    """
    if not builds_multi_vector(model_cfg):
        return
    if kind != "scores":
        raise ValueError(f"model=multi_vector trains with losses over candidates (info_nce, hinge, ...); "
                         f"this loss takes {kind} examples")
    if negatives.name not in ("in_batch", "hard"):
        raise ValueError(f"model=multi_vector supports negatives=in_batch and hard, not {negatives.name}")
    if matryoshka_dims:
        raise ValueError("model=multi_vector with matryoshka.dims: Matryoshka token vectors are not "
                         "supported; use matryoshka=off")
    if not isinstance(evaluator, Retrieval):
        raise ValueError("model=multi_vector is evaluated by MaxSim retrieval (eval=retrieval) only")
    if model_cfg.get("multi_vector_dim", 1) < 1:
        raise ValueError(f"model.multi_vector_dim must be >= 1, got {model_cfg.multi_vector_dim}")


def check_compatible(data_format, negatives, loss) -> None:
    """Fail early, naming the options that clash, when the data cannot feed the loss or the negatives.

    A loss takes one kind of example (``loss.input_kind``); a format gives one (``data_format.kind``).
    Pair data also feeds classification losses (each pair a class).

    Raises:
        ValueError: e.g. ``negatives=hard`` with ``data_format=pairwise`` (which has no negatives), or
            ``loss=cosent`` (scored pairs) with ``data_format=triplet``.
    """
    kind = getattr(loss, "input_kind", "scores")
    gives = {data_format.kind} | ({"embeddings", "teacher_scores"} if data_format.kind == "scores" else set())
    if kind not in gives:
        raise ValueError(f"loss={loss.name} takes {kind} examples, but data_format={data_format.name} gives "
                         f"{data_format.kind} examples: pick a data_format that matches the loss (see README)")
    if getattr(negatives, "needs_negatives", False) and kind not in ("scores", "teacher_scores"):
        raise ValueError(f"negatives={negatives.name} only applies to losses over candidates, not loss={loss.name}")
    if getattr(data_format, "has_negatives", False):
        return
    for group, part in (("negatives", negatives), ("loss", loss)):
        if getattr(part, "needs_negatives", False):
            instead = "negatives=in_batch" if group == "negatives" else "a loss that needs no negatives"
            raise ValueError(
                f"{group}={part.name} needs negatives in each example, but data_format={data_format.name} "
                f"has none: use data_format=triplet or multi_negative, or {instead}")


def check_train_settings(t: DictConfig, kind: str, negatives, loss_fn=None) -> None:
    """Settings that would train nothing or loop forever, refused before any model loads.

    Raises:
        ValueError: naming the key, e.g. ``train.batch_size=1`` with in-batch negatives only.
    """
    if t.max_steps is not None and t.max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1 or null (then train.epochs decides), got {t.max_steps}")
    if t.max_steps is None and t.epochs < 1:
        raise ValueError(f"train.epochs must be >= 1 when train.max_steps is null, got {t.epochs}")
    if t.on_nonfinite not in ("skip", "stop"):
        raise ValueError(f"train.on_nonfinite must be skip or stop, got {t.on_nonfinite!r}")
    if t.checkpoint_every is not None and t.checkpoint_every < 0:
        raise ValueError(f"train.checkpoint_every must be >= 0 (0: only at the end) or null (never), got "
                         f"{t.checkpoint_every}")
    if t.grad_cache and getattr(loss_fn, "same_text_positive", False):
        raise ValueError(f"train.grad_cache=true with loss={loss_fn.name}: the anchor's two passes need two dropout "
                         "masks, but GradCache encodes each column once; train this loss without grad_cache")
    if t.grad_cache and t.mini_batch_size < 1:
        raise ValueError(f"train.mini_batch_size must be >= 1 with train.grad_cache=true, got {t.mini_batch_size}")
    if kind == "scores" and not negatives.needs_negatives and t.batch_size < 2:
        raise ValueError(f"train.batch_size={t.batch_size} with negatives={negatives.name}: a batch of one has no "
                         "in-batch negative, so the loss is 0 and nothing is learned; use a batch of 2 or more")


def build(cfg: DictConfig, group: str):
    """``instantiate(cfg[group])``, but a loader's own error (naming file, row, field) is raised as it is,
    not wrapped in Hydra's InstantiationException.

    Raises:
        ValueError: a ``bool`` parameter set to anything but true/false (``loss.symmetric=maybe`` would
            otherwise count as true), named as ``group.key``.
    """
    node = cfg[group]
    if node.get("_target_"):
        params = inspect.signature(get_object(node._target_)).parameters
        for key, value in node.items():
            if key in params and params[key].annotation in (bool, "bool") and not isinstance(value, bool):
                raise ValueError(f"{group}.{key} must be true or false, got {value!r}")
    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError, TypeError)):
            raise e.__cause__ from None
        raise
