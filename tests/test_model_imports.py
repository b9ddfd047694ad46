"""The model package's imports run one way: io.py reads and writes folders and imports the model classes;
the classes never import io; no module takes another module's private name; each module imports alone."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embtune" / "model"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement in embtune/model/<module>.py."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_the_model_classes_never_import_io():
    for module in ("embedder", "multi_vector", "pooling", "llm", "kernels", "resolve"):
        imported = {m for m, _ in _imports(module)}
        assert "embtune.model.io" not in imported, module
        assert not any(m == "embtune.model" and "io" in names for m, names in _imports(module)), module


def test_no_private_name_is_taken_from_another_module():
    for module in MODULES:
        for source, names in _imports(module):
            if source.startswith("embtune"):
                assert not [n for n in names if n.startswith("_")], f"{module} imports {names} from {source}"


def test_each_module_imports_first():
    """Each module imported first, with no embtune module loaded before it (one interpreter, embtune's
    modules dropped between imports; torch and transformers stay loaded, they do not take part)."""
    script = "\n".join([
        "import importlib, sys",
        f"for name in {MODULES!r}:",
        "    for loaded in [m for m in sys.modules if m == 'embtune' or m.startswith('embtune.')]:",
        "        del sys.modules[loaded]",
        "    importlib.import_module('embtune.model.' + name)",
    ])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parents[1])
    assert done.returncode == 0, done.stderr
