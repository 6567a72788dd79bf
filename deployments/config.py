"""The inventory as the entry points load it (the CLI, `runbook serve`, the receiver): its
shapes (tasks.settings.load_settings), then every name in it that means a runbook, an action
kind or a runbook's parameter checked against the registry (deployments.catalog):

- a target's `thresholds`: the parameters of its section's runbooks (catalog.threshold_names);
- `[approval] <runbook>.<kind>`: a known runbook and a kind it plans;
- `[limits] <kind>`: a kind some runbook plans;
- `[[notify.routes]] runbooks`: known runbooks;
- `[[routes]]`: deployments.alert_routes.check_routes.

A run started by a worker loads the inventory without the registry; its gate checks its own
`[approval]` kinds (tasks.gate)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from deployments.alert_routes import check_routes
from deployments.catalog import ACTION_KINDS, RUNBOOKS, SECTIONS, threshold_names
from tasks.errors import ConfigError
from tasks.settings import ENV_PREFIX, Settings, config_path, load_settings


def load_config(path: Path | None = None) -> Settings:
    """load_settings(path), checked against the registry (check_settings).

    Raises ConfigError: one message naming the file, each key and its fix."""
    path = path or config_path()
    settings = load_settings(path)
    check_settings(settings, path)
    return settings


def check_settings(settings: Settings, path: Path) -> None:
    """Every name in settings that the registry must know (module docstring); path: the file
    they came from, for the message.

    Raises ConfigError listing every unknown name with what is known."""
    lines = [
        f"{path}: {key}: {message}; correct it in {path} or {_env(key)}"
        for key, message in _unknown_names(settings)
    ]
    try:
        check_routes(settings)
    except ConfigError as exc:
        lines.append(f"{path}: {exc}; correct it there or in the {ENV_PREFIX}* variables")
    if lines:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))


def _unknown_names(settings: Settings) -> Iterator[tuple[str, str]]:
    """(key, what is wrong) for each name the registry does not know."""
    for section in SECTIONS:
        allowed = threshold_names(section)
        for name, target in settings.targets(section).items():
            unknown = sorted(set(target.thresholds) - allowed)
            if unknown:
                yield (
                    f"{section}.{name}.thresholds",
                    f"unknown {', '.join(unknown)}; known: {', '.join(sorted(allowed))}",
                )
    for runbook, kinds in settings.approval.items():
        if runbook not in RUNBOOKS:
            yield f"approval.{runbook}", f"unknown runbook; known: {', '.join(RUNBOOKS)}"
            continue
        known = RUNBOOKS[runbook].actions
        for kind in kinds:
            if kind not in known:
                yield (
                    f"approval.{runbook}.{kind}",
                    f"{runbook} plans no action of that kind; its kinds: "
                    f"{', '.join(known) or 'none (it changes nothing)'}",
                )
    unknown_kinds = sorted(set(settings.limits) - ACTION_KINDS)
    if unknown_kinds:
        yield (
            "limits",
            f"unknown action kind {', '.join(unknown_kinds)}; "
            f"known: {', '.join(sorted(ACTION_KINDS))}",
        )
    for i, route in enumerate(settings.notify.routes if settings.notify else []):
        for name in route.runbooks or []:
            if name not in RUNBOOKS:
                yield (
                    f"notify.routes[{i}].runbooks",
                    f"unknown runbook {name!r}; known: {', '.join(RUNBOOKS)}",
                )


def _env(key: str) -> str:
    """The environment variable of a dotted key: postgres.main.thresholds ->
    RUNBOOK_POSTGRES__MAIN__THRESHOLDS."""
    return ENV_PREFIX + key.split("[")[0].replace(".", "__").upper()
