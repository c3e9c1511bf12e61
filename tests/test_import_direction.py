"""Imports go one way, along the data flow, with `cdp` on top wiring the others:

    cdp → projections → identity → ingest → cdp.contracts

A package imports only packages to its right (cdp/contracts/__init__.py says why): `cdp.contracts`,
the names every package agrees on, is a leaf layer of its own below all the others, although it
lives in the `cdp` folder beside the domain events it names. No module is part of an import cycle.
Every import counts: at module level and inside functions alike.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("cdp", "projections", "identity", "ingest", "cdp.contracts")  # top → bottom
PACKAGES = ("cdp", "projections", "identity", "ingest")  # the folders the layers live in


def _layer(module: str) -> int:
    """The rank of the most specific layer `module` belongs to (cdp.contracts.x → cdp.contracts)."""
    return max((i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")),
               key=lambda i: len(LAYERS[i]))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports (`from a import b` counts as a.b when a.b is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("__import__", "import_module"):
            found.update(arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_packages_import_only_downstream_layers():
    wrong = []
    for module, targets in _graph().items():
        rank = _layer(module)
        for target in targets:
            target_rank = _layer(target)
            if target_rank < rank:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the data flow:\n" + "\n".join(sorted(wrong))


def test_importing_the_contracts_leaf_runs_none_of_cdp():
    """Lower layers import `cdp.contracts`, which runs `cdp/__init__.py` first: it must stay empty."""
    assert _imports(ROOT / "cdp" / "__init__.py") == set()
    assert _graph()["cdp.contracts"] == set()


def test_no_module_is_part_of_an_import_cycle():
    graph = _graph()
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
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
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walk_sees_imports_in_functions_and_dunder_import(tmp_path):
    """The checks above cannot pass by not looking."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from cdp.config import Settings\n"
                      "x = __import__('cdp.identity_cli')\nimport projections.tables\n", encoding="utf-8")
    assert _imports(source) == {"cdp.config", "cdp.config.Settings", "cdp.identity_cli", "projections.tables"}
    assert len(_graph()) > 50


def test_stored_event_topics_name_the_domain_classes():
    """cdp.contracts.stored_events holds the names the store writes and the projections select; the
    library reads stored events back by the same names, so they must be the classes' topics."""
    from eventsourcing.utils import get_topic

    from cdp.domain import AuditLog, Customer
    from cdp.contracts import stored_events

    names = {name: value for name, value in vars(stored_events).items() if name.isupper() and name[0] != "_"}
    assert names.pop("CUSTOMER") == get_topic(Customer)
    assert names.pop("AUDIT_LOG") == get_topic(AuditLog)
    assert names.pop("AUDIT_ENTRY") == get_topic(AuditLog.Entry)
    names.pop("AUDIT_LOG_ID")
    classes = {name for name, value in vars(Customer).items()
               if isinstance(value, type) and name not in ("Created", "Event")}  # the library's base classes
    assert {value.rsplit(".", 1)[1] for value in names.values()} == classes
    for value in names.values():
        assert get_topic(getattr(Customer, value.rsplit(".", 1)[1])) == value


def test_only_the_application_holds_the_event_store():
    """One write path: the store's writer (cdp/store.py EventStore) is built and used by the
    application's commands alone; everyone else calls the commands."""
    users = sorted(str(path.relative_to(ROOT)) for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                   if "EventStore" in path.read_text(encoding="utf-8") or "transaction(commit=True)" in path.read_text(encoding="utf-8"))
    assert users == ["cdp/application.py", "cdp/store.py"]
