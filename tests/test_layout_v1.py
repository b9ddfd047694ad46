"""A model folder and a checkpoint written by the flat layout (checkpoint format 1, embtune 26252c8) load and
resume with today's layout: old ``_target_`` paths are mapped on load (tests/fixtures/layout_v1/make.py)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "layout_v1"


def test_format_1_targets_map_to_public_names():
    from embtune.training import checkpoint

    state = checkpoint.read(FIXTURE / "run" / "checkpoints" / "ckpt-step2.pt")
    assert state["format"] == 1 and state["config"]["loss"]["_target_"] == "embtune.losses.info_nce.InfoNCE"
    config = checkpoint.upgrade_config(state["config"], state["format"])
    targets = {g: config[g]["_target_"] for g in ("model", "pooling", "data", "data_format", "loss", "negatives",
                                                   "eval", "miner", "logger")}
    assert targets == {"model": "embtune.model.from_pretrained", "pooling": "embtune.model.Mean",
                       "data": "embtune.data.load_jsonl", "data_format": "embtune.data.Pairwise",
                       "loss": "embtune.losses.InfoNCE", "negatives": "embtune.negatives.InBatch",
                       "eval": "embtune.eval.Retrieval", "miner": "embtune.mining.HardNegativeMiner",
                       "logger": "embtune.run.RunLogger"}
    assert config["recipe"] == {"name": "finetune"} and "rounds" not in config["train"]
    assert "multi_vector" not in config["model"] and "multi_vector_dim" not in config["model"]
    multi = dict(state["config"], model={**state["config"]["model"], "multi_vector": True})
    assert checkpoint.upgrade_config(multi, 1)["model"]["_target_"] == "embtune.model.from_pretrained_multi_vector"
    # every mapped target composes with today's config groups: same keys as the group's yaml
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # pooling=mean: the default pooling=auto is null (the model's own); a format-1 config names its pooling
        today = OmegaConf.to_container(compose("config", overrides=["data=jsonl", "data.path=x", "logger=none",
                                                                    "pooling=mean"]))
    for group in targets:
        assert config[group]["_target_"] == today[group]["_target_"], group


def test_a_format_1_model_folder_loads_and_encodes_as_its_weights_say():
    from transformers import AutoModel, AutoTokenizer

    import embtune

    folder = FIXTURE / "run" / "model"
    got = embtune.load(str(folder)).encode(["def sort(self): return sorted(self.list)", "open file"])
    tok, enc = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tok(["def sort(self): return sorted(self.list)", "open file"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_format_1_checkpoint_resumes_to_the_old_layouts_final_weights(tmp_path):
    from embtune.recipes.finetune import train
    from embtune.run import RunLogger
    from embtune.training import checkpoint

    shutil.copytree(FIXTURE / "base", tmp_path / "base")
    shutil.copy(FIXTURE / "train.jsonl", tmp_path / "train.jsonl")
    state = checkpoint.read(FIXTURE / "run" / "checkpoints" / "ckpt-step2.pt")
    # the fixture was written elsewhere: point its config at the copies (the data is byte-identical)
    state["config"]["model"]["name_or_path"] = str(tmp_path / "base")
    state["config"]["data"]["path"] = str(tmp_path / "train.jsonl")
    checkpoint.save(tmp_path / "old_run", state)
    cfg = OmegaConf.create({"resume_from": str(tmp_path / "old_run")})
    out = tmp_path / "resumed"
    summary = train(cfg, out, RunLogger(output_dir=out, run_config={}, wandb=False))
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("ckpt-last.pt")
    old = load_file(str(FIXTURE / "run" / "model" / "model.safetensors"))
    new = load_file(str(out / "model" / "model.safetensors"))
    assert old.keys() == new.keys()
    for name in old:
        torch.testing.assert_close(new[name], old[name], rtol=0, atol=1e-6, msg=name)


def test_a_format_2_config_reads_its_bf16_true_as_todays_auto_on_cuda():
    from embtune.training.checkpoint import upgrade_config

    # format 2's train.bf16=true was "where the device supports it, never on a CPU": today's auto on CUDA
    cuda = {"device": "cuda"}
    assert upgrade_config({"train": {"bf16": True, "lr": 1e-5, **cuda}}, 2)["train"] == {
        "bf16": "auto", "lr": 1e-5, **cuda}
    assert upgrade_config({"train": {"bf16": False, **cuda}}, 2)["train"] == {"bf16": False, **cuda}
    assert upgrade_config({"train": {"bf16": True}}, 3)["train"] == {"bf16": True}  # today's true stays true


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_older_configs_auto_resumes_in_fp32_on_a_cpu(version):
    from embtune.training.checkpoint import upgrade_config

    # before format 5, bf16 auto (and format 2's true) meant fp32 on a CPU: a resumed run must not switch
    before = {"train": {"bf16": True if version < 3 else "auto", "device": "cpu"},
              "eval": {"bf16": "auto", "batch_size": 8}}
    after = upgrade_config(before, version)
    assert after["train"] == {"bf16": False, "device": "cpu"}
    assert after["eval"] == {"bf16": False, "batch_size": 8}
    assert upgrade_config({"train": {"device": "cpu"}}, version)["train"]["bf16"] is False  # unset was auto
    assert upgrade_config({"train": {"bf16": "auto", "device": "cpu"}}, 5)["train"]["bf16"] == "auto"  # today's
