"""The registry: every runbook, what it is for, how it is triggered and what it may change. Plain
data: the CLI lists and validates from here without importing Prefect or the flows, and lists
without importing the parameter classes either.

Each flow declares its inventory section and action kinds itself (tasks.engine.runbook_flow),
for the gate and the audit of its runs; tests/test_layers.py checks they agree with its entry
here. deployments.config checks an inventory against this registry."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

if TYPE_CHECKING:
    from prefect import Flow

    from tasks.models import Params
    from tasks.settings import Settings


@dataclass(frozen=True)
class Runbook:
    name: str
    entrypoint: str  # module:function
    purpose: str
    seeds: str
    inventory: str  # the inventory section its targets come from
    params_class: str  # module:class of its parameters, imported when first needed
    changes: str
    # module:Literal of the kinds of action it may plan (Action.kind), imported when first
    # needed; None: it plans none. `actions` lists them: what [approval] and [limits] may name.
    action_kinds: str | None
    cron: str | None  # its schedule, UTC; None: run by hand only
    # The parameters of scheduled runs; a manual run is always a dry run unless --apply.
    scheduled: dict[str, Any] = field(default_factory=dict)
    # What a target needs for this runbook, said in words and as a test.
    requires: str = ""
    accepts: Callable[[Any], bool] = field(default=lambda target: True)
    # Runbooks that look at every target of their section at once run as this one target,
    # and may be narrowed to one of them by this parameter (alerts naming one service).
    default_target: str | None = None
    narrowed_by: str | None = None

    @property
    def triggers(self) -> str:
        if self.cron is None:
            return "manual"
        mode = "applies" if not self.scheduled.get("dry_run", True) else "diagnose only"
        return f"schedule `{self.cron}` ({mode}); manual"

    @property
    def params(self) -> type[Params]:
        """The runbook's parameter class (a tasks.models.Params)."""
        module, name = self.params_class.split(":")
        params: type[Params] = getattr(importlib.import_module(module), name)
        return params

    @property
    def actions(self) -> tuple[str, ...]:
        """The kinds of action it may plan, from its Literal (action_kinds)."""
        if self.action_kinds is None:
            return ()
        module, name = self.action_kinds.split(":")
        kinds: tuple[str, ...] = get_args(getattr(importlib.import_module(module), name))
        return kinds

    def load(self) -> Flow[..., Any]:
        module, function = self.entrypoint.split(":")
        flow: Flow[..., Any] = getattr(importlib.import_module(module), function)
        return flow

    def targets(self, settings: Settings) -> list[str]:
        """The inventory targets this runbook can run on."""
        eligible = sorted(
            name
            for name, target in settings.targets(self.inventory).items()
            if self.accepts(target)
        )
        if self.default_target is not None:
            return [self.default_target] if eligible else []
        return eligible

    def accepted(self, settings: Settings) -> dict[str, dict[str, str]]:
        """Every target of its section it can run on, one at a time (a fleet selects among
        these, even for a runbook that otherwise looks at its whole section at once): each
        name with its labels."""
        return {
            name: dict(target.labels)
            for name, target in sorted(settings.targets(self.inventory).items())
            if self.accepts(target)
        }

    def select(self, settings: Settings, selector: str) -> list[str]:
        """The targets a fleet selector picks among accepted() (tasks.fleet_rules), or
        ConfigError saying what is configured."""
        from tasks.fleet_rules import select_targets

        return select_targets(
            selector,
            self.accepted(settings),
            section=self.inventory,
            runbook=self.name,
            configured=tuple(settings.targets(self.inventory)),
            requires=self.requires,
        )

    def alert_targets(self, settings: Settings) -> list[str]:
        """What an alert route may name: a deployment's target, or a target the runbook is
        narrowed to."""
        served = self.targets(settings)
        if self.narrowed_by is None or not served:
            return served
        return served + sorted(
            name
            for name, target in settings.targets(self.inventory).items()
            if self.accepts(target) and name not in served
        )


RUNBOOKS: dict[str, Runbook] = {
    rb.name: rb
    for rb in (
        Runbook(
            name="postgres-connections",
            entrypoint="flows.postgres_connections:postgres_connections",
            purpose="Connections against max_connections, sessions idle in transaction, long "
            "queries, lock waits; cancels, then terminates, what is over the limits.",
            seeds="000 s2, 002 s5, 003 Database Connection Issues, 004 s5 (DBPoolExhausted)",
            inventory="postgres",
            params_class="tasks.postgres_rules:ConnectionsParams",
            changes="cancels queries and terminates client backends (never superusers, "
            "replication or background workers; allow-lists and a cap per run)",
            action_kinds="tasks.postgres_rules:ConnectionsAction",
            cron="*/5 * * * *",
            scheduled={"dry_run": True},
        ),
        Runbook(
            name="postgres-maintenance",
            entrypoint="flows.postgres_maintenance:postgres_maintenance",
            purpose="Top queries (pg_stat_statements), dead tuples, vacuum/analyze age, table "
            "and index sizes; VACUUM (ANALYZE) of bloated tables.",
            seeds="002 s1 and monthly checklist, 004 s2",
            inventory="postgres",
            params_class="tasks.postgres_rules:MaintenanceParams",
            changes="runs VACUUM (ANALYZE) on tables over the dead-tuple threshold, one at a "
            "time, with lock and statement timeouts",
            action_kinds="tasks.postgres_rules:MaintenanceAction",
            cron="30 3 * * *",
            scheduled={"dry_run": False, "approval": "auto"},
        ),
        Runbook(
            name="stuck-jobs",
            entrypoint="flows.stuck_jobs:stuck_jobs",
            purpose="Jobs left running longer than the threshold in a jobs table; resets them "
            "to pending in one transaction.",
            seeds="004 s6 (crawler stuck jobs)",
            inventory="postgres",
            params_class="tasks.postgres_rules:StuckJobsParams",
            changes="UPDATEs stuck rows of the configured jobs table back to pending",
            action_kinds="tasks.postgres_rules:StuckJobsAction",
            cron="*/10 * * * *",
            scheduled={"dry_run": False, "approval": "auto"},
            requires='a jobs table ([postgres.NAME.jobs] with table = "SCHEMA.TABLE")',
            accepts=lambda target: target.jobs is not None,
        ),
        Runbook(
            name="redis-health",
            entrypoint="flows.redis_health:redis_health",
            purpose="PING latency, memory against maxmemory, fragmentation, evictions, the "
            "eviction policy the role wants, persistence and clients; sets the policy.",
            seeds="000 s1, 001 Redis unavailable, 004 s4",
            inventory="redis",
            params_class="tasks.redis_rules:RedisHealthParams",
            changes="CONFIG SET maxmemory-policy to what the role wants (cache: allkeys-lru, "
            "queue: noeviction), CONFIG SET appendonly yes on a queue, and CONFIG REWRITE; "
            "restarts it through its service",
            action_kinds="tasks.redis_rules:RedisHealthAction",
            cron="*/5 * * * *",
            scheduled={"dry_run": True},
        ),
        Runbook(
            name="login-lockouts",
            entrypoint="flows.login_lockouts:login_lockouts",
            purpose="Clears the login lockouts of one user, email or IP (or all) from Redis, "
            "and from a lockout table in PostgreSQL when configured.",
            seeds="001 Excessive login lockouts",
            inventory="redis",
            params_class="tasks.redis_rules:LockoutParams",
            changes="UNLINKs lockout keys found with SCAN (never KEYS or FLUSHALL); DELETEs "
            "the subject's rows from the configured lockout table",
            action_kinds="tasks.redis_rules:LockoutAction",
            cron=None,
        ),
        Runbook(
            name="queue-backlog",
            entrypoint="flows.queue_backlog:queue_backlog",
            purpose="BullMQ counts per queue, sampled twice for the drain rate and an ETA; "
            "backlogs over the threshold and stalled workers.",
            seeds="000 s3 (waiting > 1000), 004 s4",
            inventory="redis",
            params_class="tasks.redis_rules:QueueBacklogParams",
            changes="scales the worker_service (a docker compose service) to "
            "scale_workers_to replicas",
            action_kinds="tasks.redis_rules:QueueBacklogAction",
            cron="*/5 * * * *",
            scheduled={"dry_run": True},
            requires="BullMQ queue names (queues = [...] in [redis.NAME])",
            accepts=lambda target: bool(target.queues),
        ),
        Runbook(
            name="postgres-down",
            entrypoint="flows.postgres_down:postgres_down",
            purpose="PostgreSQL unreachable: service status, last log lines and disk of the "
            "data directory; a restart through its service, then readiness with backoff.",
            seeds="001 Postgres unavailable, 002 s2, 003 Database Connection Issues, 004 s3",
            inventory="postgres",
            params_class="tasks.service_rules:PostgresDownParams",
            changes="restarts the service that runs PostgreSQL (docker, systemd or command)",
            action_kinds="tasks.service_rules:PostgresDownAction",
            cron="*/2 * * * *",
            scheduled={"dry_run": True},
        ),
        Runbook(
            name="service-health",
            entrypoint="flows.service_health:service_health",
            purpose="Probes each service's health and ready URLs; a failing dependency goes to "
            "its runbook (postgres-down, redis-health), a failing app gets a restart.",
            seeds="001, 002 s2, 003 Application Not Responding, 004 s1 and s10, 000 s7",
            inventory="services",
            params_class="tasks.service_rules:ServiceHealthParams",
            changes="restarts an app that fails its own health check; what a hand-off "
            "runbook may change",
            action_kinds="tasks.service_rules:ServiceHealthAction",
            cron="*/2 * * * *",
            scheduled={"dry_run": True},
            requires="a health_url or ready_url",
            accepts=lambda target: bool(target.health_url or target.ready_url),
            default_target="all",
            narrowed_by="service",
        ),
        Runbook(
            name="resource-pressure",
            entrypoint="flows.resource_pressure:resource_pressure",
            purpose="CPU and memory per service, OOM kills and restarts, host memory and load, "
            "top consumers first; restarts a service over its own memory limit.",
            seeds="002 s4, 003 High CPU/Memory Usage",
            inventory="services",
            params_class="tasks.service_rules:ResourceParams",
            changes="restarts a service using more than memory_percent of its memory limit",
            action_kinds="tasks.service_rules:ResourceAction",
            cron="*/15 * * * *",
            scheduled={"dry_run": True},
            default_target="all",
        ),
        Runbook(
            name="tls-certificates",
            entrypoint="flows.tls_certificates:tls_certificates",
            purpose="The certificate each endpoint serves: days left, hostname, chain, issuer; "
            "renews those in the renewal window, reloads the proxy, checks the new one is served.",
            seeds="000 s5, 002 s3 and its thresholds, 003 SSL Certificate Issues",
            inventory="tls",
            params_class="tasks.tls_rules:TlsParams",
            changes="runs the renew command (certbot renew --cert-name ...) and the reload "
            "command (nginx -s reload) or restarts the proxy's service",
            action_kinds="tasks.tls_rules:TlsAction",
            cron="0 6 * * *",
            scheduled={"dry_run": False, "approval": "auto"},
            default_target="all",
        ),
        Runbook(
            name="object-storage",
            entrypoint="flows.object_storage:object_storage",
            purpose="A canary object through head bucket, put, get and compare, a presigned "
            "GET and delete, each timed; a failure says DNS/connect, credentials or provider.",
            seeds="004 s8 (object storage unreachable)",
            inventory="s3",
            params_class="tasks.backup_rules:ObjectStorageParams",
            changes="writes and deletes one canary object under the prefix",
            action_kinds=None,
            cron="*/15 * * * *",
            scheduled={"dry_run": True},
        ),
        Runbook(
            name="backup-retention",
            entrypoint="flows.backup_retention:backup_retention",
            purpose="Keeps the newest backup of the last N days, M ISO weeks and K months; "
            "deletes the rest, oldest first, within max_deletions.",
            seeds="000 s4 (prune old backups), 002 Backup & Recovery",
            inventory="backups",
            params_class="tasks.retention_rules:RetentionParams",
            changes="deletes backups past the policy and their .sha256 (never the newest or "
            "one younger than 24 h; max_deletions a run)",
            action_kinds="tasks.retention_rules:RetentionAction",
            cron="30 7 * * *",
            scheduled={"dry_run": True},
        ),
        Runbook(
            name="backup-verification",
            entrypoint="flows.backup_verification:backup_verification",
            purpose="The newest backup in S3 or a directory: age, size against the previous, "
            "a streamed gzip or pg_restore --list check, and its checksum.",
            seeds="002 Backup & Recovery and daily checklist, 001 backups",
            inventory="backups",
            params_class="tasks.backup_rules:BackupParams",
            changes="nothing: read-only",
            action_kinds=None,
            cron="0 7 * * *",
            scheduled={"dry_run": True},
        ),
        Runbook(
            name="restore-drill",
            entrypoint="flows.restore_drill:restore_drill",
            purpose="Restores the newest (or a chosen) backup into a scratch database, runs "
            "the SQL checks, compares tables with the source, reports RTO and RPO, drops it.",
            seeds="002 Database Recovery and monthly disaster recovery drill",
            inventory="backups",
            params_class="tasks.drill_rules:RestoreDrillParams",
            changes="creates and drops a scratch database on the scratch target's server; "
            "never touches the source database",
            action_kinds="tasks.drill_rules:RestoreDrillAction",
            cron="0 4 1 * *",
            scheduled={"dry_run": False, "approval": "auto"},
            requires='a scratch target (scratch = "NAME" in [backups.NAME])',
            accepts=lambda target: target.scratch is not None,
        ),
        Runbook(
            name="pre-change-backup",
            entrypoint="flows.pre_change_backup:pre_change_backup",
            purpose="A custom-format pg_dump of the set's database straight to its S3 prefix "
            "or directory with a checksum, read back and verified; run before a change.",
            seeds="002 change management (create backup), 001 backups",
            inventory="backups",
            params_class="tasks.drill_rules:PreChangeParams",
            changes="writes one new dump and its .sha256 to the backup storage",
            action_kinds="tasks.drill_rules:PreChangeAction",
            cron=None,
            requires='a database (database = "NAME" in [backups.NAME])',
            accepts=lambda target: target.database is not None,
        ),
        Runbook(
            name="data-integrity",
            entrypoint="flows.data_integrity:data_integrity",
            purpose="Orphan rows along the configured relations, at every level, with a sample "
            "of ids; expired sessions; live rows per table. Deletes them in capped batches.",
            seeds="003 Data Corruption, 003 Login Problems (clear expired sessions)",
            inventory="integrity",
            params_class="tasks.integrity_rules:IntegrityParams",
            changes="DELETEs orphan rows, deepest level first, and expired sessions, in batches "
            "each its own transaction (max_rows_deleted and max_sessions_deleted a run)",
            action_kinds="tasks.integrity_rules:IntegrityAction",
            cron=None,
        ),
        Runbook(
            name="security-incident",
            entrypoint="flows.security_incident:security_incident",
            purpose="Revokes the live sessions of compromised users, rotates the JWT signing "
            "key and restarts the services that read it; shows the last 24 h of the audit log.",
            seeds="004 s12 (token compromise), 002 Suspected Security Breach, 001 secrets rotation",
            inventory="security",
            params_class="tasks.security_rules:SecurityParams",
            changes="UPDATEs the named users' live sessions to revoked; stores a new key pair "
            "in the Prefect Secret block (the previous one kept under a dated name); restarts "
            "the services that read it",
            action_kinds="tasks.security_rules:SecurityAction",
            cron=None,
        ),
        Runbook(
            name="failed-migration",
            entrypoint="flows.failed_migration:failed_migration",
            purpose="A failed Prisma migration or a dirty golang-migrate version: its error and "
            "whether its objects exist (partially applied); marks it resolved.",
            seeds="000 s6, 002 s6, 003 Deployment Failures, 004 s11 (and 004 s3 after a restart)",
            inventory="postgres",
            params_class="tasks.migration_rules:MigrationParams",
            changes="writes what `prisma migrate resolve` (UPDATE rolled_back_at; INSERT a "
            "finished row) or `migrate force V` (TRUNCATE and INSERT schema_migrations) writes; "
            "refused for a partially applied migration",
            action_kinds="tasks.migration_rules:MigrationAction",
            cron=None,
        ),
        Runbook(
            name="block-ips",
            entrypoint="flows.block_ips:block_ips",
            purpose="Denies abusive addresses or CIDR ranges at the reverse proxy (an nginx "
            "deny file), or lifts a block; checks the 403 where it can be tested.",
            seeds="002 Suspected Security Breach (Isolate), 002 DDoS Attack, 001 Excessive "
            "login lockouts (brute-force IPs), 004 s4 (block abusive IPs)",
            inventory="proxies",
            params_class="tasks.proxy_rules:BlockParams",
            changes="rewrites the deny file (never 0.0.0.0/0 or the allow-list, at most "
            "max_entries lines), checks the configuration and reloads the proxy; a refused "
            "check or reload puts the previous file back",
            action_kinds="tasks.proxy_rules:BlockAction",
            cron=None,
        ),
        Runbook(
            name="maintenance-mode",
            entrypoint="flows.maintenance_mode:maintenance_mode",
            purpose="Puts an application in maintenance mode or takes it out (enable=true or "
            "false) through its own admin API, and reads the flag back.",
            seeds="004 s2 step 5, s3 step 6, s12 step 3; 001 Redis unavailable",
            inventory="services",
            params_class="tasks.maintenance_rules:MaintenanceParams",
            changes="sends the admin API's configured request (PUT body_on or body_off with "
            "its bearer token); postgres-down, redis-health and security-incident send the "
            "same pair around their actions when their target has a maintenance_service",
            action_kinds="tasks.maintenance_rules:MaintenanceAction",
            cron=None,
            requires="a maintenance API ([services.NAME.maintenance] with url, body_on, body_off)",
            accepts=lambda target: target.maintenance is not None,
        ),
        Runbook(
            name="disk-space",
            entrypoint="flows.disk_space:disk_space",
            purpose="Space and inodes used per filesystem, the largest entries, container logs, "
            "tables, old backups and partitions; truncates logs and frees what is past policy.",
            seeds="000 s4 (Disk Full), 004 s9 (Disk Space Critical, DiskUsageHigh), 002 "
            "monitoring thresholds (80 % warning, 90 % critical)",
            inventory="disk",
            params_class="tasks.disk_rules:DiskParams",
            changes="truncates configured containers' json-file logs over max_log_mb; while the "
            "disk is over a warning threshold, deletes backups past the set's retention policy "
            "and detaches and drops dated tables older than keep_months (caps per run; VACUUM "
            "FULL only suggested)",
            action_kinds="tasks.disk_rules:DiskAction",
            cron="*/15 * * * *",
            scheduled={"dry_run": True},
        ),
        Runbook(
            name="smtp-check",
            entrypoint="flows.smtp_check:smtp_check",
            purpose="One SMTP session as the app has it (DNS, connect, TLS, EHLO, AUTH, MAIL, "
            "RCPT), each step timed, a failure classified; the fallback's, and what to switch to.",
            seeds="004 s7 (SMTP / Email Delivery Failure, and its step 4 fallback to SMTP)",
            inventory="smtp",
            params_class="tasks.smtp_rules:SmtpParams",
            changes="nothing (RSET after RCPT TO); with send_test = true one small test message "
            "to the target's `to` addresses",
            action_kinds=None,
            cron="*/15 * * * *",
            scheduled={"dry_run": True},
        ),
        Runbook(
            name="metrics-guard",
            entrypoint="flows.metrics_guard:metrics_guard",
            purpose="Requests the metrics guard must refuse (no or a wrong secret, a denied "
            "address) and one it must admit with Prometheus text; says which part is wrong.",
            seeds="001 Metrics endpoint failing authentication (METRICS_ENABLED, METRICS_GUARD)",
            inventory="metrics",
            params_class="tasks.metrics_rules:MetricsParams",
            changes="nothing: read-only",
            action_kinds=None,
            cron="0 * * * *",
            scheduled={"dry_run": True},
        ),
        Runbook(
            name="release-rollback",
            entrypoint="flows.release_rollback:release_rollback",
            purpose="A docker service failing its health check after its image changed goes "
            "back to the image service-health last recorded it healthy on.",
            seeds="000 s6 (rollback image), 002 s6 (rollback to previous version), 003 "
            "Deployment Failures, 004 s1 step 3 (rollback)",
            inventory="services",
            params_class="tasks.release_rules:ReleaseParams",
            changes="recreates the service's containers on its last healthy image (same name, "
            "env, labels, networks, volumes, ports, restart policy), one at a time; the old "
            "one is put back if the new one does not start; never pulls",
            action_kinds="tasks.release_rules:ReleaseAction",
            cron=None,
            requires='kind = "docker" and a health_url or ready_url',
            accepts=lambda target: (
                target.kind == "docker" and bool(target.health_url or target.ready_url)
            ),
        ),
    )
}

# The inventory sections runbooks take their targets from.
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(rb.inventory for rb in RUNBOOKS.values()))


def threshold_names(section: str) -> frozenset[str]:
    """What a target's `thresholds` may set in an inventory section (postgres, redis, ...): the
    parameters of the runbooks of that section (Params.threshold_names). Imports their
    parameter classes."""
    return frozenset(
        name
        for rb in RUNBOOKS.values()
        if rb.inventory == section
        for name in rb.params.threshold_names()
    )


def __getattr__(name: str) -> frozenset[str]:
    """ACTION_KINDS: every kind of action any runbook may plan; computed when first asked
    for, as it imports the runbooks' rules (listing the runbooks does not)."""
    if name == "ACTION_KINDS":
        return frozenset(kind for rb in RUNBOOKS.values() for kind in rb.actions)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The routine schedules of seed 002 "Routine Maintenance" (its daily, weekly and monthly
# checklists): each runs its runbooks as subflows on every target they have
# (deployments.routines). A routine is not a runbook: it has no inventory section, no target and
# no action of its own; what it may change is what its runbooks' gates let through.


@dataclass(frozen=True)
class Step:
    """One runbook of a routine. diagnose_only: always a dry run, whatever the routine's
    dry_run (a review item of the checklist)."""

    runbook: str
    diagnose_only: bool = False


@dataclass(frozen=True)
class Routine:
    name: str
    entrypoint: str  # module:function
    purpose: str
    seeds: str
    cron: str  # UTC
    steps: tuple[Step, ...]

    @property
    def runbooks(self) -> tuple[Step, ...]:
        """The steps whose runbook is in the registry, in order."""
        return tuple(step for step in self.steps if step.runbook in RUNBOOKS)

    @property
    def scheduled(self) -> dict[str, Any]:
        """The parameters of its scheduled runs, derived from its runbooks' own `scheduled`:
        a routine acts on schedule only when every step that may act (not diagnose_only, a
        runbook that plans actions) has earned acting on its own schedule, and then with the
        strictest approval of theirs; otherwise its scheduled runs are dry runs."""
        acting = [
            RUNBOOKS[s.runbook]
            for s in self.runbooks
            if not s.diagnose_only and RUNBOOKS[s.runbook].action_kinds is not None
        ]
        if not acting or any(rb.scheduled.get("dry_run", True) for rb in acting):
            return {"dry_run": True}
        order = ("auto", "ask", "never")
        approval = max((rb.scheduled.get("approval", "ask") for rb in acting), key=order.index)
        return {"dry_run": False, "approval": approval}

    @property
    def triggers(self) -> str:
        mode = "applies" if not self.scheduled["dry_run"] else "diagnose only"
        return f"schedule `{self.cron}` ({mode}); manual"

    @property
    def changes(self) -> str:
        acting = [s.runbook for s in self.runbooks if not s.diagnose_only]
        changing = [n for n in acting if RUNBOOKS[n].action_kinds is not None]
        if not changing:
            return "nothing: every runbook in it runs as a dry run"
        return "what the gates of " + ", ".join(changing) + " let through"

    def load(self) -> Flow[..., Any]:
        module, function = self.entrypoint.split(":")
        flow: Flow[..., Any] = getattr(importlib.import_module(module), function)
        return flow


ROUTINES: dict[str, Routine] = {
    r.name: r
    for r in (
        Routine(
            name="routine-daily",
            entrypoint="deployments.routines:routine_daily",
            purpose="The daily checklist: health endpoints, the last backup, disk space; each "
            "runbook on every target it has, one summary.",
            seeds="002 Routine Maintenance (daily)",
            cron="0 6 * * *",
            steps=(
                Step("service-health"),
                Step("backup-verification"),
                Step("disk-space"),
            ),
        ),
        Routine(
            name="routine-weekly",
            entrypoint="deployments.routines:routine_weekly",
            purpose="The weekly checklist: slow queries (postgres-maintenance's diagnosis) and "
            "certificate expiry dates, as reviews; one summary.",
            seeds="002 Routine Maintenance (weekly)",
            cron="0 6 * * 1",
            steps=(
                Step("postgres-maintenance", diagnose_only=True),
                Step("tls-certificates", diagnose_only=True),
            ),
        ),
        Routine(
            name="routine-monthly",
            entrypoint="deployments.routines:routine_monthly",
            purpose="The monthly checklist: VACUUM ANALYZE through postgres-maintenance and a "
            "disaster recovery drill; one summary.",
            seeds="002 Routine Maintenance (monthly)",
            cron="0 5 1 * *",
            steps=(Step("postgres-maintenance"), Step("restore-drill")),
        ),
    )
}
