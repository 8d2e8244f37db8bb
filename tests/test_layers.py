"""The import structure (docs/architecture.md): no cycles between modules; leaf data imports no
other layer; the one cycle left between subpackages may only shrink.

Imports are read from the source (every `import`, function-level ones too: a lazy import is
still a dependency), so the test needs nothing importable."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hetero_llm"

# Leaf data: imported by every layer, so it imports none of them.
LEAVES = {"errors", "config", "hardware", "_files", "_version", "_cpu_load", "_modules",
          "planner.plan", "planner.display", "planner.device_costs"}
# Subpackages still joined by one cycle (issue 20 is taking it apart); the test fails if a
# package joins it, and reminds to shrink the list when one leaves.
PACKAGE_CYCLE = {"decode", "integrations", "kernels", "parallel", "planner", "prune", "quant"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path  # "" is the top-level package
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules `name` imports (a package's own __init__ excluded)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif (node.module or "").split(".")[0] == "hetero_llm":
                base = []
                node = ast.ImportFrom(module=node.module.partition(".")[2], names=node.names, level=1)
            else:
                continue
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [target] + [f"{target}.{a.name}".strip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name.partition(".")[2] for a in node.names if a.name.startswith("hetero_llm.")]
        else:
            continue
        for c in candidates:
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != name and not name.startswith(c + "."):
                out.add(c)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods) - {""}
    return {name: _imports(name, path, known) for name, path in mods.items() if name}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected groups of more than one node (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    out.append(group)

    for node in graph:
        if node not in index:
            visit(node)
    return out


def test_no_import_cycles_between_modules():
    assert _cycles(_graph()) == []


def test_leaf_data_imports_only_leaf_data():
    graph = _graph()
    wrong = {leaf: sorted(graph[leaf] - LEAVES) for leaf in LEAVES if graph[leaf] - LEAVES}
    assert wrong == {}


def test_the_cycle_between_subpackages_only_shrinks():
    graph = _graph()
    unit = lambda m: m.split(".")[0]  # noqa: E731
    packages: dict[str, set[str]] = {}
    for name, deps in graph.items():
        packages.setdefault(unit(name), set()).update(unit(d) for d in deps if unit(d) != unit(name))
    cycles = _cycles(packages)
    joined = set().union(*cycles) if cycles else set()
    assert joined <= PACKAGE_CYCLE, f"joined the cycle: {sorted(joined - PACKAGE_CYCLE)}"
    assert joined == PACKAGE_CYCLE, f"left the cycle (remove from PACKAGE_CYCLE): {sorted(PACKAGE_CYCLE - joined)}"


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
