"""Bodies and load that used to hurt the REST API: giant stop strings, deep JSON, and more clients than slots.

Before the guard, a 200 KB stop string was accepted (and matched against every new token on the event
loop), 10,000-deep JSON raised RecursionError (a 500), and any number of generations were admitted.
"""

from __future__ import annotations

import asyncio

import aiohttp
from support import FakeRuntime, serve

from meshd.serve.api import create_app
from meshd.serve.guard import MAX_JSON_DEPTH, GuardSettings, RestGuard

CHAT = "/v1/chat/completions"


def chat(**extra) -> dict:
    return {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_huge_stop_strings_get_a_400(url):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + CHAT, json=chat(stop=["x" * 200_000])) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["param"] == "stop"
            assert "1024 bytes" in body["error"]["message"]
        async with s.post(url + CHAT, json=chat(stop=["é" * 300, "z" * 500])) as r:  # 1100 bytes of UTF-8 in all
            assert r.status == 400
        async with s.post(url + CHAT, json=chat(stop=["STOP", "\n\n"])) as r:  # ordinary ones still work
            assert r.status == 200


async def test_deeply_nested_json_gets_a_400_never_a_500(url):
    async with aiohttp.ClientSession() as s:
        for depth in (10_000, 100_000, MAX_JSON_DEPTH + 1):
            body = '{"model": "m", "metadata": ' + "[" * depth + "]" * depth + "}"
            async with s.post(url + CHAT, data=body, headers={"Content-Type": "application/json"}) as r:
                got = await r.json()
                assert r.status == 400, depth
                assert got["error"]["code"] == "invalid_json" and "nested deeper" in got["error"]["message"]
        async with s.get(url + "/health") as r:  # and the daemon is fine
            assert r.status == 200


async def test_overload_gets_429_with_retry_after_and_health_stays_up(embedded_tokenizer):
    rt = FakeRuntime(embedded_tokenizer, delay=0.05)  # each generation takes about a second
    guard = RestGuard(GuardSettings(max_concurrent=2, max_queued=2, queue_timeout=30.0))
    async with serve(create_app(rt, guard=guard)) as url, aiohttp.ClientSession() as s:

        async def one() -> tuple[int, str | None]:
            async with s.post(url + CHAT, json=chat(max_tokens=20)) as r:
                await r.read()
                return r.status, r.headers.get("Retry-After")

        tasks = [asyncio.ensure_future(one()) for _ in range(8)]
        await asyncio.sleep(0.3)  # all eight have arrived: two run, two wait, four are turned away
        async with s.get(url + "/health") as r:
            assert r.status == 200  # not behind the admission queue
        results = await asyncio.gather(*tasks)
        assert sorted(st for st, _ in results) == [200] * 4 + [429] * 4
        assert all(ra == "2" for st, ra in results if st == 429)
        assert guard.rejected == 4 and guard.running == 0 and guard.waiting == 0
        assert len(rt.submitted) == 4  # the refused ones never reached the engine
        async with s.post(url + CHAT, json=chat(max_tokens=2)) as r:  # the slots are free again
            assert r.status == 200
