"""A run's report on its final Prefect state, without importing Prefect (the CLI reads it on
paths that must not import Prefect before its settings are chosen).

A COMPLETED state (Healthy, Fixed) carries the report as its data; a FAILED one (Unhealthy,
Failed) carries it inside an Outcome (tasks.engine.final_state)."""

from __future__ import annotations

from typing import Any


class Outcome(Exception):
    """A report as the data of a FAILED final state (Unhealthy or Failed).

    Prefect resolves a failed state's data into the exception it raises when the run's result
    is asked for; a worker's flow-run process asks at its end and logs that exception. As an
    Outcome it is the state's message, where a bare report was a TypeError over the report.
    `report`: the Report (a routine's RoutineReport, a fleet's FleetReport)."""

    def __init__(self, report: Any, message: str) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple[type[Outcome], tuple[Any, str]]:
        return (type(self), (self.report, str(self)))


def state_report(state: Any) -> Any:
    """What a run's final state (a prefect State) carries: its report (a Report, a
    RoutineReport, a FleetReport) when it made one, else what the run raised or returned."""
    result = state.result(raise_on_failure=False)
    return result.report if isinstance(result, Outcome) else result
