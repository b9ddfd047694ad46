"""A run's config: where it lives, how its values are read, how a group is built, and every pre-flight
check that can be judged before any model loads.

A clash between options is named by both options; a setting that would train nothing names its key; a
value of the wrong type names the key, the value and what was expected.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from embtune.eval.evaluators import Retrieval
from embtune.model import builds_multi_vector
from embtune.model.resolve import hub_id
from embtune.objectives import Objective, objective_for
from embtune.objectives.matryoshka import matryoshka_dims

# conf/ beside the package in a source checkout; the packaged copy in an installed wheel.
_REPO_CONF = Path(__file__).resolve().parents[1] / "conf"
CONFIG_PATH = str(_REPO_CONF) if (_REPO_CONF / "config.yaml").is_file() else "pkg://embtune.conf"


# -- values as tools write them ---------------------------------------------------------------------------

# What sweep agents and scripts write for "no value": Hydra reads `null` (any case) itself, not these.
NULL_WORDS = ("none", "null", "~")


class TrainSettings(TypedDict):
    """The types of ``train.*`` (conf/train/default.yaml holds the defaults): the loop reads this node
    itself, so no ``_target_`` signature types it."""

    epochs: int
    max_steps: int | None
    batch_size: int
    no_duplicates: bool
    min_batch_size: int | None
    lr: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    layerwise_lr_decay: float
    seed: int
    device: str
    strategy: Literal["ddp", "fsdp"]
    grad_cache: bool
    mini_batch_size: int
    bf16: bool | Literal["auto"]
    log_every: int
    checkpoint_every: int | None
    keep_checkpoint: bool
    on_nonfinite: Literal["skip", "stop"]
    cache_tokens: bool | Literal["auto"]
    fast_dropout: bool
    early_stopping_patience: int | None


class MatryoshkaSettings(TypedDict):
    """The types of ``matryoshka.*`` (conf/matryoshka/*.yaml)."""

    dims: list[int]
    weights: list[float]


class RecipeSettings(TypedDict):
    """The types of ``recipe.*`` (conf/recipe/*.yaml)."""

    name: str
    rounds: int


class HubSettings(TypedDict):
    """The types of ``hub.*`` (conf/hub/default.yaml; read by :mod:`embtune.run.hub`)."""

    repo_id: str | None
    private: bool
    push: bool


# groups without a _target_, typed here; top-level keys of conf/config.yaml, mine.yaml and evaluate.yaml
SETTINGS: dict[str, type] = {"train": TrainSettings, "matryoshka": MatryoshkaSettings, "recipe": RecipeSettings,
                             "hub": HubSettings}
RUN_KEYS: dict[str, Any] = {"overwrite": bool, "resume_from": str | None, "print_config": bool,
                            "pretrain": dict | None, "output": str | None, "device": str, "seed": int}


def normalize(cfg: DictConfig) -> DictConfig:
    """Read a composed config's values as sweep agents and scripts write them, once, before anything is
    built; changes ``cfg`` in place and returns it.

    - ``None``, ``none``, ``null`` and ``~`` (as strings: ``key=None``) are null for every option that may
      be null: its type admits None, its default is None, or it is a prompt (null: no prompt).
    - Every option whose type is known is checked: from the annotation (else the default) of its
      ``_target_``'s parameter, from ``SETTINGS`` (:class:`TrainSettings`, ...), or from ``RUN_KEYS``. An integer-valued float is taken as an integer and a number as a string where one
      belongs; nothing else is converted.
    - Prompts (``model.*_prompt``, ``model.prompts.*``) turn the two-character escapes ``\\n`` and ``\\t``
      into a newline and a tab: a command line cannot type a newline.

    ``pretrain.*`` (a stage-1 overlay) is read like the run's own groups; ``hydra`` and keys of unknown
    type are left as they are.

    Raises:
        ValueError: one line naming the key, the value and what was expected, e.g.
            ``train.max_steps must be an integer or null, got 'ten'``.
    """
    for key in list(cfg):
        if key == "hydra" or OmegaConf.is_missing(cfg, key) or OmegaConf.is_interpolation(cfg, key):
            continue
        value = cfg[key]
        if isinstance(value, DictConfig):
            if key == "pretrain":
                for part in list(value):
                    if isinstance(value[part], DictConfig):
                        normalize_node(value[part], f"pretrain.{part}", group=part)
            else:
                normalize_node(value, key)
        elif key in RUN_KEYS:
            cfg[key] = _read(key, value, RUN_KEYS[key], inspect.Parameter.empty)
    return cfg


def normalize_node(node: DictConfig, path: str, group: str | None = None) -> DictConfig:
    """:func:`normalize` for one group's node (``path``: its name in messages; ``group``: the group whose
    types apply, ``path`` by default)."""
    group = group or path
    if node is None:  # a group chosen as null (pooling=auto, teacher: null): nothing to read
        return node
    if node.get("_target_"):
        types_of = _parameter_types(node._target_)
    elif group in SETTINGS:
        types_of = {k: (t, inspect.Parameter.empty) for k, t in typing.get_type_hints(SETTINGS[group]).items()}
    else:
        return node
    for key in list(node):
        if str(key).startswith("_") or OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        prompt = group == "model" and (str(key).endswith("_prompt") or key == "prompts")
        if key in types_of:
            annotation, default = types_of[key]
            value = _read(f"{path}.{key}", value, annotation, default, nullable=prompt)
        elif prompt and isinstance(value, str) and value.strip().lower() in NULL_WORDS:
            value = None
        if prompt:
            value = _unescape(value)
        if value is not node[key] and not isinstance(value, (DictConfig, ListConfig)):
            node[key] = value
        if isinstance(value, ListConfig):  # nodes in a list (data=mixture's sources) are read as their targets'
            for j, item in enumerate(value):
                if isinstance(item, DictConfig) and item.get("_target_"):
                    normalize_node(item, f"{path}.{key}[{j}]", group=f"{group}.{key}")
    return node


def _parameter_types(target: str) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default) of the parameters of ``target`` (a class: its ``__init__``)."""
    obj = get_object(target)
    try:
        params = inspect.signature(obj, eval_str=True).parameters
    except Exception:  # an annotation naming something not importable here: read each one alone
        params = inspect.signature(obj).parameters
    names = vars(sys.modules.get(getattr(obj, "__module__", ""), typing))
    out = {}
    for name, p in params.items():
        annotation = p.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, dict(names))  # the signature's own annotation text
            except Exception:
                annotation = inspect.Parameter.empty
        out[name] = (annotation, p.default)
    return out


def _members(annotation) -> list:
    """The alternatives of an annotation: ``int | None`` -> [int, NoneType]; [] when unknown or Any."""
    if annotation in (inspect.Parameter.empty, Any):
        return []
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _read(key: str, value, annotation, default, nullable: bool = False):
    """``value`` as the option ``key`` of type ``annotation`` (default ``default``) takes it."""
    options = _members(annotation)
    if not options and default not in (inspect.Parameter.empty, None):
        options = [type(default)]  # unannotated: the default's type
    nullable = nullable or default is None or type(None) in options or None in options
    options = [o for o in options if o not in (type(None), None)]
    if isinstance(value, str) and value.strip().lower() in NULL_WORDS and (nullable or options):
        if not nullable:
            raise ValueError(f"{key} cannot be null; it must be {_describe(options)}, got {value!r}")
        return None
    if value is None:
        if nullable or not options:
            return None
        raise ValueError(f"{key} cannot be null; it must be {_describe(options)}")
    if not options:
        return value
    for option in options:
        ok, read = _fits(value, option)
        if ok:
            return read
    shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    raise ValueError(f"{key} must be {_describe(options, nullable)}, got {shown!r}")


def _fits(value, option) -> tuple[bool, Any]:
    """Whether ``value`` is of type ``option``, and the value to keep (an int for an integral float...)."""
    origin, args = typing.get_origin(option) or option, typing.get_args(option)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is bool:
        return isinstance(value, bool), value
    if origin is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return number and isinstance(value, int), value
    if origin is float:
        return number, value
    if origin in (str, Path):
        return isinstance(value, str) or number, str(value) if number else value
    if origin is Literal:
        return value in args, value
    if origin in (list, tuple, Sequence) or (isinstance(origin, type) and issubclass(origin, Sequence)
                                             and origin is not str):
        if not isinstance(value, (ListConfig, list, tuple)):
            return False, value
        items = _members(args[0]) if args else []
        return (all(any(_fits(x, m)[0] for m in items) for x in value) if items else True), value
    if origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
        return isinstance(value, (DictConfig, dict)), value
    return True, value  # a class the config cannot hold (nn.Module, ...): built by the code, not checked


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings", Path: "paths"}


def _describe(options: list, nullable: bool = False) -> str:
    words = []
    for option in options:
        origin, args = typing.get_origin(option) or option, typing.get_args(option)
        if origin is Literal:  # spelled as the config writes them: auto, false, null (not 'auto', False, None)
            words.append(" or ".join(yaml_word(a) for a in args))
        elif origin in _WORDS:
            words.append(_WORDS[origin])
        elif origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
            words.append("a mapping ({key: value, ...})")
        elif isinstance(origin, type) and issubclass(origin, Sequence):
            items = [_PLURALS.get(typing.get_origin(m) or m) for m in (_members(args[0]) if args else [])]
            words.append(f"a list of {' or '.join(items)}" if items and all(items) else "a list ([a, b, ...])")
        else:
            words.append(getattr(option, "__name__", str(option)))
    return " or ".join(dict.fromkeys(words + (["null"] if nullable else [])))


def yaml_word(value) -> str:
    """``value`` as a YAML config or a command line writes it: ``true``, ``false``, ``null``, a bare string."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def _unescape(value):
    """``\\n`` -> newline and ``\\t`` -> tab, in a string or a mapping's strings. No other escape, so
    reading twice changes nothing (a run's stored config is read again on resume)."""
    if isinstance(value, str):
        return value.replace("\\n", "\n").replace("\\t", "\t")
    if isinstance(value, DictConfig):
        for k in list(value):
            if isinstance(value[k], str):
                value[k] = _unescape(value[k])
    return value


# -- pre-flight checks ------------------------------------------------------------------------------------

def check_run(cfg: DictConfig, data_format, negatives, loss_fn, evaluator, teacher, where: str | None = None) -> Objective:
    """Every pre-flight check of one run; returns the objective that trains it
    (:func:`embtune.objectives.objective_for`). Starts with :func:`normalize` (nothing is built from the
    groups it reads here on: model, train). ``where`` names whose ``data_format`` this is (a mixture's
    source, ``data.sources[0] (name)``) in the format's errors.

    Raises:
        ValueError: naming the clashing options or the bad key.
    """
    normalize(cfg)
    t = cfg.train
    objective = objective_for(loss_fn, negatives, multi_vector=builds_multi_vector(cfg.model))
    try:
        check_compatible(data_format, negatives, loss_fn, objective)
        objective.check(data_format, teacher)
    except ValueError as e:
        if where is None:
            raise
        raise ValueError(f"{where}: {e}") from e
    check_train_settings(t, objective, negatives, loss_fn)
    matryoshka_dims(cfg.matryoshka.dims, cfg.matryoshka.weights, size=10**9)  # the model's size: once it loads
    check_multi_vector(cfg.model, negatives, cfg.matryoshka.dims, evaluator)
    if t.grad_cache and builds_multi_vector(cfg.model):
        raise ValueError("train.grad_cache=true with model=multi_vector: GradCache caches one vector per text, "
                         "not token vectors; train a multi-vector model without grad_cache")
    check_strategy(t, cfg.model, evaluator)
    if cfg.data.get("streaming"):
        check_streaming(t, data_format, objective, teacher)
    if cfg.matryoshka.dims and not objective.matryoshka:
        raise ValueError(f"matryoshka.dims with loss={loss_fn.name}: its class centres are full-size, so no loss "
                         "is taken at the smaller dims and the saved model would claim dims it was not trained at; "
                         "use matryoshka=off")
    return objective


def check_streaming(t: DictConfig, data_format, objective: Objective, teacher) -> None:
    """Refuse, before the model loads, what a stream (``data.streaming=true``, :mod:`embtune.data.streaming`)
    cannot do: what needs a known number of rows or every example before step 1. The loader refuses its own
    options (``data.max_train_pairs``, ``data.dev_queries``); :func:`embtune.recipes.run` other recipes.

    Raises:
        ValueError: one message naming every clash: ``train.max_steps=null`` (no epoch length: the schedule
            needs the steps), ``train.cache_tokens=true`` (it keeps every text's token ids), a teacher (it scores
            every example first), a loss that builds classes across rows (``loss=arcface``), one that plans the
            rows of a query into one batch (``loss=multi_label_softmax``), ``data_format=raw_texts`` (every
            distinct text once).
    """
    clashes = []
    if t.max_steps is None:
        clashes.append("train.max_steps=null (a stream has no known length, and the learning-rate schedule needs "
                       "the number of steps: set train.max_steps=N)")
    if t.cache_tokens is True:
        clashes.append("train.cache_tokens=true (it keeps every text's token ids, in memory and in $EMBTUNE_CACHE: "
                       "leave it at auto, which is off for a stream)")
    if teacher is not None:
        clashes.append("teacher (it scores every example before step 1: drop teacher=, or stream a file that holds "
                       "the teacher's scores, data_format.positive_scores/negative_scores)")
    loss = objective.loss_fn.name
    if not objective.per_example:
        clashes.append(f"loss={loss} (it builds classes across all rows before step 1)")
    if objective.group_field is not None:
        clashes.append(f"loss={loss} (it plans every row of one {objective.group_field} into one batch, which needs "
                       "all of them up front)")
    if getattr(data_format, "name", None) == "raw_texts":
        clashes.append("data_format=raw_texts (it keeps every distinct text once, which needs every text seen)")
    if clashes:
        raise ValueError("data.streaming=true cannot work with " + "; ".join(clashes))


def check_model_folder(model_cfg) -> None:
    """A model named by a local path (``model.name_or_path``) must be a folder: refused before the data is read.
    A hub name is looked up when the model loads (the cache, the bundled copy, the hub:
    :func:`embtune.model.resolve_model_path`).

    Raises:
        FileNotFoundError: a local path that is not a folder, e.g. ``model.name_or_path='/no/such/folder': no
            such folder``.
    """
    name = model_cfg.get("name_or_path")
    if isinstance(name, str) and hub_id(name) is None and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"model.name_or_path={name!r}: no such folder (a model is a local folder or a "
                                "hub name)")


def check_strategy(t: DictConfig, model_cfg, evaluator) -> None:
    """Refuse, before the model loads, what ``train.strategy=fsdp`` (``embtune.training.fsdp``) cannot do.

    Raises:
        ValueError: a strategy other than ddp/fsdp; with fsdp, evaluation during training
            (``eval.every_steps``: rank 0 alone would evaluate a model whose weights are spread over every
            process) or ``model=multi_vector`` (its token vectors and projection are not wired for sharding).
    """
    strategy = t.get("strategy", "ddp")
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"train.strategy must be ddp or fsdp, got {strategy!r}")
    if strategy != "fsdp":
        return
    if evaluator.every_steps:
        raise ValueError(f"train.strategy=fsdp with eval.every_steps={evaluator.every_steps}: rank 0 evaluates alone, "
                         "but each process holds only a shard of the weights; evaluate after training "
                         "(eval.every_steps=null) or use train.strategy=ddp")
    if builds_multi_vector(model_cfg):
        raise ValueError("train.strategy=fsdp with model=multi_vector: sharding a multi-vector model is not "
                         "supported; use train.strategy=ddp")


def check_multi_vector(model_cfg, negatives, matryoshka_dims, evaluator) -> None:
    """Refuse, before the model loads, what a multi-vector model cannot do (yet); a loss that is not over
    candidates is refused by :func:`embtune.objectives.objective_for`.

    Raises:
        ValueError: negatives other than ``in_batch``/``hard``, cross-device negatives, Matryoshka dims, an
            evaluation other than exact retrieval, or a dim < 1.
    """
    if not builds_multi_vector(model_cfg):
        return
    if negatives.name not in ("in_batch", "hard"):
        raise ValueError(f"model=multi_vector supports negatives=in_batch and hard, not {negatives.name}")
    if getattr(negatives, "cross_device", False):
        raise ValueError("model=multi_vector with negatives.cross_device=true: token vectors are not gathered "
                         "across processes, so each process would score its own candidates only; use "
                         "negatives.cross_device=false")
    if matryoshka_dims:
        raise ValueError("model=multi_vector with matryoshka.dims: Matryoshka token vectors are not "
                         "supported; use matryoshka=off")
    if not isinstance(evaluator, Retrieval):
        raise ValueError("model=multi_vector is evaluated by MaxSim retrieval (eval=retrieval) only")
    if evaluator.index != "flat":
        raise ValueError(f"model=multi_vector with eval.index={evaluator.index}: MaxSim is searched exactly; use "
                         "eval.index=flat")
    if model_cfg.get("multi_vector_dim", 1) < 1:
        raise ValueError(f"model.multi_vector_dim must be >= 1, got {model_cfg.multi_vector_dim}")


def check_compatible(data_format, negatives, loss, objective: Objective | None = None) -> None:
    """Fail early, naming the options that clash, when the data cannot feed the loss or the negatives.

    A loss takes one kind of example (``loss.input_kind``); a format gives one (``data_format.kind``);
    the loss's objective (``objective``, else :func:`embtune.objectives.objective_for`) says which formats
    feed it (pair data also feeds classification losses: each pair a class).

    Raises:
        ValueError: e.g. ``negatives=hard`` with ``data_format=pairwise`` (which has no negatives), or
            ``loss=cosent`` (scored pairs) with ``data_format=triplet``.
    """
    objective = objective or objective_for(loss, negatives)
    if not objective.accepts(data_format):
        raise ValueError(f"loss={loss.name} takes {getattr(loss, 'input_kind', 'scores')} examples, but "
                         f"data_format={data_format.name} gives {data_format.kind} examples: pick a data_format "
                         "that matches the loss (see README)")
    if getattr(negatives, "needs_negatives", False) and not objective.candidates:
        raise ValueError(f"negatives={negatives.name} only applies to losses over candidates, not loss={loss.name}")
    if getattr(data_format, "has_negatives", False):
        return
    for group, part in (("negatives", negatives), ("loss", loss)):
        if getattr(part, "needs_negatives", False):
            instead = "negatives=in_batch" if group == "negatives" else "a loss that needs no negatives"
            raise ValueError(
                f"{group}={part.name} needs negatives in each example, but data_format={data_format.name} "
                f"has none: use data_format=triplet or multi_negative, or {instead}")


def check_train_settings(t: DictConfig, objective: Objective, negatives, loss_fn=None) -> None:
    """Settings that would train nothing or loop forever, refused before any model loads.

    Raises:
        ValueError: naming the key, e.g. ``train.batch_size=1`` with in-batch negatives only.
    """
    if t.max_steps is not None and t.max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1 or null (then train.epochs decides), got {t.max_steps}")
    if t.max_steps is None and t.epochs < 1:
        raise ValueError(f"train.epochs must be >= 1 when train.max_steps is null, got {t.epochs}")
    # normalize() has made these numbers (TrainSettings); only their ranges are left to check
    if t.lr <= 0:
        raise ValueError(f"train.lr must be a number > 0 (the peak learning rate), got {t.lr!r}")
    if t.weight_decay < 0:
        raise ValueError(f"train.weight_decay must be a number >= 0, got {t.weight_decay!r}")
    if not 0 <= t.warmup_ratio <= 1:
        raise ValueError(f"train.warmup_ratio must be in [0, 1] (the fraction of steps that warm up), got "
                         f"{t.warmup_ratio!r}")
    if t.max_grad_norm <= 0:
        raise ValueError(f"train.max_grad_norm must be a number > 0 (the gradient norm clipped to), got "
                         f"{t.max_grad_norm!r}")
    if t.on_nonfinite not in ("skip", "stop"):
        raise ValueError(f"train.on_nonfinite must be skip or stop, got {t.on_nonfinite!r}")
    if t.log_every < 1:
        raise ValueError(f"train.log_every must be an integer >= 1 (steps between train/* log lines), got {t.log_every}")
    if t.checkpoint_every is not None and t.checkpoint_every < 0:
        raise ValueError(f"train.checkpoint_every must be >= 0 (0: only at the end) or null (never), got "
                         f"{t.checkpoint_every}")
    if t.grad_cache and getattr(loss_fn, "same_text_positive", False):
        raise ValueError(f"train.grad_cache=true with loss={loss_fn.name}: the anchor's two passes need two dropout "
                         "masks, but GradCache encodes each column once; train this loss without grad_cache")
    if t.batch_size < 1:
        raise ValueError(f"train.batch_size must be an integer >= 1 (examples per step and process), got {t.batch_size}")
    floor = t.get("min_batch_size")
    if floor is not None and not 1 <= floor <= t.batch_size:
        raise ValueError(f"train.min_batch_size must be in 1..train.batch_size ({t.batch_size}) or null, got {floor}")
    if t.grad_cache and t.mini_batch_size < 1:
        raise ValueError(f"train.mini_batch_size must be >= 1 with train.grad_cache=true, got {t.mini_batch_size}")
    if objective.in_batch and not negatives.needs_negatives and t.batch_size < 2:
        raise ValueError(f"train.batch_size={t.batch_size} with negatives={negatives.name}: a batch of one has no "
                         "in-batch negative, so the loss is 0 and nothing is learned; use a batch of 2 or more")


def build(cfg: DictConfig, group: str):
    """``instantiate(cfg[group])`` after :func:`normalize_node` (null words, types, prompt escapes), and
    a loader's own error (naming file, row, field) is raised as it is, not wrapped in Hydra's
    InstantiationException.

    Raises:
        ValueError: a value not of its parameter's type, named as ``group.key`` (``loss.symmetric=maybe``
            would otherwise count as true, ``loss.temperature=warm`` fail deep inside the loss).
    """
    node = normalize_node(cfg[group], group)
    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError, TypeError)):
            raise e.__cause__ from None
        raise
