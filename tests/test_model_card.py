"""The model card every saved model gets (embtune.recipes.model_card)."""

from __future__ import annotations

import json
import shlex

from conftest import CONF, logged
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from embtune.recipes.finetune import train
from embtune.recipes.model_card import model_card


def _config(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_the_card_names_hub_base_data_loss_and_metrics():
    config = OmegaConf.to_container(_config(["loss.temperature=0.07", "matryoshka=on"]), resolve=True)
    summary = {"base": {"ndcg@10": 0.5}, "final": {"ndcg@10": 0.625, "dim64/ndcg@10": 0.25}, "steps": 3,
               "temperature": 0.07, "margin": None, "examples": 9,
               "data": {"name": "train.jsonl", "train_rows": 9, "fingerprint": "ab" * 32}}
    card = model_card(summary, config)
    front = card.split("---")[1]
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in front
    assert "| ndcg@10 | 0.5000 | 0.6250 |" in card and "| dim64/ndcg@10 | – | 0.2500 |" in card
    assert "`info_nce` (temperature τ = 0.07)" in card and "margin" not in card.split("## Evaluation")[0]
    assert "`train.jsonl`, 9 rows -> 9 examples, fingerprint `abababababababab`" in card
    assert f"Matryoshka dimensions: {config['matryoshka']['dims']}" in card
    assert "loss=info_nce" in card and "negatives=in_batch" in card and "matryoshka=on" in card


def test_a_local_base_model_has_no_hub_id(tiny_bert):
    config = OmegaConf.to_container(_config([f"model.name_or_path={tiny_bert}"]), resolve=True)
    card = model_card({"base": {}, "final": {}, "data": {}}, config)
    assert "base_model:" not in card and f"`{tiny_bert}` (local)" in card and "No evaluation was run" in card


def test_a_trained_model_folder_has_the_card_and_still_loads_in_sentence_transformers(tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer

    cfg = _config([f"model.name_or_path={tiny_bert}", "train.batch_size=8", "train.max_steps=1",
                   "data.max_train_pairs=16", "data.max_test_queries=8", "eval.before=false", "eval.after=false"])
    logged(train, cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"{summary['data']['train_rows']} rows" in card and summary["data"]["fingerprint"][:16] in card
    # pooling=auto: the card names the pooling the saved model inherited, as its 1_Pooling says (mean)
    pooling = json.loads((tmp_path / "model" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and "- Pooling: `Mean`, normalised: True" in card
    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert model.encode(["a text"]).shape == (1, 32)


def _reproduce_block(card: str) -> str:
    return card.split("## Reproduce")[1].split("```bash\n")[1].split("\n```")[0]


def test_the_reproduce_command_is_the_typed_overrides_and_composes_the_same_config():
    typed = ["recipe=two_stage", "data.max_test_queries=50", "eval=sts", "eval.path=../shared/data/stsb/test.tsv",
             "model.query_prompt=query: "]
    config = OmegaConf.to_container(_config(typed), resolve=True)
    card = model_card({"base": {}, "final": {}, "data": {}}, config, overrides=typed)
    words = shlex.split(_reproduce_block(card).replace("\\\n", " "))
    assert words[0] == "embtune" and words[1:] == typed  # a prompt with a space survives the shell
    assert OmegaConf.to_container(_config(words[1:]), resolve=True) == config
    rebuilt = model_card({"base": {}, "final": {}, "data": {}}, config)  # outside a Hydra job: rebuilt from config
    assert _reproduce_block(rebuilt).startswith("python -m embtune.cli")


def _python_blocks(card: str) -> list[str]:
    return [b.split("\n", 1)[1] for b in card.split("```")[1::2] if b.startswith("python")]


def test_a_multi_vector_card_says_maxsim_and_its_dim_and_has_no_sentence_transformers_snippet(tiny_bert):
    summary = {"base": {}, "final": {}, "data": {}}
    config = OmegaConf.to_container(_config(["model=multi_vector", "model.multi_vector_dim=48"]), resolve=True)
    card = model_card(summary, config, "Mean", True)
    assert "multi-vector (late-interaction)" in card and "MaxSim" in card
    assert "Khattab & Zaharia 2020, ColBERT" in card
    assert "- Multi-vector (late interaction, MaxSim): token-vector dimension 48" in card
    assert "48-dimensional unit vector per token" in card
    assert "Pooling:" not in card and "SentenceTransformer(\"" not in card
    assert "from sentence_transformers" not in card and "pylate" not in card.lower()
    # the default dimension (conf/model/multi_vector.yaml: 128)
    default = model_card(summary, OmegaConf.to_container(_config(["model=multi_vector"]), resolve=True))
    assert "token-vector dimension 128" in default
    # a plain model keeps its pooling line and both snippets
    plain = model_card(summary, OmegaConf.to_container(_config([]), resolve=True), "Mean", True)
    assert "- Pooling: `Mean`, normalised: True" in plain and "MaxSim" not in plain
    assert [b.splitlines()[0] for b in _python_blocks(plain)] == ["import embtune",
                                                                   "from sentence_transformers import SentenceTransformer"]


def test_the_multi_vector_card_usage_runs_on_a_saved_folder(tmp_path, tiny_bert):
    import torch

    from embtune.model.io import from_pretrained_multi_vector, save
    from embtune.run.hub import CARD_MODEL_PATH

    model = from_pretrained_multi_vector(tiny_bert, multi_vector_dim=16)
    save(model, tmp_path / "model")
    config = OmegaConf.to_container(_config(["model=multi_vector", f"model.name_or_path={tiny_bert}"]), resolve=True)
    (block,) = _python_blocks(model_card({"base": {}, "final": {}, "data": {}}, config))
    scope: dict = {}
    exec(block.replace(CARD_MODEL_PATH, str(tmp_path / "model")), scope)  # noqa: S102 - the card's own snippet
    # MaxSim by hand from the padded token vectors: mean over query tokens of the best document token
    (_, q, qm), = scope["queries"].chunks
    expected = []
    for rows, d, dm in scope["docs"].chunks:
        for r in range(len(rows)):
            sims = q[0, qm[0]] @ d[r, dm[r]].T  # [Tq, Td]
            expected.append((int(rows[r]), sims.max(1).values.mean().item()))
    expected.sort(key=lambda x: -x[1])
    assert scope["indices"][0].tolist() == [i for i, _ in expected]
    assert torch.allclose(scope["scores"][0], torch.tensor([s for _, s in expected]), atol=1e-5)


def test_a_resumed_run_reproduces_with_the_overrides_of_the_run_it_continues(tmp_path):
    from embtune.recipes.model_card import reproducing

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    typed = ["data=jsonl", "data.path=/data/train.jsonl", "data.dev_queries=20", "eval.every_steps=2", "logger=none",
             "hub.push=true", "hub.repo_id=me/model"]
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in typed))
    kept = typed[:5]  # hub.* is where the model went, not how it was trained
    assert reproducing([f"resume_from={run}", "logger=none"]) == kept
    assert reproducing([f"resume_from={run / 'checkpoints' / 'ckpt-last.pt'}"]) == kept
    assert reproducing([f"resume_from={tmp_path / 'gone'}"]) is None  # unreadable: the card rebuilds a command
    assert reproducing(["loss.temperature=0.02", "hub.push=true"]) == ["loss.temperature=0.02"]
