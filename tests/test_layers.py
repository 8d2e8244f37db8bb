"""The import structure (docs/architecture.md): each subpackage and top-level module imports only
from its own layer or those below; no cycles between modules or between subpackages.

Imports are read from the source (every `import`, function-level ones too: a lazy import is
still a dependency), so the test needs nothing importable."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hetero_llm"

# Lowest first. A new subpackage or top-level module must be given its place here.
LAYERS = (
    # leaf data and helpers: the plan, options, errors, the machine, the architecture table and
    # transformers' calling conventions (integrations)
    {"errors", "config", "hardware", "plan", "plan_display", "integrations", "_files", "_version",
     "_cpu_load", "_modules"},
    {"kernels"},  # ops: Triton kernels, their torch paths, the compiled CPU kernels
    {"quant"},  # quantized modules and their pass
    {"fused"},  # fused modules and the kernels pass
    {"parallel", "decode"},  # sharding, placement, the decode steps: modules and their passes
    {"prune"},
    {"planner"},  # pure decisions: handed the profile, the hardware and measured costs
    {"pipeline", "selfcheck"},  # applying a plan; checking the swaps against transformers
    {"measure"},  # timing this machine (applies plans to tiny models) for the planner
    {"api"},
    {"serialize", "evaluate", "export", "serving", "cli"},  # the user-facing surface
)
# Leaf data inside a layer above: imports nothing of the project's but other leaf data.
LEAVES = LAYERS[0] | {"planner.device_costs"}


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


def _packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    unit = lambda m: m.split(".")[0]  # noqa: E731
    packages: dict[str, set[str]] = {}
    for name, deps in graph.items():
        packages.setdefault(unit(name), set()).update(unit(d) for d in deps if unit(d) != unit(name))
    return packages


def test_no_import_cycles_between_subpackages():
    assert _cycles(_packages(_graph())) == []


def test_each_layer_imports_only_from_its_own_or_lower_layers():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    packages = _packages(_graph())
    assert sorted(set(packages) - set(rank)) == [], "place these in LAYERS"
    upward = sorted(f"{a} -> {b}" for a, deps in packages.items() for b in deps if rank[b] > rank[a])
    assert upward == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
