"""MeshNode in-process on loopback: plans, data plane, duplicate ids, and peers that must be refused."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from aiohttp import web

from peers.codec import Message
from peers.hello import Hello
from peers.identity import Identity, default_state_dir, load_or_create_node_id
from peers.mesh import MeshConfig, MeshNode, parse_host_port
from peers.planner import ModelShape

SHAPE = ModelShape(n_layers=12, bytes_per_layer=1 << 20, replicated_bytes=16 << 20)
FAST = dict(heartbeat_interval=0.2, peer_timeout=1.5, plan_debounce=0.2, mdns=False, memory_budget=1 << 30)


class Running:
    """A MeshNode served by its own aiohttp app on a free loopback port."""

    def __init__(self, node: MeshNode, runner: web.AppRunner) -> None:
        self.node, self.runner = node, runner

    async def stop(self) -> None:
        await self.node.stop()
        await self.runner.cleanup()


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
async def mesh(tmp_path):
    started: list[Running] = []

    async def start(
        name: str, sock: socket.socket | None = None, peers=(), state_dir: Path | None = None, shape=SHAPE, **kw
    ):
        sock = sock or free_socket()
        config = MeshConfig(
            api_port=sock.getsockname()[1],
            state_dir=state_dir or tmp_path / name,
            mesh_name="unit",
            fingerprint=kw.pop("fingerprint", "fp1"),
            static_peers=[f"127.0.0.1:{p}" for p in peers],
            **{**FAST, **kw},
        )
        node = MeshNode(config, shape)
        app = web.Application()
        node.attach(app)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await node.start()
        started.append(Running(node, runner))
        return node

    yield start
    for r in started:
        await r.stop()


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def agreed(*nodes: MeshNode) -> bool:
    plans = [n.plan for n in nodes]
    return all(p and p.committed for p in plans) and len({(p.epoch, p.stages) for p in plans}) == 1


def ports(n: int) -> list[socket.socket]:
    return [free_socket() for _ in range(n)]


async def test_two_nodes_plan_and_exchange_data(mesh):
    sa, sb = ports(2)
    a = await mesh("a", sa, peers=[sb.getsockname()[1]])
    b = await mesh("b", sb, peers=[sa.getsockname()[1]])
    await until(lambda: agreed(a, b) and len(a.plan.stages) == 2)
    assert a.status()["plan"]["stages"][0]["first_layer"] == 0 and b.status()["plan"]["committed"] is True
    assert set(a.peers) == {b.node_id} and len(a.neighbours.links) == 1 and len(b.neighbours.links) == 1

    inbox: asyncio.Queue = asyncio.Queue()

    async def on_segment(sender: str, msg: Message) -> None:
        await inbox.put((sender, msg))

    b.on("segment", on_segment)
    seg = Message(
        "segment",
        {
            "hidden": torch.randn(16, 576).half(),
            "positions": [0],
            "parents": [-1],
            "nodes": [0],
            "origin": a.node_id,
        },
    )
    await a.send(b.node_id, replace(seg, request_id=42))
    sender, got = await asyncio.wait_for(inbox.get(), 5)
    assert sender == a.node_id and got.request_id == 42 and got.epoch == a.committed_plan.epoch
    assert torch.equal(got["hidden"], seg["hidden"])

    # a message stamped with an older epoch than b's committed plan is dropped, and the sender told
    errors: asyncio.Queue = asyncio.Queue()

    async def on_error(sender: str, msg: Message) -> None:
        await errors.put(msg)

    a.on("error", on_error)
    stale = replace(seg, epoch=a.committed_plan.epoch - 1, request_id=7)
    await a.neighbours.link(b.node_id).send(stale)  # straight onto the link: MeshNode.send would restamp it
    err = await asyncio.wait_for(errors.get(), 5)
    assert err["code"] == "stale_epoch" and err.request_id == 7 and inbox.empty()

    a.set_cost_curve({1: 0.05, 32: 0.09})
    await until(lambda: b.peers[a.node_id].cost_curve == {1: 0.05, 32: 0.09})

    with pytest.raises(ValueError, match="data-plane"):
        a.on("heartbeat", on_error)
    with pytest.raises(ConnectionError, match="no link"):
        await a.send("0000000000000000", seg)


async def test_each_node_is_planned_in_the_bytes_its_own_weight_format_holds(mesh):
    """Same budgets, but b holds its layers in 4x the bytes (bf16 against a's int4): b gets fewer."""
    sa, sb = ports(2)
    a = await mesh("a", sa, peers=[sb.getsockname()[1]], memory_budget=64 << 20)
    big = ModelShape(n_layers=12, bytes_per_layer=4 << 20, replicated_bytes=16 << 20)
    b = await mesh("b", sb, peers=[sa.getsockname()[1]], memory_budget=64 << 20, shape=big)
    await until(lambda: agreed(a, b) and len(a.plan.stages) == 2)
    held = {s.node_id: s.layers.n_layers for s in a.plan.stages}
    # room for (64 - 16) / 1 = 48 layers on a and 48 / 4 = 12 on b: shares 9.6 and 2.4 of 12
    assert (held[a.node_id], held[b.node_id]) == (10, 2)


async def test_duplicate_node_id_is_refused_and_reported_on_both_sides(mesh, tmp_path):
    """A copied state directory: the two daemons refuse each other, say what to delete, and keep running."""
    sa, sb = ports(2)
    original = tmp_path / "original"
    a = await mesh("a", sa, state_dir=original)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "node_id").write_text((original / "node_id").read_text())  # a copied state directory
    b = await mesh("b", sb, peers=[sa.getsockname()[1]], state_dir=copy)
    assert a.node_id == b.node_id
    await until(lambda: a.status()["duplicate_node_id"] and b.status()["duplicate_node_id"])
    assert "delete" in b.status()["duplicate_node_id"] and str(copy / "node_id") in b.status()["duplicate_node_id"]
    assert "node_id" in a.status()["duplicate_node_id"]
    assert not a.neighbours.links and not b.neighbours.links
    assert not a.stopping and not b.stopping


async def test_refused_peers_do_not_disturb_good_ones(mesh, caplog):
    sa, sb, sc, sd = ports(4)
    pa, pb = sa.getsockname()[1], sb.getsockname()[1]
    good = dict(secret="s3cret")
    a = await mesh("a", sa, peers=[pb], **good)
    b = await mesh("b", sb, peers=[pa], **good)
    other_model = await mesh("c", sc, peers=[pa, pb], fingerprint="another-model", **good)
    wrong_secret = await mesh("d", sd, peers=[pa, pb], secret="guess")
    await until(lambda: agreed(a, b))
    await asyncio.sleep(1.0)  # let the refused peers retry a few times
    assert agreed(a, b) and a.plan.members == tuple(sorted([a.node_id, b.node_id]))
    assert not other_model.peers and not wrong_secret.peers
    log = caplog.text
    assert "model fingerprint" in log and "wrong mesh secret" in log


async def test_clean_stop_is_noticed_at_once(mesh):
    sa, sb = ports(2)
    a = await mesh("a", sa, peers=[sb.getsockname()[1]], peer_timeout=30.0)
    b = await mesh("b", sb, peers=[sa.getsockname()[1]], peer_timeout=30.0)
    await until(lambda: agreed(a, b) and len(a.plan.members) == 2)
    await b.stop()
    await until(lambda: a.plan.committed and a.plan.members == (a.node_id,), timeout=5)


async def test_a_closed_link_is_reported_at_once_while_membership_waits(mesh):
    """An abrupt close (not going-away) may be a blip, so membership waits the peer timeout; but the
    link-down callback fires at once, which is what frees a dead originator's sessions promptly."""
    sa, sb = ports(2)
    a = await mesh("a", sa, peers=[sb.getsockname()[1]], peer_timeout=30.0)
    b = await mesh("b", sb, peers=[sa.getsockname()[1]], peer_timeout=30.0)
    await until(lambda: agreed(a, b) and len(a.plan.members) == 2)
    down: list[str] = []
    a.on_link_down(down.append)
    await b.neighbours.close_link(a.node_id, 1011, "a test's abrupt close")
    await until(lambda: down == [b.node_id], timeout=5)
    assert b.node_id in a.membership.members  # not lost: the peer timeout (30 s) decides that


async def test_hand_over_moves_the_layers_off_a_node_that_still_serves(mesh):
    socks = ports(3)
    nodes = [
        await mesh(name, sock, peers=[s.getsockname()[1] for s in socks if s is not sock])
        for name, sock in zip("abc", socks, strict=True)
    ]
    await until(lambda: agreed(*nodes) and len(nodes[0].plan.members) == 3 and len(nodes[0].plan.stages) == 3)
    leaving = nodes[1]
    epoch = leaving.plan.epoch
    assert leaving.hand_over()
    staying = [n for n in nodes if n is not leaving]

    def handed_over() -> bool:
        plan = leaving.committed_plan
        return (
            agreed(*nodes)
            and plan.epoch > epoch
            and plan.stage_of(leaving.node_id) is None
            and leaving.node_id in plan.members  # still a member: it serves until the commit, then leaves
            and {s.node_id for s in plan.stages} == {n.node_id for n in staying}
        )

    await until(handed_over)
    assert not leaving.hand_over()  # nothing left to hand over


async def test_a_lone_node_has_nothing_to_hand_over(mesh):
    a = await mesh("a")
    await until(lambda: a.plan is not None and a.plan.committed)
    assert not a.hand_over()
    assert a.committed_plan.stage_of(a.node_id) is not None


async def test_round_trip_time_on_loopback(mesh, capsys):
    sa, sb = ports(2)
    a = await mesh("a", sa, peers=[sb.getsockname()[1]])
    b = await mesh("b", sb, peers=[sa.getsockname()[1]])
    await until(lambda: agreed(a, b))
    back: asyncio.Queue = asyncio.Queue()

    async def echo(sender: str, msg: Message) -> None:
        await b.send(
            sender,
            Message("result", {"nodes": msg["nodes"], "hidden": msg["hidden"]}, request_id=msg.request_id),
        )

    async def returned(sender: str, msg: Message) -> None:
        await back.put(msg)

    b.on("segment", echo)
    a.on("result", returned)
    results = {}
    for rows in (1, 16):
        seg = Message(
            "segment",
            {
                "hidden": torch.randn(rows, 576).half(),
                "positions": [0],
                "parents": [-1],
                "nodes": [0],
                "origin": a.node_id,
            },
        )
        times = []
        for i in range(100):
            t0 = time.perf_counter()
            await a.send(b.node_id, replace(seg, request_id=i))
            assert (await asyncio.wait_for(back.get(), 5)).request_id == i
            times.append(time.perf_counter() - t0)
        results[rows] = sorted(times)[len(times) // 2]
    with capsys.disabled():
        print(f"\n[measure] loopback round trip (median of 100): 1x576 fp16 {results[1] * 1e3:.2f} ms, "
              f"16x576 fp16 {results[16] * 1e3:.2f} ms")  # fmt: skip


def test_node_id_is_created_once_and_kept(tmp_path):
    first = load_or_create_node_id(tmp_path / "state")
    assert len(first) == 16 and load_or_create_node_id(tmp_path / "state") == first
    assert Identity.load(tmp_path / "state").node_id == first
    (tmp_path / "state" / "node_id").write_text("not an id")
    with pytest.raises(ValueError, match="delete the file"):
        load_or_create_node_id(tmp_path / "state")


def test_default_state_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "meshd"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir() == Path.home() / ".local" / "state" / "meshd"


def test_older_is_decided_by_start_time_then_instance():
    def proc(start: float, instance: str) -> Hello:
        return Hello("ab" * 8, instance, start, "m", "fp", 1)

    assert proc(99.0, "z").started_before(proc(100.0, "b")) and not proc(101.0, "a").started_before(proc(100.0, "b"))
    assert proc(100.0, "a").started_before(proc(100.0, "b")) and not proc(100.0, "c").started_before(proc(100.0, "b"))


def test_parse_host_port():
    assert parse_host_port("10.0.0.2:8090") == ("10.0.0.2", 8090)
    assert parse_host_port("[fe80::1]:80") == ("fe80::1", 80)
    with pytest.raises(ValueError, match="host:port"):
        parse_host_port("10.0.0.2")


async def test_the_originator_work_each_peer_published_shows_in_status_and_moves_layers(mesh):
    """A peer's measured originator work (in its own layers) is what the origin-aware split takes off its
    share where another peer only serves a stage; ``/mesh`` shows it, so a peer that published none (its
    measurement failed) is seen as such, not only in its log."""
    sa, sb = ports(2)
    a = await mesh("a", sa, peers=[sb.getsockname()[1]], origin_layers=6.0)
    b = await mesh("b", sb, peers=[sa.getsockname()[1]], role="stage")
    await until(lambda: agreed(a, b) and len(a.plan.stages) == 2)
    seen = {p["node_id"]: (p["role"], p["origin_layers"]) for p in b.status()["peers"]}
    assert seen[a.node_id] == ("both", 6.0), seen
    layers = {s.node_id: s.layers.stop - s.layers.first for s in a.plan.stages}
    assert layers[a.node_id] < layers[b.node_id], layers
