"""A walk through the catalogue: no destructive action can run in a dry run, or without passing
the gate, in any runbook. The flows are read as code (every call that changes a system goes
through run_action, or through gated() first), and run_action refuses for real an action the
gate did not let through."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
from prefect import Task

from deployments.catalog import ACTION_KINDS, RUNBOOKS
from tasks.engine import run_action, runbook_flow
from tasks.errors import ConfigError
from tasks.gate import gate
from tasks.models import Action, ActionStatus, Report

FLOWS = Path(__file__).resolve().parents[1] / "flows"
# The verbs of the task functions that change a system (tasks/*.py).
MUTATING = re.compile(
    r"^(cancel|terminate|restart|set|enable|clear|delete|reset|scale|renew|reload|vacuum|truncate|"
    r"create|drop|restore|dump|unlink|rollback)_"
)


def test_every_runbook_is_a_dry_run_unless_told_and_declares_its_action_kinds() -> None:
    for rb in RUNBOOKS.values():
        properties = rb.load().parameters.properties
        assert properties["dry_run"]["default"] is True, rb.name
        assert properties["approval"]["default"] == "ask", rb.name
        if rb.actions:
            assert properties["approval_timeout_seconds"]["default"] == 3600, rb.name
    assert "terminate_backend" in ACTION_KINDS and "restart_service" in ACTION_KINDS


# Changes made outside run_action on purpose, each within what its run created itself.
OWN_MAKING = {
    ("object_storage.py", "delete_canary"): "the canary object the same run wrote",
    ("restore_drill.py", "restore_backup"): "into the scratch database the gated create made",
    ("restore_drill.py", "drop_scratch_database"): "the scratch database the run created",
}


def _mutating_tasks(tree: ast.Module) -> set[str]:
    """The Prefect tasks imported from tasks.* whose verb changes a system."""
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasks.")
        for alias in node.names
        if MUTATING.match(alias.name)
        and isinstance(getattr(importlib.import_module(node.module or ""), alias.name), Task)
    }


def test_flows_change_systems_only_through_run_action_or_after_gated() -> None:
    """A call of a task that changes a system, made directly in a flow module, must sit in a
    function that first keeps only the gated actions (backup-retention's batched delete)."""
    checked, violations = 0, []
    for path in sorted(FLOWS.glob("*.py")):
        tree = ast.parse(path.read_text())
        mutating = _mutating_tasks(tree) - {n for f, n in OWN_MAKING if f == path.name}
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            gated_at = [
                c.lineno
                for c in ast.walk(fn)
                if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "gated"
            ]
            for call in ast.walk(fn):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
                    continue
                if call.func.id == "run_action":
                    checked += 1
                    continue
                if call.func.id not in mutating:
                    continue
                if not any(line < call.lineno for line in gated_at):
                    violations.append(f"{path.name}:{call.lineno} {call.func.id}")
    assert checked >= 15  # the walk saw the flows' actions
    assert violations == []


def test_the_batched_backup_delete_keeps_only_the_gated_actions_first() -> None:
    """backup-retention and disk-space delete backups in one call (tasks.retention.
    delete_approved), outside run_action: gated() must come before that call."""
    tree = ast.parse((FLOWS.parent / "tasks" / "retention.py").read_text())
    (fn,) = (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "delete_approved")
    calls = {
        c.func.id: c.lineno
        for c in ast.walk(fn)
        if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
    }
    assert calls["gated"] < calls["delete_backups"] < calls["run_action"]


@runbook_flow("gate-walk")
def _acts(target: str, dry_run: bool) -> Any:
    from tasks.engine import finish
    from tasks.models import utcnow

    started = utcnow()
    actions = [Action(kind="k", target=target, description="d", destructive=True)]
    stray = Action(kind="k", target=target, description="never gated", destructive=False)
    approved = gate(actions, [], dry_run=dry_run, approval="auto")
    for action in [*actions, stray]:  # as a flow that forgot to act on `approved` only
        run_action(action, _calls.append, action.description)
    assert approved == ([] if dry_run else actions)
    return finish(
        "gate-walk",
        target,
        dry_run=dry_run,
        started_at=started,
        before=[],
        after=[],
        actions=[*actions, stray],
    )


_calls: list[str] = []


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("dry_run", [True, False])
def test_run_action_refuses_what_did_not_pass_the_gate(dry_run: bool) -> None:
    _calls.clear()
    report: Report = _acts("t", dry_run)
    assert _calls == ([] if dry_run else ["d"])
    stray = report.actions[-1]
    assert stray.status is ActionStatus.failed and "did not pass the gate" in stray.detail


@runbook_flow("gate-declared", inventory="postgres", actions=("k",))
def _declared(target: str) -> Any:
    from tasks.engine import finish
    from tasks.models import utcnow

    started = utcnow()
    actions = [Action(kind="k", target=target, description="d", destructive=True)]
    for action in gate(actions, [], dry_run=False, approval="auto"):
        run_action(action, _calls.append, action.description)
    return finish(
        "gate-declared",
        target,
        dry_run=False,
        started_at=started,
        before=[],
        after=[],
        actions=actions,
    )


@pytest.mark.usefixtures("prefect_api")
def test_a_misspelt_approval_kind_stops_a_run_that_loads_no_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker loads the inventory without the registry's checks (deployments.config): the
    gate still refuses an [approval] kind its runbook does not declare, as a misspelt `never`
    would otherwise let the action run."""
    _calls.clear()
    path = tmp_path / "runbook.toml"
    monkeypatch.setenv("RUNBOOK_CONFIG", str(path))
    path.write_text('[approval]\ngate-declared.kk = "never"\n')
    with pytest.raises(ConfigError, match=r"approval\.gate-declared\.kk: .*its kinds: k;"):
        _declared("t")
    assert _calls == []
    path.write_text('[approval]\ngate-declared.k = "never"\n')
    report: Report = _declared("t")
    assert _calls == []
    assert report.actions[0].status is ActionStatus.skipped
    assert "approval policy is 'never'" in report.actions[0].detail


@pytest.mark.usefixtures("prefect_api")
def test_a_misspelt_runbook_in_approval_stops_a_run_that_loads_no_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[approval] gate-declard.k = "never"` was meant for gate-declared: the run refuses to
    act rather than act without the policy; another runbook's section is left alone."""
    _calls.clear()
    path = tmp_path / "runbook.toml"
    monkeypatch.setenv("RUNBOOK_CONFIG", str(path))
    path.write_text('[approval]\ngate-declard.k = "never"\n')
    with pytest.raises(
        ConfigError, match=r"approval\.gate-declard: .*did you mean 'gate-declared'"
    ):
        _declared("t")
    assert _calls == []
    path.write_text('[approval]\npostgres-connections.cancel_query = "never"\n')
    report: Report = _declared("t")
    assert report.actions[0].status is ActionStatus.done


def test_no_two_runbooks_are_named_alike_enough_to_pass_for_a_misspelling() -> None:
    from difflib import SequenceMatcher
    from itertools import combinations

    from deployments.catalog import RUNBOOKS
    from tasks.gate import MISSPELT_RATIO

    for a, b in combinations(RUNBOOKS, 2):
        assert SequenceMatcher(None, a, b).ratio() < MISSPELT_RATIO, (a, b)
