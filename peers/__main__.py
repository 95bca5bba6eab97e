"""``python -m peers``: run only the mesh layer, for the integration tests and for debugging a LAN.

It serves ``/mesh/ws`` and ``GET /mesh`` (this node's view as JSON) and plans a synthetic model of
``--layers`` layers, so discovery, links and negotiation can be watched without loading weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from peers.link import LinkEmulation
from peers.mesh import MeshConfig, MeshNode
from peers.planner import ModelShape
from peers.sizes import parse_size

log = logging.getLogger("peers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m peers", description=__doc__)
    p.add_argument("--port", type=int, required=True, help="TCP port for /mesh/ws and GET /mesh")
    p.add_argument("--host", help="bind address (default: --interface, else all interfaces)")
    p.add_argument("--state-dir", type=Path, help="where the node id lives (default: XDG state dir)")
    p.add_argument("--peer", action="append", default=[], help="static peer host:port (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="do not advertise or browse with mDNS")
    p.add_argument("--interface", help="only use the interface with this address for mDNS")
    p.add_argument("--memory", type=parse_size, help="memory budget, e.g. 2GiB (default: share of MemAvailable)")
    p.add_argument("--compute", type=float, default=1.0, help="compute score (relative speed)")
    p.add_argument(
        "--mesh-secret", default=os.environ.get("MESHD_MESH_SECRET"), help="shared secret (env MESHD_MESH_SECRET)"
    )
    p.add_argument("--mesh-name", default="meshd")
    p.add_argument("--fingerprint", default="synthetic", help="model fingerprint peers must share")
    p.add_argument("--layers", type=int, default=30, help="decoder layers of the synthetic model to plan")
    p.add_argument("--layer-size", type=parse_size, default=parse_size("8MiB"))
    p.add_argument("--replicated-size", type=parse_size, default=parse_size("64MiB"))
    p.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--peer-timeout", type=float, default=3.0, help="seconds of silence before a peer is lost")
    p.add_argument("--debounce", type=float, default=1.0, help="seconds of quiet membership before re-planning")
    p.add_argument("--latency-ms", type=float, default=0.0, help="emulated one-way link latency")
    p.add_argument("--bandwidth-mbps", type=float, default=0.0, help="emulated link bandwidth (0: unlimited)")
    p.add_argument("--status-file", type=Path, help="keep this node's GET /mesh JSON in this file")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def write_status(path: Path, node: MeshNode) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(node.status(), indent=1))
    os.replace(tmp, path)


async def run(args: argparse.Namespace) -> int:
    config = MeshConfig(
        api_port=args.port,
        state_dir=args.state_dir,
        mesh_name=args.mesh_name,
        fingerprint=args.fingerprint,
        secret=args.mesh_secret,
        static_peers=args.peer,
        mdns=not args.no_mdns,
        interface=args.interface,
        memory_budget=args.memory,
        compute_score=args.compute,
        heartbeat_interval=args.heartbeat,
        peer_timeout=args.peer_timeout,
        plan_debounce=args.debounce,
        emulation=LinkEmulation(args.latency_ms, args.bandwidth_mbps),
    )
    shape = ModelShape(args.layers, args.layer_size, args.replicated_size)
    node = MeshNode(config, shape)
    app = web.Application()
    node.attach(app)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(node.status())

    app.router.add_get("/mesh", status)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, args.host or args.interface or "0.0.0.0", args.port).start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(node.wait_stopped())]
    try:
        while not any(w.done() for w in waiters):
            if args.status_file:
                write_status(args.status_file, node)
            await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await node.stop()
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
