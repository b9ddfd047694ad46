"""README.md and docs/*.md: the README stays a quick start, every experiment in conf/experiment/ composes and
builds, every command the docs show composes (a sweep: its first value), and some of them run end to end,
shrunk to a few steps on a tiny model.

Commands are read from fenced code blocks and from inline code spans that start with ``embtune``; a shown
``<date_time>`` stands for a run folder's name. Paths under ``../shared/data`` are relative to the
repository root, where embtune runs.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
from conftest import CONF, DATA, REPO
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from embtune.config import build, check_compatible, check_run
from embtune.data import MultiNegative

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# the config each command composes (embtune-eval: the new evaluation-only command)
CONFIG_OF = {"embtune": "config", "embtune-mine": "mine", "embtune-eval": "evaluate"}
# names that land with the layout change; a command or experiment using one is an expected failure until then
PENDING: list[tuple[re.Pattern, str]] = []  # (pattern, reason): shown commands waiting on a feature; none now
# shown commands that run end to end in the fast suite (shrunk); every experiment runs in the slow one
# (experiment=scifact encodes all 5,183 SciFact abstracts to evaluate, even on the tiny model: slow)
FAST_RUNS = ["embtune experiment=stsb_cosent",
             "embtune data=jsonl data.path=../shared/data/triplets/flagembedding_nq_example.jsonl "
             "data_format=multi_negative data_format.positive_scores=pos_scores "
             "data_format.negative_scores=neg_scores negatives=hard negatives.group_size=8 loss=margin_mse",
             "embtune data=jsonl data.path=../shared/data/triplets/snli_dev_triplets.jsonl data.streaming=true "
             "train.max_steps=200 data_format=triplet negatives=hard"]
RUN_FOLDER = "2000-01-01_00-00-00"  # stands for <date_time>


# -- reading the docs


def _logical_lines(block: str) -> list[str]:
    """A code block's lines with backslash continuations joined."""
    out, buf = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((buf + line).strip())
        buf = ""
    return out


def _command(text: str) -> str | None:
    """``text`` as one space-separated command when it runs embtune, else None (comments dropped)."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return None
    if not words:
        return None
    if words[0] == "torchrun" and "embtune.cli" in words:  # torchrun [its flags] -m embtune.cli OVERRIDES
        words = ["embtune", *words[words.index("embtune.cli") + 1:]]
    elif words[:3] == ["python", "-m", "embtune.cli"]:
        words = ["embtune", *words[3:]]
    elif words[0] not in (*CONFIG_OF, "embtune-report"):
        return None
    return shlex.join(words)


def shown_commands() -> list[tuple[str, str]]:
    """``(file name, command)`` for every embtune command in README.md and docs/*.md, each once."""
    found: dict[str, str] = {}
    for path in DOC_FILES:
        text = path.read_text()
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
            for line in _logical_lines(block):
                cmd = _command(line)
                if cmd:
                    found.setdefault(cmd, path.name)
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for span in re.findall(r"`([^`\n]+)`", prose):
            if re.match(r"embtune(-\w+)?( |$)", span):
                cmd = _command(span)
                if cmd:
                    found.setdefault(cmd, path.name)
    return [(name, cmd) for cmd, name in found.items()]


def _pending(text: str, follow: bool = True) -> str | None:
    """Why ``text`` (a command, or ``experiment=NAME``) cannot work yet, or None."""
    for pattern, reason in PENDING:
        if pattern.search(text):
            return reason
    for name in re.findall(r"\bexperiment=(\w+)", text) if follow else ():
        path = CONF / "experiment" / f"{name}.yaml"
        if path.is_file() and (reason := _pending(path.read_text(), follow=False)):
            return reason
    return None


def _params(items, ids, texts=None):
    """pytest params; one whose text (default: its id) uses a name still to land is an expected failure."""
    return [pytest.param(*item, id=i, marks=[pytest.mark.xfail(strict=False, reason=r)] if (r := _pending(t)) else [])
            for item, i, t in zip(items, ids, texts or ids)]


COMMANDS = shown_commands()


def _split(cmd: str) -> tuple[str, list[str], bool]:
    """``(program, overrides, multirun)`` of a shown command; ``<date_time>`` becomes a folder name."""
    words = shlex.split(cmd.replace("<date_time>", RUN_FOLDER))
    multirun = any(w in ("-m", "--multirun") for w in words[1:])
    return words[0], [w for w in words[1:] if w not in ("-m", "--multirun")], multirun


def _first_values(overrides: list[str]) -> list[str]:
    """A sweep's overrides with each swept key at its first value (what the sweep's job 0 runs)."""
    parser, out = OverridesParser.create(), []
    for text in overrides:
        override = parser.parse_override(text)
        if override.is_sweep_override():
            text = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
        out.append(text)
    return out


def _compose(config_name: str, overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)


def _trained_format(cfg, data_format):
    """The format the loop trains on: mining rounds train on their mined ``multi_negative`` rows."""
    return MultiNegative() if cfg.recipe.name == "mining_rounds" else data_format


# -- README


def test_readme_is_a_quick_start_that_names_the_ci_test_command():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "pip install torch==2.13.0" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^python3? -m pytest\b", ci, flags=re.M) and "python -m pytest\n" in readme


def test_the_docs_show_commands_and_every_experiment():
    """The reader finds every experiment in README or docs/, and the extraction below sees the commands."""
    text = "\n".join(path.read_text() for path in DOC_FILES)
    assert len(COMMANDS) >= 40
    missing = [name for name in EXPERIMENTS if name != "pretrain_finetune" and f"experiment={name}" not in text]
    assert not missing, f"experiments no doc shows: {missing}"



def _anchors(path) -> set[str]:
    """The heading anchors of a Markdown file, as GitHub makes them."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_link_between_the_docs_lands_on_a_file_and_heading():
    bad = []
    for path in DOC_FILES:
        for target, anchor in re.findall(r"\]\(([\w/.]*\.(?:md|png))?(?:#([\w-]+))?\)", path.read_text()):
            dest = (path.parent / target) if target else path
            if not dest.is_file() or (anchor and anchor not in _anchors(dest)):
                bad.append(f"{path.name}: ({target}#{anchor})")
    assert not bad


def test_the_readme_tree_names_every_package_folder_and_module():
    readme = (REPO / "README.md").read_text()
    tree = readme[readme.index("## Where things live"):readme.index("## Outputs")]
    missing = []
    for folder in sorted(p for p in (REPO / "embtune").iterdir() if (p / "__init__.py").is_file()):
        if f"  {folder.name}/" not in tree:
            missing.append(f"{folder.name}/")
        modules = [] if folder.name == "losses" else sorted(folder.glob("[!_]*.py"))  # losses: one file per loss
        missing += [f"{folder.name}/{m.name}" for m in modules if not re.search(rf"\b{m.name}\b", tree)]
    assert not missing, f"README's tree leaves out {missing}"


# -- experiments


@pytest.mark.parametrize("name", _params([(n,) for n in EXPERIMENTS], EXPERIMENTS,
                                                [f"experiment={n}" for n in EXPERIMENTS]))
def test_every_experiment_composes_and_builds(name, monkeypatch):
    """An overlay of deltas (``# @package _global_``) whose groups build and pass every pre-flight check, and
    whose data gives training examples, all before any model loads."""
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"embtune experiment={name}" in text  # the file says how it is run
    monkeypatch.chdir(REPO)  # data paths are relative to the repository root
    cfg = _compose("config", [f"experiment={name}"])
    assert cfg.pooling is None or build(cfg, "pooling") is not None  # null: pooling=auto, the model's own
    data_format, negatives, loss_fn = build(cfg, "data_format"), build(cfg, "negatives"), build(cfg, "loss")
    evaluator = build(cfg, "eval")
    check_run(cfg, _trained_format(cfg, data_format), negatives, loss_fn, evaluator, None)
    if "../shared/data" in OmegaConf.to_yaml(cfg) and not DATA.is_dir():
        pytest.skip("../shared/data absent")
    data = build(cfg, "data")
    assert len(data_format(data.rows, data.source)) > 0
    if cfg.get("pretrain") is not None:  # a two-stage overlay: every stage's components build
        from embtune.recipes.two_stage import stage_configs

        for stage in stage_configs(cfg, "stage-1-model"):
            for part in ("data_format", "loss", "negatives"):
                assert build(stage, part) is not None


# -- every shown command


@pytest.mark.parametrize("doc,cmd", _params(COMMANDS, [c for _, c in COMMANDS]))
def test_every_shown_command_composes(doc, cmd, tmp_path):
    program, overrides, multirun = _split(cmd)
    if DATA.is_dir():  # a shown data path exists where the docs say
        for path in re.findall(r"(?:^|=)(\.\./shared/data/[^\s,\]]+)", " ".join(overrides)):
            assert (REPO / path).exists(), f"{doc}: {path} does not exist"
    if program == "embtune-report":
        from embtune.run.sweep_report import main as report_main

        sweep = tmp_path / "sweep"  # a finished one-job sweep, as embtune writes it
        (sweep / "0" / ".hydra").mkdir(parents=True)
        (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- loss.temperature=0.05\n")
        (sweep / "0" / ".hydra" / "config.yaml").write_text("loss:\n  temperature: 0.05\n")
        (sweep / "0" / "summary.json").write_text(json.dumps({
            "status": "completed", "base": {"ndcg@10": 0.5, "mrr@10": 0.4}, "final": {"ndcg@10": 0.6, "mrr@10": 0.5},
            "temperature": 0.05, "margin": None, "train_seconds": 1.0, "startup_seconds": 1.0}))
        assert report_main([str(sweep), *overrides[1:]]) == 0
        return
    if any(o.startswith("hydra/launcher=submitit") for o in overrides):
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the [slurm] extra is not installed")
    if "hydra/launcher=ray" in overrides:
        pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is not installed")
    cfg = _compose(CONFIG_OF[program], _first_values(overrides) if multirun else overrides, hydra=True)
    if program == "embtune":  # the data can feed the loss and the negatives (no data or model loads)
        check_compatible(_trained_format(cfg, build(cfg, "data_format")), build(cfg, "negatives"), build(cfg, "loss"))


# -- shown commands run end to end, shrunk


def _shrunk(cmd: str, run_dir, tiny_bert: str, tiny_cross_encoder: str) -> list[str]:
    """The command's overrides plus settings that make it a few seconds' run on the tiny model."""
    _, overrides, _ = _split(cmd)
    cfg = _compose("config", overrides)
    shrink = {"model.name_or_path": tiny_bert, "train.max_steps": "1", "train.batch_size": "4",
              "data.max_train_pairs": "16", "model.document_max_length": "32", "eval.before": "false",
              "eval.batch_size": "64", "logger": "none", "hydra.run.dir": str(run_dir)}
    if "max_test_queries" in cfg.data:
        shrink["data.max_test_queries"] = "8"
    if cfg.data.get("streaming"):  # a stream takes no sample of its rows (refused): max_steps bounds it
        del shrink["data.max_train_pairs"]
    if cfg.get("teacher"):
        shrink["teacher.name_or_path"] = tiny_cross_encoder
    if cfg.get("pretrain") is not None:
        shrink["pretrain.train.max_steps"] = "1"
    if cfg.matryoshka.dims:  # the tiny model's embeddings have 32 dims
        shrink.update({"matryoshka.dims": "[32,16]", "matryoshka.weights": "[1,1]"})
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+") not in shrink]
    return [*kept, *(f"{k}={v}" for k, v in shrink.items())]


def _run(args: list[str], run_dir) -> dict:
    out = subprocess.run([sys.executable, "-m", "embtune.cli", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _check_summary(summary: dict, cfg) -> None:
    # mining rounds: each round's summary says how it ended
    assert all(part["status"] == "completed" for part in summary.get("rounds", [summary]))
    # stdlib and beir bring a test split, data=jsonl|hf a test_path or a dev split of their rows, eval=sts a file
    held_out = cfg.eval.get("path") or (cfg.data.get("dev_queries") != 0 and cfg.data.get("dev_ratio") != 0
                                         and not cfg.data.get("streaming"))  # a stream has no dev split
    # evaluated after training, under the metric sweeps report; no held-out set: nothing to evaluate
    assert (cfg.eval.metric in summary["final"]) if held_out else summary["final"] == {}


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data absent")
@pytest.mark.parametrize("cmd", _params([(c,) for c in FAST_RUNS], FAST_RUNS))
def test_readme_commands_run_shrunk(cmd, tmp_path, tiny_bert, tiny_cross_encoder):
    assert cmd in {c for _, c in COMMANDS}, "not a command the docs show"
    run_dir = tmp_path / "run"
    args = _shrunk(cmd, run_dir, tiny_bert, tiny_cross_encoder)
    summary = _run(args, run_dir)
    assert summary["steps"] == 1
    _check_summary(summary, _compose("config", args))


SLOW_RUNS = [n for n in EXPERIMENTS if f"embtune experiment={n}" not in FAST_RUNS]


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data absent")
@pytest.mark.parametrize("name", _params([(n,) for n in SLOW_RUNS], SLOW_RUNS,
                                              [f"experiment={n}" for n in SLOW_RUNS]))
def test_every_experiment_runs_a_few_steps(name, tmp_path, tiny_bert, tiny_cross_encoder):
    run_dir = tmp_path / "run"
    args = _shrunk(f"embtune experiment={name}", run_dir, tiny_bert, tiny_cross_encoder)
    _check_summary(_run(args, run_dir), _compose("config", args))


# -- benchmarks shown in docs/performance.md, run at their smallest


QUICK_BENCHMARKS = {
    "train_throughput.py": ["--steps", "1", "--rounds", "1", "--warmup", "0", "--batch-size", "4"],
    "encode_throughput.py": ["--docs", "16", "--rounds", "1", "--batch-size", "8"],
    "grad_cache.py": ["--batch-size", "8", "--mini-batch-size", "4", "--plain-batch-size", "4", "--rounds", "1"],
    "mine_scale.py": ["--passages", "200", "--queries", "20"],
    "search_crossover.py": ["--docs", "500", "--queries", "10", "--rounds", "1"],
    "data_scale.py": ["--sizes", "200", "--skip-peer", "--batch-size", "4"],
}


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data absent")
@pytest.mark.parametrize("script", sorted(QUICK_BENCHMARKS))
def test_shown_benchmarks_run_at_their_smallest(script):
    shown = set(re.findall(r"python (benchmarks/[\w.]+\.py)", "\n".join(p.read_text() for p in DOC_FILES)))
    assert f"benchmarks/{script}" in shown and shown <= {f"benchmarks/{s}" for s in QUICK_BENCHMARKS}
    out = subprocess.run([sys.executable, f"benchmarks/{script}", *QUICK_BENCHMARKS[script]], cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^SUMMARY ", out.stdout, flags=re.M)
