"""raypo's modules import each other in one direction (DESIGN.md): no import circle, counting
the imports written inside functions too (the search and confirmation stage once formed one
through two of those)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raypo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the raypo modules it imports anywhere in its file}."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from raypo.search import run` imports the module raypo.search.run
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.timeout(60)
def test_the_graph_reader_finds_a_circle_through_imports_inside_functions(tmp_path):
    # the checker itself: a circle written with function-level imports, as the old one was
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.timeout(60)
def test_no_module_of_raypo_imports_itself_through_others():
    graph = import_graph()
    assert "raypo.search.pipeline" in graph and len(graph) > 50  # it read the package
    # the confirmation stage builds on the Tune set-up, not on the search's private names
    assert "raypo.search.run" not in graph["raypo.search.confirm"]
    assert "raypo.search.tuning" in graph["raypo.search.confirm"]
    assert cycles(graph) == []


README = PACKAGE.parent / "README.md"


def stage_of(module: str) -> str:
    """raypo.train.loop -> train; raypo.cli -> cli; raypo -> raypo."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def allowed_imports() -> dict[str, set[str]]:
    """{stage: the stages it may import}, read from the README's layout table."""
    text = README.read_text()
    table = text[text.index("| stage | may import |"):].split("\n\n", 1)[0]
    allowed = {}
    for line in table.splitlines()[2:]:
        stages, may = (cell.strip() for cell in line.strip("|").split("|"))
        targets = set() if may == "nothing" else {t.strip(" `") for t in may.split(",")}
        for stage in stages.split("(")[0].split(","):
            allowed[stage.strip(" `")] = targets
    return allowed


def stray_imports(graph: dict[str, set[str]], allowed: dict[str, set[str]]) -> list[str]:
    """`module -> imported` for every import from one stage to a stage its row does not name."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if stage_of(a) != stage_of(b) and stage_of(b) not in allowed[stage_of(a)])


@pytest.mark.timeout(60)
def test_every_import_goes_the_way_the_readme_table_says():
    allowed = allowed_imports()
    graph = import_graph()
    assert {stage_of(m) for m in graph} == set(allowed)  # every stage has its row
    assert all(targets <= set(allowed) for targets in allowed.values())
    # DESIGN.md: the losses import nothing of raypo, and nothing but the entry point the cli
    assert allowed["losses"] == set()
    assert [stage for stage, targets in allowed.items() if "cli" in targets] == ["__main__"]
    assert stray_imports(graph, allowed) == []
    # the checker itself: a stage importing upstream, inside a function, is caught
    assert stray_imports({"raypo.losses.dpo": {"raypo.train.loop"}}, allowed) == [
        "raypo.losses.dpo -> raypo.train.loop"]


def private_imports() -> list[tuple[str, str, str]]:
    """(module, imported module, name) for every `from raypo... import _name` in raypo."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and (
                    node.module or "").startswith("raypo"):
                found += [(name, node.module, a.name) for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return sorted(found)


@pytest.mark.timeout(60)
def test_no_stage_reads_another_stages_private_names():
    found = private_imports()
    assert [f for f in found if stage_of(f[0]) != stage_of(f[1])] == []
    # the selection evidence and a run's set-up share public functions only (tokenizing in
    # raypo.data.tokenize, the reference outputs in raypo.train.reference)
    assert [f for f in found if f[0] == "raypo.search.evidence"] == []
