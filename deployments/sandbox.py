"""A local sandbox for `runbook serve` with no inventory: a throwaway PostgreSQL and two
redis-servers with real incidents planted in them, and an inventory pointing at them."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
from psycopg import sql

from deployments.localapps import MetricsApp, SmtpServer
from deployments.localpg import LocalPostgres, free_port
from deployments.localredis import LocalRedis
from deployments.localtls import CA, Servers

ROLE = "app"
DATABASE = "app"
# Low limits so that a newcomer sees the runbooks act within a minute or two.
CONFIG = """\
# Written by `runbook serve`: the sandbox's inventory.
[postgres.main]
dsn = "{dsn}"
service = "db"
data_directory = "{data}"
# postgres-down puts the small app below in maintenance while it restarts the database.
maintenance_service = "api"

[postgres.main.jobs]
table = "crawler.job"

[postgres.main.thresholds]
idle_in_transaction_seconds = 30
long_query_seconds = 60
cancel_grace_seconds = 5

[redis.cache]
url = "{cache_url}"
role = "cache"

[redis.queue]
url = "{queue_url}"
role = "queue"
queues = ["emails"]

# The sandbox's PostgreSQL, controlled with pg_ctl: stop it to watch postgres-down and
# service-health bring it back.
[services.db]
kind = "command"
status_command = {status}
start_command = {start}
restart_command = {restart}
logs_command = ["tail", "-n", "50", "{log}"]

# A TLS endpoint served inside `runbook serve` with a certificate 5 days from expiry; it has
# no renew_command, so the runbook says how to renew instead of renewing.
[tls.sandbox]
host = "127.0.0.1"
port = {tls_port}
server_name = "sandbox.test"
ca_file = "{tls_ca}"

# Last night's dump, and tonight's, which stopped half-way: backup-verification flags it,
# and restore-drill finds it does not restore (into a scratch database it then drops).
[backups.app]
database = "main"
directory = "{backups}"
scratch = "scratch"
checks = ["SELECT count(*) = 5 FROM crawler.job WHERE status = 'running'"]

# The server restore drills restore into: here the sandbox's own, its maintenance database.
[postgres.scratch]
dsn = "{scratch_dsn}"

# Object storage that is down (seed 004 s8): nothing listens on this port.
[s3.sandbox]
bucket = "sandbox-backups"
endpoint_url = "http://127.0.0.1:{dead_port}"
access_key_id = "sandbox"
secret_access_key = "sandbox"
timeout_seconds = 2

# A small app inside `runbook serve` whose /health checks the database, as seed 001's API
# does. It cannot be restarted from outside: its restart command does nothing.
[services.api]
kind = "command"
health_url = "{health_url}"
status_command = ["true"]
restart_command = ["true"]
timeout_seconds = 5

# Its admin API's maintenance flag (seed 004 s2 step 5), off: run maintenance-mode from the UI
# with params.enable = true to see /health answer 503 maintenance, then false to take it out.
{api_maintenance}
# The seed's Menu -> Category -> Item relations (seed 003 "Data Corruption"), with orphans at
# both levels, and expired sessions (Prisma's timestamp(3)): data-integrity deletes them.
[integrity.app]
target = "main"
sessions = {{ table = "Session", expires_column = "expiresAt" }}

[[integrity.app.relations]]
child_table = "Category"
child_column = "menuId"
parent_table = "Menu"

[[integrity.app.relations]]
child_table = "Item"
child_column = "categoryId"
parent_table = "Category"

# Sessions of users u1 to u3 and a day of audit log (seed 004 s12). Nothing is compromised
# until a run names users: run security-incident from the UI with params.users = ["u1"].
# No JWT key block here, so no rotation.
[security.app]
postgres = "main"

[security.app.sessions]
table = "users.session"
user_column = "userid"
revoked_column = "revokedat"

[security.app.audit_log]
table = "system.auditlog"
time_column = "createdat"

# A deny file checked by a real `nginx -t` of a small configuration that includes it; no nginx
# runs, so the reload does nothing. Block an address from the UI with params.add.
[proxies.edge]
deny_file = "{deny_file}"
test_command = {nginx_test}
reload_command = ["true"]
allow = ["127.0.0.1"]

# disk-space: the sandbox's own directory, judged against a warning threshold of 1 % so that
# its filesystem is "over" it (the sandbox fills no real disk), and the seed's monthly
# analytics.pageview partitions: those of 2020 are dropped, this month's and a look-alike
# table (pageview_2020_01_backup) stay. The disk stays over 1 %: the run stays Unhealthy.
[disk.sandbox]
paths = ["{data}"]
postgres = "main"
partitions = ["analytics.pageview_YYYY_MM"]

[disk.sandbox.thresholds]
used_warning_percent = 1
used_critical_percent = 100
inodes_warning_percent = 100
inodes_critical_percent = 100

# The mail provider refuses the recipient (seed 004 s7: 550, relaying denied); the fallback
# relay takes it: smtp-check says what to switch the app to. Both inside `runbook serve`.
[smtp.provider]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "noreply@sandbox.test"
to = "signup@example.com"
timeout_seconds = 5
fallback = "relay"

[smtp.relay]
host = "127.0.0.1"
port = {relay_port}
security = "none"
from = "noreply@sandbox.test"
to = "signup@example.com"
timeout_seconds = 5

# The API's /metrics with METRICS_GUARD unset (seed 001): open to anyone.
[metrics.api]
url = "{metrics_url}"
guard = "secret"
secret = "sandbox-metrics-secret"
timeout_seconds = 5

# No [services.*] of kind docker: the sandbox starts no Docker Engine, so release-rollback
# has no target here (see the README, release-rollback, to try it on your own engine).
"""
# A configuration for `nginx -t` only: it never serves.
NGINX_CONF = """\
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{}}
http {{
  access_log off;
  server {{ listen 127.0.0.1:{port}; include {deny_file}; location / {{ return 204; }} }}
}}
"""
# Sandbox runs carry out their plans: nothing there is anybody's data.
PARAMETERS: dict[str, Any] = {"dry_run": False, "approval": "auto"}
# Runbooks the sandbox has no target for, and why: serve says so when it starts the sandbox.
NOT_SERVED: dict[str, str] = {
    "release-rollback": "needs a docker service, and the sandbox starts no Docker Engine",
}
# Every minute for three minutes, so the planted incidents are found and fixed at once (some
# need a minute to age past their thresholds), then every five minutes, which a small busy
# machine holds for as long as the sandbox runs (bench/serve_capacity.py).
BURST_RUNS = 3
SETTLED_MINUTES = 5


def schedule_rrule(now: datetime) -> str:
    """The sandbox's schedule as an RFC 5545 rule set, starting 10 s after now (UTC)."""
    start = (now + timedelta(seconds=10)).astimezone(UTC).replace(microsecond=0)
    return (
        f"DTSTART:{start:%Y%m%dT%H%M%SZ}\n"
        f"RRULE:FREQ=MINUTELY;COUNT={BURST_RUNS}\n"
        f"RRULE:FREQ=MINUTELY;INTERVAL={SETTLED_MINUTES}"
    )


# The routines (deployments.routines) run the sandbox's runbooks over its planted incidents
# once the burst above is over, then every half hour: each is several runbooks at once.
ROUTINE_DELAY_SECONDS = 150
ROUTINE_MINUTES = 30


def routine_rrule(now: datetime) -> str:
    """The sandbox's schedule of a routine, as schedule_rrule: first ROUTINE_DELAY_SECONDS
    after now (UTC), then every ROUTINE_MINUTES."""
    start = (now + timedelta(seconds=ROUTINE_DELAY_SECONDS)).astimezone(UTC).replace(microsecond=0)
    return f"DTSTART:{start:%Y%m%dT%H%M%SZ}\nRRULE:FREQ=MINUTELY;INTERVAL={ROUTINE_MINUTES}"


class Sandbox:
    def __init__(self) -> None:
        self.pg = LocalPostgres()
        # A cache on Redis's default noeviction policy, and a queue on allkeys-lru that
        # would lose jobs: both wrong for their role.
        self.cache = LocalRedis(maxmemory="64mb")
        self.queue = LocalRedis(policy="allkeys-lru")
        self.sessions: list[psycopg.Connection[Any]] = []
        self.config = self.pg.dir / "runbook.toml"
        self.backups = self.pg.dir / "backups"
        self.deny_file = self.pg.dir / "blocked-ips.conf"

    def start(self) -> Sandbox:
        self.pg.start()
        with psycopg.connect(self.pg.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN")
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        dsn = self.pg.dsn_for(DATABASE)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        self.cache.start()
        self.queue.start()
        self.app = HealthApp(dsn)
        self.tls = Servers()
        ca = CA(self.pg.dir, "Runbook Sandbox CA")
        tls_port = self.tls.tls(*ca.issue("sandbox", ["sandbox.test"], days=5))
        self.mail = SmtpServer(rcpt_reply=b"550 5.7.1 <signup@example.com>: Relaying denied")
        self.relay = SmtpServer()
        self.metrics = MetricsApp()
        self.config.write_text(
            CONFIG.format(
                dsn=dsn,
                cache_url=self.cache.url,
                queue_url=self.queue.url,
                data=self.pg.dir,
                status=json.dumps(self.pg.ctl_argv("status")),
                start=json.dumps(self.pg.ctl_argv("start")),
                restart=json.dumps(self.pg.ctl_argv("restart")),
                log=self.pg.dir / "log",
                health_url=self.app.url,
                api_maintenance=self.app.maintenance_toml("api"),
                tls_port=tls_port,
                backups=self.backups,
                scratch_dsn=self.pg.dsn_for("postgres"),
                dead_port=free_port(),
                tls_ca=ca.pem,
                deny_file=self.deny_file,
                nginx_test=json.dumps(self.nginx_test()),
                smtp_port=self.mail.port,
                relay_port=self.relay.port,
                metrics_url=self.metrics.url,
            )
        )
        self.plant()
        self.dump_backups(dsn)
        return self

    def nginx_test(self) -> list[str]:
        """`nginx -t` of a configuration that includes the deny file, or `true` on a machine
        without nginx (scripts/setup.sh installs it)."""
        self.deny_file.touch()
        if shutil.which("nginx") is None:
            return ["true"]
        conf = self.pg.dir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(dir=self.pg.dir, port=free_port(), deny_file=self.deny_file)
        )
        return ["nginx", "-t", "-q", "-e", str(self.pg.dir / "nginx-error.log"), "-c", str(conf)]

    def dump_backups(self, dsn: str) -> None:
        self.backups.mkdir(exist_ok=True)
        good = self.backups / "app-1.dump"
        subprocess.run(
            ["pg_dump", "-Fc", "-f", str(good), dsn], check=True, capture_output=True, timeout=120
        )
        (self.backups / "app-2.dump").write_bytes(good.read_bytes()[: good.stat().st_size // 3])

    def plant(self) -> None:
        """Stuck jobs, a bloated table, sessions idle in transaction, a runaway query, login
        lockouts and a queue backlog."""
        with self.cache.client() as r:
            r.mset({f"login_attempt:user{n}@example.com": 5 for n in range(3)})
            r.set("login_attempt:user0@example.com:203.0.113.7", 5)
        with self.queue.client() as r:
            # BullMQ's key layout: a queue's meta hash and its list of waiting job ids.
            r.hset("bull:emails:meta", "opts.maxLenEvents", 10000)
            r.rpush("bull:emails:wait", *range(1, 1501))
        app = self.pg.dsn_for(DATABASE, ROLE)
        with psycopg.connect(app, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA crawler")
            conn.execute("""CREATE TABLE crawler.job (id bigserial PRIMARY KEY, sourceid int,
                            status text NOT NULL, startedat timestamptz)""")
            conn.execute("""INSERT INTO crawler.job (sourceid, status, startedat)
                SELECT g, CASE WHEN g <= 5 THEN 'running' ELSE 'done' END,
                       now() - make_interval(hours => g) FROM generate_series(1, 20) g""")
            conn.execute(
                "CREATE TABLE event (id int PRIMARY KEY, payload text) "
                "WITH (autovacuum_enabled = false)"
            )
            conn.execute("INSERT INTO event SELECT g, 'x' FROM generate_series(1, 50000) g")
            conn.execute("UPDATE event SET payload = 'y'")
            # data-integrity: two menus, one gone; categories and items left behind.
            conn.execute('CREATE TABLE "Menu" (id text PRIMARY KEY)')
            conn.execute('CREATE TABLE "Category" (id text PRIMARY KEY, "menuId" text)')
            conn.execute('CREATE TABLE "Item" (id text PRIMARY KEY, "categoryId" text)')
            conn.execute("""INSERT INTO "Menu" VALUES ('m1')""")
            conn.execute(
                """INSERT INTO "Category" VALUES ('c1', 'm1'), ('c2', 'm2'), ('c3', 'm2')"""
            )
            conn.execute(
                """INSERT INTO "Item"
                   VALUES ('i1', 'c1'), ('i2', 'c2'), ('i3', 'c3'), ('i4', 'c9')"""
            )
            conn.execute('CREATE TABLE "Session" (id text PRIMARY KEY, "expiresAt" timestamp(3))')
            conn.execute("""INSERT INTO "Session" SELECT 's' || g,
                (now() AT TIME ZONE 'UTC') + make_interval(hours => g - 3)
                FROM generate_series(1, 6) g""")
            # security-incident: sessions of three users, one revoked; a day of audit log.
            conn.execute("CREATE SCHEMA users")
            conn.execute("""CREATE TABLE users.session (id serial PRIMARY KEY, userid text,
                            revokedat timestamp)""")
            conn.execute("""INSERT INTO users.session (userid, revokedat) VALUES
                ('u1', NULL), ('u1', NULL), ('u2', NULL), ('u3', now() AT TIME ZONE 'UTC')""")
            conn.execute("CREATE SCHEMA system")
            conn.execute(
                "CREATE TABLE system.auditlog (id serial, action text, createdat timestamptz)"
            )
            conn.execute("""INSERT INTO system.auditlog (action, createdat)
                SELECT 'login', now() - make_interval(hours => g) FROM generate_series(1, 30) g""")
            # disk-space: monthly partitions of 2020 (old) and of this month, and a look-alike.
            conn.execute("CREATE SCHEMA analytics")
            conn.execute("""CREATE TABLE analytics.pageview (id bigint, viewed_at timestamptz
                            NOT NULL) PARTITION BY RANGE (viewed_at)""")
            month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            after = (month + timedelta(days=32)).replace(day=1)
            for start, end in (
                (datetime(2020, 1, 1, tzinfo=UTC), datetime(2020, 2, 1, tzinfo=UTC)),
                (datetime(2020, 2, 1, tzinfo=UTC), datetime(2020, 3, 1, tzinfo=UTC)),
                (month, after),
            ):
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} PARTITION OF analytics.pageview "
                        "FOR VALUES FROM ({}) TO ({})"
                    ).format(
                        sql.Identifier("analytics", f"pageview_{start:%Y_%m}"),
                        sql.Literal(start),
                        sql.Literal(end),
                    )
                )
                conn.execute(
                    "INSERT INTO analytics.pageview SELECT g, %s FROM generate_series(1, 5000) g",
                    [start],
                )
            conn.execute("CREATE TABLE analytics.pageview_2020_01_backup (id bigint)")
        for n in range(3):
            conn = psycopg.connect(app, application_name=f"worker-{n}")
            conn.execute("SELECT 1")  # a transaction left open: idle in transaction
            self.sessions.append(conn)
        runaway = psycopg.connect(app, application_name="report", autocommit=True)
        self.sessions.append(runaway)
        threading.Thread(
            target=_quietly, args=(runaway, "SELECT pg_sleep(3600)"), daemon=True
        ).start()

    def stop(self) -> None:
        if hasattr(self, "app"):
            self.app.close()
            self.tls.close()
        for server in ("mail", "relay", "metrics"):
            if hasattr(self, server):
                getattr(self, server).close()
        for conn in self.sessions:
            conn.close()
        self.pg.stop()
        self.cache.stop()
        self.queue.stop()


def _quietly(conn: psycopg.Connection[Any], query: str) -> None:
    # The runbook cancelling it is the point.
    with contextlib.suppress(psycopg.Error):
        conn.execute(query)


class HealthApp:
    """GET /health: 200 {"status": "ok", "database": "ok"}, or 503 with "database": "error"
    when the database does not answer (as seed 001's API does); 503 {"status": "maintenance"}
    while its maintenance flag is on.

    Its admin API, as seed 004 s2 step 5 calls it (Authorization: Bearer TOKEN, else 401):
    PUT ADMIN_PATH {"key": "site.maintenance_mode", "value": "true"|"false"} switches the flag;
    GET ADMIN_PATH/site.maintenance_mode answers {"key": ..., "value": "true"|"false"}.
    Each switch is recorded in `switches` as (on, observe()) at the moment it happens."""

    ADMIN_PATH = "/api/v1/admin/settings"
    KEY = "site.maintenance_mode"

    def __init__(
        self,
        dsn: str | None,
        token: str = "sandbox-admin-token",  # noqa: S107 - the sandbox app's own token
        maintenance: bool = False,
        observe: Callable[[], object] = lambda: None,
    ) -> None:
        self.dsn = dsn
        self.token = token
        self.maintenance = maintenance
        self.observe = observe
        self.switches: list[tuple[bool, object]] = []
        self.refused = 0
        # The next PUTs that apply the switch and then answer 500 (a proxy's timeout, a
        # crash after the write), as a real admin API can.
        self.failing_puts = 0
        app = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, code: int, body: object) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {app.token}":
                    return True
                app.refused += 1
                self.reply(401, {"error": "unauthorized"})
                return False

            def do_GET(self) -> None:
                if self.path == f"{app.ADMIN_PATH}/{app.KEY}":
                    if self.authorised():
                        self.reply(200, {"key": app.KEY, "value": json.dumps(app.maintenance)})
                    return
                self.reply(*app.answer())

            def do_PUT(self) -> None:
                if self.path != app.ADMIN_PATH:
                    self.reply(404, {"error": "not found"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if not self.authorised():
                    return
                try:
                    body = json.loads(self.rfile.read(length))
                    assert body["key"] == app.KEY and body["value"] in ("true", "false")
                except (ValueError, KeyError, TypeError, AssertionError):
                    self.reply(400, {"error": f"want {{'key': {app.KEY!r}, 'value': 'true'}}"})
                    return
                app.switch(body["value"] == "true")
                if app.failing_puts > 0:  # applied, then a failure answered (a test's fault)
                    app.failing_puts -= 1
                    self.reply(500, {"error": "internal error after the setting was saved"})
                    return
                self.reply(200, {"key": app.KEY, "value": body["value"]})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{base}/health"
        self.admin_url = f"{base}{self.ADMIN_PATH}"
        self.check_url = f"{self.admin_url}/{self.KEY}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def switch(self, on: bool) -> None:
        self.switches.append((on, self.observe()))
        self.maintenance = on

    def answer(self) -> tuple[int, object]:
        if self.maintenance:
            return 503, {"status": "maintenance"}
        if self.dsn is None:
            return 200, {"status": "ok"}
        try:
            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return 503, {"status": "error", "database": "error", "redis": "ok"}
        return 200, {"status": "ok", "database": "ok", "redis": "ok"}

    def maintenance_toml(self, service: str) -> str:
        """The [services.SERVICE.maintenance] table that reaches this app's admin API."""
        return (
            f"[services.{service}.maintenance]\n"
            f'url = "{self.admin_url}"\n'
            f'body_on = {{ key = "{self.KEY}", value = "true" }}\n'
            f'body_off = {{ key = "{self.KEY}", value = "false" }}\n'
            f'token = "{self.token}"\n'
            f'check_url = "{self.check_url}"\n'
            'check_path = "value"\n'
            "timeout_seconds = 5\n"
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
