"""The layering of docs/architecture.md, read from the imports of every module (``ast``, nothing imported).

Every ``import`` and ``from ... import`` is read, at module level and inside functions alike, so a lazy import
cannot hide an upward arrow. The deprecated aliases of ``pcopt.optim`` (``__getattr__``, by name through
``importlib``) are the one documented upward reference; they go in pcopt 0.4.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# docs/architecture.md, "What each layer may import".
LAYERS: dict[str, set[str]] = {
    "foundation": {
        "pcopt._tensor", "pcopt.polynomials", "pcopt.power_iteration", "pcopt.inverse", "pcopt.options",
        "pcopt.names", "pcopt.hardware", "pcopt.spectral_clip", "pcopt.profiling",
    },
    "pc_layer": {
        "pcopt.layer", "pcopt.slot", "pcopt.registration", "pcopt.kernel", "pcopt.strategy", "pcopt.state",
        "pcopt.conversion", "pcopt.diagnostics", "pcopt.accumulation", "pcopt.spectral",
    },
    "optimizers": {"pcopt.optim"},  # the package and every module in it
    "recipe": {"pcopt.recipes", "pcopt.training"},
    "integrations": {"pcopt", "pcopt.huggingface", "pcopt.demo"},
}  # fmt: skip
MAY_IMPORT: dict[str, set[str]] = {
    "foundation": {"foundation"},
    "pc_layer": {"foundation", "pc_layer"},
    "optimizers": {"foundation", "optimizers"},
    "recipe": {"foundation", "pc_layer", "optimizers", "recipe"},
    "integrations": {"foundation", "pc_layer", "optimizers", "recipe", "integrations"},
}
OUTSIDE = ("torchtitan_ext", "benchmarks", "tools", "tests")  # what pcopt never imports


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if module == "pcopt.optim" or module.startswith("pcopt.optim."):
        return "optimizers"
    for layer, members in LAYERS.items():
        if module in members:
            return layer
    raise AssertionError(f"{module} is in no layer of docs/architecture.md: add it to LAYERS and to the page")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import in ``path``; ``from pcopt import x`` names ``pcopt.x`` when that is
    a module, else the package ``pcopt`` itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    ROOT / Path(*sub.split(".")) / "__init__.py"
                ).is_file()
                found.append((sub if is_module else node.module, node.lineno))
    return found


def _pcopt_files() -> list[Path]:
    return sorted((ROOT / "pcopt").rglob("*.py"))


def test_every_pcopt_module_imports_only_what_its_layer_may():
    wrong = []
    for path in _pcopt_files():
        me = _module_name(path)
        mine = _layer(me)
        for target, line in _imports(path):
            rel = f"{path.relative_to(ROOT)}:{line}"
            if target.split(".")[0] in OUTSIDE:
                wrong.append(f"{rel}: {me} imports {target} (pcopt never imports {target.split('.')[0]})")
            elif target.split(".")[0] == "pcopt":
                theirs = _layer(target)
                if theirs not in MAY_IMPORT[mine]:
                    wrong.append(f"{rel}: {me} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def test_optimizers_import_nothing_from_the_pc_layer_or_the_recipe():
    optim = [p for p in _pcopt_files() if _module_name(p).startswith("pcopt.optim")]
    assert len(optim) >= 5
    for path in optim:
        for target, line in _imports(path):
            assert not target.startswith("pcopt") or _layer(target) in {"foundation", "optimizers"}, (
                f"{path.relative_to(ROOT)}:{line} imports {target}"
            )


def test_module_level_imports_form_no_circle():
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "pcopt").rglob("*.py")) + sorted((ROOT / "torchtitan_ext").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        deps = set()
        for node in top:
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif node.module and node.level == 0:
                deps.add(node.module)
        graph[_module_name(path)] = {d for d in deps if d.split(".")[0] in ("pcopt", "torchtitan_ext")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep == node or node.startswith(dep + "."):
                continue  # a package's submodule importing from the package's own __init__ chain
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack, node, dep]))
            if state.get(dep) is None and dep in graph:
                visit(dep, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node, [])


def test_torchtitan_ext_is_never_imported_by_pcopt_and_pcopt_by_nothing_outside_its_api():
    """torchtitan_ext -> pcopt -> torch, one way: pcopt names no integration or tooling package."""
    for path in _pcopt_files():
        for target, line in _imports(path):
            assert target.split(".")[0] not in ("torchtitan_ext", "torchtitan", "benchmarks", "tools"), (
                f"{path.relative_to(ROOT)}:{line} imports {target}"
            )
