"""The package's shape: every module imports on its own, imports run one way (no circle, nothing below the
recipes imports a recipe, the config or the command line), and no module takes another's private name."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embtune"
TOP = ("embtune.cli", "embtune.commands", "embtune.recipes", "embtune.config")  # what the pieces below never import


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported embtune module, names taken from it) for every import in ``path``, local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("embtune"):
            for alias in node.names:  # `from embtune.model import io` imports the module embtune.model.io
                sub = f"{node.module}.{alias.name}"
                found.append((sub, []) if sub in modules else (node.module, [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("embtune")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _ in _imports(path, modules)} - {name} for name, path in modules.items()}


def test_every_module_imports_on_its_own():
    names = sorted(_modules())
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n"
              "    for m in [m for m in sys.modules if m == 'embtune' or m.startswith('embtune.')]:\n"
              "        del sys.modules[m]\n"
              "    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_imports_form_no_circle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_pieces_never_import_recipes_config_or_the_command_line():
    upward = []
    for name, imported in _graph().items():
        if name.startswith(TOP) or name == "embtune":
            continue
        upward += [f"{name} -> {m}" for m in imported if m.startswith(TOP)]
    assert not upward, upward


def test_no_module_takes_another_modules_private_name():
    modules = _modules()
    taken = [f"{name}: {m}.{n}" for name, path in modules.items() for m, names in _imports(path, modules)
             for n in names if n.startswith("_") and m != name]
    assert not taken, taken


def test_the_checks_see_a_circle_and_a_private_import(tmp_path, monkeypatch):
    """The walker itself: a planted circle and a private import are found."""
    pkg = tmp_path / "embtune"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from embtune.a.y import _helper\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from embtune.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    graph = _graph()
    assert graph["embtune.a.x"] == {"embtune.a.y"} and graph["embtune.a.y"] == {"embtune.a.x"}
    modules = _modules()
    assert _imports(modules["embtune.a.x"], modules) == [("embtune.a.y", ["_helper"])]


def test_the_package_list_names_every_folder():
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert folders <= listed and "embtune.conf" in listed
