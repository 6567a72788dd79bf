"""Action kinds are typed: each runbook's Literal lists them once (the catalogue reads them from
there), mypy refuses a misspelt kind, and pydantic refuses one at run time."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import get_args

import pytest
from mypy import api
from pydantic import ValidationError

from deployments.catalog import ACTION_KINDS, RUNBOOKS
from tasks.models import Action
from tasks.postgres_rules import BackendRef, ConnectionsAction

ROOT = Path(__file__).resolve().parents[1]


def typecheck(tmp_path: Path, kind: str) -> tuple[str, int]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        textwrap.dedent(
            f"""
            from tasks.models import Action
            from tasks.postgres_rules import BackendRef, ConnectionsAction


            def plan() -> list[Action[ConnectionsAction, BackendRef]]:
                return [
                    Action(
                        kind="{kind}",
                        target="main",
                        description="d",
                        destructive=True,
                        args=BackendRef(pid=1, backend_start=None),
                    )
                ]


            def act(action: Action[ConnectionsAction, BackendRef]) -> bool:
                return action.kind == "{kind}"
            """
        )
    )
    out, err, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--strict", str(snippet)]
    )
    return out + err, status


def test_mypy_refuses_a_misspelt_kind_and_accepts_the_right_one(tmp_path: Path) -> None:
    out, status = typecheck(tmp_path, "cancel_querry")
    assert status == 1, out
    assert 'Argument "kind" to "Action" has incompatible type "Literal[\'cancel_querry\']"' in out
    assert "Non-overlapping equality check" in out
    out, status = typecheck(tmp_path, "cancel_query")
    assert status == 0, out


def test_a_misspelt_kind_is_refused_at_run_time_too() -> None:
    with pytest.raises(ValidationError, match="cancel_query"):
        Action[ConnectionsAction, BackendRef](
            kind="cancel_querry",  # type: ignore[arg-type]
            target="main",
            description="d",
            destructive=True,
            args=BackendRef(pid=1, backend_start=None),
        )


def test_the_catalogue_lists_each_runbooks_literal_in_one_naming_style() -> None:
    assert RUNBOOKS["postgres-connections"].actions == get_args(ConnectionsAction)
    assert RUNBOOKS["restore-drill"].actions == ("restore_drill",)
    assert RUNBOOKS["backup-verification"].actions == ()
    assert all(kind.isidentifier() and kind == kind.lower() for kind in ACTION_KINDS)
