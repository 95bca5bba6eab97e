"""``GET /metrics``: a flat metrics dict rendered in Prometheus' text exposition format (0.0.4).

The runtime reports plain numbers (``{"tokens_total": 812}``) or labelled families
(``{"stage_utilisation": {"stage=0,node=ab12": 0.41}}``; a label set may also be a tuple of
``(name, value)`` pairs or a dict). Names get the ``meshd_`` prefix; a name ending in
``_total`` is a counter, anything else a gauge. Rendering never fails on odd input: a value that
is not a number is skipped, names and label values are sanitised and escaped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "meshd_"

HELP = {
    "requests_total": "Requests this device originated.",
    "requests_failed_total": "Requests that ended with an error.",
    "requests_in_flight": "Requests this device is originating now.",
    "tokens_total": "Tokens generated for requests this device originated.",
    "tokens_per_second": "Generated tokens per second since start-up.",
    "rounds_total": "Verification rounds of requests this device originated.",
    "accepted_total": "Tokens accepted over all verification rounds.",
    "accepted_per_round": "Mean tokens accepted per verification round (bonus token included).",
    "stage_utilisation": "Fraction of wall time this device's stage spent computing.",
    "stage_queue_rows": "Tree nodes queued at this device's stage.",
    "stage_sessions": "Per-request KV sessions open at this device's stage.",
    "api_requests_total": "HTTP API requests by endpoint and status code.",
    "api_client_disconnects_total": "Generations cancelled because the client went away.",
    "api_streams_active": "Server-sent-event streams open now.",
}

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(name: str) -> str:
    n = _NAME_BAD.sub("_", str(name))
    if not n.startswith(PREFIX):
        n = PREFIX + n
    return n


def _label_name(name: str) -> str:
    n = _LABEL_BAD.sub("_", str(name)) or "label"
    return "_" + n if n[0].isdigit() else n


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: Any) -> str:
    if isinstance(key, Mapping):
        pairs = list(key.items())
    elif isinstance(key, tuple):
        pairs = list(key)
    else:
        pairs = []
        for part in str(key).split(","):
            name, sep, value = part.partition("=")
            if sep:
                pairs.append((name.strip(), value.strip().strip('"')))
            elif part.strip():
                pairs.append(("key", part.strip()))
    return ",".join(f'{_label_name(k)}="{_escape(v)}"' for k, v in pairs)


def _number(v: Any) -> str | None:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return None


def render(metrics: Mapping[str, Any]) -> str:
    """The exposition text, one family per key, sorted by name so scrapes diff cleanly."""
    lines: list[str] = []
    for key in sorted(metrics, key=metric_name):
        value = metrics[key]
        name = metric_name(key)
        bare = name[len(PREFIX) :]
        if isinstance(value, Mapping):
            samples = [(_labels(k), _number(v)) for k, v in value.items()]
        else:
            samples = [("", _number(value))]
        samples = [(labels, v) for labels, v in samples if v is not None]
        if not samples:
            continue
        lines.append(f"# HELP {name} {_escape(HELP.get(bare, bare.replace('_', ' ')))}")
        lines.append(f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}")
        for labels, v in samples:
            lines.append(f"{name}{{{labels}}} {v}" if labels else f"{name} {v}")
    return "\n".join(lines) + "\n"
