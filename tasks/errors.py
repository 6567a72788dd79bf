"""The errors every runbook raises, and the exit code each one maps to.

    RunbookError                 base; never raised itself
    +-- ConfigError              bad configuration or usage (exit 2): file, key and fix
    +-- TargetError              the runbook could not do its job on a target (exit 3)
        +-- TargetUnreachable    could not connect; `transient` says whether a retry may help
        +-- AuthenticationFailed the target answered and refused the credentials (a wrong
        |                        password or key, an unknown role or database); never retried
        +-- ActionFailed         an action was attempted and the system refused it
        +-- WaitTimedOut         a condition waited for (tasks.wait.poll) did not come in time
        +-- tasks.storage.BadGzip, BackupRefused
        |                        a backup's content refused; the callers report it as a finding
        +-- deployments.alert_store.StoreError
                                 a transaction of the alert store failed and rolled back; its
                                 StoreUnavailable (unreachable, too slow) is a TargetUnreachable

Messages name the target, what was observed and how to fix it. They never contain a secret:
DSNs are shown through `tasks.settings.describe_dsn`, which drops the password.

Outside this tree are only Prefect's own control exceptions (`prefect.exceptions.Abort` for a
cancelled run), Python's own errors for a call that can only be a bug in the caller (waiting
for an approval or opening a run (tasks.run) outside a runbook's flow run, polling with bounds
out of order, filtering deliveries by a column that does not exist, an action that touches
a target the inventory does not have), and
the private exceptions a module raises and catches itself.
"""

from __future__ import annotations

from typing import Final


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


class AuthenticationFailed(TargetError):
    """The target refused the credentials: retrying or restarting it cannot help."""

    transient: Final = False


class ActionFailed(TargetError):
    pass


class WaitTimedOut(TargetError):
    pass
