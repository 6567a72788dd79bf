"""Dependencies point one way (flows -> tasks; deployments -> flows and tasks), and what a flow
declares for its runs agrees with its registry entry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from deployments.catalog import RUNBOOKS
from tasks.engine import RunbookFlow

ROOT = Path(__file__).resolve().parents[1]
# A layer and the top-level packages it may not import.
FORBIDDEN = {"tasks": {"flows", "deployments"}, "flows": {"deployments"}}


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module a module imports: at module level, inside functions and under
    TYPE_CHECKING, and by importlib.import_module("...") with a string literal."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(layer: str) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / layer).rglob("*.py"))
        for line, module in imported(ast.parse(path.read_text(encoding="utf-8")))
        if module.split(".")[0] in FORBIDDEN[layer]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_every_kind_of_import() -> None:
    tree = ast.parse(
        "import flows.a\nfrom deployments import b\n"
        "def f():\n    from flows.c import d\n    importlib.import_module('deployments.e')\n"
    )
    assert [m for _, m in imported(tree)] == ["flows.a", "deployments", "flows.c", "deployments.e"]


@pytest.mark.parametrize("name", list(RUNBOOKS))
def test_each_flow_declares_what_its_registry_entry_says(name: str) -> None:
    rb = RUNBOOKS[name]
    flow = rb.load()
    assert isinstance(flow, RunbookFlow)
    assert flow.name == rb.name
    assert flow.inventory == rb.inventory
    assert flow.actions == rb.actions
    assert rb.params_class.split(":")[0].startswith("tasks.")


def test_every_flow_module_has_a_registry_entry() -> None:
    entries = {rb.entrypoint.split(":")[0] for rb in RUNBOOKS.values()}
    modules = {
        f"flows.{path.stem}"
        for path in (ROOT / "flows").glob("*.py")
        if "@runbook_flow(" in path.read_text(encoding="utf-8")
    }
    assert modules == entries
