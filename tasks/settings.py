"""Settings and inventory: a TOML file (path in RUNBOOK_CONFIG, default ./runbook.toml) with
environment overrides (prefix RUNBOOK_, nested delimiter __), e.g.
RUNBOOK_POSTGRES__MAIN__DSN=postgresql://app@127.0.0.1:5432/app.

Every problem becomes one ConfigError that names the file, the key and the fix.

Shapes only: what names a runbook, an action kind or a runbook's parameter ([approval],
[limits], thresholds, [[routes]], [[notify.routes]] runbooks) is checked against the registry
by the entry points that load it (deployments.config.load_config); a run checks its own
[approval] kinds at the gate (tasks.gate).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from tasks.audit import AuditSettings
from tasks.errors import ConfigError
from tasks.fleet_rules import RESERVED_NAMES, is_fleet
from tasks.limits import RateLimit
from tasks.models import Approval
from tasks.notify import NotifySettings

DEFAULT_CONFIG = "runbook.toml"
ENV_PREFIX = "RUNBOOK_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _TableRef(_Strict):
    table: str = Field(description="table name, may be schema-qualified: crawler.job")

    @field_validator("table")
    @classmethod
    def _one_or_two_parts(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) > 2 or not all(parts):
            raise ValueError("must be TABLE or SCHEMA.TABLE")
        return value

    @property
    def table_parts(self) -> tuple[str, ...]:
        return tuple(self.table.split("."))


class TimedTable(_TableRef):
    """A table with a time column the runbook compares with now(). A `timestamptz` column is
    compared as it is; a `timestamp` (without time zone) column, what Prisma's DateTime
    makes, holds wall-clock times of time_zone (UTC unless set). The column's type is read
    from the catalog at each run, so the server's timezone setting never changes the result."""

    time_zone: str = Field("UTC", description="IANA name: UTC, Europe/Berlin, ...")

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as UTC or Europe/Berlin"
            ) from None
        return value


class JobsTable(TimedTable):
    """A queue of jobs kept in a table (seed 004 section 6: crawler.job)."""

    id_column: str = "id"
    status_column: str = "status"
    running_value: str = "running"
    pending_value: str = "pending"
    started_column: str = "startedat"
    clear_started: bool = True


# A label's name as Prometheus spells one (names starting "__" are Prometheus's own); its value
# any text of at most LABEL_VALUE_MAX characters without control characters.
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
LABEL_VALUE_MAX = 256


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """labels as given, or ValueError naming the first bad name or value and the rule."""
    for key, value in labels.items():
        if not LABEL_NAME.fullmatch(key) or key.startswith("__"):
            raise ValueError(
                f"label name {key!r}: use letters, digits and underscores, not starting with a "
                "digit or with two underscores (a Prometheus label name), e.g. env or tier"
            )
        if not value:
            raise ValueError(f'label {key}: the value is empty; give it one, e.g. {key} = "prod"')
        if len(value) > LABEL_VALUE_MAX:
            raise ValueError(
                f"label {key}: the value has {len(value)} characters; at most {LABEL_VALUE_MAX}"
            )
        if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
            raise ValueError(f"label {key}: the value holds a control character; remove it")
    return labels


class _Target(_Strict):
    # What selects it among its section's targets for a fleet run (`--target env=prod`):
    # tasks.fleet_rules.select_targets.
    labels: dict[str, str] = Field(default_factory=dict)
    # Per-target values for a runbook's parameters, e.g. idle_in_transaction_seconds = 300:
    # the names its section's runbooks take (deployments.catalog.threshold_names).
    thresholds: dict[str, int | float] = Field(default_factory=dict)
    # The most a run may do on its own here: a run's `auto` becomes this when stricter ("ask":
    # a human decides; "never": destructive actions are skipped). production = true turns
    # `auto` into `ask` for destructive actions (tasks.gate).
    approval: Approval = "auto"
    production: bool = False

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)


class PostgresTarget(_Target):
    dsn: SecretStr = Field(
        description="libpq connection string: postgresql://USER@HOST:PORT/DBNAME or key=value"
    )
    # Unset: no narrowing beyond the built-in rules (client backends, not superusers, not us).
    allow_roles: list[str] | None = None
    allow_databases: list[str] | None = None
    allow_applications: list[str] | None = None
    jobs: JobsTable | None = None
    service: str | None = Field(None, description="the [services.NAME] that runs it")
    data_directory: str | None = Field(None, description="local data directory, for disk space")
    maintenance_service: str | None = Field(
        None,
        description="the [services.NAME] with `maintenance` put in maintenance while a run mends",
    )
    # failed-migration: the tool whose table to read (unset: both), the schema its table is
    # in, and the migration files, to tell whether a failed migration partially applied.
    migrations: Literal["prisma", "golang-migrate"] | None = None
    migrations_schema: str = Field("public", min_length=1, max_length=63)
    migrations_dir: str | None = Field(
        None,
        description="prisma: the migrations folder (NAME/migration.sql); golang-migrate: the "
        "folder of VERSION_TITLE.up.sql files",
    )

    @field_validator("dsn")
    @classmethod
    def _parsable(cls, value: SecretStr) -> SecretStr:
        dsn_keywords(value)
        return value

    @property
    def description(self) -> str:
        return describe_dsn(self.dsn)


class MaintenanceApi(_Strict):
    """[services.NAME] maintenance: the application's own admin API for its maintenance flag
    (seed 004 s2 step 5: `curl -X PUT .../api/v1/admin/settings -H "Authorization: Bearer
    ${ADMIN_TOKEN}" -d '{"key": "site.maintenance_mode", "value": "true"}'`). The bodies are
    sent as JSON (Content-Type: application/json); the token as `Authorization: Bearer`.

    How the flag is read back: `check_url` (a GET, with the token) and `check_path` (a dotted
    path into its JSON answer, e.g. `value`: true/"true"/"on"/"1" is on, false/"false"/"off"/
    "0"/null is off); without check_url, the service's health_url: an answer whose body's
    state (or a component's) is `maintenance` means on, any other answer off."""

    url: str = Field(description="http(s) URL of the setting, e.g. .../api/v1/admin/settings")
    method: Literal["PUT", "POST", "PATCH"] = "PUT"
    body_on: dict[str, Any] = Field(
        description='JSON object that switches it on: {"key": "site.maintenance_mode", '
        '"value": "true"}'
    )
    body_off: dict[str, Any] = Field(description="JSON object that switches it off")
    token: SecretStr | None = Field(None, description="sent as Authorization: Bearer TOKEN")
    check_url: str | None = Field(None, description="GET that answers the setting as JSON")
    check_path: str = Field(
        "value", min_length=1, description="dotted path into check_url's answer: value, data.value"
    )
    timeout_seconds: float = Field(10, gt=0, le=120, description="each call, in seconds")

    @field_validator("body_on", "body_off", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        # A JSON text is accepted too, as the seed's curl writes it (and as an environment
        # variable can carry it).
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(
                    'not JSON: write an inline table, body_on = { key = "site.maintenance_mode", '
                    'value = "true" }, or a JSON object text'
                ) from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object (an inline table)")
        return value

    @field_validator("url", "check_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and (
            urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname
        ):
            # Not quoted: a URL may carry credentials.
            raise ValueError("use http(s)://HOST[:PORT]/PATH")
        return value


class ServiceTarget(_Target):
    """How to see and restart one service: through Docker's API, systemd, or given commands."""

    kind: Literal["docker", "systemd", "command"]
    # docker: one container, or every container of a compose service
    container: str | None = None
    compose_project: str | None = None
    compose_service: str | None = None
    docker_host: str | None = None
    # systemd
    unit: str | None = None
    # command: argv lists, run without a shell
    status_command: list[str] | None = None
    start_command: list[str] | None = None
    restart_command: list[str] | None = None
    logs_command: list[str] | None = None
    # any kind
    health_url: str | None = None
    ready_url: str | None = None
    timeout_seconds: float = Field(30, gt=0, le=3600)
    # Health-body components and the inventory target each stands for, e.g.
    # database = "postgres.main"; unset: inferred when there is one target of that kind.
    dependencies: dict[str, str] = Field(default_factory=dict)
    # maintenance-mode, and the runbooks whose target names this service as its
    # maintenance_service (postgres-down, redis-health, security-incident).
    maintenance: MaintenanceApi | None = None

    @model_validator(mode="after")
    def _maintenance_can_be_read_back(self) -> ServiceTarget:
        if self.maintenance is not None and not (self.maintenance.check_url or self.health_url):
            raise ValueError(
                "maintenance needs a way to read the flag back: set maintenance.check_url (and "
                "check_path) or the service's health_url"
            )
        return self

    @model_validator(mode="after")
    def _kind_has_what_it_needs(self) -> ServiceTarget:
        needs = {
            "docker": self.container or (self.compose_project and self.compose_service),
            "systemd": self.unit,
            "command": self.status_command and self.restart_command,
        }[self.kind]
        if not needs:
            raise ValueError(
                {
                    "docker": "kind docker needs container, or compose_project and compose_service",
                    "systemd": "kind systemd needs unit",
                    "command": "kind command needs status_command and restart_command (argv lists)",
                }[self.kind]
            )
        for ref in self.dependencies.values():
            if not re.fullmatch(r"(postgres|redis)\.[^.]+", ref):
                raise ValueError(f"dependency {ref!r} must be postgres.NAME or redis.NAME")
        return self


class TlsEndpoint(_Target):
    host: str
    port: int = Field(443, ge=1, le=65535)
    server_name: str | None = None
    ca_file: str | None = None
    renew_command: list[str] | None = None
    reload_command: list[str] | None = None
    service: str | None = Field(
        None, description="restarted through its controller instead of reload_command"
    )
    cert_name: str | None = None


class S3Target(_Target):
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = Field(
        None, description="http(s)://HOST[:PORT] of an S3-compatible store; unset: AWS"
    )
    region: str = "us-east-1"
    # Unset: the standard AWS variables and files.
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    timeout_seconds: float = Field(10, gt=0, le=600)

    # botocore's own checks, so a value it would refuse when the client is made is refused at
    # load instead. Imported here: botocore costs ~40 ms, paid only with an [s3] section.
    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

        if value is not None and (
            urlsplit(value).scheme not in ("http", "https")
            or not (is_valid_endpoint_url(value) or is_valid_ipv6_endpoint_url(value))
        ):
            # The value is not quoted: a URL may carry credentials (user:password@).
            raise ValueError(
                "not an S3 endpoint URL: use http(s)://HOST[:PORT], e.g. "
                "https://s3.eu-central-1.amazonaws.com or http://127.0.0.1:9000"
            )
        return value

    @field_validator("region")
    @classmethod
    def _region_is_a_name(cls, value: str) -> str:
        from botocore.exceptions import InvalidRegionError
        from botocore.utils import validate_region_name

        try:
            validate_region_name(value)
        except InvalidRegionError:
            raise ValueError(
                f"{value!r} is not a region name: letters, digits and hyphens, e.g. us-east-1"
            ) from None
        return value


class BackupSet(_Target):
    """Where one database's backups are kept: an [s3.NAME] (with this prefix) or a directory."""

    database: str | None = Field(None, description="the [postgres.NAME] they are dumps of")
    s3: str | None = None
    prefix: str | None = Field(None, description="under the s3 target's prefix")
    directory: str | None = None
    pattern: list[str] = Field(default_factory=lambda: ["*.sql.gz", "*.dump"])
    max_age_hours: float = Field(26, gt=0)
    min_size_ratio: float = Field(0.5, ge=0, le=1)
    # restore-drill: the [postgres.NAME] on the server to restore into (never `database`),
    # and SQL assertions run on the restored copy, each a query returning one boolean.
    scratch: str | None = None
    checks: list[str] = Field(default_factory=list)
    # backup-retention's keep_daily, keep_weekly, keep_monthly, max_deletions go in
    # [backups.NAME.thresholds].

    @model_validator(mode="after")
    def _one_place(self) -> BackupSet:
        if (self.s3 is None) == (self.directory is None):
            raise ValueError('set either s3 = "NAME" or directory = "/path"')
        return self


class LockoutTable(TimedTable):
    """Lockouts also kept in PostgreSQL (seed 001: a Prisma Lockout table)."""

    postgres: str = Field(description="a [postgres.NAME] target")
    column: str
    expires_column: str | None = Field(
        None, description="when the lockout ends (lockedUntil); set: only rows still in force"
    )


class Relation(_Strict):
    """One foreign key the application means but the database may not enforce: each row of
    child_table whose child_column is set names a row of parent_table by parent_column.
    Names are case-sensitive, as Prisma creates them (table "Category", column "menuId");
    a table may be schema-qualified (public.Category)."""

    child_table: str = Field(description="TABLE or SCHEMA.TABLE, e.g. Category")
    child_column: str = Field(description="the referencing column, e.g. menuId")
    parent_table: str = Field(description="TABLE or SCHEMA.TABLE, e.g. Menu")
    parent_column: str = Field("id", description="the referenced column, e.g. id")
    child_id_column: str = Field("id", description="the child's key, shown in the sample")

    @field_validator("child_table", "parent_table")
    @classmethod
    def _one_or_two_parts(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"{value!r} must be TABLE or SCHEMA.TABLE")
        return value

    @property
    def child_parts(self) -> tuple[str, ...]:
        return _qualified(self.child_table)

    @property
    def parent_parts(self) -> tuple[str, ...]:
        return _qualified(self.parent_table)


def _qualified(table: str) -> tuple[str, ...]:
    """(schema, table): an unqualified name is in public, so that Category and
    public.Category are one table when relations are chained."""
    parts = tuple(table.split("."))
    return parts if len(parts) == 2 else ("public", *parts)


class SessionsTable(TimedTable):
    """The application's sessions (seed 003 "Login Problems": "Session"."expiresAt")."""

    expires_column: str = Field(description="when a session expires, e.g. expiresAt")


class IntegritySet(_Target):
    """[integrity.NAME]: the relations of one database to check for orphans, and its sessions
    table (seed 003 "Data Corruption" and "Login Problems")."""

    target: str = Field(description="a [postgres.NAME] target")
    relations: list[Relation] = Field(default_factory=list)
    sessions: SessionsTable | None = None

    @model_validator(mode="after")
    def _acyclic(self) -> IntegritySet:
        if not self.relations and self.sessions is None:
            raise ValueError(
                "nothing to check: add [[integrity.NAME.relations]] (child_table, child_column, "
                "parent_table, parent_column) or sessions = { table = ..., expires_column = ... }"
            )
        parents: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
        for r in self.relations:
            parents.setdefault(r.child_parts, set()).add(r.parent_parts)

        def reaches(start: tuple[str, ...], goal: tuple[str, ...], seen: set[Any]) -> bool:
            for parent in parents.get(start, ()):
                if parent == goal or (
                    parent not in seen and reaches(parent, goal, seen | {parent})
                ):
                    return True
            return False

        for r in self.relations:
            if r.child_parts == r.parent_parts or reaches(r.parent_parts, r.child_parts, set()):
                raise ValueError(
                    f"relation {r.child_table}.{r.child_column} -> {r.parent_table} closes a "
                    "cycle: the relations must form a tree (a table referencing itself, or "
                    "through others, is not supported); remove that relation"
                )
        return self


class RedisTarget(_Target):
    url: SecretStr
    password: SecretStr | None = None
    role: Literal["cache", "queue"] = "cache"
    # The policy the role wants (cache: allkeys-lru, queue: noeviction) unless set here.
    maxmemory_policy: str | None = None
    queues: list[str] = Field(default_factory=list)
    prefix: str = "bull"
    lockout_prefix: str = "login_attempt"
    lockout_table: LockoutTable | None = None
    service: str | None = Field(None, description="the [services.NAME] that runs it")
    worker_service: str | None = Field(
        None, description="the [services.NAME] of the queue's workers, scaled by queue-backlog"
    )
    maintenance_service: str | None = Field(
        None,
        description="the [services.NAME] with `maintenance` put in maintenance while a run mends",
    )

    @property
    def wanted_policy(self) -> str:
        return self.maxmemory_policy or ("noeviction" if self.role == "queue" else "allkeys-lru")

    @property
    def description(self) -> str:
        return describe_url(self.url)


class RevocableSessions(TimedTable):
    """The application's sessions (seed 004 s12: users.session, userid, revokedat): a session
    is live while its revoked column is NULL; revoking sets it to now()."""

    user_column: str = Field("userid", description="the column holding the user's id")
    revoked_column: str = Field(
        "revokedat", description="timestamp or timestamptz set when revoked; NULL: live"
    )


class AuditLogTable(TimedTable):
    """The application's audit log (seed 004 s12: system.auditlog, createdat)."""

    time_column: str = Field("createdat", description="timestamp or timestamptz of each row")


class SecurityTarget(_Target):
    """[security.NAME]: where one application keeps its sessions, its audit log and its JWT
    signing key, and which services read the key (security-incident)."""

    postgres: str = Field(description="the [postgres.NAME] holding the sessions and audit log")
    sessions: RevocableSessions
    audit_log: AuditLogTable | None = None
    jwt_secret: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="the Prefect Secret block holding the JWT private key (PEM); "
        "lowercase letters, digits and dashes",
    )
    jwt_algorithm: Literal["RS256", "Ed25519"] = Field(
        "RS256", description="RS256: RSA 2048-bit; Ed25519 (JWT's EdDSA)"
    )
    jwt_services: list[str] = Field(
        default_factory=list, description="the [services.NAME]s that read the key: restarted"
    )
    maintenance_service: str | None = Field(
        None,
        description="the [services.NAME] with `maintenance` put in maintenance while a run mends",
    )


class ReceiverSettings(_Strict):
    """[receiver]: where it listens, how callers authenticate, storm control, dispatch."""

    listen: str = Field("127.0.0.1:8787", pattern=r"^[^\s:]+:\d{1,5}$")
    token: SecretStr | None = Field(None, description="Authorization: Bearer TOKEN")
    hmac_secret: SecretStr | None = Field(
        None, description="X-Runbook-Signature: sha256=<hex HMAC-SHA256 of the body>"
    )
    dedup_window_seconds: int = Field(600, ge=0, le=7 * 86400)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    max_runs_per_hour: int = Field(20, ge=0, le=100_000)
    dispatch: Literal["direct", "trigger"] = "direct"
    state_file: Path | None = Field(
        None,
        description="storm control's SQLite file, shared by the receivers on this machine; "
        "unset (and no state_dsn): PREFECT_HOME/runbook-alerts.sqlite",
    )
    state_dsn: SecretStr | None = Field(
        None,
        description="storm control in PostgreSQL (schema runbook_receiver), shared by "
        "receivers on several machines: postgresql://USER:PASSWORD@HOST:PORT/DBNAME",
    )
    # In-process runs at once in `runbook serve`; more wait, Pending, in order.
    max_concurrent_runs: int = Field(4, ge=1, le=32)

    @model_validator(mode="after")
    def _secrets_not_empty(self) -> ReceiverSettings:
        for key in ("token", "hmac_secret"):
            secret = getattr(self, key)
            if secret is not None and len(secret.get_secret_value()) < 8:
                raise ValueError(f"receiver.{key} must be at least 8 characters")
        return self

    @model_validator(mode="after")
    def _one_store(self) -> ReceiverSettings:
        if self.state_file is not None and self.state_dsn is not None:
            raise ValueError(
                "set either receiver.state_file (SQLite, one machine) or receiver.state_dsn "
                "(PostgreSQL, several receivers), not both"
            )
        return self

    @field_validator("state_dsn")
    @classmethod
    def _state_dsn_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            dsn_keywords(value)
        return value

    @field_validator("listen")
    @classmethod
    def _port_in_range(cls, listen: str) -> str:
        if not 0 < int(listen.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"{listen!r}: the port must be 1-65535")
        return listen

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def has_credentials(self) -> bool:
        return self.token is not None or self.hmac_secret is not None


class Route(_Strict):
    """[[routes]]: an alert (name plus label matchers) to a runbook, a target and parameters."""

    alert: str = Field(min_length=1, max_length=256)
    matchers: dict[str, str] = Field(default_factory=dict)
    runbook: str
    target: str | None = Field(None, description="a fixed inventory target")
    target_label: str | None = Field(
        None, description='the label naming the target; unset: "target"'
    )
    selector: Annotated[str, StringConstraints(strip_whitespace=True)] | None = Field(
        None,
        description='a fleet instead of one target: "all", "a,b,c" or "env=prod" (the '
        "runbook's NAME/fleet deployment runs it)",
    )
    # false: the run diagnoses and plans only. true: it acts, its destructive actions as
    # `approval` says: ask (the default: it pauses for a human in the Prefect UI), auto, never.
    apply: bool = False
    approval: Approval = "ask"
    set: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_target_source(self) -> Route:
        given = [k for k in ("target", "target_label", "selector") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(
                f"set one of target, target_label and selector, not {' and '.join(given)}"
            )
        if self.selector is not None and not is_fleet(self.selector):
            raise ValueError(
                f"selector {self.selector!r} names one target: set target instead, or give "
                '"all", several names "a,b" or labels "env=prod"'
            )
        return self


class ProxyTarget(_Target):
    """A reverse proxy whose deny file block-ips edits: an nginx file of `deny ADDRESS;` lines
    that the proxy's configuration includes (in http, server or location context)."""

    kind: Literal["nginx"] = "nginx"
    deny_file: Path = Field(description="the included file of deny lines, written whole")
    test_command: list[str] = Field(
        default_factory=lambda: ["nginx", "-t"],
        min_length=1,
        description="checks the whole configuration with the new file, e.g. nginx -t -c CONF",
    )
    reload_command: list[str] | None = Field(
        None, min_length=1, description="unset (and no service): nginx -s reload"
    )
    service: str | None = Field(
        None, description="restarted through its controller instead of reload_command"
    )
    allow: list[str] = Field(
        default_factory=list,
        description="addresses and CIDR ranges never blocked (your office, monitors, the LB)",
    )
    max_entries: int = Field(1000, ge=1, le=100_000, description="deny lines the file may hold")
    probe_url: str | None = Field(
        None,
        description="http(s) URL of the proxy; a blocked address this host can send from "
        "must be answered 403 there",
    )
    timeout_seconds: float = Field(5, gt=0, le=120)

    @field_validator("allow")
    @classmethod
    def _allow_is_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"allow: {entry!r} is not an address or CIDR range, e.g. 203.0.113.7 "
                    "or 10.0.0.0/8"
                ) from None
        return value

    @field_validator("probe_url")
    @classmethod
    def _probe_is_http(cls, value: str | None) -> str | None:
        if value is not None and (
            urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname
        ):
            raise ValueError("probe_url: use http(s)://HOST[:PORT]/PATH")
        return value

    def reload_argv(self) -> list[str] | None:
        """The reload command: reload_command, else nginx -s reload unless a service is
        restarted instead (None)."""
        if self.reload_command:
            return self.reload_command
        return None if self.service else ["nginx", "-s", "reload"]


class DiskTarget(_Target):
    """[disk.NAME]: paths whose filesystems disk-space judges, and what may fill them: the
    json-file logs of docker services, a backup directory, dated tables of a database."""

    paths: list[str] = Field(
        min_length=1, description="absolute paths; each one's filesystem is judged"
    )
    postgres: str | None = Field(None, description="a [postgres.NAME]: its largest tables")
    services: list[str] = Field(
        default_factory=list, description="[services.NAME]s of kind docker: their json-file logs"
    )
    backups: str | None = Field(
        None, description="a [backups.NAME] with a directory: backups past its retention"
    )
    partitions: list[str] = Field(
        default_factory=list,
        description="dated tables of `postgres`, e.g. analytics.pageview_YYYY_MM",
    )

    @field_validator("paths")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        for path in value:
            if not os.path.isabs(path):
                raise ValueError(f"{path!r} is not an absolute path: write it from /")
        return value

    @field_validator("partitions")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        from tasks.disk_rules import parse_partition_pattern

        for text in value:
            parse_partition_pattern(text)
        return value

    @model_validator(mode="after")
    def _partitions_need_postgres(self) -> DiskTarget:
        if self.partitions and self.postgres is None:
            raise ValueError('partitions need postgres = "NAME", the database that holds them')
        return self


def _mail_address(value: str) -> str:
    """A bare address (user@domain), as MAIL FROM and RCPT TO take it."""
    name, address = parseaddr(value)
    if not address or "@" not in address or name or address != value.strip():
        raise ValueError(f"{value!r} is not a mail address: write user@example.com")
    return address


class SmtpTarget(_Target):
    """[smtp.NAME]: an SMTP server the application sends mail through (seed 004 s7, "SMTP /
    Email Delivery Failure"), checked by smtp-check as the application uses it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    host: str = Field(min_length=1, description="the server's DNS name (or address)")
    port: int = Field(587, ge=1, le=65535, description="587 submission, 465 TLS, 25 relay")
    security: Literal["starttls", "tls", "none"] = Field(
        "starttls", description="starttls: STARTTLS after EHLO; tls: TLS at once (465); none"
    )
    username: str | None = Field(None, min_length=1)
    password: SecretStr | None = None
    ca_file: str | None = Field(None, description="PEM CAs to trust; unset: the system's")
    sender: str = Field(alias="from", description="the MAIL FROM address the app sends as")
    to: list[str] = Field(min_length=1, description="an address or a list of them (RCPT TO)")
    send_test: bool = Field(
        False, description="true: a small test message is sent; false: RSET after RCPT TO"
    )
    timeout_seconds: float = Field(10, gt=0, le=120, description="of each SMTP call")
    fallback: str | None = Field(None, description="another [smtp.NAME] to switch to")

    @field_validator("to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("sender")
    @classmethod
    def _sender_is_an_address(cls, value: str) -> str:
        return _mail_address(value)

    @field_validator("to")
    @classmethod
    def _recipients_are_addresses(cls, value: list[str]) -> list[str]:
        return [_mail_address(v) for v in value]

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> SmtpTarget:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password (AUTH), or neither")
        if self.username is not None and self.security == "none":
            raise ValueError(
                'security = "none" with a username would send the password in clear: '
                'use "starttls" (port 587) or "tls" (port 465)'
            )
        return self


class MetricsTarget(_Target):
    """[metrics.NAME]: an application's Prometheus endpoint behind its guard (seed 001,
    "Metrics endpoint failing authentication": METRICS_GUARD=secret checks a header against
    METRICS_GUARD_SECRET; METRICS_GUARD=cidr checks the caller against
    METRICS_GUARD_ALLOWLIST)."""

    url: str = Field(description="http(s)://HOST[:PORT]/metrics")
    guard: Literal["secret", "cidr"]
    header: str = Field(
        "x-metrics-secret", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", description="guard=secret"
    )
    secret: SecretStr | None = Field(None, description="METRICS_GUARD_SECRET; guard=secret")
    allowed_source: str | None = Field(
        None, description="an address of this host inside METRICS_GUARD_ALLOWLIST; guard=cidr"
    )
    denied_source: str | None = Field(
        None, description="an address of this host outside METRICS_GUARD_ALLOWLIST; guard=cidr"
    )
    timeout_seconds: float = Field(5, gt=0, le=120)
    ca_file: str | None = Field(None, description="PEM CAs to trust; unset: the system's")

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.password:
            raise ValueError("url: use http(s)://HOST[:PORT]/PATH, without credentials")
        return value

    @field_validator("allowed_source", "denied_source")
    @classmethod
    def _single_address(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an IP address: give one of this host's addresses, "
                    "e.g. 127.0.0.2 or 10.0.0.5"
                ) from None
        return value

    @model_validator(mode="after")
    def _guard_has_what_it_needs(self) -> MetricsTarget:
        if self.guard == "secret" and (self.secret is None or not self.secret.get_secret_value()):
            raise ValueError("guard secret needs secret (the app's METRICS_GUARD_SECRET)")
        if self.guard == "cidr":
            if self.allowed_source is None or self.denied_source is None:
                raise ValueError(
                    "guard cidr needs allowed_source and denied_source: two addresses of this "
                    "host, one inside METRICS_GUARD_ALLOWLIST and one outside it"
                )
            if self.allowed_source == self.denied_source:
                raise ValueError("allowed_source and denied_source must differ")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    postgres: dict[str, PostgresTarget] = Field(default_factory=dict)
    redis: dict[str, RedisTarget] = Field(default_factory=dict)
    services: dict[str, ServiceTarget] = Field(default_factory=dict)
    tls: dict[str, TlsEndpoint] = Field(default_factory=dict)
    s3: dict[str, S3Target] = Field(default_factory=dict)
    backups: dict[str, BackupSet] = Field(default_factory=dict)
    # The alert receiver and its routes (README, Alerts); no routes: deployments/alerts/routes.toml.
    # Their names are checked where the receiver is built (deployments.alert_routes).
    receiver: ReceiverSettings | None = None
    routes: list[Route] = Field(default_factory=list)
    # Per runbook and action kind, the most its runs may do on their own (as a target's
    # approval): [approval] postgres-connections.terminate_backend = "ask".
    approval: dict[str, dict[str, Approval]] = Field(default_factory=dict)
    # Rates per action kind over time (README, Limits); unset kinds keep tasks.limits'
    # DEFAULT_RATES: [limits] restart_service = { max = 2, per_seconds = 3600 }.
    limits: dict[str, RateLimit] = Field(default_factory=dict)
    # Where the audit trail's rows go (README, Audit); unset: Prefect events only.
    audit: AuditSettings | None = None
    # Who is told of approval requests and outcomes, and escalation ([[notify.routes]]).
    notify: NotifySettings | None = None
    # data-integrity: the relations and sessions of a [postgres.NAME]'s database.
    integrity: dict[str, IntegritySet] = Field(default_factory=dict)
    # Where one application keeps sessions, audit log and JWT key (security-incident).
    security: dict[str, SecurityTarget] = Field(default_factory=dict)
    # Reverse proxies whose deny file block-ips edits.
    proxies: dict[str, ProxyTarget] = Field(default_factory=dict)
    # Filesystems disk-space watches, and what may fill them.
    disk: dict[str, DiskTarget] = Field(default_factory=dict)
    # SMTP servers the application sends mail through (smtp-check).
    smtp: dict[str, SmtpTarget] = Field(default_factory=dict)
    # Prometheus endpoints behind the application's metrics guard (metrics-guard).
    metrics: dict[str, MetricsTarget] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        for name, redis_target in self.redis.items():
            table = redis_target.lockout_table
            if table is not None and table.postgres not in self.postgres:
                raise ValueError(
                    f"redis.{name}.lockout_table.postgres names {table.postgres!r}, which is "
                    f"not a [postgres.*] target (configured: {', '.join(self.postgres) or 'none'})"
                )
        for kind in ("postgres", "redis", "tls"):
            for name, target in self.targets(kind).items():
                for key in ("service", "worker_service"):
                    ref = getattr(target, key, None)
                    if ref is not None and ref not in self.services:
                        known = ", ".join(self.services) or "none"
                        raise ValueError(
                            f"{kind}.{name}.{key} names {ref!r}, which is not a "
                            f"[services.*] entry (configured: {known})"
                        )
        for name, backup in self.backups.items():
            if backup.s3 is not None and backup.s3 not in self.s3:
                raise ValueError(f"backups.{name}.s3 names {backup.s3!r}: no [s3.{backup.s3}]")
            for key in ("database", "scratch"):
                ref = getattr(backup, key)
                if ref is not None and ref not in self.postgres:
                    raise ValueError(f"backups.{name}.{key} names {ref!r}: no [postgres.{ref}]")
        for name, service in self.services.items():
            for component, ref in service.dependencies.items():
                kind, target_name = ref.split(".", 1)
                if target_name not in self.targets(kind):
                    raise ValueError(f"services.{name}.dependencies.{component}: no [{ref}]")
        return self

    @model_validator(mode="after")
    def _integrity_targets_resolve(self) -> Settings:
        for name, found in self.integrity.items():
            if found.target not in self.postgres:
                known = ", ".join(self.postgres) or "none"
                raise ValueError(
                    f"integrity.{name}.target names {found.target!r}, which is not a "
                    f"[postgres.*] target (configured: {known})"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init values; the environment overrides it.
        return _InventoryEnv(settings_cls), init_settings

    def postgres_target(self, name: str | None) -> tuple[str, PostgresTarget]:
        return _pick("postgres", self.postgres, name)

    def redis_target(self, name: str | None) -> tuple[str, RedisTarget]:
        return _pick("redis", self.redis, name)

    def s3_target(self, name: str | None) -> tuple[str, S3Target]:
        return _pick("s3", self.s3, name)

    def tls_target(self, name: str | None) -> tuple[str, TlsEndpoint]:
        return _pick("tls", self.tls, name)

    def proxy_target(self, name: str | None) -> tuple[str, ProxyTarget]:
        return _pick("proxies", self.proxies, name)

    def service_target(self, name: str | None) -> tuple[str, ServiceTarget]:
        return _pick("services", self.services, name)

    def service(self, name: str) -> ServiceTarget:
        found: ServiceTarget = _pick("services", self.services, name)[1]
        return found

    def targets(self, kind: str) -> dict[str, Any]:
        """The targets of one inventory section: postgres or redis."""
        found: dict[str, Any] = getattr(self, kind)
        return found

    def target(self, kind: str, name: str | None) -> tuple[str, Any]:
        return _pick(kind, self.targets(kind), name)

    def backup_set(self, name: str | None) -> tuple[str, BackupSet]:
        """A [backups.NAME]: its name and entry (ConfigError naming the known ones)."""
        return _pick("backups", self.backups, name)

    def storage_of(self, backup: BackupSet) -> S3Target | None:
        """Where a backup set is kept: its [s3.*] target, or None for a directory."""
        return self.s3[backup.s3] if backup.s3 else None

    def integrity_set(self, name: str | None) -> tuple[str, IntegritySet]:
        """An [integrity.NAME]: its name and entry (ConfigError naming the known ones)."""
        return _pick("integrity", self.integrity, name)

    def security_target(self, name: str | None) -> tuple[str, SecurityTarget]:
        """A [security.NAME]: its name and entry (ConfigError naming the known ones)."""
        return _pick("security", self.security, name)

    @model_validator(mode="after")
    def _no_reserved_target_names(self) -> Settings:
        for section in type(self).model_fields:
            entries = getattr(self, section)
            if not isinstance(entries, dict):
                continue
            targets = {k for k, v in entries.items() if isinstance(v, _Target)}
            for name in sorted(targets & set(RESERVED_NAMES)):
                raise ValueError(
                    f"{section}.{name}: {name!r} cannot name a target (`--target all` selects "
                    "every target, and NAME/fleet is a runbook's fleet deployment); rename it"
                )
        return self

    @model_validator(mode="after")
    def _security_references_resolve(self) -> Settings:
        for name, sec in self.security.items():
            if sec.postgres not in self.postgres:
                known = ", ".join(self.postgres) or "none"
                raise ValueError(
                    f"security.{name}.postgres names {sec.postgres!r}, which is not a "
                    f"[postgres.*] target (configured: {known})"
                )
            for service in sec.jwt_services:
                if service not in self.services:
                    known = ", ".join(self.services) or "none"
                    raise ValueError(
                        f"security.{name}.jwt_services names {service!r}, which is not a "
                        f"[services.*] entry (configured: {known})"
                    )
            if sec.jwt_services and sec.jwt_secret is None:
                raise ValueError(
                    f"security.{name}.jwt_services is set but jwt_secret is not: name the "
                    "Prefect Secret block that holds the key the services read"
                )
        return self

    @model_validator(mode="after")
    def _proxy_services_resolve(self) -> Settings:
        for name, proxy in self.proxies.items():
            if proxy.service is not None and proxy.service not in self.services:
                known = ", ".join(self.services) or "none"
                raise ValueError(
                    f"proxies.{name}.service names {proxy.service!r}, which is not a "
                    f"[services.*] entry (configured: {known})"
                )
        return self

    @model_validator(mode="after")
    def _maintenance_services_resolve(self) -> Settings:
        for kind in ("postgres", "redis", "security"):
            for name, target in self.targets(kind).items():
                ref = target.maintenance_service
                if ref is None:
                    continue
                if ref not in self.services:
                    known = ", ".join(self.services) or "none"
                    raise ValueError(
                        f"{kind}.{name}.maintenance_service names {ref!r}, which is not a "
                        f"[services.*] entry (configured: {known})"
                    )
                if self.services[ref].maintenance is None:
                    raise ValueError(
                        f"{kind}.{name}.maintenance_service names {ref!r}, which has no "
                        f"maintenance API: add [services.{ref}.maintenance] (url, body_on, "
                        "body_off, token) or unset maintenance_service"
                    )
        return self

    def disk_target(self, name: str | None) -> tuple[str, DiskTarget]:
        """A [disk.NAME]: its name and entry (ConfigError naming the known ones)."""
        return _pick("disk", self.disk, name)

    @model_validator(mode="after")
    def _disk_references_resolve(self) -> Settings:
        for name, found in self.disk.items():
            if found.postgres is not None and found.postgres not in self.postgres:
                known = ", ".join(self.postgres) or "none"
                raise ValueError(
                    f"disk.{name}.postgres names {found.postgres!r}, which is not a "
                    f"[postgres.*] target (configured: {known})"
                )
            for service in found.services:
                if service not in self.services:
                    known = ", ".join(self.services) or "none"
                    raise ValueError(
                        f"disk.{name}.services names {service!r}, which is not a "
                        f"[services.*] entry (configured: {known})"
                    )
                if self.services[service].kind != "docker":
                    raise ValueError(
                        f"disk.{name}.services names {service!r}, of kind "
                        f"{self.services[service].kind}: only kind docker has json-file logs "
                        "to check; remove it there"
                    )
            if found.backups is not None:
                backup = self.backups.get(found.backups)
                if backup is None:
                    known = ", ".join(self.backups) or "none"
                    raise ValueError(
                        f"disk.{name}.backups names {found.backups!r}, which is not a "
                        f"[backups.*] set (configured: {known})"
                    )
                if backup.directory is None:
                    raise ValueError(
                        f"disk.{name}.backups names {found.backups!r}, which is kept in S3: "
                        "only a set with a local directory takes room on this disk"
                    )
        return self

    @model_validator(mode="after")
    def _smtp_fallbacks_resolve(self) -> Settings:
        for name, server in self.smtp.items():
            if server.fallback is None:
                continue
            if server.fallback == name:
                raise ValueError(
                    f"smtp.{name}.fallback names the server itself: name another [smtp.*] "
                    "entry, or remove fallback"
                )
            if server.fallback not in self.smtp:
                others = ", ".join(n for n in self.smtp if n != name) or "none"
                raise ValueError(
                    f"smtp.{name}.fallback names {server.fallback!r}, which is not an "
                    f"[smtp.*] entry (the other entries: {others})"
                )
        return self

    def smtp_target(self, name: str | None) -> tuple[str, SmtpTarget]:
        """An [smtp.NAME]: its name and entry (ConfigError naming the known ones)."""
        return _pick("smtp", self.smtp, name)

    def metrics_target(self, name: str | None) -> tuple[str, MetricsTarget]:
        """A [metrics.NAME]: its name and entry (ConfigError naming the known ones)."""
        return _pick("metrics", self.metrics, name)


class _InventoryEnv(EnvSettingsSource):
    """The RUNBOOK_* environment, less RUNBOOK_CONFIG: that names the file, it is no setting.
    Read from a copy, so loads on several threads at once never touch the process
    environment."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = super()._load_env_vars()
        hidden = f"{ENV_PREFIX}CONFIG"
        return {k: v for k, v in env.items() if k.upper() != hidden}


def _pick(kind: str, targets: dict[str, Any], name: str | None) -> tuple[str, Any]:
    names = ", ".join(sorted(targets)) or "none"
    if name is None:
        if len(targets) == 1:
            return next(iter(targets.items()))
        if not targets:
            raise ConfigError(
                f"no {kind} target is configured in {config_path()}: add a [{kind}.NAME] "
                f"section (see README, Configuration) or set {ENV_PREFIX}{kind.upper()}__NAME__..."
            )
        raise ConfigError(f"several {kind} targets are configured ({names}): pass --target NAME")
    if name not in targets:
        raise ConfigError(
            f"unknown {kind} target {name!r} in {config_path()}; configured: {names}. "
            f"Add a [{kind}.{name}] section or pass one of those with --target."
        )
    return name, targets[name]


# libpq names an unknown keyword in its message; anything else it says may quote the DSN.
_UNKNOWN_KEYWORD = re.compile(r'invalid (?:connection option|URI query parameter):? "([A-Za-z_]+)"')


def dsn_keywords(dsn: SecretStr) -> dict[str, Any]:
    """A DSN's libpq keywords (host, port, dbname, user, password...), as libpq parses it.

    Raises ValueError when libpq cannot parse it, saying what to write instead; the message
    never quotes the DSN (it may hold a password)."""
    try:
        parts: dict[str, Any] = psycopg.conninfo.conninfo_to_dict(dsn.get_secret_value())
    except psycopg.ProgrammingError as exc:
        unknown = _UNKNOWN_KEYWORD.search(str(exc))
        why = f"libpq knows no keyword {unknown.group(1)!r}" if unknown else "libpq cannot parse it"
        raise ValueError(
            f"not a PostgreSQL connection string ({why}): use "
            "postgresql://USER:PASSWORD@HOST:PORT/DBNAME or host=HOST port=PORT dbname=DBNAME"
        ) from None
    return parts


def describe_dsn(dsn: SecretStr) -> str:
    """host:port/dbname user=... of a DSN, never its password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn.get_secret_value())
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    host = parts.get("host") or "local socket"
    port, dbname, user = parts.get("port") or 5432, parts.get("dbname"), parts.get("user")
    return f"{host}:{port}/{dbname or '?'} user={user or '?'}"


def describe_url(url: SecretStr) -> str:
    """scheme://host:port/db of a URL, never its credentials."""
    parts = urlsplit(url.get_secret_value())
    host = parts.hostname or "?"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}:{port or 6379}{parts.path or ''}"


def sandbox_config_path() -> Path:
    """Where `runbook serve` puts its sandbox's inventory while the sandbox runs:
    $PREFECT_HOME/runbook-sandbox.toml (PREFECT_HOME defaults to ~/.prefect, as Prefect's)."""
    home = os.environ.get("PREFECT_HOME") or "~/.prefect"
    return Path(home).expanduser() / "runbook-sandbox.toml"


def config_path() -> Path:
    """The inventory file: RUNBOOK_CONFIG; else ./runbook.toml; else, when there is none and
    `runbook serve` is running its sandbox, the sandbox's inventory."""
    if f"{ENV_PREFIX}CONFIG" in os.environ:
        return Path(os.environ[f"{ENV_PREFIX}CONFIG"])
    default = Path(DEFAULT_CONFIG)
    if not default.is_file() and (sandbox := sandbox_config_path()).is_file():
        return sandbox
    return default


def load_settings(path: Path | None = None) -> Settings:
    path = path or config_path()
    explicit = path != Path(DEFAULT_CONFIG) or f"{ENV_PREFIX}CONFIG" in os.environ
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}. Fix the syntax there.") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    elif explicit:
        raise ConfigError(
            f"{path}: no such file ({ENV_PREFIX}CONFIG points at it). Create it, or unset "
            f"{ENV_PREFIX}CONFIG to use ./{DEFAULT_CONFIG}."
        )
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_explain(path, exc)) from None


def _explain(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        key = ".".join(str(p) for p in err["loc"])
        env = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
        message = err["msg"].removeprefix("Value error, ")  # pydantic's wrapping of our own
        if not err["loc"]:
            # A check across sections (its message names the keys): no one key to point at.
            lines.append(f"{path}: {message}; correct it there or in the {ENV_PREFIX}* variables")
            continue
        if err["type"] == "extra_forbidden":
            fix = "remove it or correct its spelling"
        elif err["type"] == "missing":
            fix = f"add it to {path} or set {env}"
        else:
            fix = f"correct it in {path} or {env}"
        lines.append(f"{path}: {key}: {message}; {fix}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
