"""The layout stays as the README describes it: imports only go down, no import circle, no job
imports another job, short functions and files.

Layers, top to bottom: run.py -> jobs/ -> trained/ -> tokenizers/ -> models/ -> core/.
configs/ sit beside the layers: anything above models/ may read them, and they import only
other configs and the JAX-free core/runtime/rules.py.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "visual_tokenizers"
LAYERS = {"core": 0, "models": 1, "tokenizers": 2, "trained": 3, "jobs": 4, "run": 5}
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 400


def _python_files(folders=("core", "models", "tokenizers", "trained", "jobs", "configs")):
    files = [os.path.join(ROOT, "run.py")]
    for folder in folders:
        for where, _, names in os.walk(os.path.join(ROOT, folder)):
            files += [os.path.join(where, n) for n in names if n.endswith(".py")]
    return sorted(files)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, modules: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included).

    `from visual_tokenizers.trained import inputs` imports the module trained.inputs (not the
    package trained); `from visual_tokenizers.core.files import write_json` imports core.files.
    """
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
            if not any(n[len(PACKAGE) + 1 :] in modules for n in names):
                names = [node.module]
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                found.add(name[len(PACKAGE) + 1 :])
    return found


def _graph() -> dict[str, set[str]]:
    """module -> project modules it imports."""
    modules = {_module_name(p): p for p in _python_files()}
    return {m: _imports(p, set(modules)) & set(modules) for m, p in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_imports_only_go_down():
    wrong = []
    for module, imported in _graph().items():
        for other in imported:
            mine, theirs = _layer(module), _layer(other)
            if theirs == "configs":
                ok = mine == "configs" or LAYERS.get(mine, 0) > LAYERS["models"]
            elif mine == "configs":
                ok = other == "core.runtime.rules"  # JAX-free (test_config_vocabulary.py)
            elif mine == "jobs" and theirs == "jobs":
                ok = False  # a job never imports another job
            else:
                ok = LAYERS[theirs] <= LAYERS[mine]
            if not ok:
                wrong.append(f"{module} imports {other}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = _graph()
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_upward_and_circular_imports(tmp_path, monkeypatch):
    """The two tests above fail on a tree that breaks the rules."""
    for folder, text in {
        "core": f"from {PACKAGE}.models import net\n",
        "models": f"from {PACKAGE}.core import low\n",
        "jobs": f"def f():\n    from {PACKAGE}.jobs import other\n",
    }.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "low.py").write_text(text)
        (tmp_path / folder / "net.py").write_text("")
        (tmp_path / folder / "other.py").write_text("")
    (tmp_path / "run.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    with pytest.raises(AssertionError, match="core.low imports models.net"):
        test_imports_only_go_down()
    with pytest.raises(AssertionError, match="jobs.low imports jobs.other"):
        test_imports_only_go_down()
    (tmp_path / "models" / "net.py").write_text(f"from {PACKAGE}.core import low\n")
    with pytest.raises(AssertionError, match="core.low -> models.net -> core.low"):
        test_no_import_circle()


def _long_functions(path: str) -> list[str]:
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                out.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({lines})")
    return out


def test_functions_are_short_outside_config_builders():
    files = _python_files(("core", "models", "tokenizers", "trained", "jobs", "benchmarks"))
    files += _python_files(("tests",))[1:]
    long = [f for path in files for f in _long_functions(path)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_files_stay_under_400_lines():
    folders = ("core", "models", "tokenizers", "trained", "jobs", "configs", "benchmarks", "tests")
    big = []
    for path in _python_files(folders):
        count = sum(1 for _ in open(path))
        if count >= MAX_FILE_LINES:
            big.append(f"{os.path.relpath(path, ROOT)} ({count} lines)")
    assert not big, "files of 400 lines or more:\n" + "\n".join(big)
