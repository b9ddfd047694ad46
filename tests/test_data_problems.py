"""DataProblems: warnings counted and printed once, and printed the same way again from a cached record."""

import logging

from embtune.data.checks import _LOGGED, DataProblems


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_replaying_a_record_prints_and_counts_what_reading_the_data_printed(caplog):
    caplog.set_level(logging.WARNING)
    first = DataProblems(drop_bad_rows=True)
    for i in range(_LOGGED + 5):
        first.bad_row(f"f.jsonl:{i + 1}: field 'query' is missing")
    printed = _warnings(caplog)
    assert len(printed) == _LOGGED + 1 and printed[-1].startswith("more data warnings")
    caplog.clear()

    again = DataProblems(drop_bad_rows=True)
    again.replay(first.record())
    assert _warnings(caplog) == printed  # the same lines, the same order
    assert again.summary() == first.summary() == {
        "warnings": _LOGGED + 5, "dropped_rows": _LOGGED + 5,
        "first": [f"f.jsonl:{i + 1}: field 'query' is missing; row dropped" for i in range(5)]}


def test_a_replay_after_other_warnings_prints_the_overflow_line_once(caplog):
    caplog.set_level(logging.WARNING)
    cached = DataProblems(drop_bad_rows=True)
    for i in range(3):
        cached.warn(f"a.jsonl:{i + 1}: empty document")
    current = DataProblems()
    for i in range(_LOGGED - 1):
        current.warn(f"b.jsonl:{i + 1}: empty query")
    caplog.clear()
    current.replay(cached.record())
    lines = _warnings(caplog)
    # one replayed message fits under the limit, then the overflow line once, the other two only counted
    assert lines == ["a.jsonl:1: empty document",
                     "more data warnings: counted, not printed (see summary.json data.problems)"]
    assert current.warnings == _LOGGED + 2
