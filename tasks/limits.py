"""Blast-radius limits over time, across runs and processes, kept by the Prefect API:

- a **rate limit** per action kind and target (`runbook-rate-<kind>-<target>`), e.g. at most 2
  restart_service on service `api` in any hour, whatever runbook, run or process asks;
- **one mutating run at a time** per inventory target (`runbook-mutating-<resource>`).

Both are Prefect global concurrency limits, created here when missing and then always used
with `strict=True`: a limit that cannot be created or read is an error (TargetError), never
a silent pass. They show on the Concurrency page of the Prefect UI, where they can be read,
reset or switched off.

How a Prefect rate limit behaves (prefect 3.9.1, server/models/concurrency_limits_v2.py,
measured against its API): a limit with `slot_decay_per_second > 0` is a leaky bucket of
`limit` slots. Taking a slot is one atomic UPDATE, so two processes never both take the last
one. The occupied count shrinks by `floor(slot_decay_per_second * seconds since the row was
last written)`; taking a slot writes the row, so it restarts that clock and drops the
fraction gone by. A refusal writes nothing (the server raises its 423 inside the
transaction that would count the denied slot, which rolls it back).

A bucket alone cannot express "N per window" with N per window sustained: leaking N/W allows
close to 2N in one window. Rates here leak one slot per `per_seconds` (decay
1/per_seconds), so no interval between two takes shorter than per_seconds gives a slot
back, and therefore at most `max` actions start in any window of per_seconds (the max+1-th
comes no earlier than per_seconds after the first). The price: after a burst of `max`, a
slot comes back only per_seconds after the latest take, and a full bucket is empty again
only after max * per_seconds. Whoever wants the budget back at once resets the limit's
active slots on the Concurrency page of the Prefect UI.

A limit switched off in the UI (inactive) is not enforced by Prefect; that is left as the
operator's decision. This module reads a limit before asking for a slot and does not ask for
one it can see is taken; a request that loses a race to another process is refused by the
API at once (423 Locked, never retried): a rate never waits. The mutating slot waits up to
MUTATING_WAIT_SECONDS for the run holding it, saying so in the run's log, so that runs due
together follow one another. Each API call is bounded by API_TIMEOUT_SECONDS (a busy SQLite
server can take seconds).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from tasks.errors import TargetError
from tasks.journal import run_logger
from tasks.models import Action, ActionStatus, ServiceRef, touched_ref

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse

# Prefect's answer when the slots asked for are in use: refused at once, never waited for
# (a run over its limit says so instead of waiting silently).
LOCKED = 423
# Requests for the slots of one rate limit in one admit: each after a race lost to another
# process, so that a busy limit still answers within a few seconds.
MAX_ATTEMPTS = 3
# Each call to the Prefect API for creating, reading and taking limits; Prefect's client
# retries 429/503 answers within it. A busy SQLite server can take seconds to answer.
API_TIMEOUT_SECONDS = 30.0
# The mutating lock's lease: Prefect renews it every 3/4 of this while the run holds it; a
# killed holder's slot comes back when it runs out (minimum 60 s, Prefect's API).
MUTATING_LEASE_SECONDS = 120.0

# How long a run that would change a target waits for another run changing it: remediations
# take seconds, and runs due at the same minute (a schedule, an alert) should follow one
# another rather than skip; a wait longer than this means something is stuck.
MUTATING_WAIT_SECONDS = 60.0

RATE_PREFIX = "runbook-rate-"
MUTATING_PREFIX = "runbook-mutating-"


class RateLimit(BaseModel):
    """At most `max` actions in any window of `per_seconds` seconds (see the module's
    docstring for how Prefect's leaky bucket keeps it, and what it costs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max: int = Field(ge=1, description="actions allowed in any window")
    # At least a minute: schedules run minutes apart, so a shorter window limits nothing.
    # At most 31 days: anything longer is a typo, or a limit better kept as policy `never`.
    per_seconds: int = Field(ge=60, le=31 * 86_400, description="the window, in seconds")

    @property
    def slot_decay_per_second(self) -> float:
        """Prefect's decay for this rate: one slot per window (module docstring)."""
        return 1.0 / self.per_seconds

    def __str__(self) -> str:
        return f"{self.max} per {self.per_seconds} s"


# Per destructive action kind (deployments.catalog.ACTION_KINDS); configured [limits] replace them.
DEFAULT_RATES: dict[str, RateLimit] = {
    # Issue 13's own example: at most 2 restarts of one service per hour. Seed 003
    # ("Application Not Responding") escalates when a restart does not fix it, rather than
    # restarting again.
    "restart_service": RateLimit(max=2, per_seconds=3600),
    # Issue 13's own example: at most 500 backends ended per hour on one PostgreSQL
    # (postgres-connections ends at most max_backends_ended, default 20, per run).
    "terminate_backend": RateLimit(max=500, per_seconds=3600),
    # A cancel escalates to a terminate after its grace period: the same budget.
    "cancel_query": RateLimit(max=500, per_seconds=3600),
    # stuck-jobs runs every 10 minutes with a 30-minute threshold (seed 004 s6): a job can
    # honestly be found stuck at most twice an hour; 4 leaves room for runs by hand.
    "reset_stuck_jobs": RateLimit(max=4, per_seconds=3600),
    # Lockouts are a security control (seed 002, "Security Procedures"): clearing them over
    # and over in an hour is an attack, not an incident. login-lockouts (seed 001,
    # "Excessive login lockouts") is run by hand, for a few users at a time.
    "clear_lockout_keys": RateLimit(max=5, per_seconds=3600),
    "clear_lockout_rows": RateLimit(max=5, per_seconds=3600),
    # backup-retention runs once a day and deletes at most max_deletions (default 50) per
    # run: the same number per day across all runs.
    "delete_backup": RateLimit(max=50, per_seconds=86_400),
    # A background rewrite of the whole data set (a fork and disk writes): rare by nature.
    "enable_aof": RateLimit(max=2, per_seconds=3600),
    # Destructive when it turns eviction on: keys start going at once if memory is full.
    "set_maxmemory_policy": RateLimit(max=2, per_seconds=3600),
    # data-integrity deletes application rows (seed 003 "Data Corruption"), max_rows_deleted
    # (1000) a run: a few runs an hour finish a backlog; orphans that keep coming back are a
    # bug in the application, not something to delete over and over.
    "delete_orphans": RateLimit(max=4, per_seconds=3600),
    # Expired sessions are dead data (seed 003 "Login Problems"), max_sessions_deleted a run.
    "delete_expired_sessions": RateLimit(max=4, per_seconds=3600),
    # security-incident is run by hand for the users of one incident (seed 004 s12).
    "revoke_sessions": RateLimit(max=10, per_seconds=3600),
    # Each rotation invalidates every token: all users are logged out.
    "rotate_jwt_key": RateLimit(max=2, per_seconds=86_400),
    # failed-migration: a migration fails at most once per deploy; marking several resolved
    # within an hour on one database is a deploy loop to look at, not to automate.
    "resolve_prisma_migration": RateLimit(max=3, per_seconds=3600),
    "force_migration_version": RateLimit(max=3, per_seconds=3600),
    # block-ips is run by hand during an attack, a handful of changes an hour (each one a
    # whole-configuration check and reload); a run that keeps rewriting the file is a loop.
    "block_addresses": RateLimit(max=20, per_seconds=3600),
    "unblock_addresses": RateLimit(max=20, per_seconds=3600),
    # maintenance-mode, and the pair around postgres-down's, redis-health's and
    # security-incident's actions, per service: an incident puts an application in and out
    # once or twice an hour (seed 004 s2: "temporarily"); more is a flapping loop that keeps
    # users out. The pair runs only when both halves are admitted (tasks.maintenance_rules).
    "enable_maintenance": RateLimit(max=4, per_seconds=3600),
    "disable_maintenance": RateLimit(max=4, per_seconds=3600),
    # disk-space: a container log that needs truncating more than 4 times an hour is a logging
    # loop to fix at its source (seed 000 s4: rotate with max-size), not to truncate over and
    # over. Counted per service.
    "truncate_container_log": RateLimit(max=4, per_seconds=3600),
    # disk-space drops at most max_partitions_dropped (12: a year of months) a run; two
    # years' worth in a day clears a first backlog, more is a loop or a wrong keep_months.
    # Counted per database.
    "drop_partition": RateLimit(max=24, per_seconds=86_400),
    # release-rollback: a bad release is rolled back once; a second within the hour means the
    # last healthy image is not healthy either (or deploys keep coming): a person decides.
    "rollback_image": RateLimit(max=2, per_seconds=3600),
}

# The kinds with no rate over time, and why (tests/test_limits.py: every kind of the catalogue
# is in DEFAULT_RATES or here). They still take the one-mutating-run-per-target limit.
UNRATED: dict[str, str] = {
    "dump": "adds a backup and changes no data; pre-change-backup runs it by hand",
    "handoff": "starts another runbook, which has its own gate and limits",
    "renew_certificate": "the ACME CA rate-limits issuance itself; the window allows one a day",
    "restore_drill": "works on a scratch database it creates and drops",
    "scale_workers": "bounded by max_workers of the queue's worker service",
    "vacuum_analyze": "takes no data away; at most max_tables a run, with lock timeouts",
}


def rate_for(kind: str, rates: Mapping[str, RateLimit]) -> RateLimit | None:
    """The rate of an action kind: the configured one (Settings.limits), else
    DEFAULT_RATES, else None (not limited over time)."""
    return rates.get(kind) or DEFAULT_RATES.get(kind)


def limit_name(prefix: str, *parts: str) -> str:
    """A global concurrency limit's name: prefix and parts joined by "-", kept readable on
    the Concurrency page. Characters other than letters, digits, ".", "_" and "-" (Prefect
    bans / % & < > in names, and the name travels in URL paths) become "-", and then a
    short hash of the original parts is appended so two targets never share a limit."""
    raw = "-".join(parts)
    clean = re.sub(r"[^A-Za-z0-9._-]", "-", raw)
    if clean != raw:
        clean += "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return prefix + clean


def rate_limit_name(kind: str, target: str) -> str:
    """`runbook-rate-<kind>-<target>`, e.g. runbook-rate-restart_service-api."""
    return limit_name(RATE_PREFIX, kind, target)


def mutating_limit_name(resource: str) -> str:
    """`runbook-mutating-<resource>`, e.g. runbook-mutating-postgres.main."""
    return limit_name(MUTATING_PREFIX, resource)


def acted_on(action: Action) -> str:
    """What an action changes, for its rate limit: the NAME of the target its `touches`
    names ("backups.local" -> "local"), so that disk-space's delete_backup on a backup set
    counts against the budget backup-retention keeps on that set (whose action.target is the
    set's NAME); else the service a restart acts on (its args, a ServiceRef: postgres-down
    and redis-health name their target's service, service-health and resource-pressure the
    service); else the action's target. The kind is part of the limit's name, and a kind
    changes targets of one inventory section, so the NAME alone does not mix sections."""
    if action.touches is not None:
        ref = touched_ref(action.touches)
        return ref[1] if ref is not None else action.touches
    return action.args.service if isinstance(action.args, ServiceRef) else action.target


def admit(actions: list[Action], *, rates: Mapping[str, RateLimit]) -> list[Action]:
    """Take one slot of its rate limit for each planned action whose kind has a rate
    (`rate_for`: configured, else DEFAULT_RATES), keyed by (action.kind, acted_on(action)), and
    return the planned actions admitted, in their order. Call it in a run, after approval.

    The actions of one limit take their slots together, in one atomic request: as many as
    are free, the first ones first. An action over its limit is marked skipped with a detail
    naming the limit, its rate, and when its next slot frees (seconds from now and UTC
    time). Nothing waits for a slot; at most MAX_ATTEMPTS requests per limit (only races
    lost to other processes cost one), each answered within API_TIMEOUT_SECONDS. Actions
    not `planned` are neither taken nor returned. Limits are created when missing (races
    between processes are settled by the API's unique names) and set to the configured rate
    when it changed.

    Raises TargetError (exit 3) when the Prefect API cannot create, read or use a limit:
    a limit that cannot be kept is an error, never a pass.
    """
    planned = [a for a in actions if a.status is ActionStatus.planned]
    groups: dict[str, tuple[RateLimit, list[Action]]] = {}
    for action in planned:
        rate = rate_for(action.kind, rates)
        if rate is not None:
            name = rate_limit_name(action.kind, acted_on(action))
            groups.setdefault(name, (rate, []))[1].append(action)
    if not groups:
        return planned
    with _client("the rate limits of these actions") as client:
        for name, (rate, group) in groups.items():
            limit = ensure_limit(
                client, name, limit=rate.max, slot_decay_per_second=rate.slot_decay_per_second
            )
            taken, limit = _take(client, limit, len(group))
            if taken < len(group):
                if taken:
                    limit = _read(client, name)  # when its clock restarted, for the detail
                reason = _rate_refusal(limit, rate)
                for action in group[taken:]:
                    _skip(action, reason)
    return [a for a in planned if a.status is ActionStatus.planned]


def _take(
    client: SyncPrefectClient, limit: GlobalConcurrencyLimitResponse, wanted: int
) -> tuple[int, GlobalConcurrencyLimitResponse]:
    """Take up to `wanted` slots of a rate limit, as many as it shows free, in one request;
    return how many were taken and the limit as last read."""
    import httpx

    for _ in range(MAX_ATTEMPTS):
        # Prefect lets everything through an inactive limit (switched off in the UI).
        free = wanted if not limit.active else min(wanted, limit.limit - limit.active_slots)
        if free <= 0:
            return 0, limit
        try:
            with _api_errors(f"the concurrency limit {limit.name}"):
                try:
                    granted = client.increment_concurrency_slots([limit.name], free, "rate_limit")
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code == LOCKED:
                        raise _SlotsTaken from None
                    raise
        except _SlotsTaken:
            # Another process took slots between our read and our request.
            limit = _read(client, limit.name)
            continue
        if not granted.json():  # strict: a limit deleted in between is no pass
            raise TargetError(
                f"the concurrency limit {limit.name} vanished while in use at {_api_url()}; "
                "no action was allowed past it"
            )
        return free, limit
    return 0, limit


class _SlotsTaken(Exception):
    """Prefect's API answered 423 Locked: the slots asked for are in use."""


@contextmanager
def mutating_run(resource: str, wait_seconds: float | None = None) -> Iterator[str | None]:
    """Hold the global concurrency limit of 1 `runbook-mutating-<resource>` (resource is an
    inventory target like "postgres.main") while the body runs: one mutating run at a time per
    target. Yields None when held; or, when another run still holds it after wait_seconds
    (default: MUTATING_WAIT_SECONDS as it is at the call; said in the run's log when the wait
    begins), the reason it is not (which limit, that another run holds it, where to look) and
    the body must not change anything. The slot is released when the body ends, also by an
    exception.

    A slot an ancestor flow run in this process holds (tasks.journal.Journal.locks) counts as
    held, and yields None at once without asking the API: service-health hands a failing
    dependency over to postgres-down or redis-health as a subflow after its gate, holding
    services.X for each X it plans to restart; postgres-down's restart of the database's
    service, or its maintenance pair on an application, may touch one of those X. The
    subflow runs inside its parent's turn (the parent waits for it and acts on X only after
    it returns), so it is no second run on X; asking the API would make it wait for its own
    parent and then skip.

    The limit is created when missing and taken with strict=True. The slot is held under a
    lease of MUTATING_LEASE_SECONDS that Prefect's client renews in the background (recorded
    with the flow run as holder when called in one); a holder killed without releasing
    gets its slot back when the lease expires and the server's repossessor service revokes
    it. Caveats of Prefect 3.9.1 (server/concurrency/lease_storage/memory.py, the default
    lease storage, and services/repossessor.py, not run by ephemeral servers): leases live
    in the API server's memory, so after a server restart, or for an API served inside a
    killed process (the CLI's), the slot stays taken until reset on the UI's Concurrency page.
    A failed lease renewal is logged and the run goes on: stopping a remediation half done is
    worse than a moment without the lock.

    Raises TargetError (exit 3) when the Prefect API cannot create, read or use the limit.
    """
    from prefect.concurrency.sync import concurrency

    from tasks.journal import held_by_ancestor, journal

    if held_by_ancestor(resource):
        yield None
        return
    if wait_seconds is None:
        wait_seconds = MUTATING_WAIT_SECONDS
    name = mutating_limit_name(resource)
    with _client(f"the concurrency limit {name}") as client:
        limit = ensure_limit(client, name, limit=1, slot_decay_per_second=0.0)
        if limit.active and limit.active_slots >= limit.limit:
            run_logger(__name__).warning(
                "another run is changing %s (concurrency limit %s): waiting up to %g s for it",
                resource,
                name,
                wait_seconds,
            )
        with ExitStack() as stack:
            try:
                with _api_errors(f"the concurrency limit {name}"):
                    stack.enter_context(
                        concurrency(
                            name,
                            occupy=1,
                            timeout_seconds=wait_seconds,
                            lease_duration=MUTATING_LEASE_SECONDS,
                            strict=True,
                            holder=_holder(),
                            raise_on_lease_renewal_failure=False,
                        )
                    )
            except TargetError as exc:
                if not isinstance(exc.__cause__, TimeoutError):
                    raise
                reason: str | None = _still_busy(client, name, resource, wait_seconds)
            else:
                reason = None
            if reason is not None:
                yield reason
                return
            with journal().holding(resource):
                yield None


def _still_busy(client: SyncPrefectClient, name: str, resource: str, waited: float) -> str:
    """Why a mutating slot was not granted within `waited` seconds."""
    if _read(client, name).active_slots >= 1:
        return (
            f"another run is changing {resource}: it held the concurrency limit {name} (one "
            f"mutating run at a time per target) for the {waited:g} s this run waited; run "
            "again when it has finished, or see the Concurrency page of the Prefect UI"
        )
    return (
        f"the Prefect API at {_api_url()} did not grant the concurrency limit {name} within "
        f"{waited:g} s though it shows it free; nothing was changed: run again"
    )


class _QuietRefusals(logging.Filter):
    """Prefect's slot service logs an ERROR line (no traceback) for every request it gives up
    on; here a timed-out wait is an answer, reported on the action instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.getMessage().startswith("Service 'ConcurrencySlotAcquisition")
            and "raised TimeoutError" in record.getMessage()
        )


logging.getLogger("prefect._internal.concurrency").addFilter(_QuietRefusals())


def ensure_limit(
    client: SyncPrefectClient, name: str, *, limit: int, slot_decay_per_second: float
) -> GlobalConcurrencyLimitResponse:
    """The global concurrency limit `name`, created when missing and updated when its size or
    decay differs from the ones given (the configuration is the source of truth; whether it
    is active is left to whoever switched it in the UI). A create that loses a race with
    another process reads the winner's. TargetError when the API refuses or cannot be reached.
    """
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with _api_errors(f"the concurrency limit {name}"):
        try:
            found = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(
                        name=name, limit=limit, slot_decay_per_second=slot_decay_per_second
                    )
                )
            found = client.read_global_concurrency_limit_by_name(name)
        if found.limit != limit or not math.isclose(
            found.slot_decay_per_second, slot_decay_per_second, rel_tol=1e-9, abs_tol=0.0
        ):
            client.update_global_concurrency_limit(
                name,
                GlobalConcurrencyLimitUpdate(
                    limit=limit, slot_decay_per_second=slot_decay_per_second
                ),
            )
            found = client.read_global_concurrency_limit_by_name(name)
    return found


def next_slot_at(limit: GlobalConcurrencyLimitResponse, now: datetime) -> datetime:
    """When the next slot of a full rate limit frees (UTC): its occupied count drops by one
    each 1/slot_decay_per_second seconds counted from the limit's last update (module
    docstring). A limit without decay frees only on release: `now` is returned."""
    decay = limit.slot_decay_per_second
    if decay <= 0 or limit.updated is None:
        return now
    # Prefect's timestamps are UTC; a plain datetime keeps pendulum's arithmetic out.
    stamp = limit.updated
    updated = datetime(*stamp.timetuple()[:6], stamp.microsecond, tzinfo=stamp.tzinfo or UTC)
    updated = updated.astimezone(UTC)
    gone = math.floor(decay * max((now - updated).total_seconds(), 0.0))
    needed = gone + max(limit.active_slots - limit.limit, 0) + 1
    return updated + timedelta(seconds=needed / decay)


def _rate_refusal(limit: GlobalConcurrencyLimitResponse, rate: RateLimit) -> str:
    now = datetime.now(UTC)
    frees = next_slot_at(limit, now)
    wait = max(math.ceil((frees - now).total_seconds()), 0)
    return (
        f"over the rate limit {limit.name} ({rate}): its next slot frees in {wait} s, at "
        f"{frees:%Y-%m-%d %H:%M:%S} UTC; see or reset it on the Concurrency page of the "
        "Prefect UI"
    )


def _skip(action: Action, reason: str) -> None:
    action.status = ActionStatus.skipped
    action.detail = reason


def _read(client: SyncPrefectClient, name: str) -> GlobalConcurrencyLimitResponse:
    with _api_errors(f"the concurrency limit {name}"):
        return client.read_global_concurrency_limit_by_name(name)


@contextmanager
def _client(what: str) -> Iterator[SyncPrefectClient]:
    from prefect.client.orchestration import get_client

    with (
        _api_errors(what),
        get_client(httpx_settings={"timeout": API_TIMEOUT_SECONDS}, sync_client=True) as client,
    ):
        yield client


def _holder() -> Any:
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=ctx.flow_run.id)


@contextmanager
def _api_errors(what: str) -> Iterator[None]:
    """Prefect's errors about `what` (a limit) as one TargetError naming it, an API that did
    not answer in time (TimeoutError) included."""
    import httpx
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.exceptions import ObjectNotFound

    try:
        yield
    except (
        ConcurrencySlotAcquisitionError,
        httpx.HTTPError,
        ObjectNotFound,
        TimeoutError,
    ) as exc:
        raise TargetError(
            f"{what} could not be kept by the Prefect API at "
            f"{_api_url()}: {_why(exc)}; no action was allowed past it. Check that the API "
            "answers and that its credentials may manage concurrency limits"
        ) from exc


def _api_url() -> str:
    """PREFECT_API_URL without any user or password it may carry."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return "(ephemeral)"
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _why(exc: BaseException) -> str:
    import httpx
    from prefect.exceptions import ObjectNotFound

    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {exc.request.method} {exc.request.url.path}"
    if isinstance(exc, ObjectNotFound):
        return "it does not exist (deleted while in use?)"
    cause = exc.__cause__
    if isinstance(cause, httpx.HTTPError):
        return f"{exc}: {_why(cause)}"
    return str(exc) or type(exc).__name__
