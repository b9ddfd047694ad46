"""Keep API keys and tokens out of everything a run writes: logs, saved configs, wandb, model metadata.

Three things are replaced by ``***``: the value of any environment variable whose name says it holds
a secret (``WANDB_API_KEY``, ``HF_TOKEN``, ``*_TOKEN``, ``*_SECRET``, ``*_PASSWORD``, ...), strings shaped
like a known token (``hf_...``, ``sk-...``, ``ghp_...``, credentials in a URL), and the value of a config
key whose name says it is a secret (``token``, ``api_key``, ...).
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
_SECRET_NAME = re.compile(r"(^|_)(token|api_?key|secret|password|passwd|credentials?)($|_)", re.I)  # "max_tokens" is not a secret
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")  # user:password@ in a URL


def secret_values() -> list[str]:
    """Values of environment variables named like secrets (8 characters or more), longest first."""
    values = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with secret environment values and token-shaped strings replaced by ``***``."""
    for value in secret_values():
        text = text.replace(value, MASK)
    return _TOKEN_SHAPES.sub(MASK, text)


def redact(obj):
    """A copy of a config (nested dicts/lists) with secrets masked: values under secret-named keys, and
    secret strings anywhere (:func:`redact_text`)."""
    if isinstance(obj, dict):
        return {k: (MASK if _SECRET_NAME.search(str(k)) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return redact_text(obj) if isinstance(obj, str) else obj


def redact_yaml_file(path) -> None:
    """Mask secrets in a YAML file Hydra wrote (``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml``):
    secret-named keys (``key: value`` and ``- key=value`` lines) and secret strings."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text()

    def mask(m: re.Match) -> str:  # the last dotted part names the key: hydra.job.env_set.HF_TOKEN
        secret = _SECRET_NAME.search(m.group("key").rsplit(".", 1)[-1])
        return m.group("head") + f'"{MASK}"' if secret else m.group(0)  # quoted: a bare * is a YAML alias

    new = re.sub(r"^(?P<head>[ \t]*-?[ \t]*(?P<key>[\w.]+)[ \t]*[:=][ \t]*)\S.*$", mask, redact_text(text), flags=re.M)
    if new != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(new)
        os.replace(tmp, path)


class RedactFilter(logging.Filter):
    """A logging filter that masks secrets in every record's message (attach it to the handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filter() -> None:
    """Attach :class:`RedactFilter` to every handler of the root logger (console and Hydra's log file)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
