"""The pull step of `prefect.yaml`: where a worker's flow run finds the runbooks.

`prefect deploy` without a `pull:` section bakes in the deploying machine's absolute working
directory, which a worker on another host does not have. This step is resolved on the worker,
when each flow run starts (Prefect runs a deployment's pull steps in the flow-run process,
before it loads the entrypoint), from that worker's own environment."""

from __future__ import annotations

import os
from pathlib import Path

HOME_VARIABLE = "RUNBOOK_HOME"


def checkout() -> Path:
    """The checkout this package is installed from (scripts/setup.sh installs it editable)."""
    return Path(__file__).resolve().parents[1]


def set_runbook_home() -> dict[str, str]:
    """Change the flow-run process's working directory to this worker's checkout: the
    directory in RUNBOOK_HOME when the worker's environment sets it, else the checkout the
    installed package comes from.

    Prints the directory (one line in the worker's output). Returns {"directory": the
    absolute path}, as Prefect's own set_working_directory step does.
    Raises FileNotFoundError, naming the directory and RUNBOOK_HOME, when that directory has no
    `flows/`: the run ends Crashed, the message in the worker's output."""
    given = os.environ.get(HOME_VARIABLE, "").strip()
    home = Path(given).expanduser().resolve() if given else checkout()
    if not (home / "flows").is_dir():
        source = f"{HOME_VARIABLE}={given}" if given else "the installed package's checkout"
        raise FileNotFoundError(
            f"{home} ({source}) has no flows/: set {HOME_VARIABLE} in this worker's environment "
            "to the runbook-automation checkout the worker runs from"
        )
    os.chdir(home)
    print(f"runbook home: {home}", flush=True)
    return {"directory": str(home)}
