"""The default data set: code search over the running interpreter's standard library.

For each documented, public, top-level function or class of the standard library, the query is the
first paragraph of its docstring and the relevant document is its source with the docstring removed
(the CodeSearchNet recipe, Husain et al. 2019, "CodeSearchNet Challenge", section 2). It is real text
and needs no network. Source files are parsed with :mod:`ast`, never imported: importing the stdlib has
side effects (``antigravity`` opens a browser, ``this`` prints, ``tkinter`` needs a display).

Train and test are split by top-level module (all of ``email.*`` on one side), so the test set asks
about code whose module the model has never seen in training.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import platform
import random
import re
import sys
import sysconfig
import tempfile
import textwrap
import tokenize
import warnings
from pathlib import Path

from embtune.data.beir import check_sample_size
from embtune.data.cache import cache_dir as default_cache_dir
from embtune.data.dataset import RetrievalSet, TrainingData

log = logging.getLogger(__name__)

# Bump when the extraction changes, so that old caches are not read back.
BUILDER_VERSION = 1
# Directories that hold tests or test data, not library code (lib2to3/tests, idlelib/idle_test, ...).
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_PAIR_KEYS = {"id", "module", "query", "document", "file", "line"}


def extract_pairs(source: str, module: str) -> list[dict]:
    """Query/document pairs from the source of one module.

    Args:
        source: Python source text.
        module: dotted module name, the prefix of each id (``email.utils``).

    Returns:
        One dict per public top-level ``def``/``async def``/``class`` with a docstring, in source
        order: ``id`` (``module.name``), ``query`` (first paragraph of the docstring, whitespace
        collapsed), ``document`` (source with decorators, docstring statement removed, dedented) and
        ``line`` (1-based line of the ``def``/``class``). No length filters are applied here.

    Raises:
        SyntaxError, ValueError: the source does not parse.
    """
    with warnings.catch_warnings():  # old files have invalid escapes; not our concern
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    # ast offsets count "\n"-separated lines and UTF-8 bytes; str.splitlines would also split on \f.
    lines = [line.encode() for line in source.split("\n")]
    pairs = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node)
        if node.name.startswith("_") or not doc:
            continue
        query = " ".join(re.split(r"\n\s*\n", doc.strip())[0].split())
        pairs.append({"id": f"{module}.{node.name}", "query": query,
                      "document": _strip_docstring(lines, node), "line": node.lineno})
    return pairs


def _strip_docstring(lines: list[bytes], node: ast.AST) -> str:
    """Source of `node` (decorators included) without its docstring statement, dedented."""
    first = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    ds = node.body[0]  # the docstring expression, by ast.get_docstring's definition
    head = lines[first:ds.lineno - 1] + [lines[ds.lineno - 1][:ds.col_offset]]
    tail = [lines[ds.end_lineno - 1][ds.end_col_offset:]] + lines[ds.end_lineno:node.end_lineno]
    if not head[-1].strip() and not tail[0].strip():  # the usual case: the docstring has its own lines
        kept = head[:-1] + tail[1:]
    else:  # `def f(): "doc"; return 1` shares a line with code: keep that code
        kept = head[:-1] + [head[-1] + tail[0].lstrip(b" ;")] + tail[1:]
    text = b"\n".join(kept).decode()
    return textwrap.dedent(text).strip("\n").rstrip()


def _module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of the stdlib's public library ``.py`` files, sorted by path."""
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] not in sys.stdlib_module_names or _SKIP_DIRS.intersection(parts[:-1]):
            continue  # site-packages, lib-dynload, config-*, the test suites
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1] == "__main__":
            continue
        # private modules stay (_pydecimal, email._header_value_parser): only private *names* are
        # skipped, and the C-accelerated modules' documented Python versions live there
        out.append((".".join(parts), path))
    return out


def build_pairs(root: Path, min_query_words: int, min_doc_chars: int) -> tuple[list[dict], dict]:
    """Extract, filter and de-duplicate the pairs of every library file under `root`.

    Returns:
        (pairs, counts). Pairs are in sorted path order then source order, each with ``id``,
        ``module`` (top-level name), ``query``, ``document``, ``file`` and ``line``. A query or a
        document seen before is dropped (the first is kept): a duplicate would be a false negative.
        counts: files parsed / failed, pairs extracted / too short / duplicates / kept.
    """
    counts = dict(files_parsed=0, files_failed=0, extracted=0, too_short=0, duplicates=0)
    pairs, seen = [], set()
    for module, path in _module_files(root):
        try:
            with tokenize.open(path) as f:  # honours `# -*- coding: ... -*-`
                found = extract_pairs(f.read(), module)
        except (SyntaxError, ValueError, OSError) as e:  # ValueError: bad bytes, null bytes
            counts["files_failed"] += 1
            log.debug("skipping %s: %s", path, e)
            continue
        counts["files_parsed"] += 1
        counts["extracted"] += len(found)
        for p in found:
            if len(p["query"].split()) < min_query_words or len(p["document"]) < min_doc_chars:
                counts["too_short"] += 1
                continue
            keys = ("id", p["id"]), ("q", p["query"]), ("d", p["document"])
            if seen.intersection(keys):
                counts["duplicates"] += 1
                continue
            seen.update(keys)
            pairs.append(dict(p, module=module.split(".")[0], file=str(path)))
    counts["kept"] = len(pairs)
    return pairs, counts


def _cached_pairs(root: Path, cache_dir: Path, min_query_words: int, min_doc_chars: int) -> list[dict]:
    """:func:`build_pairs`, read from / written to a JSON file in `cache_dir` (atomic write)."""
    key = json.dumps([platform.python_version(), str(root), BUILDER_VERSION, min_query_words,
                      min_doc_chars])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir / f"stdlib-py{platform.python_version()}-{digest}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["key"] == key and all(set(p) == _PAIR_KEYS for p in data["pairs"]):
                return data["pairs"]
            raise ValueError("key or content mismatch")
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            log.warning("corrupt stdlib cache %s (%s): rebuilding it", path, e)
    pairs, counts = build_pairs(root, min_query_words, min_doc_chars)
    log.info("built stdlib pairs from %s: %s", root, counts)
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # temp file in the same dir + os.replace: a reader never sees a half-written cache
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "counts": counts, "pairs": pairs}, f, ensure_ascii=False)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop a run; it just rebuilds next time
        log.warning("could not write stdlib cache %s: %s", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return pairs


def _is_test(module: str, test_fraction: float) -> bool:
    """Whether top-level `module` goes to test: sha256, not hash(), which is salted per process."""
    digest = hashlib.sha256(module.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def _subsample(items: list, k: int | None, seed: int, option: str) -> list:
    """`k` items drawn with `random.Random(seed)`, in their original order; all of them if k is None."""
    check_sample_size(k, option)
    if k is None or len(items) <= k:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), k))
    return [items[i] for i in keep]


def load_stdlib(test_fraction: float = 0.15, min_query_words: int = 4, min_doc_chars: int = 40,
                max_train_pairs: int | None = 2048, max_test_queries: int | None = 1000,
                cache_dir: str | None = None, seed: int = 0) -> TrainingData:
    """Code-search pairs (docstring summary -> code) from the running Python's standard library.

    Args:
        test_fraction: fraction (roughly: by sha256 of the name) of top-level modules held out for test.
        min_query_words: drop pairs whose query has fewer words.
        min_doc_chars: drop pairs whose document (code without docstring) has fewer characters.
        max_train_pairs: keep at most this many training rows (seeded subsample, order kept); None:
            all. The defaults bound the run time; on Python 3.11 neither cap is reached.
        max_test_queries: keep at most this many test pairs; the corpus is their documents.
        cache_dir: where the built pairs are cached as JSON; default ``$EMBTUNE_CACHE`` or
            ``~/.cache/embtune``. A corrupt cache file is rebuilt with a warning.
        seed: seed of the subsampling.

    Returns:
        TrainingData with rows ``{"query", "positive", "id": "module.qualname", "module": top-level}``
        and a test RetrievalSet in which query ``i`` (``module.qualname``) has one relevant document, ``i:code``.

    Raises:
        ValueError: `test_fraction` is outside [0, 1], or no pair survives the filters.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    root = Path(sysconfig.get_paths()["stdlib"])
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    pairs = _cached_pairs(root, cache.expanduser(), min_query_words, min_doc_chars)
    if not pairs:
        raise ValueError(f"no stdlib pairs found under {root} with min_query_words={min_query_words}, "
                         f"min_doc_chars={min_doc_chars}")
    train = [p for p in pairs if not _is_test(p["module"], test_fraction)]
    test = [p for p in pairs if _is_test(p["module"], test_fraction)]
    # separate generators: changing one cap does not change the other split's sample
    train = _subsample(train, max_train_pairs, seed, "data.max_train_pairs")
    test = _subsample(test, max_test_queries, seed, "data.max_test_queries")
    rows = [{"query": p["query"], "positive": p["document"], "id": p["id"], "module": p["module"]}
            for p in train]
    # a document's id is its query's plus ":code": BEIR's rule ignores a document that shares the query's id
    retrieval = RetrievalSet(queries={p["id"]: p["query"] for p in test},
                             corpus={f"{p['id']}:code": p["document"] for p in test},
                             qrels={p["id"]: {f"{p['id']}:code": 1} for p in test})
    return TrainingData(rows=rows, test=retrieval if test else None,
                        name=f"stdlib (Python {platform.python_version()})",
                        source=[(p["file"], p["line"]) for p in train])
