"""A local sandbox for `runbook serve` with no inventory: a throwaway PostgreSQL and two
redis-servers with real incidents planted in them, and an inventory pointing at them."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg

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
                tls_port=tls_port,
                backups=self.backups,
                scratch_dsn=self.pg.dsn_for("postgres"),
                dead_port=free_port(),
                tls_ca=ca.pem,
                deny_file=self.deny_file,
                nginx_test=json.dumps(self.nginx_test()),
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
    when the database does not answer (as seed 001's API does)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = app.answer()
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self) -> tuple[int, object]:
        try:
            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return 503, {"status": "error", "database": "error", "redis": "ok"}
        return 200, {"status": "ok", "database": "ok", "redis": "ok"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
