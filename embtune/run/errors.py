"""Bad input and settings end a command with one line, ``Error: <message>``, not a traceback.

Shared by ``embtune`` (:mod:`embtune.cli`), ``embtune-eval`` and ``embtune-mine``. A user error is a
``ValueError``, ``OSError`` or a missing mandatory config value, also when Hydra's ``instantiate`` wraps it
(a model folder that does not exist, raised while the ``model`` node is built). ``HYDRA_FULL_ERROR=1``
keeps the traceback.
"""

from __future__ import annotations

import contextlib
import os

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

# errors whose message is the whole story (bad input, bad settings, missing files)
USER_ERRORS = (ValueError, OSError, MissingMandatoryValue)


def user_error(e: BaseException) -> BaseException | None:
    """The user error behind ``e``: ``e`` itself, or the cause of the ``InstantiationException``\\ s wrapping
    one; None for any other exception."""
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return e if isinstance(e, USER_ERRORS) else None


def message(e: BaseException) -> str:
    """The one-line message of a user error."""
    if isinstance(e, MissingMandatoryValue):  # omegaconf's text spans lines (full_key, object_type)
        return f"{e.full_key} has no value (??? in its config): set it, e.g. {e.full_key}=..."
    return str(e)


def full_traceback() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def one_line_errors():
    """Inside the block, a user error (:func:`user_error`) exits with ``Error: <message>`` (secrets masked);
    anything else, or any error with ``HYDRA_FULL_ERROR=1``, propagates with its traceback.

    Raises:
        SystemExit: with the one-line message.
    """
    try:
        yield
    except Exception as e:
        cause = user_error(e)
        if cause is None or full_traceback():
            raise
        from embtune.run.redact import redact_text

        raise SystemExit(f"Error: {redact_text(message(cause))}") from None
