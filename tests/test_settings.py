"""Configuration: one clear error naming the file, the key and the fix; env overrides TOML."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deployments.config import load_config
from tasks.errors import ConfigError
from tasks.settings import load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runbook.toml"
    path.write_text(text)
    return path


def test_environment_overrides_the_file_and_merges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        '[postgres.main]\ndsn = "postgresql://a@h/file"\n'
        'allow_roles = ["app"]\n[postgres.main.jobs]\ntable = "crawler.job"\n',
    )
    monkeypatch.setenv("RUNBOOK_POSTGRES__MAIN__DSN", "postgresql://a:pw@h/env")
    monkeypatch.setenv("RUNBOOK_POSTGRES__SECOND__DSN", "postgresql://b@h/two")
    settings = load_settings(path)
    main = settings.postgres["main"]
    assert main.dsn.get_secret_value().endswith("/env")
    assert main.allow_roles == ["app"] and main.jobs and main.jobs.table_parts == ("crawler", "job")
    assert set(settings.postgres) == {"main", "second"}
    assert "pw" not in repr(settings) and "pw" not in main.description


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[postgres.main\ndsn = "host=x"', "not valid TOML"),
        ("[postgres.main]\nallow_roles = []\n", "postgres.main.dsn: Field required"),
        ('[postgres.main]\ndsn = "host=x"\ndns = "y"\n', "postgres.main.dns: Extra inputs"),
        (
            '[postgres.main]\ndsn = "host=x"\n[postgres.main.jobs]\ntable = "a.b.c"\n',
            "SCHEMA.TABLE",
        ),
        (
            '[postgres.main]\ndsn = "host=x"\n[postgres.main.thresholds]\nidle_seconds = 3\n',
            "unknown idle_seconds",
        ),
        ('[nosuch.x]\nurl = "h"\n', "nosuch: Extra inputs"),
        (
            '[services.api]\nkind = "systemd"\nunit = "api"\n'
            "[services.api.thresholds]\nhost_memory_percent = 50\n",
            "unknown host_memory_percent; known: cpu_percent, max_containers, memory_percent",
        ),
        ('[postgres.main]\ndsn = "host=x"\napproval = "sometimes"\n', "postgres.main.approval"),
        ('[approval]\nnosuch.terminate_backend = "ask"\n', "approval.nosuch: unknown runbook"),
        (
            '[approval]\npostgres-connections.vacuum_analyze = "ask"\n',
            "postgres-connections plans no action of that kind; its kinds: cancel_query, "
            "terminate_backend",
        ),
        ('[approval]\nstuck-jobs.reset_stuck_jobs = "maybe"\n', "stuck-jobs.reset_stuck_jobs"),
        (
            '[postgres.main]\ndsn = "host=x"\nlabels = { "bad-key" = "x" }\n',
            "postgres.main.labels: label name 'bad-key': use letters, digits and underscores",
        ),
        (
            '[redis.cache]\nurl = "redis://h:6379/0"\nlabels = { __env = "x" }\n',
            "redis.cache.labels: label name '__env'",
        ),
        (
            '[postgres.main]\ndsn = "host=x"\nlabels = { env = "" }\n',
            "label env: the value is empty",
        ),
        (
            f'[postgres.main]\ndsn = "host=x"\nlabels = {{ env = "{"x" * 257}" }}\n',
            "postgres.main.labels: label env: the value has 257 characters; at most 256",
        ),
        (
            '[postgres.main]\ndsn = "host=x"\nlabels = { env = "a\\tb" }\n',
            "label env: the value holds a control character",
        ),
        ('[postgres.main]\ndsn = "host=x"\nlabels = { tier = 1 }\n', "postgres.main.labels.tier"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)
    assert ": :" not in str(caught.value) and "Value error" not in str(caught.value)


@pytest.mark.parametrize(
    ("dsn", "why"),
    [
        ("postgresql://app:s3cret-pw@h:5432/app?sslmod=x", "libpq knows no keyword 'sslmod'"),
        ("user=app password=s3cret-pw bogus=1", "libpq knows no keyword 'bogus'"),
        ("s3cret-pw", "libpq cannot parse it"),
    ],
)
def test_a_malformed_dsn_is_a_config_error_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dsn: str, why: str
) -> None:
    expected = f"postgres.main.dsn: not a PostgreSQL connection string ({why}): use postgresql://"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, f'[postgres.main]\ndsn = "{dsn}"\n'))
    assert expected in str(caught.value) and "s3cret-pw" not in str(caught.value)
    monkeypatch.setenv("RUNBOOK_POSTGRES__MAIN__DSN", dsn)
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, '[postgres.main]\ndsn = "host=x"\n'))
    assert expected in str(caught.value) and "s3cret-pw" not in str(caught.value)
    assert "RUNBOOK_POSTGRES__MAIN__DSN" in str(caught.value)


def test_a_named_config_that_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()


def test_unknown_and_ambiguous_targets(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, '[postgres.a]\ndsn = "host=x"\n[postgres.b]\ndsn = "host=y"\n')
    )
    with pytest.raises(ConfigError, match=r"unknown postgres target 'c'.*configured: a, b"):
        settings.postgres_target("c")
    with pytest.raises(ConfigError, match="pass --target"):
        settings.postgres_target(None)
    assert settings.postgres_target("b")[0] == "b"


def test_redis_targets(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            (
                '[redis.queue]\nurl = "redis://:pw-in-url@10.1.2.3:6380/2"\nrole = "queue"\n'
                'queues = ["emails"]\n[redis.cache]\nurl = "redis://127.0.0.1/0"\n'
                'maxmemory_policy = "allkeys-lfu"\n'
            ),
        )
    )
    queue, cache = settings.redis["queue"], settings.redis["cache"]
    assert queue.wanted_policy == "noeviction" and cache.wanted_policy == "allkeys-lfu"
    assert queue.description == "redis://10.1.2.3:6380/2"
    assert "pw-in-url" not in repr(settings)
    assert settings.target("redis", "cache")[1] is cache


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[redis.r]\nurl = "redis://h"\nrole = "db"\n', "redis.r.role: Input should be 'cache' or"),
        ('[redis.r]\nurl = "redis://h"\n[redis.r.thresholds]\nwaiting = 3\n', "unknown waiting"),
    ],
)
def test_bad_redis_config(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[services.a]\nkind = "docker"\n', "kind docker needs container"),
        (
            '[services.a]\nkind = "command"\nstatus_command = ["true"]\n',
            "needs status_command and ",
        ),
        ('[services.a]\nkind = "ssh"\n', "services.a.kind"),
        (
            '[postgres.main]\ndsn = "host=x"\nservice = "nope"\n',
            "postgres.main.service names 'nope'",
        ),
        (
            '[services.a]\nkind = "systemd"\nunit = "a"\ndependencies = { db = "mysql.x" }\n',
            "must be postgres.NAME or redis.NAME",
        ),
        (
            '[services.a]\nkind = "systemd"\nunit = "a"\ndependencies = { db = "postgres.x" }\n',
            "no [postgres.x]",
        ),
    ],
)
def test_bad_service_config(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert expected in str(caught.value)


def test_tls_endpoints(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            (
                '[tls.api]\nhost = "api.example.com"\ncert_name = "api"\n'
                'reload_command = ["nginx", "-s", "reload"]\n'
            ),
        )
    )
    api = settings.tls["api"]
    assert api.port == 443 and api.server_name is None
    with pytest.raises(ConfigError, match=r"tls\.x\.port"):
        load_settings(write(tmp_path, '[tls.x]\nhost = "h"\nport = 70000\n'))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[backups.app]\npattern = ["*.gz"]\n', "set either s3"),
        ('[backups.app]\ns3 = "nope"\n', "backups.app.s3 names 'nope'"),
        ('[backups.app]\ndirectory = "/x"\ndatabase = "nope"\n', "backups.app.database names"),
    ],
)
def test_bad_backup_config(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert expected in str(caught.value)


def test_loads_on_many_threads_at_once_all_see_the_inventory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Alert runs load the settings on several threads at once; RUNBOOK_CONFIG names the file.
    path = write(tmp_path, '[redis.queue]\nurl = "redis://127.0.0.1:6379/0"\nrole = "queue"\n')
    monkeypatch.setenv("RUNBOOK_CONFIG", str(path))
    monkeypatch.setenv("RUNBOOK_REDIS__QUEUE__PREFIX", "jobs")
    start = threading.Barrier(8)

    def loads(n: int) -> list[tuple[tuple[str, ...], str]]:
        start.wait()
        seen = []
        for _ in range(n):
            settings = load_settings()
            seen.append((tuple(settings.redis), settings.redis["queue"].prefix))
        return seen

    with ThreadPoolExecutor(8) as pool:
        results = [r for seen in pool.map(loads, [150] * 8) for r in seen]
    assert len(results) == 8 * 150
    assert set(results) == {(("queue",), "jobs")}
    assert os.environ["RUNBOOK_CONFIG"] == str(path)


def test_labels_on_every_kind_of_target_and_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNBOOK_POSTGRES__MAIN__LABELS__REGION", "eu")
    settings = load_config(
        write(
            tmp_path,
            '[postgres.main]\ndsn = "host=x"\nlabels = { env = "prod", tier = "db" }\n'
            '[redis.cache]\nurl = "redis://h:6379/0"\n[redis.cache.labels]\nenv = "stage"\n'
            '[tls.app]\nhost = "app.test"\nlabels = { env = "prod é" }\n',
        )
    )
    assert settings.postgres["main"].labels == {"env": "prod", "tier": "db", "region": "eu"}
    assert settings.redis["cache"].labels == {"env": "stage"}
    assert settings.tls["app"].labels == {"env": "prod é"}
