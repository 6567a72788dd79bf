"""The errors every runbook raises, and the exit code each one maps to.

    RunbookError                 base; never raised itself
    +-- ConfigError              bad configuration or usage (exit 2): file, key and fix
    +-- TargetError              the runbook could not do its job on a target (exit 3)
        +-- TargetUnreachable    could not connect; `transient` says whether a retry may help
        +-- ActionFailed         an action was attempted and the system refused it
        +-- WaitTimedOut         a condition waited for (tasks.wait.poll) did not come in time

Messages name the target, what was observed and how to fix it. They never contain a secret:
DSNs are shown through `tasks.settings.describe_dsn`, which drops the password.
"""

from __future__ import annotations


class RunbookError(Exception):
    exit_code = 3


class ConfigError(RunbookError):
    exit_code = 2


class TargetError(RunbookError):
    exit_code = 3


class TargetUnreachable(TargetError):
    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class ActionFailed(TargetError):
    pass


class WaitTimedOut(TargetError):
    pass
