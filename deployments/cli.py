"""The `runbook` command: list, run, serve (DESIGN.md's CLI contract).

Exit codes: 0 healthy or fixed; 1 problems remain; 2 bad usage or configuration; 3 the runbook
failed. Prefect is imported only by the commands that run a flow."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar, cast

import typer

from tasks.errors import ConfigError, RunbookError

if TYPE_CHECKING:
    from prefect import State
    from pydantic import BaseModel
    from rich.console import Console
    from rich.status import Status

    from deployments.catalog import Runbook
    from tasks.models import Report
    from tasks.progress import Snapshot

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help: rich's formatting of it costs about 0.1 s of CPU a call.
    rich_markup_mode=None,
    help="Incident runbooks as Prefect flows: diagnose, plan, gate, act, verify.",
)

# Flow parameters the CLI sets itself: --target, --apply and --yes, never --set.
RESERVED = ("target", "dry_run", "approval")
# Piped or redirected output is as wide as its lines: rich would wrap it at 80 columns.
UNWRAPPED = 100_000


@functools.cache
def console(stderr: bool = False) -> Console:
    """stdout's (or stderr's) rich console; imported on first use, as `--help` needs none."""
    from rich.console import Console

    found = Console(stderr=stderr)
    if found.is_terminal or "COLUMNS" in os.environ:
        return found
    return Console(stderr=stderr, width=UNWRAPPED)


def fail(exc: RunbookError) -> typer.Exit:
    from rich.text import Text

    console(stderr=True).print(
        Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True
    )
    return typer.Exit(exc.exit_code)


@app.command("list")
def list_runbooks() -> None:
    """Every runbook with its triggers, purpose and what it may change."""
    from deployments.catalog import ROUTINES, RUNBOOKS

    header = ("runbook", "triggers", "purpose", "may change")
    rows = [(rb.name, rb.triggers, rb.purpose, rb.changes) for rb in RUNBOOKS.values()]
    rows += [(r.name, r.triggers, r.purpose, r.changes) for r in ROUTINES.values()]
    if not sys.stdout.isatty():
        sys.stdout.write(plain_table(header, rows))
        return
    from rich.table import Column, Table
    from rich.text import Text

    table = Table(Column(header[0], no_wrap=True), *header[1:], show_lines=True)
    for row in rows:
        table.add_row(row[0], *(Text(cell) for cell in row[1:]))
    console().print(table)


def plain_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """One line per row, columns aligned with two spaces between them, never wrapped: what
    grep, a pager or a file wants."""
    lines = (header, *rows)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    return "".join(
        "  ".join([*(row[i].ljust(width) for i, width in enumerate(widths)), row[-1]]) + "\n"
        for row in lines
    )


def find_runbook(name: str) -> Runbook:
    from deployments.catalog import ROUTINES, RUNBOOKS

    if name not in RUNBOOKS:
        raise ConfigError(
            f"unknown runbook {name!r}; known: {', '.join([*RUNBOOKS, *ROUTINES])} "
            "(see `runbook list`)"
        )
    return RUNBOOKS[name]


def parse_sets(rb: Runbook, pairs: list[str]) -> dict[str, Any]:
    from pydantic import ValidationError

    from tasks.models import explain_params

    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--set {pair!r}: expected key=value, e.g. --set "
                f"{next(iter(rb.params.model_fields))}=60"
            )
        if key in RESERVED:
            raise ConfigError(f"--set {key}: use --target, --apply and --yes instead")
        values[key] = value
    try:
        rb.params.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"{rb.name} --set: {explain_params(rb.params, exc)}") from None
    return values


def resolve_target(rb: Runbook, target: str | None) -> tuple[str, dict[str, Any]]:
    from deployments.config import load_config
    from tasks.settings import config_path

    settings = load_config()
    if target is None and rb.default_target is not None:
        if not rb.targets(settings):
            raise ConfigError(
                f"{rb.name} needs at least one [{rb.inventory}.NAME] entry"
                + (f" with {rb.requires}" if rb.requires else "")
                + f" in {config_path()} (see README, Configuration)"
            )
        return rb.default_target, {}
    name, cfg = settings.target(rb.inventory, target)
    if not rb.accepts(cfg):
        raise ConfigError(f"{rb.name} needs {rb.requires} on {rb.inventory} target {name!r}")
    return name, cfg.thresholds


@contextmanager
def prefect_context() -> Iterator[None]:
    """Prefect settings for one CLI run, recorded in: the API in PREFECT_API_URL (checked
    first: TargetError when it does not answer), else a local server that answers (`runbook
    serve`), else Prefect's API app served in this process on its database in PREFECT_HOME
    (deployments.prefect_api), unless Prefect's ephemeral mode is off (ConfigError)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The report says what happened; Prefect's console logs (with tracebacks) would bury it.
    # They still reach the Prefect API and UI.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    # A first run creates Prefect's database (its migrations): well over 20 s on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    from deployments.prefect_api import (
        in_process_api,
        local_prefect_api,
        no_api_configured,
        require_prefect_api,
    )

    settings = get_current_settings()
    # Heartbeats detect crashed runs of unattended workers; a CLI run is watched by the
    # person who started it, and joining the heartbeat thread costs about 1 s per run.
    updates: dict[Any, Any] = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    with ExitStack() as stack:
        if settings.api.url:
            require_prefect_api(settings.api.url)
        elif url := local_prefect_api():
            updates[PREFECT_API_URL] = url
        elif settings.server.ephemeral.enabled:
            timeout = settings.server.ephemeral.startup_timeout_seconds
            updates[PREFECT_API_URL] = stack.enter_context(in_process_api(timeout))
        else:
            raise no_api_configured()
        stack.enter_context(temporary_settings(updates=updates))
        yield


def terminal_approver(status: Status) -> Any:
    from rich.prompt import Confirm

    from tasks.models import Action

    err = console(stderr=True)

    def decide(actions: list[Action]) -> bool:
        status.stop()
        err.print("[bold]These actions change the system:[/]")
        for a in actions:
            err.print(f"  - {a.description} ({a.target})", highlight=False, markup=False)
        answer = Confirm.ask("Carry them out?", console=err, default=False)
        status.start()
        return answer

    return decide


def cli_approver(status: Any, yes: bool) -> AbstractContextManager[None]:
    """Who answers a run's approvals from the CLI: --yes approves every action (as the login
    name with "(--yes)"); else the prompt on a terminal; else nobody (the gate skips what
    needs approval)."""
    from tasks.gate import approver, login_name

    if yes:
        return approver(lambda actions: True, who=f"{login_name()} (--yes)")
    return approver(terminal_approver(status) if sys.stdin.isatty() else None)


class ProgressBar:
    """A listener of tasks.progress: while a step reports progress, a rich bar (what, bar,
    percent, amount, elapsed) in place of the run's spinner, which comes back when it ends.
    Steps may report from another thread (boto3's upload threads read a dump)."""

    def __init__(self, status: Status) -> None:
        import threading

        self.status, self.lock = status, threading.Lock()
        self.bar: Any = None
        self.row: Any = None

    def __call__(self, snapshot: Snapshot) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        from tasks.progress import amount

        with self.lock:
            if self.bar is None:
                self.status.stop()
                self.bar = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TaskProgressColumn(),
                    TextColumn("{task.fields[amount]}"),
                    TimeElapsedColumn(),
                    console=console(stderr=True),
                    transient=True,
                )
                self.row = self.bar.add_task(snapshot.what, total=100, amount="")
                self.bar.start()
            self.bar.update(
                self.row,
                description=snapshot.what,
                completed=snapshot.percent,
                amount=amount(snapshot.done, snapshot.total, snapshot.unit, snapshot.estimate),
            )
            if snapshot.ended:
                self.close()
                self.status.start()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@contextmanager
def progress_bar(status: Status, as_json: bool) -> Iterator[None]:
    """On a terminal, without --json: the steps' progress as a bar (ProgressBar). Otherwise
    nothing: piped, redirected or --json output stays exactly what it was."""
    if as_json or not console(stderr=True).is_terminal:
        yield
        return
    from tasks.progress import listening

    bar = ProgressBar(status)
    try:
        with listening(bar):
            yield
    finally:
        with bar.lock:
            bar.close()


@contextmanager
def unexpected_errors(name: str) -> Iterator[None]:
    """Within: Ctrl-C exits 130, and an error that is no RunbookError becomes one line naming
    NAME (exit 3; the traceback only with RUNBOOK_DEBUG=1). RunbookErrors pass through."""
    try:
        yield
    except (RunbookError, typer.Exit):
        raise
    except KeyboardInterrupt:
        console(stderr=True).print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:
        if os.environ.get("RUNBOOK_DEBUG"):
            traceback.print_exc()
        raise fail(
            RunbookError(
                f"{name} failed: {type(exc).__name__}: {exc} (RUNBOOK_DEBUG=1 shows the traceback)"
            )
        ) from None


@app.command()
def run(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the runbook, see `runbook list`")],
    target: Annotated[
        str | None, typer.Option(metavar="TARGET", help="inventory target name")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="a runbook parameter, repeatable"),
    ] = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="carry out the plan (default: plan only)")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="approve destructive actions")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    max_concurrency: Annotated[
        str | None,
        typer.Option(
            metavar="N|P%", help="a fleet: targets at once, a count or a percentage (default 5)"
        ),
    ] = None,
    max_errors: Annotated[
        str | None,
        typer.Option(
            metavar="N|P%",
            help="a fleet: errors before no new target starts, a count or a percentage "
            "(default 0: stop after the first)",
        ),
    ] = None,
) -> None:
    """Run a runbook (or a routine: every target of its runbooks): plan only unless --apply.

    --target all, a,b,c or env=prod,tier=db runs it on each of those targets (a fleet), one
    first, then more at once up to --max-concurrency, stopping after --max-errors."""
    from deployments.catalog import ROUTINES
    from tasks.models import utcnow

    rates = {"--max-concurrency": max_concurrency, "--max-errors": max_errors}
    if name in ROUTINES:
        if given := [option for option, value in rates.items() if value is not None]:
            raise fail(ConfigError(f"{given[0]} goes with a fleet of one runbook, not {name}"))
        run_routine(name, target=target, sets=set_ or [], apply=apply, yes=yes, as_json=as_json)
    if is_fleet(target):
        run_fleet(
            name,
            selector=cast("str", target),
            sets=set_ or [],
            max_concurrency=max_concurrency,
            max_errors=max_errors,
            apply=apply,
            yes=yes,
            as_json=as_json,
        )
    try:
        if given := [option for option, value in rates.items() if value is not None]:
            raise ConfigError(
                f"{given[0]} goes with a fleet (--target all, a,b,c or env=prod); "
                f"--target {target or 'NAME'} runs one target"
            )
        rb = find_runbook(name)
        params = parse_sets(rb, set_ or [])
        target_name, thresholds = resolve_target(rb, target)
        rb.params.resolve(
            rb.params.model_validate(params), thresholds, f"{rb.name} on {target_name}"
        )
    except RunbookError as exc:
        raise fail(exc) from None
    started = utcnow()
    try:
        with (
            unexpected_errors(rb.name),
            prefect_context(),
            console(stderr=True).status(f"{rb.name} on {target_name}…") as status,
        ):
            flow = rb.load()
            with cli_approver(status, yes), progress_bar(status, as_json):
                report = cast(
                    "Report",
                    flow(target=target_name, dry_run=not apply, approval="ask", params=params),
                )
    except RunbookError as exc:
        if as_json:
            console().print_json(
                failed_report(rb, target_name, not apply, started, exc).model_dump_json()
            )
        raise fail(exc) from None
    if as_json:
        sys.stdout.write(report.model_dump_json() + "\n")
    else:
        show(report)
    raise typer.Exit(report.exit_code)


def run_routine(
    name: str, *, target: str | None, sets: list[str], apply: bool, yes: bool, as_json: bool
) -> None:
    """`runbook run routine-...`: the routine's runbooks on every target each has
    (deployments.routines), with --apply and --yes passed down to each; prints the summary
    rows (--json: the RoutineReport) and exits with the worst status's exit code."""
    from deployments.catalog import ROUTINES
    from deployments.config import load_config
    from tasks.routines import RoutineReport

    try:
        if target is not None:
            raise ConfigError(
                f"--target: {name} runs every target of its runbooks; to run one target, "
                f"run the runbook itself (`runbook run RUNBOOK --target {target}`)"
            )
        if sets:
            raise ConfigError(
                f"--set: {name} runs its runbooks with their parameters from the inventory's "
                "thresholds; to set one, run the runbook itself"
            )
        load_config()
    except RunbookError as exc:
        raise fail(exc) from None
    try:
        with (
            unexpected_errors(name),
            prefect_context(),
            console(stderr=True).status(f"{name}…") as status,
        ):
            flow = ROUTINES[name].load()
            with cli_approver(status, yes), progress_bar(status, as_json):
                state = cast(
                    "State[Any]", flow(dry_run=not apply, approval="ask", return_state=True)
                )
            report = report_of(state, RoutineReport, f"{name} ended {state.name} without a summary")
    except RunbookError as exc:
        raise fail(exc) from None
    print_and_exit(report, as_json, show_routine)


R = TypeVar("R", bound="BaseModel")


def report_of(state: State[Any], kind: type[R], missing: str) -> R:
    """The report a routine's or fleet's final state holds; what its flow raised when it
    holds none, else RunbookError(missing)."""
    from tasks.outcome import state_report

    report = state_report(state)
    if not isinstance(report, kind):
        state.result()  # raises what the flow raised
        raise RunbookError(missing)
    return report


def print_and_exit(report: Any, as_json: bool, show_it: Callable[[Any], None]) -> NoReturn:
    """--json: the report as one JSON object on stdout, else show_it(report); then exit with
    the report's exit code."""
    if as_json:
        sys.stdout.write(report.model_dump_json() + "\n")
    else:
        show_it(report)
    raise typer.Exit(report.exit_code)


def is_fleet(target: str | None) -> bool:
    """tasks.fleet_rules.is_fleet, without importing tasks (`--help` stays light)."""
    from tasks.fleet_rules import is_fleet as fleet_selector

    return fleet_selector(target)


def run_fleet(
    name: str,
    *,
    selector: str,
    sets: list[str],
    max_concurrency: str | None,
    max_errors: str | None,
    apply: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """`runbook run NAME --target SELECTOR`: the fleet flow (deployments.fleet) in this
    process, after every check it makes before a target runs (exit 2 on any); prints its
    targets worst first, then those not started (--json: the FleetReport), and exits with the
    fleet's exit code.

    A fleet never prompts: several targets may ask at once, and one prompt per target is not
    an answer to any of them. --apply therefore needs --yes, which approves every target's
    destructive actions (the inventory's `approval = "never"`, production targets' rules
    beyond `ask`, and [limits] still apply)."""
    from deployments.config import load_config
    from tasks.fleet import FleetReport
    from tasks.fleet_rules import (
        DEFAULT_MAX_CONCURRENCY,
        DEFAULT_MAX_ERRORS,
        parse_rate,
    )

    concurrency = max_concurrency or DEFAULT_MAX_CONCURRENCY
    errors = max_errors or DEFAULT_MAX_ERRORS
    try:
        rb = find_runbook(name)
        params = parse_sets(rb, sets)
        parse_rate(concurrency, "--max-concurrency", minimum=1)
        parse_rate(errors, "--max-errors", minimum=0)
        if apply and not yes:
            raise ConfigError(
                "--apply on a fleet needs --yes: a fleet runs several targets at once and "
                "cannot stop for a prompt per target. Add --yes to approve the destructive "
                "actions of every selected target, or leave out --apply to plan only"
            )
        settings = load_config()
        selected = rb.select(settings, selector)
        for target in selected:
            _, cfg = settings.target(rb.inventory, target)
            rb.params.resolve(
                rb.params.model_validate(params), cfg.thresholds, f"{rb.name} on {target}"
            )
    except RunbookError as exc:
        raise fail(exc) from None
    from tasks.gate import approver, login_name

    try:
        with (
            unexpected_errors(rb.name),
            prefect_context(),
            console(stderr=True).status(f"{rb.name} on {len(selected)} target(s)…") as status,
        ):
            from deployments.fleet import FLEETS

            # --yes answers for every target; without it nobody is asked (a dry run asks none).
            who = f"{login_name()} (--yes)"
            with (
                approver((lambda actions: True) if yes else None, who=who if yes else None),
                progress_bar(status, as_json),
            ):
                state = cast(
                    "State[Any]",
                    FLEETS[rb.name](
                        selector=selector,
                        max_concurrency=concurrency,
                        max_errors=errors,
                        dry_run=not apply,
                        approval="ask",
                        params=params or None,
                        return_state=True,
                    ),
                )
            report = report_of(
                state, FleetReport, f"the fleet of {rb.name} ended {state.name} without a report"
            )
    except RunbookError as exc:
        raise fail(exc) from None
    print_and_exit(report, as_json, show_fleet)


def show_fleet(report: Any) -> None:
    """A fleet's report (a tasks.fleet.FleetReport): its targets worst first, then those not
    started, then the totals."""
    from rich.table import Table
    from rich.text import Text

    from tasks.fleet import summary_of

    out = console()
    table = Table("target", "status", "summary", title=f"{report.runbook} on {report.selector}")
    for r in report.worst_first():
        table.add_row(
            Text(r.target), Text(r.status.value, STATUS_STYLE[r.status]), Text(summary_of(r))
        )
    for n in report.not_started:
        table.add_row(Text(n.target), Text("not started", "dim"), Text(n.reason))
    out.print(table)
    t = report.totals
    mode = "dry run" if report.dry_run else "applied"
    out.print(
        Text.assemble(
            f"{report.runbook} on {report.selector} ({mode}): ",
            (report.status.value, STATUS_STYLE[report.status]),
            f"; {t.healthy} healthy, {t.fixed} fixed, {t.unhealthy} unhealthy, "
            f"{t.failed} failed, {t.not_started} not started",
        )
    )
    if report.flow_run_id:
        from tasks.notify import run_link

        out.print(Text(f"fleet run: {run_link(report.flow_run_id, None) or report.flow_run_id}"))


def show_routine(report: Any) -> None:
    """A routine's summary (a tasks.routines.RoutineReport): one row per runbook and target."""
    from rich.table import Table
    from rich.text import Text

    out = console()
    table = Table("runbook", "target", "status", "run", "detail", title=report.routine)
    for row in report.rows:
        status = row.status.value if row.status is not None else "not run"
        table.add_row(
            row.runbook,
            Text(row.target or "-"),
            Text(status, STATUS_STYLE.get(status, "dim")),
            Text(row.link or row.flow_run_id or ""),
            Text(row.detail),
        )
    out.print(table)
    mode = "dry run" if report.dry_run else "applied"
    out.print(
        Text.assemble(
            f"{report.routine} ({mode}): ", (report.status.value, STATUS_STYLE[report.status])
        )
    )


def failed_report(
    rb: Runbook, target: str, dry_run: bool, started: Any, exc: RunbookError
) -> Report:
    from tasks.models import Finding, Report, RunStatus, Severity, utcnow

    return Report(
        runbook=rb.name,
        target=target,
        dry_run=dry_run,
        status=RunStatus.failed,
        findings=[
            Finding(check="runbook", target=target, severity=Severity.critical, message=str(exc))
        ],
        actions=[],
        started_at=started,
        finished_at=utcnow(),
    )


SEVERITY_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red"}
STATUS_STYLE = {
    "healthy": "green",
    "fixed": "green",
    "unhealthy": "yellow",
    "failed": "bold red",
    "planned": "cyan",
    "skipped": "dim",
    "done": "green",
}


def show(report: Report) -> None:
    from rich.table import Table
    from rich.text import Text

    out = console()
    findings = Table("check", "severity", "observed", "threshold", "message", title="Findings")
    for f in report.findings:
        findings.add_row(
            f.check,
            Text(f.severity, SEVERITY_STYLE[f.severity]),
            Text(str(f.observed_brief)),
            "" if f.threshold is None else str(f.threshold),
            Text(f.message),
        )
    out.print(findings)
    if report.actions:
        actions = Table("action", "destructive", "status", "detail", title="Actions")
        for a in report.actions:
            actions.add_row(
                Text(a.description),
                "yes" if a.destructive else "no",
                Text(a.status, STATUS_STYLE[a.status]),
                Text(a.detail),
            )
        out.print(actions)
    mode = "dry run" if report.dry_run else "applied"
    out.print(
        Text.assemble(
            f"{report.runbook} on {report.target} ({mode}): ",
            (report.status.value, STATUS_STYLE[report.status]),
        )
    )


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(metavar="HOST", help="address of the embedded Prefect server")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(metavar="PORT", help="port of the embedded Prefect server")
    ] = 4200,
    max_runs: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            metavar="N",
            envvar="RUNBOOK_SERVE_MAX_RUNS",
            help="runs at once, each on a thread of this process",
        ),
    ] = 8,  # deployments.serve.DEFAULT_MAX_RUNS (not imported: `list` stays quick)
) -> None:
    """Serve every runbook with its schedule.

    Every runbook is a deployment per target (a sandbox if nothing is configured), run in
    this process; Ctrl-C stops all it started."""
    # One line per run on the console (deployments.runner); Prefect's own logs are in the UI.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "ERROR")
    from deployments.serve import serve_all

    try:
        serve_all(host=host, port=port, max_runs=max_runs)
    except RunbookError as exc:
        raise fail(exc) from None


@app.command()
def receiver(
    listen: Annotated[
        str | None,
        typer.Option(metavar="HOST:PORT", help="where to listen (default: receiver.listen)"),
    ] = None,
) -> None:
    """Run the alert receiver alone.

    Against the Prefect API in PREFECT_API_URL or a local one on 127.0.0.1:4200; runs start
    through their deployments. Ctrl-C stops it."""
    from deployments.config import load_config
    from deployments.prefect_api import local_prefect_api, require_prefect_api

    try:
        # Imports no Prefect: PREFECT_API_URL may still be set below.
        from deployments.receiver import receiver_settings, run_receiver

        settings = load_config()
        receiver_settings(settings)
        if url := os.environ.get("PREFECT_API_URL"):
            require_prefect_api(url)
        else:
            url = local_prefect_api()
            if url is None:
                raise ConfigError(
                    "no Prefect API: set PREFECT_API_URL, or start `runbook serve` "
                    "(which also receives alerts)"
                )
            os.environ["PREFECT_API_URL"] = url
        run_receiver(settings, listen)
    except RunbookError as exc:
        raise fail(exc) from None


SINCE_UNITS = {"m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> int:
    """Seconds in a --since value: a whole number and a unit, m (minutes), h (hours) or
    d (days): 30m, 24h, 7d. ConfigError (exit 2) otherwise."""
    number, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if not number.isdigit() or unit not in SINCE_UNITS or int(number) == 0:
        raise ConfigError(
            f"--since {text!r}: expected a whole number of minutes, hours or days, "
            "such as 30m, 24h or 7d"
        )
    return int(number) * SINCE_UNITS[unit]


@app.command()
def audit(
    since: Annotated[str, typer.Option(metavar="AGE", help="how far back: 30m, 24h, 7d")] = "24h",
    target: Annotated[
        str | None, typer.Option(metavar="TARGET", help="one inventory target name")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON array")] = False,
    init: Annotated[
        bool,
        typer.Option("--init", help="create the [audit] table (as its owner) and exit"),
    ] = False,
    grant: Annotated[
        str | None,
        typer.Option(metavar="ROLE", help="with --init: grant ROLE INSERT and SELECT on it"),
    ] = None,
) -> None:
    """The audit trail: what runs did, skipped or failed on their targets, newest first.

    From the [audit] table when configured, else from the Prefect API's events."""
    from datetime import UTC, timedelta

    from deployments.config import load_config
    from tasks.audit import init_table, read_trail
    from tasks.models import utcnow
    from tasks.settings import config_path

    try:
        seconds = parse_since(since)
        settings = load_config()
        if grant is not None and not init:
            raise ConfigError("--grant goes with --init")
        if init:
            if settings.audit is None:
                raise ConfigError(
                    f"--init needs an [audit] section with dsn in {config_path()} "
                    "(or RUNBOOK_AUDIT__DSN); see README, Audit"
                )
            init_table(settings.audit, grant_to=grant)
            console(stderr=True).print(
                f"audit table {settings.audit.table} is ready", highlight=False
            )
            return
        start = utcnow() - timedelta(seconds=seconds)
        if settings.audit is not None:
            trail = read_trail(start, target, settings.audit)
        else:
            with prefect_context():
                trail = read_trail(start, target, None)
    except RunbookError as exc:
        raise fail(exc) from None
    if as_json:
        sys.stdout.write("[" + ",".join(entry.model_dump_json() for entry in trail) + "]\n")
        return
    header = ("time (UTC)", "target", "runbook", "action", "status", "approver", "detail")
    rows = [
        (
            e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            f"{e.inventory}.{e.target}" if e.inventory else e.target,
            e.runbook,
            e.kind,
            e.status.value,
            e.approver or "",
            e.detail,
        )
        for e in trail
    ]
    if not sys.stdout.isatty():
        sys.stdout.write(plain_table(header, rows))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(*header, title="Audit trail")
    for row in rows:
        # Text, not markup: names and details come from inventories and systems.
        cells = [Text(cell) for cell in row]
        cells[4].stylize(STATUS_STYLE[row[4]])
        table.add_row(*cells)
    console().print(table)


def main() -> None:
    app()
