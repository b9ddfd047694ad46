"""The model card: a ``README.md`` for a saved model folder, in the layout of sentence-transformers' cards
(YAML front matter with ``base_model``, ``library_name``, ``tags``; then what was trained, on what, how,
the base -> final metrics, the command that reproduces it, the library versions and how to use it).

:func:`model_card` is pure: it reads a run's summary and its resolved config (plain dicts) and returns the
text; the training loop writes it into ``RUN_DIR/model/README.md``.
"""

from __future__ import annotations

import re
import shlex
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path

from embtune.config import CONFIG_PATH
from embtune.model.io import builds_multi_vector
from embtune.model.resolve import hub_id
from embtune.run.hub import CARD_MODEL_PATH  # the repo id once pushed

_LIBRARIES = ("embtune", "torch", "transformers", "sentence-transformers", "datasets")
_TRAIN_KEYS = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
               "seed", "grad_cache", "bf16")


def _option(group: str, target: str | None) -> str | None:
    """The option of config group ``group`` whose file builds ``target`` (``embtune.losses.InfoNCE`` ->
    ``info_nce``), or the target's last name when no option file does."""
    if not target:
        return None
    conf = files("embtune.conf") if CONFIG_PATH.startswith("pkg://") else Path(CONFIG_PATH)
    for file in sorted((f for f in (conf / group).iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name):
        if re.search(rf"^_target_:\s*{re.escape(target)}\s*$", file.read_text(encoding="utf-8"), re.M):
            return file.name.removesuffix(".yaml")
    return target.rsplit(".", 1)[-1]


def _versions() -> dict[str, str]:
    out = {}
    for lib in _LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            continue
    return out


def _metrics_table(base: dict, final: dict) -> list[str]:
    names = sorted(set(base) | set(final), key=lambda k: (k.count("/"), k))
    if not names:
        return ["No evaluation was run (no test set, or `eval.after=false`)."]
    rows = ["| metric | base | final |", "|---|---|---|"]
    for k in names:
        cell = [f"{d[k]:.4f}" if isinstance(d.get(k), (int, float)) else "–" for d in (base, final)]
        rows.append(f"| {k} | {cell[0]} | {cell[1]} |")
    return rows


def typed_overrides() -> list[str] | None:
    """The overrides typed for this job (Hydra's ``overrides.task``, a sweep job's own values included),
    secrets masked and ``hub.*`` left out; a resumed job gives those of the run it continues (that run's
    ``.hydra/overrides.yaml``). None outside a Hydra job or when they cannot be read."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return reproducing(list(HydraConfig.get().overrides.task))


def reproducing(task: list[str]) -> list[str] | None:
    """:func:`typed_overrides` of a job typed as ``task``."""
    import yaml

    from embtune.run.redact import redact_text

    resumed = [o.split("=", 1)[1] for o in task if o.lstrip("+~").startswith("resume_from=")]
    if resumed:  # resume_from=RUN_DIR or RUN_DIR/checkpoints/FILE: the continued run's own overrides
        path = Path(resumed[0]).expanduser()
        first = (path if path.is_dir() else path.parent.parent) / ".hydra" / "overrides.yaml"
        task = yaml.safe_load(first.read_text(encoding="utf-8")) if first.is_file() else None
        if not isinstance(task, list):
            return None
    # hub.*: where the model was uploaded, not how it was trained; rerunning the card's command must not push
    return [redact_text(str(o)) for o in task
            if not str(o).lstrip("+~").startswith(("hub.", "hub=", "resume_from="))]


def _command(config: dict, overrides: list[str] | None = None) -> str:
    """The ``embtune`` command that reproduces the run: the typed ``overrides`` when known (they compose
    exactly this config, every stage of a recipe included); else one rebuilt from the chosen options and
    the key values."""
    if overrides is not None:
        return " \\\n  ".join(["embtune", *(shlex.quote(o) for o in overrides)]) if overrides else "embtune"
    parts = ["python -m embtune.cli"]
    model, data = config.get("model", {}), config.get("data", {})
    parts.append(f"model.name_or_path={model.get('name_or_path')}")
    for group in ("data", "data_format", "loss", "negatives"):
        option = _option(group, config.get(group, {}).get("_target_"))
        if option:
            parts.append(f"{group}={option}")
    for key in ("path", "name", "subset", "test_path", "max_train_pairs"):
        if data.get(key) is not None:
            parts.append(f"data.{key}={data[key]}")
    for key, value in config.get("data_format", {}).items():
        if key != "_target_" and value is not None:
            parts.append(f"data_format.{key}={value}")
    for key in ("temperature", "margin"):
        if config.get("loss", {}).get(key) is not None:
            parts.append(f"loss.{key}={config['loss'][key]}")
    if (config.get("matryoshka") or {}).get("dims"):
        parts.append("matryoshka=on")
    train = config.get("train", {})
    parts += [f"train.{k}={train[k]}" for k in _TRAIN_KEYS if train.get(k) is not None]
    return " \\\n  ".join(parts)


def _usage(multi_vector: bool) -> list[str]:
    """The card's usage snippets: embtune for every model; sentence-transformers for single-vector models only
    (``SentenceTransformer(path).encode`` of a multi-vector folder has no ``sentence_embedding`` and raises).
    The multi-vector folder is not in PyLate's layout (no ``[Q]``/``[D]`` marker tokens, no PyLate config),
    so no PyLate snippet."""
    load = ["```python", "import embtune", "", f'model = embtune.load("{CARD_MODEL_PATH}")']
    if multi_vector:
        return [*load, "from embtune.objectives.maxsim import search_maxsim", "",
                'queries = model.encode(["A query"], kind="query")  # TokenVectors: one vector per token',
                'docs = model.encode(["A document", "Another document"], kind="document")',
                "scores, indices = search_maxsim(queries, docs, k=2)  # exact MaxSim, best first", "```", "",
                "Token vectors need MaxSim scoring: `SentenceTransformer(...).encode` gives no sentence embedding "
                "for this folder.", ""]
    return [*load, 'embeddings = model.encode(["A query", "A document"])', "```", "", "```python",
            "from sentence_transformers import SentenceTransformer", "",
            f'model = SentenceTransformer("{CARD_MODEL_PATH}")', 'embeddings = model.encode(["A query", "A document"])',
            "```", ""]


def model_card(summary: dict, config: dict, pooling: str | None = None, normalize: bool | None = None,
               overrides: list[str] | None = None) -> str:
    """The README.md text of a model trained by embtune.

    Args:
        summary: the run's ``summary.json`` content (``base``, ``final``, ``steps``, ``temperature``,
            ``margin``, ``data`` with ``name``, ``train_rows``, ``fingerprint``, ``examples``).
        config: the run's resolved config as plain containers (``OmegaConf.to_container(cfg, resolve=True)``).
        pooling, normalize: what the saved model uses (inherited from the starting model when the config
            left them null, ``pooling=auto``); None reads them from the config.
        overrides: the command-line overrides of the run (:func:`typed_overrides`) for the "Reproduce"
            command; None rebuilds one from ``config``.

    Returns:
        Markdown with YAML front matter (``base_model`` only when the hub id is known). A multi-vector model
        (``model=multi_vector``) is described as late interaction scored by MaxSim (Khattab & Zaharia 2020,
        ColBERT) with its token-vector dimension, without a pooling line or a sentence-transformers snippet.
    """
    model, data = config.get("model", {}), summary.get("data", {})
    multi_vector = builds_multi_vector(model)
    base_name = str(model.get("name_or_path", "?"))
    hub = hub_id(base_name)
    loss, negatives = config.get("loss", {}), config.get("negatives", {})
    dims = (config.get("matryoshka") or {}).get("dims")
    front = ["---", "library_name: sentence-transformers",
             "tags: [sentence-transformers, sentence-similarity, feature-extraction, embtune"
             + (", ColBERT, late-interaction]" if multi_vector else "]"),
             "pipeline_tag: sentence-similarity"]
    if hub:
        front.append(f"base_model: {hub}")
    front.append("---")
    loss_line = f"`{_option('loss', loss.get('_target_'))}`"
    knobs = [f"temperature τ = {summary['temperature']:g}" if summary.get("temperature") is not None else None,
             f"margin = {summary['margin']:g}" if summary.get("margin") is not None else None]
    knobs = [k for k in knobs if k]
    if knobs:
        loss_line += " (" + ", ".join(knobs) + ")"
    train = config.get("train", {})
    lines = [
        *front, "",
        f"# Fine-tuned {hub or Path(base_name).name}", "",
        *([f"A multi-vector (late-interaction) model fine-tuned with embtune: each text is one "
           f"{model.get('multi_vector_dim')}-dimensional unit vector per token, and a query and a document are "
           "scored by MaxSim, the mean over query tokens of the best dot product with a document token "
           "(Khattab & Zaharia 2020, ColBERT).", ""] if multi_vector
          else ["A sentence-embedding model fine-tuned with embtune.", ""]),
        "## Training", "",
        f"- Base model: {f'[{hub}](https://huggingface.co/{hub})' if hub else f'`{base_name}` (local)'}",
        (f"- Multi-vector (late interaction, MaxSim): token-vector dimension {model.get('multi_vector_dim')}"
         if multi_vector else
         f"- Pooling: `{pooling or _option('pooling', (config.get('pooling') or {}).get('_target_'))}`, "
         f"normalised: {model.get('normalize') if normalize is None else normalize}"),
        f"- Training data: `{data.get('name')}`, {data.get('train_rows')} rows -> {summary.get('examples')} "
        f"examples, fingerprint `{str(data.get('fingerprint', ''))[:16]}`",
        f"- Data format: `{_option('data_format', (config.get('data_format') or {}).get('_target_'))}`",
        f"- Loss: {loss_line}",
        f"- Negatives: `{_option('negatives', negatives.get('_target_'))}`"
        + (f", group size {negatives['group_size']}" if negatives.get("group_size") else ""),
        f"- Matryoshka dimensions: {dims if dims else 'off'}",
        f"- Steps: {summary.get('steps')}; "
        + ", ".join(f"{k} {train[k]}" for k in _TRAIN_KEYS if train.get(k) is not None)
        + (f" (computed in {summary['precision']})" if summary.get("precision") else ""), "",
        "## Evaluation", "", *_metrics_table(summary.get("base") or {}, summary.get("final") or {}), "",
        "## Reproduce", "", "```bash", _command(config, overrides), "```", "",
        "## Library versions", "", *[f"- {k}: {v}" for k, v in _versions().items()], "",
        "## Usage", "", *_usage(multi_vector),
    ]
    return "\n".join(lines)
