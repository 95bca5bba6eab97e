"""The soak's verdict per request, against a fake daemon: what counts as completed, failed or hung.

A soak that called a stalled stream "completed", or a stream cut without an error "failed clearly",
would report 0 hung requests whatever the daemons did; so each bucket is checked here on its own.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from meshd.lab.soak import Hung, Tally, one_request

EVENT = b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'


async def stream(request: web.Request, tail: list[bytes], stall: bool = False) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(EVENT)
    if stall:
        await asyncio.sleep(3600)
    for line in tail:
        await resp.write(line)
    await resp.write_eof()
    return resp


def replying(reply):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await reply(request)

    return handler


ROUTES = {
    "done": lambda r: stream(r, [EVENT, b"data: [DONE]\n\n"]),
    "error": lambda r: stream(
        r, [b'data: {"error": {"message": "peer B failed the request"}}\n\n', b"data: [DONE]\n\n"]
    ),
    "cut": lambda r: stream(r, []),
    "stall": lambda r: stream(r, [], stall=True),
    "busy": lambda r: asyncio.sleep(0, web.json_response({"error": {"message": "too many requests"}}, status=429)),
    "html": lambda r: asyncio.sleep(0, web.Response(status=502, text="<html>bad gateway</html>")),
}


class Steady(random.Random):
    """Neither a bad body nor a cancel: ``random()`` is 0.5 (bad bodies below 0.1, cancels below 0.2)."""

    def random(self) -> float:
        return 0.5


@pytest.fixture
async def base():
    app = web.Application()
    for name, handler in ROUTES.items():
        app.router.add_post(f"/{name}/v1/chat/completions", replying(handler))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


@pytest.mark.parametrize(
    ("route", "bucket"),
    [("done", "completed"), ("error", "failed_clear"), ("cut", "failed_unclear"), ("busy", "failed_clear")],
)
async def test_each_ending_lands_in_its_bucket(base, route, bucket):
    tally = Tally()
    async with aiohttp.ClientSession() as s:
        assert await one_request(s, f"{base}/{route}", Steady(0), 5.0, tally) == bucket
    if bucket == "failed_clear":
        assert sum(tally.errors.values()) == 1  # the message is kept, so "clear" can be read, not assumed
    if bucket == "failed_unclear":
        assert tally.unclear


async def test_an_error_without_error_json_is_not_clear(base):
    tally = Tally()
    async with aiohttp.ClientSession() as s:
        assert await one_request(s, f"{base}/html", Steady(0), 5.0, tally) == "failed_unclear"


async def test_a_stream_that_stops_sending_is_hung_after_the_bound(base):
    async with aiohttp.ClientSession() as s:
        with pytest.raises(Hung, match=r"nothing for 0\.5 s"):
            await asyncio.wait_for(one_request(s, f"{base}/stall", Steady(0), 0.5, Tally()), 10)
