"""The package's shape: imports flow one way, with no cycle, and model families are named only in
their own modules. Read from the source files (module-level and function-level imports alike)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_nodes"

# Lower layers never import higher ones. Within a layer, packages may import each other only
# where named in SAME_LAYER_ORDER. ``nodes.spec`` is the declaration vocabulary: it imports
# nothing of the package, and any layer declares node inputs with it.
LAYERS = [
    {"cli", "cli_display", "comfyui", "server", "__init__"},
    {"engine"},
    {"graph"},
    {"nodes", "inspection"},
    {"training"},
    {"lora", "models", "datasets"},
    {"families"},
    {"fileio", "filepages", "libraries", "pngchunks", "tensorfiles", "nodes.spec"},
    {"paths", "modelfolders"},
    {"errors"},
]
# (importer, imported) pairs allowed within one layer
SAME_LAYER_ORDER = {("cli", "cli_display"), ("cli", "comfyui"), ("cli", "server"), ("server", "comfyui"),
                    ("__init__", "comfyui"), ("modelfolders", "paths")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module ``name`` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _unit(module: str) -> str:
    """The layering unit of a module: ``nodes.spec`` itself, else its top-level package or module."""
    rest = module.removeprefix("lora_nodes").lstrip(".")
    if rest.startswith("nodes.spec"):
        return "nodes.spec"
    return rest.split(".")[0] or "__init__"


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def test_the_walker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    missing = [u for u in units if not any(u in layer for layer in LAYERS)]
    assert missing == [], f"add {missing} to LAYERS"


def test_imports_flow_down_the_layers():
    upward = []
    for importer, imported in _graph().items():
        for target in imported:
            a, b = _unit(importer), _unit(target)
            if a == b:
                continue
            if _layer(a) > _layer(b) or (_layer(a) == _layer(b) and (a, b) not in SAME_LAYER_ORDER):
                upward.append(f"{importer} -> {target}")
    assert upward == []


def test_lora_and_models_meet_only_at_the_families():
    graph = _graph()
    crossing = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
                if {_unit(a), _unit(b)} == {"lora", "models"}]
    assert crossing == []


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant but docstrings, with its line (f-string parts included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


# How people and files spell the families, written here rather than taken from the code under test.
COMMON_SPELLINGS = {
    "sd1": {"sd1", "SD1", "SD1.x", "SD1.5", "SD 1.5", "sd15", "sd_v1", "v1-5"},
    "sd2": {"sd2", "SD2", "SD2.x", "SD2.1", "SD 2.1", "sd21", "sd_v2", "sd_v2_v", "v2-1"},
    "sdxl": {"sdxl", "SDXL", "sd_xl", "sdxl_base_v1-0"},
    "flux": {"flux", "Flux", "FLUX", "FLUX.1", "flux1", "flux-1-dev"},
}


def _family_names() -> dict[str, set[str]]:
    """family id (= its module's name) -> the words that name it: the common spellings, and what
    the family declares (id, display name, kohya versions)."""
    from lora_nodes.families import FAMILIES

    names = {}
    for family in FAMILIES:
        declared = {family.id, family.display_name, family.kohya_version, family.kohya_v_prediction_version,
                    *family.kohya_version_prefixes}
        names[family.id] = (declared | COMMON_SPELLINGS.get(family.id, set())) - {""}
    return names


def _named_families(text: str, names: dict[str, set[str]]) -> set[str]:
    """The families ``text`` names: a spelling not inside a longer word or a dashed name
    (``builtin:tiny-sdxl`` names a built-in model, not the family)."""
    found = set()
    for family_id, words in names.items():
        for word in words:
            if re.search(rf"(?<![A-Za-z0-9-]){re.escape(word)}(?![A-Za-z0-9-])", text):
                found.add(family_id)
    return found


def test_the_family_check_sees_a_name_in_a_message():
    names = {"sdxl": {"sdxl", "SDXL"}, "sd1": {"sd1", "SD1.5"}}
    assert _named_families("this needs an SDXL base", names) == {"sdxl"}
    assert _named_families("builtin:tiny-sdxl", names) == set()  # a built-in's name is not the family's
    assert _named_families("sd1", names) == {"sd1"}
    assert _named_families("sd1_version", names) == {"sd1"}  # followed by an underscore: still the family
    from lora_nodes.families import FAMILIES

    assert set(COMMON_SPELLINGS) == {f.id for f in FAMILIES}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_family_is_named_outside_its_module(path):
    names = _family_names()
    own = path.stem if path.parent.name == "families" else None
    named = []
    for line, text in _string_literals(path):
        others = _named_families(text, names) - {own}
        if others:
            named.append(f"line {line}: {text!r} names {sorted(others)}")
    assert named == [], "ask the family (lora_nodes.families) instead of naming it"
