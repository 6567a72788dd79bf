"""data-integrity's pure rules: levels, the order of deletion, findings and the capped plan."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.integrity_rules import (
    IntegrityParams,
    IntegrityState,
    LiveRows,
    Orphans,
    deletion_order,
    depths,
    integrity_findings,
    plan_integrity,
)
from tasks.models import ActionStatus, Severity
from tasks.settings import IntegritySet, Relation


def rel(child: str, column: str, parent: str) -> Relation:
    return Relation(child_table=child, child_column=column, parent_table=parent)


# Configured top-down, as a person writes them; the seed's Menu <- Category <- Item, and
# Item also references a Tax table (a second root).
RELATIONS = [
    rel("Category", "menuId", "Menu"),
    rel("public.Item", "categoryId", "Category"),
    rel("Item", "taxId", "Tax"),
]
SET = IntegritySet(
    target="main",
    relations=RELATIONS,
    sessions={"table": "Session", "expires_column": "expiresAt"},
)


def state(*counts: int, expired: int | None = 0) -> IntegrityState:
    return IntegrityState(
        orphans=[
            Orphans(relation=i, count=n, sample=[f"r{i}-{k}" for k in range(min(n, 3))])
            for i, n in enumerate(counts)
        ],
        expired_sessions=expired,
        live_rows=[LiveRows(table="public.Item", live_rows=6)],
    )


def test_levels_count_from_the_roots_and_a_schema_less_name_is_public() -> None:
    assert depths(RELATIONS) == {
        ("public", "Menu"): 0,
        ("public", "Tax"): 0,
        ("public", "Category"): 1,
        ("public", "Item"): 2,
    }
    # Item's two relations first (configured order between them), Category's last.
    assert deletion_order(RELATIONS) == [1, 2, 0]


def test_plan_deletes_deepest_first_and_shares_the_cap_in_that_order() -> None:
    p = IntegrityParams(max_rows_deleted=5, batch_size=2)
    actions = plan_integrity("app", SET, state(4, 3, 1, expired=7), p)
    assert [(a.kind, a.args.model_dump(), a.status) for a in actions] == [
        ("delete_orphans", {"relation": 1, "limit": 3}, ActionStatus.planned),
        ("delete_orphans", {"relation": 2, "limit": 1}, ActionStatus.planned),
        ("delete_orphans", {"relation": 0, "limit": 1}, ActionStatus.planned),
        ("delete_expired_sessions", {"limit": 7}, ActionStatus.planned),
    ]
    assert actions[2].detail == "1 of 4 only: cap max_rows_deleted"
    assert all(a.destructive for a in actions)

    spent = plan_integrity("app", SET, state(4, 5, 0), p)
    assert [(a.args.model_dump(), a.status) for a in spent] == [
        ({"relation": 1, "limit": 5}, ActionStatus.planned),
        ({"relation": 0, "limit": 0}, ActionStatus.skipped),
    ]
    assert "max_rows_deleted" in spent[1].detail


def test_no_orphans_and_no_expired_sessions_plan_nothing() -> None:
    assert plan_integrity("app", SET, state(0, 0, 0), IntegrityParams()) == []
    none = plan_integrity(
        "app", SET, state(0, 0, 0, expired=3), IntegrityParams(max_sessions_deleted=0)
    )
    assert none[0].status is ActionStatus.skipped


def test_findings_carry_counts_samples_and_live_rows() -> None:
    findings = integrity_findings("app", SET, state(4, 0, 1, expired=2), IntegrityParams())
    orphans = [f for f in findings if f.check == "orphans"]
    assert [(f.observed, f.severity) for f in orphans] == [
        (4, Severity.warning),
        (0, Severity.ok),
        (1, Severity.warning),
    ]
    assert "id r0-0, r0-1, r0-2 (first 3)" in orphans[0].message
    assert '"Category"."menuId"' in orphans[0].message
    sessions = next(f for f in findings if f.check == "expired_sessions")
    assert (sessions.observed, sessions.severity) == (2, Severity.warning)
    live = next(f for f in findings if f.check == "live_rows")
    assert live.observed == [{"table": "public.Item", "live_rows": 6}]
    assert live.severity is Severity.ok


@pytest.mark.parametrize(
    "relations",
    [
        [rel("Category", "parentId", "Category")],
        [rel("A", "bId", "B"), rel("B", "cId", "public.C"), rel("C", "aId", "A")],
    ],
)
def test_cycles_are_refused(relations: list[Relation]) -> None:
    with pytest.raises(ValidationError, match="closes a cycle"):
        IntegritySet(target="main", relations=relations)


@pytest.mark.parametrize("field", ["max_rows_deleted", "batch_size", "sample_size"])
def test_params_are_bounded(field: str) -> None:
    with pytest.raises(ValidationError):
        IntegrityParams(**{field: -1})
