"""HTTP health probes with httpx: explicit timeouts, and the component states of a JSON
health body (`{"status": "ok", "database": "error"}` and the usual nested shapes)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from pydantic import BaseModel

from tasks.engine import io_task

OK_STATES = {"ok", "up", "healthy", "pass", "passing", "ready", "connected", "true", "green"}
NESTED = ("checks", "components", "dependencies", "services", "details", "info")


class HttpProbe(BaseModel):
    url: str
    ok: bool
    status_code: int | None = None
    ms: float | None = None
    error: str = ""
    components: dict[str, str] = {}
    body_note: str = ""

    @property
    def failing(self) -> dict[str, str]:
        return {k: v for k, v in self.components.items() if v.lower() not in OK_STATES}


def _state(value: Any) -> str | None:
    if isinstance(value, bool):
        return "ok" if value else "error"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        inner = value.get("status", value.get("state"))
        return _state(inner) if inner is not None else None
    return None


def components(body: Any) -> dict[str, str]:
    """Component name -> state, from the top level and the usual nesting keys."""
    if not isinstance(body, dict):
        return {}
    found: dict[str, str] = {}
    for key, value in body.items():
        if key in ("status", "state"):
            continue
        if key in NESTED and isinstance(value, dict):
            found.update(components(value))
        elif (state := _state(value)) is not None:
            found[key] = state
    return found


@io_task("probe-http", timeout_seconds=120, retries=0)
def probe_http(url: str, timeout_s: float) -> HttpProbe:
    start = time.perf_counter()
    try:
        response = httpx.get(url, timeout=timeout_s, follow_redirects=False)
    except httpx.TimeoutException:
        return HttpProbe(url=url, ok=False, error=f"no answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return HttpProbe(url=url, ok=False, error=f"{type(exc).__name__}: {exc}")
    ms = (time.perf_counter() - start) * 1000
    probe = HttpProbe(url=url, ok=response.is_success, status_code=response.status_code, ms=ms)
    if "json" in response.headers.get("content-type", "") or response.text.lstrip()[:1] == "{":
        try:
            probe.components = components(response.json())
        except json.JSONDecodeError:
            probe.body_note = "the body says it is JSON but is not JSON"
    return probe
