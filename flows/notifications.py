"""When a flow run fails or crashes: its MLflow run ends FAILED with the reason, and someone hears of it.

`notify_failure` is the flows' `on_failure` / `on_crashed` hook. It always logs one line; if the environment
variable CASSAVA_NOTIFY_WEBHOOK holds a URL, it also POSTs the same facts there as JSON (a Slack/Teams/
ntfy-style incoming webhook, or any HTTP endpoint). The URL is never logged: such URLs often embed a token.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import Any

WEBHOOK_VARIABLE = "CASSAVA_NOTIFY_WEBHOOK"
WEBHOOK_TIMEOUT_SECONDS = 10

log = logging.getLogger("tasks.notifications")  # a "tasks" logger: Prefect forwards it to the UI


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect hook: end the flow run's MLflow runs FAILED with the reason, log it, POST it to the webhook."""
    reason = f"Prefect flow run {flow_run.name} ({flow_run.id}) {state.name.lower()}: {state.message or state.name}"
    mlflow_runs: list[str] = []
    try:
        from tasks.tracking import fail_runs_of_flow_run

        mlflow_runs = fail_runs_of_flow_run(str(flow_run.id), reason)
    except Exception as error:  # the tracking store itself may be what failed: the notification must still go
        log.warning("could not mark the MLflow run failed: %s: %s", type(error).__name__, error)
    message = {
        "event": f"flow run {state.name.lower()}",
        "flow": flow.name,
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "state": state.name,
        "reason": state.message or state.name,
        "mlflow_runs_marked_failed": mlflow_runs,
    }
    log.error("notification: flow %s run %s %s: %s", flow.name, flow_run.name, state.name.lower(), message["reason"])
    webhook = os.environ.get(WEBHOOK_VARIABLE)
    if webhook:
        post_json(webhook, message)


def post_json(url: str, payload: dict[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:
            log.info("notification: sent to $%s (HTTP %d)", WEBHOOK_VARIABLE, response.status)
    except OSError as error:  # a notification that cannot be sent must not hide the failure it reports
        log.warning("notification: could not POST to $%s: %s", WEBHOOK_VARIABLE, type(error).__name__)
