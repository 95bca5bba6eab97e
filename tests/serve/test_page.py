"""The live page at ``/``: its files and event stream against the faked runtime, then the real page in a
headless Chromium (Debian's package) against three loopback daemons.

The browser is driven over the DevTools protocol (a websocket, with aiohttp), with every host name but
127.0.0.1 resolving nowhere, and every request it makes recorded: the page must load and work from
the daemon alone. Set ``MESHD_PAGE_SCREENSHOT=docs/page.png`` to keep the screenshot it takes.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import serve

from meshd.lab.testbed import LoopbackMesh, http
from meshd.serve.api import create_app
from meshd.serve.page import STATIC_DIR, MeshFeed

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


# ---- the files and the stream (fast, faked runtime) ----------------------------------------
async def test_page_and_its_files_come_from_the_daemon(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            html = await r.text()
        for name in ("app.js", "style.css"):
            assert f'"/static/{name}"' in html
            async with s.get(url + "/static/" + name) as r:
                assert r.status == 200
        for bad in ("/static/..%2Fpage.py", "/static/page.py", "/static/.hidden.js", "/static/nope.js"):
            async with s.get(url + bad) as r:
                assert r.status == 404, bad


def test_static_files_reference_no_other_origin():
    """No CDN, no web font, no analytics: nothing in the page names another host."""
    for f in STATIC_DIR.iterdir():
        text = f.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{f.name} names another origin"
        assert "@import" not in text and "url(" not in text, f.name


async def _first_snapshot(url: str, headers: dict | None = None) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/events", headers=headers or {}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        async for line in r.content:
            if line.startswith(b"data: "):
                return json.loads(line[6:])
    raise AssertionError("the stream ended without a snapshot")


async def test_events_stream_snapshots_of_the_ring(rt, url):
    snap = await _first_snapshot(url)
    assert [(s["first_layer"], s["stop_layer"]) for s in snap["stages"]] == [(0, 15), (15, 30)]
    assert snap["n_layers"] == 30 and snap["epoch"] == 3 and snap["model"] == rt.model_name
    me, other = snap["stages"]
    assert me["link"] == "self" and me["stage"]["queued_rows"] == 0
    # the faked peer's address (127.0.0.1:1) refuses connections: the page says so instead of failing
    assert other["link"] == "unreachable" and other["error"]


async def test_events_need_the_api_key_like_mesh(rt):
    async with serve(create_app(rt, api_key="sesame")) as url, aiohttp.ClientSession() as s:
        async with s.get(url + "/") as r:
            assert r.status == 200  # the page holds no data; it asks for the key when /events refuses
        async with s.get(url + "/events") as r:
            assert r.status == 401
        snap = await _first_snapshot(url, {"Authorization": "Bearer sesame"})
        assert snap["node_id"] == rt.status()["node_id"]


# ---- the real page in a real browser --------------------------------------------------------
class Browser:
    """Headless Chromium over the DevTools protocol: one page, every network request recorded."""

    def __init__(self, profile: Path):
        self.profile = profile
        self.proc: subprocess.Popen | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.requests: list[str] = []
        self.console: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> Browser:
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",  # tests may run as root, where Chromium's sandbox refuses to start
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                # any name but the loopback daemons resolves nowhere: an external request fails (and is recorded)
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "--window-size=1360,1000",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit code {self.proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20)
        self._reader = asyncio.create_task(self._read())
        await self.call("Network.enable")
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._reader:
            self._reader.cancel()
        if self.ws:
            await self.ws.close()
        if self.session:
            await self.session.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            elif data.get("method") == "Network.requestWillBeSent":
                self.requests.append(data["params"]["request"]["url"])
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"]["args"]
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(data["params"]["exceptionDetails"])[:500])

    async def call(self, method: str, **params: Any) -> dict:
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[i] = fut
        await self.ws.send_json({"id": i, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, 60)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def js(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; console: {self.console[-5:]}")


@pytest.fixture(scope="module")
def mesh3_page(tmp_path_factory):
    m = LoopbackMesh(tmp_path_factory.mktemp("page-mesh"), 3)
    try:
        m.wait_plan([0, 1, 2], 3, timeout=180)
        yield m
    finally:
        m.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make test-tools` installs it as root)")
async def test_page_in_headless_chromium_against_three_daemons(mesh3_page, tmp_path):
    m = mesh3_page
    origin = m.url(0)
    with tempfile.TemporaryDirectory(prefix="meshd-chromium-") as profile:
        async with Browser(Path(profile)) as b:
            await b.call("Page.navigate", url=origin + "/")
            # the ring: three stages, ten layers each, in ring order
            await b.until("document.querySelectorAll('#ring .stage').length === 3", 30, "three stages")
            layers = await b.js("[...document.querySelectorAll('#ring .stage .layers')].map(e => e.textContent)")
            assert layers == ["layers 0–9 (10)", "layers 10–19 (10)", "layers 20–29 (10)"]
            assert await b.js("document.getElementById('state').textContent") == "serving"
            # each other stage's mesh link, as this daemon's link measured it: round trip and bytes each way
            links = await b.until(
                "(() => { const t = [...document.querySelectorAll('#ring .stage .link')].map(e => e.textContent);"
                " return t.filter(x => /rtt [0-9.]+ ms/.test(x)).length === 2 && t; })()",
                30,
                "two links' round trips",
            )
            size = r"[\d.]+ (B|KiB|MiB)"
            shape = rf"link up, rtt [\d.]+ ms, {size} out / {size} in"
            assert sorted(bool(re.fullmatch(shape, x)) for x in links) == [False, True, True], links
            assert "this daemon" in links

            # a live figure: a long request from another peer moves the throughput line and the table
            assert float(await b.js("document.getElementById('throughput').dataset.peak") or 0) == 0
            body = {"messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}]}
            body |= {"max_tokens": 160, "temperature": 0}
            result: dict = {}
            t = threading.Thread(
                target=lambda: result.update(r=http("POST", m.url(2) + "/v1/chat/completions", body, timeout=300))
            )
            t.start()
            try:
                await b.until("document.getElementById('requests').dataset.live === '1'", 60, "a running request")
                peak = await b.until(
                    "Number(document.getElementById('throughput').dataset.peak) > 0 && "
                    "document.getElementById('throughput').dataset.peak",
                    60,
                    "the throughput figure to rise",
                )
                assert float(peak) > 0
                busy = await b.until(
                    "[...document.querySelectorAll('#ring .busy')].some(e => parseInt(e.textContent) > 0)",
                    60,
                    "a stage to show it is busy",
                )
                assert busy
            finally:
                await asyncio.to_thread(t.join, 300)
            assert result["r"][0] == 200, result
            finished = "[...document.querySelectorAll('#requests tbody tr td:last-child')].map(e => e.textContent)"
            assert await b.until(f"{finished}.find(t => t === 'length' || t === 'stop')", 10, "the finished request")

            # the chat box streams: partial text is seen before the answer is done, then its speed
            await b.js(
                "document.getElementById('chat-max').value = 96;"
                "document.getElementById('chat-input').value = 'Name three uses of a lighthouse.';"
                "document.getElementById('chat-form').requestSubmit(); true"
            )
            partial = await b.until(
                "(() => { const m = document.querySelector('.msg.assistant');"
                " return m && m.dataset.state === 'streaming' && m.querySelector('.text').textContent; })()",
                120,
                "streamed text before the end of the answer",
            )
            final = await b.until(
                "(() => { const m = document.querySelector('.msg.assistant');"
                " return m && m.dataset.state !== 'streaming' && [m.dataset.state, m.textContent]; })()",
                300,
                "the end of the answer",
            )
            assert final[0] == "done", final
            assert final[1].startswith(partial) and len(final[1]) > len(partial)
            assert re.search(r"\d+ tokens in [\d.]+ s · [\d.]+ tokens/s here", final[1]), final[1]
            assert "accepted/round" in final[1]

            shot = await b.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            png = base64.b64decode(shot["data"])
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            keep = os.environ.get("MESHD_PAGE_SCREENSHOT")
            (Path(keep) if keep else tmp_path / "page.png").write_bytes(png)

            # nothing but the daemon the page came from was ever asked for anything
            others = [u for u in b.requests if not (u.startswith(origin + "/") or u.startswith("data:"))]
            assert not others, others
            assert any(u == origin + "/events" for u in b.requests)
            errors = [c for c in b.console if c.startswith("exception")]
            assert not errors, errors


async def test_the_feed_fetches_nothing_while_nobody_watches_and_a_first_page_gets_a_fresh_snapshot():
    class Engine:
        calls = 0

        def status(self) -> dict:
            Engine.calls += 1
            return {"node_id": "me", "metrics": {"tokens_total": 10 * Engine.calls}}

    feed = MeshFeed(Engine(), interval=0.02)
    await feed.start()
    try:
        await asyncio.sleep(0.3)  # fifteen intervals: with nobody watching, only the start-up snapshot
        assert Engine.calls == 1
        stale = feed.latest
        feed.watch()
        first = await asyncio.wait_for(feed.next(None), 5)
        assert first is not stale and Engine.calls == 2
        assert first["tokens_per_s"] is None  # a rate needs two readings of this watch, not one from long ago
        second = await asyncio.wait_for(feed.next(first), 5)
        assert second["tokens_per_s"] is not None and second["tokens_per_s"] > 0
        feed.unwatch()
    finally:
        await feed.close()
