"""Bad input ends a command in one line: the user error behind Hydra's wrapping, a traceback only on request."""

import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from embtune.run.errors import message, one_line_errors, user_error


def _wrapped(cause: BaseException) -> InstantiationException:
    try:
        try:
            raise cause
        except Exception as e:
            raise InstantiationException("Error in call to target 'embtune.model.io.from_pretrained'") from e
    except InstantiationException as wrapped:
        return wrapped


def test_the_user_error_behind_hydras_wrapping_is_found_and_others_are_not():
    missing = FileNotFoundError("model './nope': no such folder")
    assert user_error(_wrapped(missing)) is missing
    assert user_error(_wrapped(_wrapped(missing).__cause__)) is missing
    assert user_error(_wrapped(RuntimeError("deep inside torch"))) is None
    assert user_error(KeyError("x")) is None
    bad = ValueError("f.jsonl:2: missing field 'positive'")
    assert user_error(bad) is bad


def test_one_line_errors_exits_with_the_message_and_lets_bugs_through(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as out, one_line_errors():
        raise _wrapped(FileNotFoundError("model './nope': no such folder"))
    assert str(out.value) == "Error: model './nope': no such folder"
    with pytest.raises(SystemExit) as out, one_line_errors():
        OmegaConf.create({"eval": {"path": "???"}}).eval.path
    assert str(out.value) == "Error: eval.path has no value (??? in its config): set it, e.g. eval.path=..."
    with pytest.raises(RuntimeError), one_line_errors():
        raise RuntimeError("a bug keeps its traceback")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError), one_line_errors():
        raise ValueError("asked for the traceback")


def test_a_missing_mandatory_value_reads_as_an_override_to_set():
    with pytest.raises(MissingMandatoryValue) as e:
        OmegaConf.create({"eval": {"path": "???"}}).eval.path
    assert message(e.value) == "eval.path has no value (??? in its config): set it, e.g. eval.path=..."
