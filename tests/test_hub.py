"""Pushing a model to the Hugging Face hub (embtune.run.hub): ``hub.push=true`` at the end of a run and
``embtune-push`` later upload exactly the model folder with its card; every bad input is refused by name
before a model loads or the hub client is used; the token is never written anywhere.

No network: the hub client is :class:`StandInHub`, which records its calls and copies an uploaded folder
into a local "hub" folder.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
from conftest import CONF, REPO, logged
from huggingface_hub import RepoUrl
from hydra import compose, initialize_config_dir

from embtune.recipes import run
from embtune.run import hub

TOKEN = "hf_" + "Xq7Lm2Pz9Rt4Vw8Ks3Nb6Yc1Hd5Jf0Ga"  # shaped like a real one; never sent anywhere
TINY = ["train.batch_size=8", "train.max_steps=1", "data.max_train_pairs=16", "data.max_test_queries=8",
        "eval.before=false", "eval.after=false", "train.checkpoint_every=1", "train.keep_checkpoint=true"]


class StandInHub:
    """What embtune uses of ``huggingface_hub.HfApi``: ``create_repo`` answers with the repo's URL (a bare
    NAME under ``stand-in-user``), ``upload_folder`` copies the folder to ``root/OWNER/NAME`` (leaving out the
    names ``ignore_patterns`` matches), ``upload_file`` writes the bytes given there."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'stand-in-user/' + repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, {"folder_path": str(folder_path), **kwargs}))
        ignore = kwargs.get("ignore_patterns") or []
        for f in Path(folder_path).rglob("*"):
            rel = f.relative_to(folder_path)
            if f.is_file() and not any(fnmatch.fnmatch(rel.as_posix(), p) for p in ignore):
                (self.root / repo_id / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, self.root / repo_id / rel)
        return SimpleNamespace(oid="c0ffee" * 6 + "abcd")

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        self.calls.append(("upload_file", repo_id, {"path_in_repo": path_in_repo, **kwargs}))
        assert isinstance(path_or_fileobj, bytes)  # the card's text, not a file of the local folder
        (self.root / repo_id / path_in_repo).parent.mkdir(parents=True, exist_ok=True)
        (self.root / repo_id / path_in_repo).write_bytes(path_or_fileobj)
        return SimpleNamespace(oid="cafe" * 10)


def _logged_in(monkeypatch, root: Path) -> StandInHub:
    """A token in the environment, the network allowed, and the stand-in as the hub client."""
    stand_in = StandInHub(root)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "client", lambda: stand_in)
    return stand_in


def _logged_out(monkeypatch, tmp_path: Path) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _token_in_any_file(*folders: Path) -> list[str]:
    return [str(p) for f in folders for p in f.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, tiny_bert):
    """A tiny completed run with ``hub.push=true hub.repo_id=org/tiny`` (checkpoints kept): its folder, its
    stand-in hub, its summary and the lines embtune.run.hub logged."""
    root = tmp_path_factory.mktemp("pushed")
    run_dir, stand_in, lines = root / "run", StandInHub(root / "hub"), _Lines()
    cfg = _compose([f"model.name_or_path={tiny_bert}", *TINY, "hub.push=true", "hub.repo_id=org/tiny"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", TOKEN)
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.setattr(hub, "client", lambda: stand_in)
        mp.setattr(hub.log, "level", logging.INFO)
        hub.log.addHandler(lines)
        try:
            summary = logged(run, cfg, run_dir)
        finally:
            hub.log.removeHandler(lines)
    return run_dir, stand_in, summary, lines.lines


def test_a_run_pushes_exactly_its_model_folder_with_the_card_at_the_end(pushed_run):
    run_dir, stand_in, summary, lines = pushed_run
    assert [c[:2] for c in stand_in.calls] == [("create_repo", "org/tiny"), ("upload_folder", "org/tiny"),
                                               ("upload_file", "org/tiny")]
    assert stand_in.calls[0][2]["private"] is False and stand_in.calls[0][2]["exist_ok"] is True
    assert stand_in.calls[1][2]["folder_path"] == str(run_dir / "model")
    assert stand_in.calls[2][2]["path_in_repo"] == "README.md"
    uploaded = stand_in.root / "org" / "tiny"
    assert _files(uploaded) == _files(run_dir / "model")  # the model folder, all of it and nothing else
    assert "README.md" in _files(uploaded) and "model.safetensors" in _files(uploaded)
    assert (run_dir / "checkpoints").is_dir() and not any("ckpt" in f for f in _files(uploaded))
    assert not {"summary.json", "metrics.jsonl"} & _files(uploaded)
    card = (uploaded / "README.md").read_text()
    assert 'SentenceTransformer("org/tiny")' in card and 'embtune.load("org/tiny")' in card
    url = "https://huggingface.co/org/tiny"
    assert "model pushed to " + url in lines
    recorded = json.loads((run_dir / "summary.json").read_text())
    assert recorded["status"] == "completed" and recorded["hub"]["url"] == url == summary["hub"]["url"]
    assert recorded["hub"]["repo_id"] == "org/tiny" and recorded["hub"]["commit"] == "cafe" * 10  # the card's
    local = (run_dir / "model" / "README.md").read_text()
    assert 'SentenceTransformer("path/to/model")' in local and "org/tiny" not in local  # left as it was


def test_the_token_is_written_nowhere(pushed_run):
    run_dir, stand_in, summary, lines = pushed_run
    assert not _token_in_any_file(run_dir, stand_in.root)
    assert not any(TOKEN in line for line in lines) and TOKEN not in json.dumps(summary)


def test_embtune_push_uploads_a_finished_run_later(pushed_run, monkeypatch, tmp_path, capsys):
    run_dir = pushed_run[0]
    stand_in = _logged_in(monkeypatch, tmp_path / "hub")
    assert hub.main([str(run_dir), "later", "--private"]) == 0
    assert [c[:2] for c in stand_in.calls] == [("create_repo", "later"), ("upload_folder", "stand-in-user/later"),
                                               ("upload_file", "stand-in-user/later")]
    assert stand_in.calls[0][2]["private"] is True  # a bare NAME goes under the token's account
    assert _files(tmp_path / "hub" / "stand-in-user" / "later") == _files(run_dir / "model")
    assert capsys.readouterr().out.strip() == f"pushed {run_dir / 'model'} to https://huggingface.co/stand-in-user/later"
    assert json.loads((run_dir / "summary.json").read_text())["hub"]["repo_id"] == "stand-in-user/later"
    assert not _token_in_any_file(run_dir, tmp_path)


def test_each_push_names_its_own_repo_and_leaves_the_local_card_alone(monkeypatch, tmp_path):
    run_dir = _folder(tmp_path, {"status": "completed"})
    card = '# tiny\n\n```python\nmodel = SentenceTransformer("path/to/model")\nembtune.load("path/to/model")\n```\n'
    (run_dir / "model" / "README.md").write_text(card)
    before = (run_dir / "model" / "README.md").stat().st_mtime_ns
    stand_in = _logged_in(monkeypatch, tmp_path / "hub")
    assert hub.main([str(run_dir), "alice/first"]) == 0
    assert hub.main([str(run_dir), "alice/second"]) == 0
    for repo in ("first", "second"):
        pushed = (stand_in.root / "alice" / repo / "README.md").read_text()
        assert pushed == card.replace("path/to/model", f"alice/{repo}")  # written out by hand: only the id differs
        assert _files(stand_in.root / "alice" / repo) == _files(run_dir / "model")
    assert (run_dir / "model" / "README.md").read_text() == card
    assert (run_dir / "model" / "README.md").stat().st_mtime_ns == before
    assert [c[2].get("ignore_patterns") for c in stand_in.calls if c[0] == "upload_folder"] == [["README.md"]] * 2


def test_embtune_push_names_an_unreadable_summary(monkeypatch, tmp_path):
    stand_in = _logged_in(monkeypatch, tmp_path / "hub")
    run_dir = _folder(tmp_path, None)
    (run_dir / "summary.json").write_text("{bad")
    summary = re.escape(str(run_dir / "summary.json"))
    with pytest.raises(SystemExit, match=f"^Error: {summary}: unreadable \\(Expecting property name enclosed in double "
                                         "quotes: line 1 column 2"):
        hub.main([str(run_dir), "org/tiny"])
    assert stand_in.calls == []


def test_a_failed_upload_keeps_the_completed_run_and_masks_the_token(monkeypatch, tmp_path, caplog):
    """A client whose error echoes the token (as an HTTP error may echo a header): one ERROR line, the run
    stays completed, ``hub.error`` records it, and neither holds the token."""
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "config.json").write_text("{}")
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    stand_in = _logged_in(monkeypatch, tmp_path / "hub")

    def refuse(**kwargs):
        raise PermissionError(f"403 Forbidden: token {TOKEN} cannot write to org/tiny")

    stand_in.upload_folder = refuse
    summary = hub.push_run({"push": True, "repo_id": "org/tiny", "private": False}, run_dir, {"status": "completed"})
    recorded = json.loads((run_dir / "summary.json").read_text())
    assert recorded["status"] == "completed" and recorded["hub"]["error"].startswith("PermissionError: 403")
    assert summary["hub"] == recorded["hub"] and TOKEN not in json.dumps(recorded)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "push to org/tiny failed" in errors[0] and f"embtune-push {run_dir} org/tiny" in errors[0]
    assert TOKEN not in errors[0]


# -- refused before a model loads or the client is called


@pytest.mark.parametrize("overrides,message", [
    (["hub.push=true"], r"^hub.push=true needs hub.repo_id=OWNER/NAME"),
    (["hub.push=true", "hub.repo_id=org/tiny/extra"], r"^hub.repo_id='org/tiny/extra' is not a hub repo id: "
                                                         r"Repo id must be in the form"),
    (["hub.push=true", "hub.repo_id=org/bad--name"], r"^hub.repo_id='org/bad--name' is not a hub repo id: "
                                                        r"Cannot have -- or \.\."),
    (["hub.push=true", "hub.repo_id='org/with space'"], r"^hub.repo_id='org/with space' is not a hub repo id"),
], ids=["no_repo_id", "three_parts", "double_dash", "space"])
def test_bad_hub_settings_are_refused_by_name_before_the_model_loads(overrides, message, monkeypatch, tmp_path):
    stand_in = _logged_in(monkeypatch, tmp_path / "hub")
    cfg = _compose(["model.name_or_path=/nonexistent/model", *overrides])  # a loaded model: FileNotFoundError
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "run", logger=None)
    assert stand_in.calls == [] and not (tmp_path / "run").exists()


def test_no_token_is_one_line_saying_how_to_log_in(monkeypatch, tmp_path):
    _logged_out(monkeypatch, tmp_path)
    cfg = _compose(["model.name_or_path=/nonexistent/model", "hub.push=true", "hub.repo_id=org/tiny"])
    with pytest.raises(ValueError, match=r"^hub.push=true: no Hugging Face token found; log in with `hf auth login` "
                                         r"\(or set HF_TOKEN\)$"):
        run(cfg, tmp_path / "run", logger=None)
    run_dir = tmp_path / "done"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "modules.json").write_text("[]")
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(SystemExit, match=r"^Error: embtune-push: no Hugging Face token found; log in with `hf auth "
                                         r"login` \(or set HF_TOKEN\)$"):
        hub.main([str(run_dir), "org/tiny"])


def test_the_cli_says_no_token_in_one_line_without_a_traceback(tmp_path, tiny_bert):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "HYDRA_FULL_ERROR")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no token file there; the models need no hub
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "logger=none", "hub.push=true",
           "hub.repo_id=org/tiny", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "Error: hub.push=true: no Hugging Face token found; log in with `hf auth login` (or set HF_TOKEN)" in out.stderr
    assert not (tmp_path / "run" / "model").exists()  # refused before training


def test_offline_is_refused_for_a_push(monkeypatch, tmp_path):
    stand_in = _logged_in(monkeypatch, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose(["model.name_or_path=/nonexistent/model", "hub.push=true", "hub.repo_id=org/tiny"])
    with pytest.raises(ValueError, match=r"^hub.push=true, but HF_HUB_OFFLINE=1: uploading needs the network"):
        run(cfg, tmp_path / "run", logger=None)
    assert stand_in.calls == []


def _folder(tmp_path, summary: dict | None, model_file: str | None = "config.json") -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')  # a run writes it as it starts
    if model_file:
        (run_dir / "model" / model_file).write_text("{}")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.mark.parametrize("summary,model_file,message", [
    ({"status": "failed", "error": "ValueError: x"}, "config.json",
     r"run: the run did not finish \(summary.json says status: failed\); only a completed run's model is pushed"),
    (None, "config.json", r"run: the run did not finish \(no summary.json: it is still running or was stopped\)"),
    ({"status": "completed"}, None, r"run: no saved model here \(a run folder holds one in model/"),
], ids=["failed_run", "unfinished_run", "no_model"])
def test_embtune_push_refuses_a_folder_without_a_finished_model(summary, model_file, message, monkeypatch, tmp_path):
    stand_in = _logged_in(monkeypatch, tmp_path / "hub")
    folder = _folder(tmp_path, summary, model_file)
    with pytest.raises(SystemExit, match=f"^Error: {re.escape(str(tmp_path))}/{message}"):
        hub.main([str(folder), "org/tiny"])
    if model_file:  # the model folder itself: its run is the folder above
        with pytest.raises(SystemExit, match=r"the run did not finish"):
            hub.main([str(folder / "model"), "org/tiny"])
    assert stand_in.calls == []


def test_embtune_push_refuses_a_bad_repo_id_and_a_missing_folder(monkeypatch, tmp_path):
    stand_in = _logged_in(monkeypatch, tmp_path / "hub")
    folder = _folder(tmp_path, {"status": "completed"})
    with pytest.raises(SystemExit, match=r"^Error: REPO_ID='org/x\.git' is not a hub repo id: Repo_id cannot end by"):
        hub.main([str(folder), "org/x.git"])
    with pytest.raises(SystemExit, match=f"^Error: {re.escape(str(tmp_path / 'nowhere'))}: no such folder$"):
        hub.main([str(tmp_path / "nowhere"), "org/tiny"])
    assert stand_in.calls == []


def test_a_sweep_refuses_to_push_every_job_to_one_repo(tmp_path, tiny_bert):
    sweep = tmp_path / "sweep"
    # hub.push=true for every job is refused once before any job (tests/test_cli.py); a swept hub.push=true,false
    # reaches the jobs, and the one that would push is refused there
    cmd = [sys.executable, "-m", "embtune.cli", "-m", "hub.push=true,false", f"model.name_or_path={tiny_bert}",
           "logger=none", "hub.repo_id=org/tiny", "data.max_train_pairs=8", "data.max_test_queries=4",
           "train.batch_size=4", "train.max_steps=1", "eval.before=false", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "failed", out.stderr[-3000:]
    assert summary["error"].startswith("ValueError: hub.push=true in a multirun: every job would push to org/tiny")
    assert not (sweep / "0" / "model").exists()


def test_the_cards_reproduce_command_trains_again_without_pushing():
    from hydra.core.hydra_config import HydraConfig

    from embtune.recipes.model_card import typed_overrides

    typed = ["loss.temperature=0.05", "hub.push=true", "hub.repo_id=org/tiny", "hub.private=true"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=typed, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as inside the job
    try:
        assert typed_overrides() == ["loss.temperature=0.05"]
    finally:
        HydraConfig.instance().cfg = None
