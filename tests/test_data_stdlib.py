"""The stdlib code-search data set: extraction, split, determinism, cache."""

import inspect
import json
import logging
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from embtune.data import stdlib
from embtune.data.stdlib import extract_pairs, load_stdlib

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "stdlib.yaml"

SNIPPET = textwrap.dedent('''
    """Module docstring: not a pair."""
    import functools


    @functools.lru_cache(maxsize=None)
    @staticmethod
    def cached(x):
        """Return x, cached.

        Second paragraph
        is not part of the query.
        """
        return x


    class Greeter(object):
        """Say hello
           to   people.

        More details.
        """

        greeting = "hello"

        def greet(self, name):
            """Nested docstrings may stay."""
            return f"{self.greeting} {name}"


    async def fetch(url):
        """Fetch a URL with café-grade latency."""
        return url


    def _private(x):
        """Private helper, skipped."""
        return x


    def undocumented(x):
        return x


    def inline(x): "Inline docstring on the def line."; return x
''')


def test_extract_pairs_snippet():
    pairs = {p["id"]: p for p in extract_pairs(SNIPPET, "pkg.mod")}
    assert list(pairs) == ["pkg.mod.cached", "pkg.mod.Greeter", "pkg.mod.fetch", "pkg.mod.inline"]
    assert pairs["pkg.mod.cached"]["query"] == "Return x, cached."
    assert pairs["pkg.mod.cached"]["document"] == (
        "@functools.lru_cache(maxsize=None)\n@staticmethod\ndef cached(x):\n    return x")
    assert pairs["pkg.mod.cached"]["line"] == 8  # the def line; the decorators start at 6
    assert pairs["pkg.mod.Greeter"]["query"] == "Say hello to people."
    doc = pairs["pkg.mod.Greeter"]["document"]
    assert doc.startswith("class Greeter(object):\n\n    greeting = \"hello\"")
    assert "More details" not in doc and '"""Nested docstrings may stay."""' in doc
    # non-ASCII before the end of the docstring: ast offsets are UTF-8 bytes
    assert pairs["pkg.mod.fetch"]["query"] == "Fetch a URL with café-grade latency."
    assert pairs["pkg.mod.fetch"]["document"] == "async def fetch(url):\n    return url"
    assert pairs["pkg.mod.inline"]["document"] == "def inline(x): return x"


def test_extract_pairs_rejects_bad_source():
    with pytest.raises(SyntaxError):
        extract_pairs("def broken(:\n    pass\n", "m")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # never the user's ~/.cache


@pytest.fixture(scope="module")
def data(cache):
    return load_stdlib(cache_dir=cache)


def test_yaml_lists_every_argument_with_its_default():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF))
    assert cfg.pop("_target_") == "embtune.data.load_stdlib"
    defaults = {k: p.default for k, p in inspect.signature(load_stdlib).parameters.items()}
    assert cfg == defaults


def test_sizes_and_shapes(data):
    assert data.name.startswith("stdlib (Python 3.")
    assert 1000 <= len(data.rows) <= 2048 and 300 <= len(data.test) <= 1000
    assert set(data.rows[0]) == {"query", "positive", "id", "module"}
    assert len(data.source) == len(data.rows)
    test = data.test
    for ids in (test.queries, test.corpus, test.qrels):
        assert all(isinstance(i, str) for i in ids)
    for qid, rel in test.qrels.items():
        assert qid in test.queries and rel == {f"{qid}:code": 1} and f"{qid}:code" in test.corpus
    assert set(test.corpus) == {f"{q}:code" for q in test.queries}
    assert test.identical_ids() == 0  # no query shares its document's id: none is ignored in evaluation


def test_no_module_in_both_splits(data):
    train_modules = {r["module"] for r in data.rows}
    test_modules = {i.split(".")[0] for i in data.test.queries}
    assert train_modules and test_modules and not train_modules & test_modules
    assert not {r["id"] for r in data.rows} & set(data.test.queries)


def test_no_duplicates_and_filters(data):
    queries = [r["query"] for r in data.rows] + list(data.test.queries.values())
    docs = [r["positive"] for r in data.rows] + list(data.test.corpus.values())
    assert len(set(queries)) == len(queries) and len(set(docs)) == len(docs)
    assert all(len(q.split()) >= 4 for q in queries) and all(len(d) >= 40 for d in docs)
    assert all(d.lstrip().startswith(("def ", "async def ", "class ", "@")) for d in docs)


def test_docstring_removed(data):
    pairs = [(r["query"], r["positive"]) for r in data.rows]
    pairs += [(data.test.queries[i], data.test.corpus[f"{i}:code"]) for i in data.test.queries]
    # a few functions legitimately repeat their summary in code (doctest.testmod), hence the slack
    leaked = [q for q, d in pairs if q in " ".join(d.split())]
    assert len(leaked) <= 0.005 * len(pairs), leaked


def test_deterministic_and_cached(data, tmp_path):
    again = load_stdlib(cache_dir=str(tmp_path))  # fresh cache dir: a second, uncached build
    assert again.rows == data.rows and again.test == data.test
    assert again.fingerprint == data.fingerprint
    assert len(list(tmp_path.glob("stdlib-*.json"))) == 1
    assert load_stdlib(cache_dir=str(tmp_path)).fingerprint == data.fingerprint  # read back
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A two-module stand-in for the stdlib (names must be in sys.stdlib_module_names): fast rebuilds."""
    root = tmp_path / "lib"
    (root / "json").mkdir(parents=True)
    (root / "json" / "__init__.py").write_text(SNIPPET, encoding="utf-8")
    (root / "textwrap.py").write_text(
        'def split(s):\n    """Split a string like a shell does."""\n    return s.split()\n\n\n'
        'def hello(x):\n    """Say hello to people."""\n    return "duplicate query, dropped"\n',
        encoding="utf-8")
    (root / "json" / "tests").mkdir()
    (root / "json" / "tests" / "test_x.py").write_text(SNIPPET, encoding="utf-8")  # skipped
    (root / "json" / "broken.py").write_text("def broken(:\n", encoding="utf-8")  # counted, skipped
    monkeypatch.setattr(stdlib.sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    return tmp_path / "cache"


def test_corrupt_cache_is_rebuilt(fake_stdlib, caplog):
    first = load_stdlib(test_fraction=0.5, min_doc_chars=10, cache_dir=str(fake_stdlib))
    # json (sha256 -> 0.01: test): the snippet's pairs but `cached` (3-word query);
    # textwrap (0.61: train): `split` only, as `hello` repeats a json query
    assert sorted(first.test.queries) == ["json.Greeter", "json.fetch", "json.inline"]
    assert [r["id"] for r in first.rows] == ["textwrap.split"]
    (cache_file,) = fake_stdlib.glob("stdlib-*.json")
    counts = json.loads(cache_file.read_text())["counts"]
    assert counts["files_failed"] == 1 and counts["files_parsed"] == 2  # json/tests/ skipped
    for corrupt in ('{"key": "tru', json.dumps({"key": "other", "pairs": []})):
        cache_file.write_text(corrupt)
        with caplog.at_level(logging.WARNING, logger="embtune.data.stdlib"):
            rebuilt = load_stdlib(test_fraction=0.5, min_doc_chars=10, cache_dir=str(fake_stdlib))
        assert "corrupt stdlib cache" in caplog.text
        assert rebuilt.fingerprint == first.fingerprint
        assert json.loads(cache_file.read_text())["pairs"]  # rewritten
        caplog.clear()


def test_caps_and_seed(data, cache):
    small = load_stdlib(max_train_pairs=50, max_test_queries=20, cache_dir=cache, seed=1)
    assert len(small.rows) == 50 and len(small.test) == 20 and len(small.test.corpus) == 20
    ids = [r["id"] for r in data.rows]
    assert [r["id"] for r in small.rows] == [i for i in ids if i in {r["id"] for r in small.rows}]
    other = load_stdlib(max_train_pairs=50, max_test_queries=20, cache_dir=cache, seed=2)
    assert other.rows != small.rows


def test_bad_fraction(cache):
    with pytest.raises(ValueError, match="test_fraction"):
        load_stdlib(test_fraction=1.5, cache_dir=cache)
