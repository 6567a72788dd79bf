"""The alert receiver: Alertmanager, Grafana and generic webhooks in, remediation runs out.

    POST /alerts/alertmanager | /alerts/grafana | /alerts/generic   -> 202 {"alerts": [...]}
    GET  /healthz

Per request: credentials (bearer token or HMAC signature, constant-time), the size limit
(counted while the body streams in), the content type, then the payload model; anything
malformed is a 4xx and never reaches routing. Per alert: route, target and typed parameters
(deployments.alert_routes), storm control (deployments.alert_store), then the start of a run, a
Prefect event, and one line on stdout.

How a run starts (receiver.dispatch):
- direct, in `runbook serve`: the run is created from its deployment in Pending, which the
  served runner never picks up (it polls Scheduled runs), and runs on a thread of this process,
  where the flows are already imported: no poll interval, no subprocess spawn.
- direct, in `runbook receiver`: run_deployment(timeout=0); the served runner or a worker picks
  it up on its next poll.
- trigger: a runbook.alert.dispatch event; the deployment's trigger creates the run.

Modules: app (the HTTP app, credentials, the Receiver handling each alert), runs (starting
runs, the alert's event and log line), server (building it, its routes checked, and its life
cycle).
"""

from deployments.receiver.app import Receiver, create_app, secret_values
from deployments.receiver.runs import AlertResult, InProcessStarter, Starter
from deployments.receiver.server import (
    ReceiverServer,
    build_receiver,
    receiver_settings,
    run_receiver,
    start_receiver,
)

__all__ = [
    "AlertResult",
    "InProcessStarter",
    "Receiver",
    "ReceiverServer",
    "Starter",
    "build_receiver",
    "create_app",
    "receiver_settings",
    "run_receiver",
    "secret_values",
    "start_receiver",
]
