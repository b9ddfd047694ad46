"""Pushing a saved model to the Hugging Face hub: ``hub.push=true hub.repo_id=OWNER/NAME`` at the end of a
completed run (:func:`push_run`, called by :func:`embtune.recipes.run`), or ``embtune-push RUN_DIR REPO_ID``
later (:func:`main`).

What goes up is the model folder alone (``RUN_DIR/model``: weights, tokenizer, sentence-transformers files,
``embtune.json`` and the ``README.md`` model card), never checkpoints, logs or the run's config files. The
repo is made with ``HfApi().create_repo(repo_id, private=..., exist_ok=True)`` (an existing repo keeps its
visibility), then the folder goes up with ``upload_folder`` (all but ``README.md``) and the card with
``upload_file``: its usage snippets name the repo, filled in from the local card's ``path/to/model`` each
push (the local folder is never changed, so a second push names its own repo). The token is huggingface_hub's
own (``HF_TOKEN``, else the file ``hf auth login`` writes): embtune never reads it into a config, a log,
``summary.json`` or the card. :func:`client` builds the hub client; tests replace it with a local stand-in.

Everything that can be judged locally is refused before a model loads or the network is used: no
``hub.repo_id`` with ``hub.push=true``, a repo id huggingface_hub's ``validate_repo_id`` refuses, a folder
that holds no saved model, a run that did not complete, ``HF_HUB_OFFLINE`` set, no token.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from embtune.run.outputs import rank, write_json
from embtune.run.redact import install_log_filter, redact, redact_text

log = logging.getLogger(__name__)

CARD_MODEL_PATH = "path/to/model"  # what the card's usage snippets load; the repo id once pushed
MODEL_FILES = ("modules.json", "config.json", "adapter_config.json")  # any of them: a saved model folder
LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"


def client():
    """The hub client: ``huggingface_hub.HfApi()``, which finds the token itself. Tests replace this
    function with a stand-in that has ``create_repo``, ``upload_folder`` and ``upload_file``."""
    from huggingface_hub import HfApi

    return HfApi()


def check_repo_id(repo_id, option: str = "hub.repo_id") -> str:
    """``repo_id`` if huggingface_hub's ``validate_repo_id`` accepts it (``NAME`` or ``OWNER/NAME``: letters,
    digits, ``-``, ``_``, ``.``, at most 96 characters, no ``--`` or ``..``, not ending in ``.git``).

    Raises:
        ValueError: naming ``option``, the value and the rule it breaks.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"{option}={repo_id!r}: give the hub repo to push to, NAME or OWNER/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{option}={repo_id!r} is not a hub repo id: {e}") from None
    return repo_id


def check_can_push(what: str = "hub.push=true") -> None:
    """The network may be used and a token is there (huggingface_hub's lookup; nothing is sent).

    Raises:
        ValueError: ``HF_HUB_OFFLINE`` is set, or there is no token (the message says how to log in).
    """
    from huggingface_hub import get_token

    offline = os.environ.get("HF_HUB_OFFLINE", "")
    if offline.upper() in ("1", "ON", "YES", "TRUE"):
        raise ValueError(f"{what}, but HF_HUB_OFFLINE={offline}: uploading needs the network; unset HF_HUB_OFFLINE")
    if get_token() is None:
        raise ValueError(f"{what}: no Hugging Face token found; {LOGIN}")


def check_settings(hub) -> None:
    """The ``hub`` config node (``repo_id``, ``private``, ``push``), before any model loads.

    Raises:
        ValueError: ``hub.push=true`` without ``hub.repo_id`` or with a bad one (:func:`check_repo_id`),
            offline or without a token (:func:`check_can_push`).
    """
    if hub is None or not hub.get("push"):
        return
    if hub.get("repo_id") is None:
        raise ValueError("hub.push=true needs hub.repo_id=OWNER/NAME (or NAME, under your account): the repo to "
                         "push to")
    check_repo_id(hub.get("repo_id"))
    check_can_push()


def _is_model(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in MODEL_FILES)


def _round(folder: Path) -> int:
    return int(re.fullmatch(r"round(\d+)", folder.parent.name).group(1))


def find_model(folder: str | Path) -> tuple[Path, Path | None]:
    """The saved model in ``folder`` and the run it belongs to: ``(model folder, run folder or None)``.

    ``folder`` is a run folder (its ``model/``; after ``recipe=mining_rounds``, the last round's) or a model
    folder (a run's ``model/``, whose run is its parent, or any other saved model, which has no run).

    Raises:
        FileNotFoundError: no such folder.
        ValueError: no saved model there, or its run did not complete (no ``summary.json``, or its status
            is not ``completed``), or its ``summary.json`` is unreadable (named).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if _is_model(folder):
        parent = folder.parent
        run = parent if folder.name == "model" and any((parent / f).exists() for f in
                                                        ("summary.json", "metrics.jsonl", ".hydra")) else None
        model = folder
    else:
        rounds = sorted((p for p in folder.glob("round*/model") if re.fullmatch(r"round\d+", p.parent.name)
                         and _is_model(p)), key=_round)
        model = folder / "model" if _is_model(folder / "model") else (rounds[-1] if rounds else None)
        if model is None:
            raise ValueError(f"{folder}: no saved model here (a run folder holds one in model/; a model folder "
                             f"has {' or '.join(MODEL_FILES)})")
        run = folder
    if run is not None:
        summary = run / "summary.json"
        status = _status(summary) if summary.is_file() else None
        if status != "completed":
            why = ("no summary.json: it is still running or was stopped" if status is None
                   else f"summary.json says status: {status}")
            raise ValueError(f"{run}: the run did not finish ({why}); only a completed run's model is pushed "
                             f"(resume_from={run} finishes an interrupted one)")
    return model, run


def _status(summary: Path):
    """The ``status`` of a run's ``summary.json``.

    Raises:
        ValueError: the file is not a JSON object, naming it and where it breaks.
    """
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{summary}: unreadable ({e}); a completed run writes it at its end") from None
    if not isinstance(data, dict):
        raise ValueError(f"{summary}: expected a JSON object, got {type(data).__name__}")
    return data.get("status")


def _card_for(model: Path, repo_id: str) -> bytes | None:
    """The card to upload: the local ``README.md`` (left as it is) with its usage snippets loading the model
    from ``repo_id``; None when the folder has no card."""
    card = model / "README.md"
    if not card.is_file():
        return None
    return card.read_text(encoding="utf-8").replace(f'"{CARD_MODEL_PATH}"', f'"{repo_id}"').encode("utf-8")


def push(model: Path, repo_id: str, private: bool = False) -> dict:
    """Upload the model folder ``model`` to the hub repo ``repo_id`` (created if missing, ``private`` then),
    its card naming the repo (see the module docstring); ``model`` itself is not changed.

    Returns:
        ``{"repo_id", "url", "private", "commit", "folder"}``: the repo as the hub names it (``OWNER/NAME``
        also when ``NAME`` was given), its URL and the last commit's id.
    Raises:
        Whatever the hub client raises (no network, refused token, no write access).
    """
    api = client()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    full_id = getattr(url, "repo_id", None) or repo_id  # a bare NAME is created under the token's account
    card = _card_for(model, full_id)
    commit = api.upload_folder(repo_id=full_id, folder_path=str(model), repo_type="model",
                               commit_message="Upload a model fine-tuned with embtune",
                               ignore_patterns=["README.md"] if card is not None else None)
    if card is not None:  # last: the repo is complete once its card names it
        commit = api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=full_id, repo_type="model",
                                 commit_message="Model card naming this repo")
    return {"repo_id": full_id, "url": str(url), "private": private, "commit": getattr(commit, "oid", None),
            "folder": str(model)}


def _record(run: Path | None, entry: dict) -> None:
    """Add ``hub`` to the run's ``summary.json``."""
    if run is None or not (run / "summary.json").is_file():
        return
    summary = json.loads((run / "summary.json").read_text())
    write_json(run / "summary.json", {**summary, "hub": redact(entry)})


def push_run(hub, output_dir: str | Path, summary: dict, logger=None) -> dict:
    """At the end of a completed run: push its model when ``hub.push`` (settings checked by
    :func:`check_settings` before the run), log the URL and record ``hub`` in ``summary`` and in
    ``summary.json``. A failed upload is one ERROR line and ``hub.error``: the run and its model stay
    as they are, and the line says how to push again. Only rank 0 pushes. Returns ``summary``."""
    if hub is None or rank() > 0:
        return summary
    output_dir = Path(output_dir)
    if not hub.get("push"):
        if hub.get("repo_id"):
            log.info("not pushed to %s (hub.push=false): embtune-push %s %s uploads the model", hub.get("repo_id"),
                     output_dir, hub.get("repo_id"))
        return summary
    repo_id = hub.get("repo_id")
    model, run = find_model(output_dir)
    try:
        entry = push(model, repo_id, bool(hub.get("private")))
        log.info("model pushed to %s", entry["url"])
    except Exception as e:  # no network, a refused token: the trained model is safe on disk
        entry = {"repo_id": repo_id, "error": redact_text(f"{type(e).__name__}: {e}")}
        log.error("push to %s failed (%s); the model is in %s: embtune-push %s %s retries", repo_id,
                  entry["error"], model, output_dir, repo_id)
    summary["hub"] = redact(entry)
    _record(run, entry)
    if logger is not None:
        logger.summary({"hub": summary["hub"]})
    return summary


def main(argv: list[str] | None = None) -> int:
    """``embtune-push RUN_DIR REPO_ID [--private]``: upload a finished run's model (or a model folder)."""
    parser = argparse.ArgumentParser(prog="embtune-push", description="Upload a finished run's model folder (with "
                                     "its model card) to the Hugging Face hub.")
    parser.add_argument("folder", metavar="RUN_DIR", help="a completed run's folder (its model/ is pushed), or a "
                        "model folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="OWNER/NAME, or NAME under your account")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps "
                        "its visibility)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    install_log_filter()
    try:
        check_repo_id(args.repo_id, "REPO_ID")
        model, run = find_model(args.folder)
        check_can_push("embtune-push")
    except (ValueError, OSError) as e:
        raise SystemExit(f"Error: {redact_text(str(e))}") from None
    try:
        entry = push(model, args.repo_id, args.private)
    except Exception as e:  # the hub's answer (HTTP error, no network): one line, no traceback
        raise SystemExit(f"Error: push to {args.repo_id} failed: {redact_text(f'{type(e).__name__}: {e}')}") from None
    _record(run, entry)
    print(f"pushed {model} to {entry['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
