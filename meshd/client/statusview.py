"""``meshd status`` as text: the mesh, its plan and every peer's layers and health at a glance.

A pure function of the daemon's ``GET /mesh`` JSON (plus, optionally, each peer's ``/health``
as probed by the caller), so it is easy to test and tolerant of fields a daemon does not send.
"""

from __future__ import annotations

from typing import Any

from peers.sizes import format_size


def _short(node_id: Any) -> str:
    return str(node_id or "?")[:12]


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    return format_size(n)


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def render(url: str, status: dict[str, Any], health: dict[str, str] | None = None) -> str:
    """``health`` maps node id -> "ok" | "unavailable: why" | "unreachable" (peers probed by the caller)."""
    health = health or {}
    me = status.get("node_id")
    ready = status.get("ready")
    state = "ready" if ready else f"NOT READY: {status.get('reason') or 'unknown reason'}"
    version = f", meshd {status['version']}" if status.get("version") else ""
    lines = [f"meshd at {url}: node {_short(me)}{version}, mesh {status.get('mesh', '?')!s}, {state}"]
    if status.get("model"):
        fp = status.get("fingerprint")
        lines.append(f"model   {status['model']}" + (f" (fingerprint {str(fp)[:16]})" if fp else ""))

    peers = {p.get("node_id"): p for p in status.get("peers") or [] if isinstance(p, dict)}
    plan = status.get("plan")
    if not plan:
        lines.append("plan    none yet" + (f" ({status['plan_error']})" if status.get("plan_error") else ""))
    else:
        stages = plan.get("stages") or []
        kind = "committed" if plan.get("committed") else "proposed, still loading"
        lines.append(f"plan    epoch {plan.get('epoch')}, {kind}, {len(stages)} stage(s) in ring order")
        for i, s in enumerate(stages):
            nid = s.get("node_id")
            who = "this node" if nid == me else (peers.get(nid, {}).get("address") or "address unknown")
            first, stop = s.get("first_layer"), s.get("stop_layer")
            n = (stop - first) if isinstance(first, int) and isinstance(stop, int) else "?"
            lines.append(
                f"  {i + 1}. {_short(nid):12}  layers {first!s:>3}:{stop!s:<3} ({n} layers)  {who}"
                + (f"  [{health[nid]}]" if nid in health else "")
            )
    if status.get("plan_error") and plan:
        lines.append(f"plan error: {status['plan_error']}")

    lines.append(f"peers   {len(peers)} besides this node")
    if peers:
        lines.append(f"  {'node':12}  {'address':22}  {'memory':>10}  {'compute':>7}  {'version':10}  health")
        for nid, p in sorted(peers.items(), key=lambda kv: str(kv[0])):
            lines.append(
                f"  {_short(nid):12}  {p.get('address') or '-':22}  {_size(p.get('memory_budget')):>10}  "
                f"{_num(p.get('compute_score')):>7}  {p.get('version') or '-':10}  {health.get(nid, '-')}"
            )

    st = status.get("stage")
    if st:
        lines.append(
            f"stage   this node computes layers {st.get('first_layer')}:{st.get('stop_layer')}: "
            f"{st.get('sessions', 0)} session(s), {st.get('queued_rows', 0)} queued row(s), "
            f"utilisation {_num((st.get('utilisation') or 0) * 100, '{:.1f}')}%"
        )
    m = status.get("metrics") or {}
    if m:
        lines.append(
            f"load    {m.get('requests_in_flight', 0)} request(s) in flight, {m.get('requests_total', 0)} "
            f"total, {m.get('requests_failed_total', 0)} failed; "
            f"{_num(m.get('tokens_per_second'), '{:.1f}')} tokens/s, "
            f"{_num(m.get('accepted_per_round'))} accepted/round"
        )
        if m.get("rows_computed_total"):
            lines.append(
                f"rows    {m.get('rows_accepted_total', 0)} of {m['rows_computed_total']} drafted rows computed "
                f"were accepted; {m.get('segments_in_flight', 0)} segment(s) in flight now"
            )
    o = status.get("originator")
    if o:
        live = o.get("live_segments") or {}
        lines.append(
            f"flow    slots {o.get('flow_slots')}, segments in flight per request {live or '-'} "
            f"(peak {o.get('peak_segments', 0)}); ring latency {_num(o.get('ring_latency_ms'), '{:.1f}')} ms, "
            f"step {_num(o.get('ring_step_ms'), '{:.1f}')} ms (8 rows)"
        )
    return "\n".join(lines)
