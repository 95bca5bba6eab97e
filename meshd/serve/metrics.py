"""``GET /metrics``: the daemon's Prometheus metrics, kept with ``prometheus_client``.

One :class:`Metrics` per API application (its own registry, so several daemons in one process,
as in tests, never share counts). What it measures itself:

- per request, as the client sees it (``RequestTimer``): time to first token, inter-token latency
  (each later chunk's gap from the previous one, divided by the tokens it carries, observed once per
  token: speculative decoding delivers several tokens at once), end-to-end latency; prompt and
  generated tokens; draft rows sent through the target for verification and draft rows accepted;
- per peer, measured on the authenticated mesh link itself (``peers.link``): its round trip (a
  websocket ping every heartbeat interval, answered by the peer's link reader), every byte the link
  carried each way (``meshd_peer_link_bytes``, read from the mesh node at scrape time), and of
  those the hidden-state payloads (``meshd_peer_activation_bytes``);
- build info and the process (CPU, memory, open files; Linux) and Python platform collectors.

What the runtime and the API count already (``Engine.metrics()``, a flat dict of plain numbers or
labelled families such as ``{"stage_utilisation": {"stage=0,node=ab12": 0.41}}``; a label set may
also be a tuple of ``(name, value)`` pairs or a dict) is exported at scrape time, with the ``meshd_``
prefix: a name ending in ``_total`` is a counter, anything else a gauge. Rendering never fails on
odd input: a value that is not a number is skipped, names and label names are sanitised.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from meshd import __version__

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # Prometheus' classic text format, which every scraper reads
PREFIX = "meshd_"
# Every counter's creation time as an extra series doubles the scrape for nothing a dashboard uses.
prometheus_client.disable_created_metrics()

# Latencies of a small-device mesh: tens of milliseconds per token to minutes per long answer.
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
REQUEST_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)

HELP = {
    "requests_total": "Requests this device originated.",
    "requests_failed_total": "Requests that ended with an error.",
    "requests_in_flight": "Requests this device is originating now.",
    "tokens_total": "Tokens generated for requests this device originated.",
    "tokens_per_second": "Generated tokens per second since start-up (a lifetime average; prefer rate()).",
    "rounds_total": "Verification rounds of requests this device originated.",
    "accepted_total": "Tokens accepted over all verification rounds.",
    "accepted_per_round": "Mean tokens accepted per verification round since start-up (bonus token included).",
    "stage_utilisation": "Fraction of wall time this device's stage spent computing since start-up.",
    "stage_queue_rows": "Tree nodes queued at this device's stage.",
    "stage_sessions": "Per-request KV sessions open at this device's stage.",
    "prefix_hit_tokens_total": (
        "Positions of this device's requests whose KV the stages reused from kept prefixes "
        "(prompts, and histories replayed by resumes)."
    ),
    "prefix_hit_requests_total": "Requests of this device that started or resumed after a kept prefix.",
    "prefix_misses_total": "Kept prefixes a stage no longer held: that prefill was sent again in full.",
    "stage_prefix_cache_bytes": "Bytes of kept prefixes' KV at this device's stage (inside its KV reservation).",
    "stage_prefix_cache_entries": "Kept prefixes at this device's stage.",
    "requests_resumed_total": "Resumes of requests this device originated after their ring was lost or re-planned.",
    "resume_pause_seconds_total": "Seconds clients of this device's requests waited across resume pauses.",
    "api_requests_total": "HTTP API requests by endpoint and status code.",
    "api_client_disconnects_total": "Generations cancelled because the client went away.",
    "api_streams_active": "Server-sent-event streams open now.",
}

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


class Metrics:
    """The registry behind one daemon's ``/metrics`` and the instruments the API and daemon feed."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.first_token = Histogram(
            "meshd_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "meshd_inter_token_latency_seconds",
            "Time per generated token after the first: each chunk's gap from the previous chunk divided by "
            "the tokens it carries, observed once per token.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "meshd_request_duration_seconds",
            "From a request's arrival to its last token (end-to-end latency).",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("meshd_prompt_tokens", "Prompt tokens of served requests.", registry=r)
        self.generated_tokens = Counter("meshd_generated_tokens", "Tokens generated for clients.", registry=r)
        self.draft_rows = Counter(
            "meshd_draft_rows", "Draft tree rows sent through the target for verification.", registry=r
        )
        self.accepted_rows = Counter("meshd_accepted_rows", "Draft rows the target accepted.", registry=r)
        self.peer_rtt = Histogram(
            "meshd_peer_rtt_seconds",
            "Round trip of a websocket ping on the authenticated mesh link to a peer, answered by the peer's "
            "link reader (network latency plus how long that reader was busy).",
            ["peer"],
            buckets=RTT_BUCKETS,
            registry=r,
        )
        self.peer_bytes = Counter(
            "meshd_peer_activation_bytes",
            "Hidden-state bytes carried on the link with a peer (the tensor payloads, framing not counted).",
            ["peer", "direction"],
            registry=r,
        )
        self.resume_pause = Histogram(
            "meshd_resume_pause_seconds",
            "How long a resumed request's client waited: from its ring's loss to its next token.",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        Info("meshd_build", "The running meshd and what it runs on.", registry=r).info(_build_info())
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._scrape: Mapping[str, Any] = {}
        r.register(_FlatCollector(lambda: self._scrape))
        # peer -> {"sent": bytes, "received": bytes} on its mesh links; the daemon sets it to read its mesh node
        self.link_bytes: Callable[[], Mapping[str, Mapping[str, int]]] = dict
        r.register(_LinkBytesCollector(lambda: self.link_bytes()))

    def observe_rtt(self, peer: str, seconds: float) -> None:
        self.peer_rtt.labels(peer=peer).observe(seconds)

    def count_bytes(self, peer: str, direction: str, nbytes: int) -> None:
        if nbytes:
            self.peer_bytes.labels(peer=peer, direction=direction).inc(nbytes)

    def request(self, prompt_tokens: int) -> RequestTimer:
        self.prompt_tokens.inc(prompt_tokens)
        return RequestTimer(self)

    def render(self, flat: Mapping[str, Any]) -> bytes:
        """The exposition text, with ``flat``: this scrape's engine and API numbers."""
        self._scrape = flat
        try:
            return generate_latest(self.registry)
        finally:
            self._scrape = {}


class RequestTimer:
    """One request's latencies, as the API hands its tokens to the client."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.tokens = 0
        self.done = False

    def chunk(self, n: int) -> None:
        """``n`` tokens arrived together (one verification round)."""
        if n <= 0:
            return
        now = time.perf_counter()
        if self.tokens == 0:
            self.metrics.first_token.observe(now - self.start)
        else:
            per_token = (now - self.last) / n
            for _ in range(n):
                self.metrics.inter_token.observe(per_token)
        self.metrics.generated_tokens.inc(n)
        self.tokens += n
        self.last = now

    def finish(self, draft_rows: int = 0, accepted_rows: int = 0) -> None:
        """The request ended (any reason); counted once."""
        if self.done:
            return
        self.done = True
        if self.tokens:
            self.metrics.request_seconds.observe(time.perf_counter() - self.start)
        self.metrics.draft_rows.inc(max(0, draft_rows))
        self.metrics.accepted_rows.inc(max(0, accepted_rows))


def _build_info() -> dict[str, str]:
    info = {"version": __version__, "python": platform.python_version()}
    for dist in ("torch", "aiohttp"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "none"
    return info


# ---- the engine's flat numbers ----------------------------------------------------------------
def metric_name(name: str) -> str:
    n = _NAME_BAD.sub("_", str(name))
    if not n.startswith(PREFIX):
        n = PREFIX + n
    return n


def _label_name(name: str) -> str:
    n = _LABEL_BAD.sub("_", str(name)) or "label"
    return "_" + n if n[0].isdigit() else n


def _labels(key: Any) -> dict[str, str]:
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
    return {_label_name(k): str(v) for k, v in pairs}


def _number(v: Any) -> float | None:
    if isinstance(v, (bool, int, float)):
        return float(v)
    return None


class _LinkBytesCollector:
    """``meshd_peer_link_bytes_total{peer, direction}``: counters kept by the mesh links, read at each scrape."""

    def __init__(self, source: Callable[[], Mapping[str, Mapping[str, int]]]):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "meshd_peer_link_bytes",
            "Bytes of every frame on the mesh link with a peer (sealed websocket messages: hidden states, "
            "token ids and control), by direction.",
            labels=["peer", "direction"],
        )
        for peer, counts in sorted(self.source().items()):
            for direction in ("sent", "received"):
                value = _number(counts.get(direction))
                if value is not None:
                    family.add_metric([str(peer), direction], value)
        yield family


class _FlatCollector:
    """``Engine.metrics()`` and the API's own counts, turned into families at each scrape."""

    def __init__(self, source: Callable[[], Mapping[str, Any]]):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        flat = self.source()
        for key in sorted(flat, key=metric_name):
            value, name = flat[key], metric_name(key)
            bare = name[len(PREFIX) :]
            counter = name.endswith("_total")
            family = Metric(
                name[: -len("_total")] if counter else name,
                HELP.get(bare, bare.replace("_", " ")),
                "counter" if counter else "gauge",
            )
            items = value.items() if isinstance(value, Mapping) else [((), value)]
            for labels, v in items:
                number = _number(v)
                if number is not None:
                    family.add_sample(name, _labels(labels), number)
            if family.samples:
                yield family
